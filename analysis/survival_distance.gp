# survival_distance.gp — needle survival by turn distance at a conversation's last turn, from
# the turns.csv of runs in several history modes concatenated with a leading `history` column
# (`make conversation` writes it): one panel per history mode, in order of first appearance, one
# line per policy. At the last turn, distance d is the survival of the needles delivered d turns
# earlier (turns.csv's needle_survival_dD; docs/metrics.md), measured at that turn's probes: what
# of a fact a policy still holds when a question about it can come. With persist the policy's
# cache has carried the needle through every turn since; with reencode the whole history was
# compressed once more at the last turn.
#   gnuplot -e "in='results/conversation/turns.csv'; out='survival_distance.png'" analysis/survival_distance.gp

script_dir = system(sprintf("dirname '%s'", ARG0))
png_size = "1600,700"
load script_dir . "/common.gp"

modes_cmd = "awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == \"history\") c = i; next }" \
    . " c && !seen[$c]++ { printf \"%%s \", $c }' '%s'"
modes = system(sprintf(modes_cmd, in))
if (words(modes) == 0) \
    exit error sprintf("%s: expected a history column (turns.csv of each mode with its mode first)", in)
n_modes = words(modes)

# The distances the table has columns for (needle_survival_d0, _d1, ...).
n_dist = int(system(sprintf("awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i ~ /^needle_survival_d[0-9]+$/) n++; print n + 0; exit }' '%s'", in)))
if (n_dist == 0) exit error sprintf("%s: expected needle_survival_dD columns (turns.csv)", in)

# Policy p's last-turn row in mode h, as "distance,survival" rows (empty survival: no needle at
# that distance, left out).
last_turn_cmd = "< awk -F, -v p='%s' -v h='%s' 'NR == 1 { for (i = 1; i <= NF; i++) {" \
    . " if ($i == \"policy\") c = i; if ($i == \"history\") hc = i; if ($i == \"turn\") tc = i;" \
    . " if ($i ~ /^needle_survival_d[0-9]+$/) { d = substr($i, 18); col[d] = i; if (d + 1 > nd) nd = d + 1 } }" \
    . " print \"distance,survival\"; next }" \
    . " $c == p && $hc == h && ($tc + 0 >= last) { last = $tc + 0; row = $0 }" \
    . " END { n = split(row, f, \",\"); for (d = 0; d < nd; d++) if (f[col[d]] != \"\") print d \",\" f[col[d]] }' '%s'"
last_turn(p, h) = sprintf(last_turn_cmd, p, h, in)

left = 0.06
right = 0.84
width = (right - left) / n_modes

# The lines drawn on top of each other in each panel (common.gp: coinciding), named below it:
# each policy's last-turn survival at every distance, as rows "policy,survival".
mode_table_cmd = "awk -F, -v h='%s' 'NR == 1 { for (i = 1; i <= NF; i++) {" \
    . " if ($i == \"policy\") c = i; if ($i == \"history\") hc = i; if ($i == \"turn\") tc = i;" \
    . " if ($i ~ /^needle_survival_d[0-9]+$/) col[++nd] = i } print \"policy,survival\"; next }" \
    . " $hc == h { if (!($c in last)) order[++n] = $c;" \
    . " if (!($c in last) || $tc + 0 >= last[$c]) { last[$c] = $tc + 0; row[$c] = $0 } }" \
    . " END { for (i = 1; i <= n; i++) { split(row[order[i]], f, \",\");" \
    . " for (d = 1; d <= nd; d++) print order[i] \",\" f[col[d]] } }' '%s'"
note = ""
do for [m = 1:n_modes] {
    note = panel_note(note, word(modes, m), \
                      coinciding_in("survival", sprintf(mode_table_cmd, word(modes, m), in)))
}
if (note ne "") {
    set label 2 sprintf("lines drawn on top of each other (within 0.2%% at every distance): %s", note) \
        at screen 0.01, screen 0.02 left font ",10"
}

set multiplot title titled("Needle survival at the last turn, by turns since the needle was delivered") font ",15"
set xlabel "turn distance"
set xtics 1
set xrange [-0.25:n_dist - 0.75]
set yrange [0:1.05]
set tmargin at screen panels_top(0.88)
set bmargin at screen 0.12
do for [m = 1:n_modes] {
    set lmargin at screen left + (m - 1) * width + 0.015
    set rmargin at screen left + m * width - 0.015
    set title sprintf("history = %s", word(modes, m)) font ",13"
    if (m == 1) { set ylabel "needle survival at the last turn's probes" } else { unset ylabel }
    if (m == n_modes) { set key at screen 0.99, screen 0.5 right center title "policy" } else { unset key }
    plot for [i = 1:n_policies] last_turn(word(policies, i), word(modes, m)) \
        using "distance":"survival" with linespoints linetype i title word(policies, i)
    unset label 2 # drawn once
}
unset multiplot
unset output
