# error_vs_budget.gp — attention output error vs KV budget, one line per policy, from a sweep summary:
#   gnuplot -e "in='results/sweep/summary.csv'; out='error_vs_budget.png'" analysis/error_vs_budget.gp
metric = "out_err_mean"
metric_label = "output error ‖o_S − o_full‖ / ‖o_full‖ (mean, log scale)"
plot_title = "Attention output error vs KV budget"
y_log = 1
script_dir = system(sprintf("dirname '%s'", ARG0))
load script_dir . "/vs_budget.gp"
