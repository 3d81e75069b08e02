#!/usr/bin/env bash
# The one-pass sweep against separate runs: `kvsim sweep CONFIG --budgets B,...` (every policy
# at every budget as instances of one replay: the shared exact attention once) against one
# `kvsim run` per budget of the same cells (CONFIG with each policy's budget-like keys removed
# and `[run] budget = B`: what the sweep sets, docs/sweeps.md), same trace, same threads.
# Checks that each budget's summary.csv is the same bytes both ways, and reports the ratio of
# the wall times (the best of ROUNDS rounds each, taken in turn, as neighbours on a shared
# machine come and go). Target: the sweep faster than the runs. Exit status 1 when missed.
#
#   bench/sweep.sh KVSIM CONFIG TRACE "64 128 256 512 1024" [THREADS] [ROUNDS]
set -euo pipefail
kvsim=$1 config=$2 trace=$3 budgets=$4 threads=${5:-2} rounds=${6:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# CONFIG at budget B for `kvsim run`: the keys [run] budget scales (config.c, budget_params)
# dropped from the policy sections, [run] budget = B added.
for b in $budgets; do
  awk -v b="$b" '
    /^\[/ { section = $0 }
    section ~ /^\[policy\./ && /^[[:space:]]*(budget|window|local|span|max_split|divide_length|protect_recent)[[:space:]]*=/ { next }
    { print }
    section == "[run]" && !done && /^\[run\]/ { print "budget = " b; done = 1 }
  ' "$config" > "$work/b$b.ini"
done

now() { date +%s.%N; }
best_runs="" best_sweep=""
for r in $(seq "$rounds"); do
  t0=$(now)
  for b in $budgets; do
    "$kvsim" run "$work/b$b.ini" --trace "$trace" --out "$work/runs/b$b" --threads "$threads" --quiet \
      2>> "$work/runs.log" # its warnings (unequal caches) are not the bench's
  done
  t1=$(now)
  "$kvsim" sweep "$config" --trace "$trace" --budgets "$(echo $budgets | tr ' ' ,)" \
    --out "$work/sweep" --threads "$threads" --quiet
  t2=$(now)
  best_runs=$(awk -v a="$t0" -v b="$t1" -v m="$best_runs" 'BEGIN { d = b - a; print (m == "" || d < m) ? d : m }')
  best_sweep=$(awk -v a="$t1" -v b="$t2" -v m="$best_sweep" 'BEGIN { d = b - a; print (m == "" || d < m) ? d : m }')
done

for b in $budgets; do
  cmp -s "$work/runs/b$b/summary.csv" "$work/sweep/b$b/summary.csv" || {
    echo "sweep bench: $config at budget $b: the sweep's summary.csv differs from kvsim run's" >&2
    exit 1
  }
done
n=$(echo $budgets | wc -w)
ratio=$(awk -v a="$best_runs" -v b="$best_sweep" 'BEGIN { printf "%.2f", a / b }')
printf '\nsweep of %s on %s, budgets %s, %s threads (best of %s rounds):\n' \
  "$config" "$trace" "$budgets" "$threads" "$rounds"
printf '    %d separate kvsim runs %7.2f s\n    one kvsim sweep        %7.2f s  = %.2fx faster; summaries identical\n' \
  "$n" "$best_runs" "$best_sweep" "$ratio"
if awk -v r="$ratio" 'BEGIN { exit !(r > 1) }'; then
  echo "target one-pass sweep faster than separate runs: met"
else
  echo "target one-pass sweep faster than separate runs: MISSED"
  exit 1
fi
