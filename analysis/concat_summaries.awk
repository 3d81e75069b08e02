# Concatenates the summary.csv files of a budget sweep into one table with a leading `budget`
# column. Each file is preceded by the assignment of its budget:
#
#   awk -f analysis/concat_summaries.awk budget=64 b64/summary.csv budget=128 b128/summary.csv
#
# Rows come out in argument order (the caller lists budgets in ascending order) and, within a
# file, in the file's order (the config's policy order), so the output is deterministic. Every
# file must have the header of the first, at least one row, and as many fields per row as its
# header (fields as RFC 4180 counts them: a comma inside a quoted label does not separate; a
# record must fit on one line, as the rows of summary.csv and eval.csv do); every budget must be
# a positive integer given once. On a violation it prints one line naming the file (and line)
# to stderr and exits with status 1. POSIX awk (mawk, gawk).

BEGIN { FS = ","; OFS = ","; failed = 0 }

# Number of fields of a one-line RFC 4180 record: commas between double quotes do not separate
# (a doubled quote inside quotes toggles twice, so it changes nothing).
function csv_nf(line,    n, i, ch, quoted) {
    n = 1
    quoted = 0
    for (i = 1; i <= length(line); i++) {
        ch = substr(line, i, 1)
        if (ch == "\"")
            quoted = !quoted
        else if (ch == "," && !quoted)
            n++
    }
    return n
}

function fail(msg) {
    if (!failed)
        print "concat_summaries: " msg > "/dev/stderr"
    failed = 1
    exit 1
}

# The previous file must have contributed rows before the next one starts.
function check_rows(file) {
    if (file != "" && rows[file] == 0)
        fail(file ": no policy rows after the header")
}

FNR == 1 {
    check_rows(current)
    current = FILENAME
    files_seen[FILENAME] = 1
    if (budget !~ /^[1-9][0-9]*$/)
        fail(FILENAME ": preceded by budget=\"" budget "\", expected a positive integer")
    if (budget in budget_file)
        fail(FILENAME ": budget " budget " already given for " budget_file[budget])
    budget_file[budget] = FILENAME
    if (header == "") {
        for (i = 1; i <= NF; i++)
            if ($i == "budget")
                fail(FILENAME ": already has a budget column")
        if ($1 != "policy" || $2 != "type")
            fail(FILENAME ": header starts with \"" $1 "\", expected a summary.csv header (policy,type,...)")
        header = $0
        header_file = FILENAME
        columns = NF
        print "budget", $0
    } else if ($0 != header) {
        fail(FILENAME ": header differs from that of " header_file)
    }
    rows[FILENAME] = 0
    next
}

csv_nf($0) != columns {
    fail(FILENAME ":" FNR ": " csv_nf($0) " fields, the header has " columns)
}

{
    print budget, $0
    rows[FILENAME]++
}

END {
    if (failed)
        exit 1
    check_rows(current)
    # An empty file never reaches FNR == 1.
    for (i = 1; i < ARGC; i++)
        if (ARGV[i] !~ /=/ && !(ARGV[i] in files_seen))
            fail(ARGV[i] ": empty, expected a summary.csv header")
    if (header == "")
        fail("no summary files given")
}
