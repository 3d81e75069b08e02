# reuse_ttft.gp — the distribution of the time to first token under persisted KV caches
# (`kvsim reuse`, docs/reuse.md): from reuse_ttft.csv (101 nearest-rank quantiles per scope x
# capacity x policy x compression ratio), the CDF of TTFT, one panel per scope (`none` drawn
# in every panel as the baseline: nothing cached), one line per policy, at one capacity: the
# largest of the file unless `capacity` (bytes) is given, and uncompressed entries only
# (compress_ratio 1). A line to the left of another: shorter TTFTs (less prefill and less
# queueing behind other prefills).
#   gnuplot -e "in='results/reuse/reuse_ttft.csv'; out='reuse_ttft.png'" analysis/reuse_ttft.gp

script_dir = system(sprintf("dirname '%s'", ARG0))
png_size = "1400,640"
load script_dir . "/common.gp"

col_cmd = "awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == \"%s\") c = i; next }" \
    . " c && %s { print $c }' '%s'"
scopes = system(sprintf("awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == \"scope\") c = i; next }" \
    . " c && $c != \"none\" && !seen[$c]++ { printf \"%%s \", $c }' '%s'", in))
if (words(scopes) == 0) \
    exit error sprintf("%s: expected a scope column and rows of a scope other than none (reuse_ttft.csv)", in)
n_scopes = words(scopes)
if (!exists("capacity")) {
    capacity = system(sprintf("awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == \"capacity_bytes\") c = i; next }" \
        . " c && $c + 0 > m { m = $c + 0 } END { printf \"%%.0f\", m }' '%s'", in))
}

# The header and the rows of policy p in scope s at the capacity, uncompressed.
rows_cmd = "< awk -F, -v p='%s' -v s='%s' -v cap='%s' 'NR == 1 { for (i = 1; i <= NF; i++) {" \
    . " if ($i == \"policy\") c = i; if ($i == \"scope\") sc = i; if ($i == \"capacity_bytes\") cb = i;" \
    . " if ($i == \"compress_ratio\") q = i } }" \
    . " NR == 1 || ($c == p && $sc == s && $cb == cap && (!q || $q == 1))' '%s'"
rows(p, s) = sprintf(rows_cmd, p, s, capacity, in)

left = 0.07
right = 0.84
width = (right - left) / n_scopes
set multiplot title titled(sprintf("TTFT CDF at %.3g GiB of device cache (kvsim reuse)", capacity / 2.0**30)) font ",15"
set xlabel "time to first token (s, log scale)"
set logscale x 10
set format x "%g"
set yrange [0:1.02]
set tmargin at screen panels_top(0.87)
set bmargin at screen 0.13
do for [m = 1:n_scopes] {
    set lmargin at screen left + (m - 1) * width + 0.02
    set rmargin at screen left + m * width - 0.015
    set title sprintf("scope = %s", word(scopes, m)) font ",13"
    if (m == 1) { set ylabel "share of requests" } else { unset ylabel }
    if (m == n_scopes) { set key at screen 0.99, screen 0.5 right center title "policy" } else { unset key }
    plot for [i = 1:n_policies] (word(policies, i) eq "none" ? rows("none", "none") : rows(word(policies, i), word(scopes, m))) \
        using (column("ttft_s") > 0 ? column("ttft_s") : 1/0):"quantile" with lines \
        linetype policy_linetype(word(policies, i)) linewidth 2 title word(policies, i)
}
unset multiplot
unset output
