# cache_vs_budget.gp — mean cache size (tokens per KV head) vs KV budget, one line per policy,
# from a sweep summary: what each policy really holds at a nominal budget, to read next to the
# other *_vs_budget plots (kvsim run warns when the policies' caches differ by more than 5%):
#   gnuplot -e "in='results/sweep/summary.csv'; out='cache_vs_budget.png'" analysis/cache_vs_budget.gp
metric = "cache_tokens_mean"
metric_label = "mean cache size (tokens per KV head, log scale)"
y_log = 1
plot_title = "Cache size vs KV budget (what each policy holds)"
script_dir = system(sprintf("dirname '%s'", ARG0))
load script_dir . "/vs_budget.gp"
