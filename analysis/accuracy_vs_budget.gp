# accuracy_vs_budget.gp — exact-answer accuracy (`kvsim eval`, the model decoding with each
# policy evicting from its live KV cache) vs KV budget, one line per policy, from the sweep's
# concatenated eval table:
#   gnuplot -e "in='results/sweep/eval.csv'; out='accuracy_vs_budget.png'" analysis/accuracy_vs_budget.gp
# Policies that do not apply in closed loop (oracle_future: empty fields) have no line. The
# error bars are the Wilson 95% intervals of eval.csv (accuracy_lo, accuracy_hi).
metric = "accuracy"
metric_lo = "accuracy_lo"
metric_hi = "accuracy_hi"
metric_label = "exact-answer accuracy over the held-out prompts"
plot_title = "Answer accuracy vs KV budget (kvsim eval)"
y_range = "[0:1.02]"
script_dir = system(sprintf("dirname '%s'", ARG0))
load script_dir . "/vs_budget.gp"
