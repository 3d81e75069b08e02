#!/bin/sh
# Generator throughput: kvsim's forward pass and `kvsim trace` against the same forward pass in
# PyTorch on the CPU (Debian's python3-torch), same ~100M-parameter random checkpoint, same
# prompt, same thread count, in one run: ROUNDS rounds, the two taken in turn, the best rate of
# each (neighbours on a shared machine come and go). Prints both and the ratios (kvsim /
# PyTorch). Target: the ratios this bench measured when the replay's speed work began (prefill
# 4.3x, decode 7.9x PyTorch's, 2 threads), kept within 20% (>= 3.44x and >= 6.32x): the
# forward pass that `kvsim trace` and `kvsim eval` share must not fall behind. Exit status 1
# when missed.
#   bench/generator.sh BUILD_DIR [THREADS] [ROUNDS]
set -eu
build=$1
threads=${2:-$(nproc)}
rounds=${3:-3}
here=$(dirname "$0")
python=/usr/bin/python3   # Debian's interpreter, the one python3-torch installs into
if ! "$python" -c 'import torch, numpy' 2>/dev/null; then
    echo "bench: the PyTorch reference needs Debian's python3-torch (apt-get install -y python3-torch)" >&2
    exit 2
fi
ckpt=$build/bench-100m
[ -f "$ckpt/model.safetensors" ] || "$python" "$here/torch_forward.py" write "$ckpt"
rate() { echo "$1" | awk -v key="$2" 'index($0, key) == 1 { print $(NF - 1) }'; }
best() { awk -v a="$1" -v b="$2" 'BEGIN { print (a == "" || b + 0 > a + 0) ? b : a }'; }
kp="" kd="" tp="" td=""
for r in $(seq "$rounds"); do
    ours=$("$build/bench_generator" "$ckpt" --threads "$threads")
    theirs=$("$python" "$here/torch_forward.py" run "$ckpt" --threads "$threads")
    echo "$ours"
    echo "$theirs"
    kp=$(best "$kp" "$(rate "$ours" 'kvsim forward prefill')")
    kd=$(best "$kd" "$(rate "$ours" 'kvsim forward decode')")
    tp=$(best "$tp" "$(rate "$theirs" 'torch prefill')")
    td=$(best "$td" "$(rate "$theirs" 'torch decode')")
done
awk -v kp="$kp" -v tp="$tp" -v kd="$kd" -v td="$td" -v t="$threads" -v r="$rounds" 'BEGIN {
        printf "\ngenerator vs PyTorch, %d threads (best of %d rounds): prefill %.2fx (%.1f vs %.1f tok/s), decode %.2fx (%.1f vs %.1f tok/s)\n", t, r, kp / tp, kp, tp, kd / td, kd, td
        ok = kp / tp >= 0.8 * 4.3 && kd / td >= 0.8 * 7.9
        printf "target prefill >= 3.44x and decode >= 6.32x PyTorch (4.3x and 7.9x, within 20%%): %s\n", ok ? "met" : "MISSED"
        exit ok ? 0 : 1
    }'
