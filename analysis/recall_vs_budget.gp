# recall_vs_budget.gp — recall@k vs KV budget, one line per policy, from a sweep summary:
#   gnuplot -e "in='results/sweep/summary.csv'; out='recall_vs_budget.png'" analysis/recall_vs_budget.gp
metric = "recall_mean"
metric_label = "recall@k (share of the query's top-k keys cached, mean)"
plot_title = "Recall@k vs KV budget"
y_range = "[0:1.02]"
script_dir = system(sprintf("dirname '%s'", ARG0))
load script_dir . "/vs_budget.gp"
