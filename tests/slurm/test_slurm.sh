#!/usr/bin/env bash
# make test-slurm: a sharded sweep through a real Slurm, end to end (docs/cluster.md).
#
# Starts a single-node Slurm on this machine (Debian's slurm-wlm and munge; everything but the
# munge key lives in a scratch directory, ports chosen for this run, SLURM_CONF pointing at its
# slurm.conf), submits analysis/sweep.sbatch as a job array of 3 tasks on a small synthetic
# trace, joins the shards with `kvsim merge`, checks that every file is byte-identical to the
# local unsharded sweep's (run.json, which records times, apart), and stops what it started.
#
#   tests/slurm/test_slurm.sh KVSIM
#
# Needs root (the daemons and the munge key). Without root, or without the packages, it says
# so and exits 0 (skipped), unless KVSIM_REQUIRE_SLURM=1 (CI sets it), which makes that a
# failure. Exit status 1 when a check fails.
set -euo pipefail
kvsim=$(readlink -f "$1")
src=$(cd "$(dirname "$0")/../.." && pwd)
started=$(date +%s.%N)

skip() {
  if [ "${KVSIM_REQUIRE_SLURM:-0}" = 1 ]; then
    echo "test-slurm: FAILED: $1 (KVSIM_REQUIRE_SLURM=1)" >&2
    exit 1
  fi
  echo "test-slurm: SKIPPED: $1"
  exit 0
}
fail() {
  echo "test-slurm: FAILED: $1" >&2
  for f in "$work"/log/*; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
  exit 1
}

[ "$(id -u)" = 0 ] || skip "needs root to start munged, slurmctld and slurmd (run: sudo make test-slurm)"
for c in munged munge unmunge slurmctld slurmd sbatch sinfo squeue scontrol; do
  command -v "$c" >/dev/null || skip "$c not found (apt-get install slurm-wlm munge; make slurm-deps)"
done

work=$(mktemp -d)
pids=()
cleanup() {
  # Stop what this script started, by the pids it recorded, newest first.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
  done
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    for _ in $(seq 50); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.1; done
  done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work"/{log,state,spool,run}
chmod 755 "$work"

# ---- munge: the package's key, a daemon of our own on a socket of our own ----
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
mkdir -p "$work/munge"
chown munge:munge "$work/munge"
chmod 755 "$work/munge" # munged: the socket's directory must be searchable by all
socket=$work/munge/munge.socket
runuser -u munge -- munged --socket="$socket" --pid-file="$work/munge/munged.pid" \
  --log-file="$work/munge/munged.log" --seed-file="$work/munge/munged.seed" \
  || fail "munged did not start"
for _ in $(seq 50); do [ -s "$work/munge/munged.pid" ] && break; sleep 0.1; done
pids+=("$(cat "$work/munge/munged.pid")")
munge -n --socket="$socket" | unmunge --socket="$socket" >/dev/null || fail "munge -n | unmunge failed"

# ---- slurm.conf: this host as controller and only node, on the loopback address (so that it
# need not resolve its own name) ----
host=$(hostname -s)
# Two free ports (nothing accepts a connection on them), so that another Slurm on the machine,
# or another run of this test, does not collide with this one.
in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 20); do
  port=$((20000 + RANDOM % 20000))
  in_use "$port" || in_use $((port + 1)) || break
done
export SLURM_CONF=$work/slurm.conf
cat > "$SLURM_CONF" <<EOF
ClusterName=kvsimtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/run/slurmctld.pid
SlurmdPidFile=$work/run/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MessageTimeout=10
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=1000 State=UNKNOWN
PartitionName=kvsim Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start"
for _ in $(seq 50); do [ -s "$work/run/slurmctld.pid" ] && break; sleep 0.1; done
pids+=("$(cat "$work/run/slurmctld.pid")")
slurmd -f "$SLURM_CONF" || fail "slurmd did not start"
for _ in $(seq 50); do [ -s "$work/run/slurmd.pid" ] && break; sleep 0.1; done
pids+=("$(cat "$work/run/slurmd.pid")")
state=""
for _ in $(seq 150); do
  state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1) || true
  [ "$state" = idle ] && break
  sleep 0.2
done
[ "$state" = idle ] || fail "the node is '$state' after 30 s, expected idle"

# ---- the sweep: local, then as a job array of 3 tasks ----
cd "$src"
"$kvsim" synth --out "$work/t.h5" --seed 7 --layers 2 --q-heads 4 --kv-heads 2 --head-dim 32 \
  --prompt 512 --decode 32 --needles 4 --system 16 >/dev/null
config=configs/ta512.ini budgets=64,128,256
"$kvsim" sweep "$config" --trace "$work/t.h5" --budgets "$budgets" --out "$work/local" \
  --quiet || fail "the local sweep failed"
job=$(KVSIM=$kvsim timeout 100 sbatch --parsable --wait --array=0-2 --cpus-per-task=1 \
  --output="$work/log/task-%a.out" analysis/sweep.sbatch "$config" "$work/cluster" "$budgets" \
  "$work/t.h5") || fail "the job array failed (sbatch --wait)"
"$kvsim" merge --out "$work/merged" "$work"/cluster/shard-* >/dev/null || fail "kvsim merge failed"
for i in 0 1 2; do
  grep -q "shard $i/3" "$work/cluster/shard-$i/sweep.txt" || fail "shard-$i is not share $i of 3"
done
diff -r -x run.json "$work/local" "$work/merged" >/dev/null ||
  fail "the merged sweep differs from the local one"
n=$(find "$work/merged" -name '*.csv' | wc -l)
[ "$n" -ge $((13 * 3 * 4 + 3 * 4 + 1)) ] || fail "only $n CSV files in the merged sweep"
elapsed=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
echo "test-slurm: passed: job ${job%%;*}, a 3-task array of the sweep of $config at $budgets," \
  "merged: $n CSV files byte-identical to the local sweep (${elapsed}s in all)"
