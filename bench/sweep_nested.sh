#!/usr/bin/env bash
# Exact curves of the nested policies: `kvsim sweep` of `window` and `oracle_topk` (a larger
# budget keeps a superset) at 20 budgets (32, 64, ..., 640) against the same sweep at one
# budget (512), on a synthetic trace of 2 layers, 8 query heads, 2 KV heads, head_dim 64, 4096
# prompt + 512 decode tokens, every step evaluated, same threads. Reports the ratio of the wall
# times of the whole command (trace read and hashed, replay, cells written and assembled; the
# best of ROUNDS rounds each, taken in turn, as neighbours on a shared machine come and go).
#
# What the 20 budgets share: the trace, the exact attention of every decode query, the scoring
# (both policies' caches nest: each is scored in its keep order, every budget from one pass over
# the largest cache, sim/replay/metrics.h: nested_metrics), and for oracle_topk one selection
# and one sort per step and KV head. What each budget still pays for is its own cache's upkeep
# and its four CSVs. docs/sweeps.md gives the figures. Target "any number of budgets at the
# cost of one": 20 budgets <= 1.5x one budget; exit status 1 when missed.
#
#   bench/sweep_nested.sh KVSIM [THREADS] [ROUNDS]
set -euo pipefail
kvsim=$1 threads=${2:-2} rounds=${3:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$kvsim" synth --out "$work/nested.h5" --seed 1 --layers 2 --q-heads 8 --kv-heads 2 \
  --head-dim 64 --prompt 4096 --decode 512 > /dev/null
cat > "$work/nested.ini" <<'EOF'
[run]
topk = 32
eval_every = 1
kv_bits = 16
seed = 0

[policy.window]
type = window
window = 508
sinks = 4

[policy.oracle_topk]
type = oracle_topk
budget = 512
EOF
many=$(seq -s, 32 32 640)

now() { date +%s.%N; }
best_one="" best_many=""
for r in $(seq "$rounds"); do
  t0=$(now)
  "$kvsim" sweep "$work/nested.ini" --trace "$work/nested.h5" --budgets 512 \
    --out "$work/one" --threads "$threads" --quiet
  t1=$(now)
  "$kvsim" sweep "$work/nested.ini" --trace "$work/nested.h5" --budgets "$many" \
    --out "$work/many" --threads "$threads" --quiet
  t2=$(now)
  best_one=$(awk -v a="$t0" -v b="$t1" -v m="$best_one" 'BEGIN { d = b - a; print (m == "" || d < m) ? d : m }')
  best_many=$(awk -v a="$t1" -v b="$t2" -v m="$best_many" 'BEGIN { d = b - a; print (m == "" || d < m) ? d : m }')
done

# The one-budget sweep's cells are the 20-budget sweep's cells at 512.
for f in summary layers steps turns; do
  cmp -s "$work/one/b512/$f.csv" "$work/many/b512/$f.csv" || {
    echo "nested sweep bench: b512/$f.csv differs between the 1- and the 20-budget sweep" >&2
    exit 1
  }
done
ratio=$(awk -v a="$best_many" -v b="$best_one" 'BEGIN { printf "%.2f", a / b }')
printf '\nexact curves of window + oracle_topk (synthetic 2 layers, 8/2 heads, 4096+512 tokens), %s threads (best of %s rounds):\n' \
  "$threads" "$rounds"
printf '    sweep at 1 budget (512)        %7.2f s\n    sweep at 20 budgets (32..640)  %7.2f s  = %.2fx one budget\n' \
  "$best_one" "$best_many" "$ratio"
if awk -v r="$ratio" 'BEGIN { exit !(r <= 1.5) }'; then
  echo "target 20 budgets <= 1.5x one: met"
else
  echo "target 20 budgets <= 1.5x one: MISSED"
  exit 1
fi
