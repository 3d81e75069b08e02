# reuse.gp — persisted KV caches under a request stream (`kvsim reuse`, docs/reuse.md): the token
# hit rate (prompt tokens served from a persisted cache / prompt tokens) against the cache's
# capacity, from reuse.csv, one panel per scope (in order of first appearance; `none` caches
# nothing and is left out), one line per replacement policy. belady is the oracle (it knows the
# log's future): the gap between it and a policy is what a better policy could still gain. In
# the conversation scope the other policies often coincide (a conversation's cache serves only
# its next turn, so the order of evictions matters little): their lines then lie on one another.
# Conversation entries persisted compressed (kvsim reuse --compress) get a panel per ratio
# (conversation@0.25: a quarter of the bytes, the same tokens served, at a cost in quality).
# With lru_curve.csv beside reuse.csv (--lru-curve), the prefix panel also draws the exact lru
# curve at every capacity from one pass (dashed, black): the replays' lru points lie on it.
#   gnuplot -e "in='results/reuse/reuse.csv'; out='reuse.png'" analysis/reuse.gp

script_dir = system(sprintf("dirname '%s'", ARG0))
png_size = "1400,640"
load script_dir . "/common.gp"

# A panel's label: the scope, and for compressed conversation entries (compress_ratio < 1,
# kvsim reuse --compress) the scope and the ratio, e.g. conversation@0.25.
label_awk = "function label() { return (q && $q != 1) ? $sc \"@\" $q : $sc }" \
    . " NR == 1 { for (i = 1; i <= NF; i++) { if ($i == \"scope\") sc = i;" \
    . " if ($i == \"policy\") c = i; if ($i == \"compress_ratio\") q = i } }"
scopes_cmd = "awk -F, '" . label_awk . " NR > 1 && sc && $sc != \"none\" && !seen[label()]++ { printf \"%%s \", label() }' '%s'"
scopes = system(sprintf(scopes_cmd, in))
if (words(scopes) == 0) \
    exit error sprintf("%s: expected a scope column and rows of a scope other than none (reuse.csv)", in)
n_scopes = words(scopes)

# The header and the rows of policy p in scope s.
scope_rows_cmd = "< awk -F, -v p='%s' -v s='%s' '" . label_awk . " NR == 1 || ($c == p && label() == s)' '%s'"
scope_rows(p, s) = sprintf(scope_rows_cmd, p, s, in)
plotted = ""
do for [i = 1:n_policies] { if (word(policies, i) ne "none") { plotted = plotted . word(policies, i) . " " } }

# The exact lru curve of the prefix scope (kvsim reuse --lru-curve writes lru_curve.csv beside
# reuse.csv), drawn in the prefix panel over the capacities of reuse.csv when it is there.
curve_file = system(sprintf("d=$(dirname '%s'); [ -r \"$d/lru_curve.csv\" ] && printf '%%s' \"$d/lru_curve.csv\"", in))
cap_range = system(sprintf("awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == \"capacity_bytes\") c = i; next }" \
    . " c { v = $c + 0; if (n++ == 0 || v < lo) lo = v; if (v > hi) hi = v } END { printf \"%%.0f %%.0f\", lo, hi }' '%s'", in))
cap_lo = word(cap_range, 1) / 2.0**30
cap_hi = word(cap_range, 2) / 2.0**30

left = 0.07
right = 0.84
width = (right - left) / n_scopes
set multiplot title titled("Token hit rate of persisted KV caches vs capacity (kvsim reuse)") font ",15"
set xlabel "capacity (GiB, log2 scale)"
set logscale x 2
set yrange [0:1.02]
set tmargin at screen panels_top(0.87)
set bmargin at screen 0.13
do for [m = 1:n_scopes] {
    set lmargin at screen left + (m - 1) * width + 0.02
    set rmargin at screen left + m * width - 0.015
    set title sprintf("scope = %s", word(scopes, m)) font ",13"
    if (m == 1) { set ylabel "token hit rate" } else { unset ylabel }
    if (m == n_scopes) { set key at screen 0.99, screen 0.5 right center title "policy" } else { unset key }
    if (word(scopes, m) eq "prefix" && curve_file ne "" && cap_lo > 0 && cap_hi > cap_lo) {
        set xrange [cap_lo / 1.2 : cap_hi * 1.2]
        plot for [i = 1:words(plotted)] scope_rows(word(plotted, i), word(scopes, m)) \
            using (column("capacity_bytes") / 2.0**30):"token_hit_rate" with linespoints \
            linetype policy_linetype(word(plotted, i)) title word(plotted, i), \
            curve_file using (column("capacity_bytes") / 2.0**30):"token_hit_rate" with lines \
            dashtype 2 linecolor rgb "black" title "lru, one pass"
        set autoscale x
    } else {
        plot for [i = 1:words(plotted)] scope_rows(word(plotted, i), word(scopes, m)) \
            using (column("capacity_bytes") / 2.0**30):"token_hit_rate" with linespoints \
            linetype policy_linetype(word(plotted, i)) title word(plotted, i)
    }
}
unset multiplot
unset output
