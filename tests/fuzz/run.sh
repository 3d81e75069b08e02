#!/usr/bin/env bash
# Runs every libFuzzer harness of a fuzz build for SECONDS each, JOBS at a time, and fails on any
# finding. Usage: tests/fuzz/run.sh BUILD_DIR SECONDS [JOBS]
#
# Each harness starts from its committed seeds (tests/fuzz/corpus/NAME, read-only) and grows a
# working corpus in BUILD_DIR/fuzz-corpus/NAME, kept between runs so that a long campaign resumes
# where the last one stopped. A crash, leak, sanitizer report, timeout (10 s) or out-of-memory
# (2 GiB) is a finding: the input is saved as BUILD_DIR/fuzz-findings/NAME-*, the log as
# BUILD_DIR/fuzz-logs/NAME.log, and the script exits 1. The last lines give, per harness, the
# inputs executed and the coverage (edges: libFuzzer's cov) reached.
set -uo pipefail
build=${1:?usage: run.sh BUILD_DIR SECONDS [JOBS]}
seconds=${2:?usage: run.sh BUILD_DIR SECONDS [JOBS]}
jobs=${3:-1}
src=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$build/fuzz-corpus" "$build/fuzz-findings" "$build/fuzz-logs"
harnesses=$(cd "$build" && ls fuzz_* 2>/dev/null | grep -v '\.' || true)
if [ -z "$harnesses" ]; then
  echo "run.sh: no harness in $build (build with -DKVSIM_FUZZ=ON)" >&2
  exit 2
fi

run_one() {
  local name=$1 build=$2 seconds=$3 src=$4
  local corpus="$build/fuzz-corpus/$name" seeds="$src/corpus/${name#fuzz_}"
  mkdir -p "$corpus"
  ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1 \
    "$build/$name" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$build/fuzz-findings/$name-" \
    "$corpus" "$seeds" > "$build/fuzz-logs/$name.log" 2>&1
  local rc=$?
  local execs cov
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$build/fuzz-logs/$name.log" | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$build/fuzz-logs/$name.log" | tail -n 1 | cut -d' ' -f2)
  if [ "$rc" -eq 0 ]; then
    printf 'fuzz: %-22s ok       %10s execs  cov %s\n' "$name" "${execs:-?}" "${cov:-?}"
  else
    printf 'fuzz: %-22s FINDING  (exit %d) see %s\n' "$name" "$rc" "$build/fuzz-logs/$name.log"
    grep -m 5 -E 'ERROR|SUMMARY|runtime error|Test unit written' "$build/fuzz-logs/$name.log" | sed 's/^/      /'
  fi
  return "$rc"
}
export -f run_one

failed=0
printf '%s\n' $harnesses | xargs -P "$jobs" -I{} bash -c 'run_one "$@"' _ {} "$build" "$seconds" "$src" \
  || failed=1
if [ "$failed" -ne 0 ]; then
  echo "fuzz: findings above (inputs in $build/fuzz-findings)" >&2
  exit 1
fi
echo "fuzz: $(printf '%s\n' $harnesses | wc -l) harnesses, ${seconds}s each, no finding"
