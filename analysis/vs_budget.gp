# vs_budget.gp — one summary metric against the KV budget, one line per policy, from the
# concatenated sweep summary (results/sweep/summary.csv: a `budget` column and summary.csv's).
# Loaded by the *_vs_budget.gp scripts, which set `metric` (a column name), `metric_label`
# (the y axis) and `plot_title`, and optionally `y_range` (e.g. "[0:1]"), `y_log` (1: log10
# y axis; zeros, such as `full`'s output error, then have no point) and `metric_lo`,
# `metric_hi` (the columns of a 95% interval, drawn as error bars; the points of the policies
# are then shifted apart by a few percent of a budget step so that their bars do not overlap).
# Lines that coincide everywhere get a note under the plot naming them.

load script_dir . "/common.gp"

set title titled(plot_title)
set xlabel "KV budget (tokens per KV head, log2 scale)"
set ylabel metric_label
set logscale x 2
set format x "%.0f"
set offsets graph 0.03, graph 0.03, 0, 0
if (exists("y_range")) { eval "set yrange " . y_range }
if (exists("y_log") && y_log) { set logscale y 10 }

# A metric that is empty throughout (needle survival on a trace without needles) gives an empty
# frame that says so, rather than no file.
if (value_count(metric) == 0) {
    set label 1 sprintf("no value: %s is empty in every row of %s", metric, in) at graph 0.5, 0.5 center
    unset logscale y
    unset key
    set xrange [64:1024]
    set yrange [0:1]
    plot -1 notitle
    exit
}

note = coinciding(metric)
if (note ne "") {
    set label 2 sprintf("lines drawn on top of each other (within 0.2%% at every budget): %s", note) \
        at screen 0.01, screen 0.015 left font ",10"
    set bmargin 5
}

# A policy without any value (oracle_future in an eval table: not applicable) has no line.
plotted = policies_with_values(metric)
if (exists("metric_lo") && exists("metric_hi")) {
    dodge(i) = 2 ** ((i - (words(plotted) + 1) / 2.0) * 0.025)
    plot for [i = 1:words(plotted)] rows(word(plotted, i)) \
        using (column("budget") * dodge(i)):(column(metric)):(column(metric_lo)):(column(metric_hi)) \
        with yerrorlines linetype policy_linetype(word(plotted, i)) title word(plotted, i)
} else {
    plot for [i = 1:words(plotted)] rows(word(plotted, i)) using "budget":(column(metric)) \
        with linespoints linetype policy_linetype(word(plotted, i)) title word(plotted, i)
}
