# mass_heatmap.gp — retained attention mass per layer (x) and policy (y, in the file's order),
# from one run's layers.csv; every cell is labelled with its value when there are at most 16
# layers:
#   gnuplot -e "in='results/ta512/layers.csv'; out='mass_heatmap.png'" analysis/mass_heatmap.gp

script_dir = system(sprintf("dirname '%s'", ARG0))
load script_dir . "/common.gp"

# Row of policy s: its rank in `policies` (recursion depth = number of policies).
policy_row(s, i) = i > n_policies ? NaN : (word(policies, i) eq s ? i : policy_row(s, i + 1))
row_of(s) = policy_row(s, 1)

stats in using "layer" nooutput
first_layer = STATS_min
last_layer = STATS_max
stats in using "mass_mean" nooutput
mass_min = STATS_min

set title titled("Retained attention mass per layer and policy (mean over decode steps and query heads)")
set xlabel "layer"
set ylabel "policy"
set xrange [first_layer - 0.5 : last_layer + 0.5]
set yrange [n_policies + 0.5 : 0.5]
set xtics 1 out nomirror
if (last_layer - first_layer > 24) { set xtics 4 }
set ytics () out nomirror
do for [i = 1:n_policies] { set ytics add (word(policies, i) i) }
set grid noxtics noytics
unset key
set palette defined (0 "#440154", 0.25 "#3b528b", 0.5 "#21918c", 0.75 "#5ec962", 1 "#fde725")
set cbrange [mass_min : 1]
set cblabel "retained mass (fraction of the full attention row)"
set style fill solid 1.0 noborder

label_cells = last_layer - first_layer < 16
cell_text(v) = v == v ? sprintf("%.2f", v) : ""
# Dark text on the bright (high) half of the palette, white on the dark half.
cell_color(v) = v > (mass_min + 1) / 2 ? 0x000000 : 0xffffff

if (label_cells) {
    plot in using "layer":(row_of(strcol("policy"))):(0.5):(0.5):"mass_mean" \
             with boxxyerror fillcolor palette, \
         in using "layer":(row_of(strcol("policy"))):(cell_text(column("mass_mean"))):(cell_color(column("mass_mean"))) \
             with labels textcolor rgb variable font ",10"
} else {
    plot in using "layer":(row_of(strcol("policy"))):(0.5):(0.5):"mass_mean" \
             with boxxyerror fillcolor palette
}
unset output
