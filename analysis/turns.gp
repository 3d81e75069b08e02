# turns.gp — a conversation turn by turn, from the turns.csv of runs in several history modes
# concatenated with a leading `history` column (`make conversation` writes it), in two panels
# sharing the x axis (the turn, 0 for the prompt):
#   top: the tokens each turn's prefill computes, one line per history mode (a turn's prefill
#        costs the same for every policy: the first policy's rows are drawn), on a log scale
#        since a persisted cache computes a few tokens where reencoding computes the whole
#        history;
#   bottom: the retained attention mass of each policy's decode in each turn, under the first
#        history mode of the file (persist in `make conversation`): what the compressed cache
#        carried into later turns costs their questions.
#   gnuplot -e "in='results/conversation/turns.csv'; out='turns.png'" analysis/turns.gp

script_dir = system(sprintf("dirname '%s'", ARG0))
png_size = "1280,960"
load script_dir . "/common.gp"

# The history modes in order of first appearance; a table without the column is not this plot's.
modes_cmd = "awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == \"history\") c = i; next }" \
    . " c && !seen[$c]++ { printf \"%%s \", $c }' '%s'"
modes = system(sprintf(modes_cmd, in))
if (words(modes) == 0) \
    exit error sprintf("%s: expected a history column (turns.csv of each mode with its mode first)", in)
n_modes = words(modes)

# The header and the rows of policy p in history mode h (a line is broken at every row a filter
# rejects, so each pair is read on its own, as common.gp's rows(p) does).
mode_rows_cmd = "< awk -F, -v p='%s' -v h='%s' 'NR == 1 { for (i = 1; i <= NF; i++) {" \
    . " if ($i == \"policy\") c = i; if ($i == \"history\") hc = i } }" \
    . " NR == 1 || ($c == p && $hc == h)' '%s'"
mode_rows(p, h) = sprintf(mode_rows_cmd, p, h, in)

# Mode lines keep colors apart from the policies': the last line types of the cycle.
mode_linetype(i) = 17 - i

set multiplot title titled("A conversation turn by turn: prefill cost and retained attention") font ",15"
set lmargin at screen 0.09
set rmargin at screen 0.78
set xlabel "turn (0: the prompt)"
set xtics 1
set autoscale xfix
set offsets 0.25, 0.25, 0, 0

set tmargin at screen 0.88
set bmargin at screen 0.56
set title "tokens computed by each turn's prefill" font ",13"
set ylabel "prefill tokens (log10 scale)"
set logscale y 10
set key at screen 0.99, screen 0.72 right center title "history"
plot for [i = 1:n_modes] mode_rows(word(policies, 1), word(modes, i)) \
    using "turn":"prefill_tokens" with linespoints linetype mode_linetype(i) title word(modes, i)

set tmargin at screen 0.43
set bmargin at screen 0.08
set title sprintf("retained attention mass of each turn's decode (history = %s)", word(modes, 1)) \
    font ",13"
unset logscale y
set yrange [0:1.05]
set ylabel "retained mass (mean over layers, steps, heads)"
set key at screen 0.99, screen 0.26 right center title "policy"
plot for [i = 1:n_policies] mode_rows(word(policies, i), word(modes, 1)) \
    using "turn":"mass_mean" with linespoints linetype i title word(policies, i)
unset multiplot
unset output
