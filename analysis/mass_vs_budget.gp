# mass_vs_budget.gp — retained attention mass vs KV budget, one line per policy, from a sweep summary:
#   gnuplot -e "in='results/sweep/summary.csv'; out='mass_vs_budget.png'" analysis/mass_vs_budget.gp
metric = "mass_mean"
metric_label = "retained attention mass (fraction of the full row, mean)"
plot_title = "Retained attention mass vs KV budget"
y_range = "[0:1.02]"
script_dir = system(sprintf("dirname '%s'", ARG0))
load script_dir . "/vs_budget.gp"
