# common.gp — loaded first by every plot script of analysis/: checks the `in` and `out`
# variables and that the input is readable (exiting with an error, hence a non-zero status,
# otherwise), opens the PNG, reads the policies of the `policy` column in order of first
# appearance into `policies`, gives policy i line type i (a distinct color and point), and
# defines rows(p), a data source holding the header and the rows of policy p only: gnuplot
# would break a line at every row a filter rejects, so each policy is read on its own.

if (!exists("in") || !exists("out")) \
    exit error "usage: gnuplot -e \"in='FILE.csv'; out='PLOT.png'\" SCRIPT.gp"
if (system(sprintf("test -f '%s' -a -r '%s' && echo readable", in, in)) ne "readable") \
    exit error sprintf("%s: cannot read the input file", in)

policy_list_cmd = "awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == \"policy\") c = i; next }" \
    . " c && !seen[$c]++ { printf \"%%s \", $c }' '%s'"
policies = system(sprintf(policy_list_cmd, in))
if (words(policies) == 0) \
    exit error sprintf("%s: expected a header with a policy column and at least one row", in)
n_policies = words(policies)

rows_cmd = "< awk -F, -v p='%s' 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == \"policy\") c = i }" \
    . " NR == 1 || $c == p' '%s'"
rows(p) = sprintf(rows_cmd, p, in)

# Number of values of column `name`: fields that are not empty (kvsim writes a value that
# does not apply as an empty field).
values_cmd = "awk -F, -v name='%s' 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == name) c = i; next }" \
    . " c && $c != \"\" { n++ } END { print n + 0 }' '%s'"
value_count(name) = int(system(sprintf(values_cmd, name, in)))

# The policies (in order of first appearance) with at least one value of column `name`, and
# the line type of a policy (its place in `policies`, so that it keeps its color when others
# are left out of a plot).
with_values_cmd = "awk -F, -v name='%s' 'NR == 1 { for (i = 1; i <= NF; i++) { if ($i == name) c = i;" \
    . " if ($i == \"policy\") pc = i } next } c && $c != \"\" && !seen[$pc]++" \
    . " { printf \"%%s \", $pc }' '%s'"
policies_with_values(name) = system(sprintf(with_values_cmd, name, in))
policy_linetype(p) = words(substr(" " . policies . " ", 1, strstrt(" " . policies . " ", " " . p . " "))) + 1

set datafile separator ","
# An empty field is a value that does not apply. gnuplot 5.4 already skips one read as a column
# (`using "x":"y"`), but inside an expression (`using 1:(column("y") / 2)`) it is NaN, which
# would break the line there; `missing NaN` makes every NaN, hence every empty field in any
# `using` form, a missing point (skipped, the line drawn on through it).
set datafile missing NaN
# A script may set png_size ("width,height" in pixels) before loading this file. `format` (set
# with -e, `make plots FORMAT=...`) picks the output: png (default), pdf (pdfcairo, the same
# size at 100 pixels per inch) or svg (the same size in pixels).
if (!exists("png_size")) png_size = "1280,760"
if (!exists("format")) format = "png"
png_w = real(substr(png_size, 1, strstrt(png_size, ",") - 1))
png_h = real(substr(png_size, strstrt(png_size, ",") + 1, strlen(png_size)))
if (format eq "png") {
    eval "set terminal pngcairo noenhanced font 'sans,12' linewidth 1.5 size " . png_size
} else {
    if (format eq "pdf") {
        eval sprintf("set terminal pdfcairo noenhanced font 'sans,9' linewidth 1.5 size %gin,%gin", png_w / 100, png_h / 100)
    } else {
        if (format eq "svg") {
            eval sprintf("set terminal svg noenhanced font 'sans,12' linewidth 1.5 size %d,%d", int(png_w), int(png_h))
        } else {
            exit error sprintf("format = '%s': expected png, pdf or svg", format)
        }
    }
}
set output out

# Sixteen line types a colour-blind reader can tell apart: the eight colours of Okabe and Ito's
# palette (Color Universal Design; black first, `full` in every kvsim config), solid for the
# first eight policies and dashed, in the same colours, for the next eight; every line type has
# its own point as well. More policies reuse them in order.
policy_colors = "#000000 #E69F00 #56B4E9 #009E73 #F0E442 #0072B2 #D55E00 #CC79A7"
policy_points = "7 5 9 11 13 15 6 4 8 10 12 14 1 2 3 7"
do for [i = 1:16] {
    eval sprintf("set linetype %d linecolor rgb '%s' pointtype %s pointsize 1.3 linewidth 1.5 " \
                 . "dashtype %d", i, word(policy_colors, (i - 1) % 8 + 1), \
                 word(policy_points, i), i <= 8 ? 1 : 2)
}
set linetype cycle 16

# `subtitle` (set with -e; `make plots` gives the model, the trace(s) or the number of prompts,
# and the budget when one is fixed) is the second line of every title: titled(t).
if (!exists("subtitle")) subtitle = ""
titled(t) = subtitle eq "" ? t : t . "\n" . subtitle
# The top of a multiplot's panels (a screen fraction) below a title of one line, or of two.
panels_top(t) = subtitle eq "" ? t : t - 0.05

# The policies whose values of column `name` equal, row for row, those of another within 0.2%
# (lines drawn on top of each other at a plot's scale, e.g. offload's on hybrid's, which differ
# only when offload restores a token), as groups in order of first appearance, "hybrid =
# offload; window = oracle_topk"; "" when no two are so. A field that is not a number (empty,
# text) matches only the same field; a policy without any value is left out.
coincide_cmd = "awk -F, -v name='%s' 'function same(a, b, i, x, y) { if (n_[a] != n_[b]) return 0;" \
    . " for (i = 1; i <= n_[a]; i++) { x = v_[a, i]; y = v_[b, i]; if (x \"\" == y \"\") continue;" \
    . " if (x !~ /^[-+]?[0-9.]+([eE][-+]?[0-9]+)?$/ || y !~ /^[-+]?[0-9.]+([eE][-+]?[0-9]+)?$/) return 0;" \
    . " if ((x - y > 0.002 * ((x < 0 ? -x : x) > (y < 0 ? -y : y) ? (x < 0 ? -x : x) : (y < 0 ? -y : y))" \
    . " || y - x > 0.002 * ((x < 0 ? -x : x) > (y < 0 ? -y : y) ? (x < 0 ? -x : x) : (y < 0 ? -y : y)))) return 0 }" \
    . " return 1 } NR == 1 { for (i = 1; i <= NF; i++) { if ($i == name) c = i;" \
    . " if ($i == \"policy\") pc = i } next } c { if (!($pc in n_)) order[++n] = $pc;" \
    . " v_[$pc, ++n_[$pc]] = $c; if ($c != \"\") any[$pc] = 1 } END { for (i = 1; i <= n; i++) {" \
    . " if (done[i] || !any[order[i]]) continue; g = order[i]; for (j = i + 1; j <= n; j++)" \
    . " if (!done[j] && same(order[i], order[j])) { g = g \" = \" order[j]; done[j] = 1 }" \
    . " if (g != order[i]) printf \"%%s%%s\", (k++ ? \"; \" : \"\"), g } }' '%s'"
coinciding(name) = system(sprintf(coincide_cmd, name, in))
# The same for the table a shell command writes (a header, then rows): one panel's rows.
coinciding_in(name, cmd) = system(cmd . " | " . sprintf(coincide_cmd, name, "-"))
# A multiplot's note of the lines drawn on top of each other, panel by panel: "" or
# "persist: hybrid = offload; reencode: window = h2o" (panel_note adds one panel's groups).
panel_note(note, panel, groups) = groups eq "" ? note : note . (note eq "" ? "" : "; ") . panel . ": " . groups

set key outside right center vertical Left reverse spacing 1.2 box
set title font ",15"
set grid lc rgb "#dddddd"
set border lc rgb "#444444"
