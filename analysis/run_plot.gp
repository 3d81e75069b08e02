# run_plot.gp — one run at a glance: retained mass, recall@k and needle survival of every
# policy as grouped bars, from that run's summary.csv (an empty field leaves a gap); under each
# policy's name its mean cache size (cache_tokens_mean), so that bars of policies holding
# different amounts are read as such:
#   gnuplot -e "in='results/baselines/summary.csv'; out='results/baselines/plot.png'" analysis/run_plot.gp

script_dir = system(sprintf("dirname '%s'", ARG0))
load script_dir . "/common.gp"

set title titled(sprintf("Per-policy retention: %s (means over layers, decode steps and heads)", in))
set ylabel "fraction (0 to 1)"
set yrange [0:1.15]
set ytics 0, 0.1, 1
set grid noxtics ytics
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set xtics rotate by -35 left nomirror
set bmargin 6
set key inside top center horizontal noreverse Right nobox

plot in using (column("mass_mean")):xticlabels(sprintf("%s (%.0f tok)", strcol("policy"), column("cache_tokens_mean"))) linecolor rgb "#1f77b4" \
        title "retained attention mass", \
     in using (column("recall_mean")) linecolor rgb "#ff7f0e" title "recall@k", \
     in using (column("needle_survival_mean")) linecolor rgb "#2ca02c" title "needle survival"
unset output
