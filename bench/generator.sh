#!/bin/sh
# Generator throughput: kvsim's forward pass and `kvsim trace` against the same forward pass in
# PyTorch on the CPU (Debian's python3-torch), same ~100M-parameter random checkpoint, same
# prompt, same thread count, in one run. Prints both and the ratios (kvsim / PyTorch).
#   bench/generator.sh BUILD_DIR [THREADS]
set -eu
build=$1
threads=${2:-$(nproc)}
here=$(dirname "$0")
python=/usr/bin/python3   # Debian's interpreter, the one python3-torch installs into
if ! "$python" -c 'import torch, numpy' 2>/dev/null; then
    echo "bench: the PyTorch reference needs Debian's python3-torch (apt-get install -y python3-torch)" >&2
    exit 2
fi
ckpt=$build/bench-100m
[ -f "$ckpt/model.safetensors" ] || "$python" "$here/torch_forward.py" write "$ckpt"
ours=$("$build/bench_generator" "$ckpt" --threads "$threads")
theirs=$("$python" "$here/torch_forward.py" run "$ckpt" --threads "$threads")
echo "$ours"
echo "$theirs"
rate() { echo "$1" | awk -v key="$2" 'index($0, key) == 1 { print $(NF - 1) }'; }
awk -v kp="$(rate "$ours" 'kvsim forward prefill')" -v tp="$(rate "$theirs" 'torch prefill')" \
    -v kd="$(rate "$ours" 'kvsim forward decode')" -v td="$(rate "$theirs" 'torch decode')" \
    -v t="$threads" 'BEGIN {
        printf "\ngenerator vs PyTorch, %d threads: prefill %.2fx (%.1f vs %.1f tok/s), decode %.2fx (%.1f vs %.1f tok/s)\n", t, kp / tp, kp, tp, kd / td, kd, td
        ok = kp >= tp && kd >= td
        printf "target prefill and decode >= PyTorch: %s\n", ok ? "met" : "MISSED"
        exit ok ? 0 : 1
    }'
