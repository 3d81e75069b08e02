# dataset.gp — a dataset of traces at a glance (`kvsim run` over many traces): for one summary
# column (`metric`, default mass_mean), each policy's mean over the traces with its 95%
# bootstrap interval (dataset.csv), and its paired difference to the reference policy with
# that interval (paired.csv beside it, when there is one), as points and bars (from 0) with
# error bars; under each
# policy's name its mean cache size (cache_tokens_mean):
#   gnuplot -e "in='results/dataset/dataset.csv'; out='dataset.png'" analysis/dataset.gp

script_dir = system(sprintf("dirname '%s'", ARG0))
png_size = "1280,900"
load script_dir . "/common.gp"

if (!exists("metric")) metric = "mass_mean"
paired = system(sprintf("dirname '%s'", in)) . "/paired.csv"
has_paired = system(sprintf("test -r '%s' && echo yes", paired)) eq "yes"

# One row per policy, in file order: policy, cache tokens, mean, lo, hi (of `metric`), then the
# paired difference's mean, lo, hi (empty without paired.csv or for the reference).
wide_cmd = "< awk -F, -v m='%s' 'FILENAME != ARGV[1] { if (FNR > 1 && $3 == m) d[$1] = $5 \",\" $6 \",\" $7; next }" \
    . " FNR == 1 { next } $3 == m { order[++n] = $1; v[$1] = $5 \",\" $6 \",\" $7 }" \
    . " $3 == \"cache_tokens_mean\" { c[$1] = $5 }" \
    . " END { print \"policy,cache,mean,lo,hi,dmean,dlo,dhi\"; for (i = 1; i <= n; i++) { p = order[i];" \
    . " print p \",\" c[p] \",\" v[p] \",\" (p in d ? d[p] : \",,\") } }' '%s' %s"
wide = sprintf(wide_cmd, metric, in, has_paired ? "'" . paired . "'" : "")
traces = system(sprintf("awk -F, 'NR == 2 { print $4 }' '%s'", in))
reference = has_paired ? system(sprintf("awk -F, 'NR == 2 { print $2 }' '%s'", paired)) : ""

label(s, c) = sprintf("%s (%.0f tok)", s, c)
set style fill solid 0.8 border -1
set boxwidth 0.7
set xtics rotate by -35 left nomirror
set grid noxtics ytics
unset key
set xrange [0.3 : n_policies + 0.7]

set multiplot layout (has_paired ? 2 : 1), 1 title \
    titled(sprintf("%s over a dataset of %s traces: means with 95%% bootstrap intervals", metric, traces)) font ",15"
set title sprintf("mean of %s over the traces", metric) font ",13"
set ylabel metric
# points, not bars: a bar would start at the axis, which is not at 0
plot wide using (column(0) + 1):(column("mean")):(column("lo")):(column("hi")):xticlabels(label(strcol("policy"), column("cache"))) \
        with yerrorbars linecolor rgb "#000000" pointtype 7 pointsize 0.6
if (has_paired) {
    set title sprintf("paired difference to %s, trace by trace (policy - %s)", reference, reference) font ",13"
    set ylabel sprintf("%s difference", metric)
    plot wide using (column(0) + 1):(column("dmean")) with boxes linecolor rgb "#E69F00", \
         wide using (column(0) + 1):(column("dmean")):(column("dlo")):(column("dhi")):xticlabels(label(strcol("policy"), column("cache"))) \
            with yerrorbars linecolor rgb "#000000" pointtype 7 pointsize 0.6, \
         0 with lines linecolor rgb "#444444" dashtype 2
}
unset multiplot
unset output
