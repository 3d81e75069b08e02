# eval_distance.gp — answers in a conversation by turn distance (the turns between the fact a
# question asks about and the question), from the eval_turns.csv of `kvsim eval` runs in several
# history modes concatenated (`make conversation` writes it; every row carries its `history`):
# one panel per history mode, in order of first appearance, one line per policy, the share of
# questions at each distance answered exactly. Distance 0 asks about the turn just delivered;
# what a policy evicted in earlier turns shows at larger distances, under persist (the
# compressed cache is kept) as under reencode (the history is compressed anew at every turn).
#   gnuplot -e "in='results/conversation/eval_turns.csv'; out='eval_distance.png'" analysis/eval_distance.gp

script_dir = system(sprintf("dirname '%s'", ARG0))
png_size = "1600,700"
load script_dir . "/common.gp"

# The history modes in order of first appearance; a table without the columns is not this plot's.
modes_cmd = "awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) { if ($i == \"history\") c = i;" \
    . " if ($i == \"by\") b = i } next } c && b && $b == \"distance\" && !seen[$c]++" \
    . " { printf \"%%s \", $c }' '%s'"
modes = system(sprintf(modes_cmd, in))
if (words(modes) == 0) \
    exit error sprintf("%s: expected history and by columns and rows by distance (eval_turns.csv of a conversation whose answers give the facts' turns)", in)
n_modes = words(modes)

# The header and the by-distance rows of policy p in history mode h.
mode_rows_cmd = "< awk -F, -v p='%s' -v h='%s' 'NR == 1 { for (i = 1; i <= NF; i++) {" \
    . " if ($i == \"policy\") c = i; if ($i == \"history\") hc = i; if ($i == \"by\") b = i } }" \
    . " NR == 1 || ($c == p && $hc == h && $b == \"distance\")' '%s'"
mode_rows(p, h) = sprintf(mode_rows_cmd, p, h, in)

# Policies that do not apply in closed loop (oracle_future: empty fields) have no line.
plotted = policies_with_values("accuracy")

# The lines drawn on top of each other in each panel (common.gp: coinciding), named below it.
mode_table_cmd = "awk -F, -v h='%s' 'NR == 1 { for (i = 1; i <= NF; i++) {" \
    . " if ($i == \"history\") hc = i; if ($i == \"by\") b = i } }" \
    . " NR == 1 || ($hc == h && $b == \"distance\")' '%s'"
note = ""
do for [m = 1:n_modes] {
    note = panel_note(note, word(modes, m), \
                      coinciding_in("accuracy", sprintf(mode_table_cmd, word(modes, m), in)))
}
if (note ne "") {
    set label 2 sprintf("lines drawn on top of each other (within 0.2%% at every distance): %s", note) \
        at screen 0.01, screen 0.02 left font ",10"
}

left = 0.06
right = 0.84
width = (right - left) / n_modes

set multiplot title titled("Exact answers by turn distance, the turns between a fact and its question (kvsim eval)") font ",15"
set xlabel "turn distance"
set xtics 1
set autoscale xfix
set offsets 0.25, 0.25, 0, 0
set yrange [0:1.05]
set tmargin at screen panels_top(0.88)
set bmargin at screen 0.12
do for [m = 1:n_modes] {
    set lmargin at screen left + (m - 1) * width + 0.015
    set rmargin at screen left + m * width - 0.015
    set title sprintf("history = %s", word(modes, m)) font ",13"
    if (m == 1) { set ylabel "share of questions answered exactly" } else { unset ylabel }
    if (m == n_modes) { set key at screen 0.99, screen 0.5 right center title "policy" } else { unset key }
    plot for [i = 1:words(plotted)] mode_rows(word(plotted, i), word(modes, m)) \
        using "value":"accuracy" with linespoints linetype policy_linetype(word(plotted, i)) \
        title word(plotted, i)
    unset label 2 # drawn once
}
unset multiplot
unset output
