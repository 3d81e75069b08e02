# memory_vs_step.gp — device and host KV memory against the decode step, one line per policy,
# from one run's steps.csv (bytes summed over layers), in two panels sharing the x axis (device
# on a log2 scale, host linear since most policies have none):
#   gnuplot -e "in='results/ta512/steps.csv'; out='memory_vs_step.png'" analysis/memory_vs_step.gp

script_dir = system(sprintf("dirname '%s'", ARG0))
png_size = "1280,960"
load script_dir . "/common.gp"

mib = 1024.0 * 1024.0
# Points every eighth of the decode so that overlapping lines stay distinguishable.
stats rows(word(policies, 1)) using "decode_index" nooutput
point_every = STATS_records > 16 ? int(STATS_records / 8) : 1

note = coinciding("device_bytes")
if (note ne "") {
    set label 2 sprintf("device memory, within 0.2%% at every step: %s", note) \
        at screen 0.01, screen 0.015 left font ",10"
}
set multiplot title titled("KV-cache memory per decode step (all layers and KV heads)") font ",15"
set lmargin at screen 0.09
set rmargin at screen 0.78
set xlabel "decode step (tokens generated since the prompt)"
set yrange [0:*]
set autoscale xfix

set tmargin at screen 0.88
set bmargin at screen 0.56
# Log scale: the full cache is many times the budgeted ones, which would otherwise merge.
set title "device (accelerator) tier" font ",13"
set ylabel "device memory (MiB, log2 scale)"
set logscale y 2
set yrange [*:*]
set key at screen 0.99, screen 0.5 right center
plot for [i = 1:n_policies] rows(word(policies, i)) \
    using "decode_index":(column("device_bytes") / mib) \
    with linespoints linetype i pointinterval point_every title word(policies, i)

set tmargin at screen 0.43
set bmargin at screen 0.08
set title "host (second) tier" font ",13"
unset logscale y
set yrange [0:*]
set ylabel "host memory (MiB)"
unset key
plot for [i = 1:n_policies] rows(word(policies, i)) \
    using "decode_index":(column("host_bytes") / mib) \
    with linespoints linetype i pointinterval point_every notitle
unset multiplot
unset output
