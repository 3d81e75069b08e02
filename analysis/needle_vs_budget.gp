# needle_vs_budget.gp — needle survival vs KV budget, one line per policy, from a sweep summary:
#   gnuplot -e "in='results/sweep/summary.csv'; out='needle_vs_budget.png'" analysis/needle_vs_budget.gp
metric = "needle_survival_mean"
metric_label = "needle survival (share of needle tokens cached, mean)"
plot_title = "Needle survival vs KV budget"
y_range = "[0:1.02]"
script_dir = system(sprintf("dirname '%s'", ARG0))
load script_dir . "/vs_budget.gp"
