#!/bin/sh
# The include graph of kvsim's sources, checked against its layers (docs/layout.md): a file may
# include a header of its own directory or of a lower layer, never one of the same layer in
# another directory or of a higher layer. Prints every include with the layers on both sides
# when run with -v; exits 1 naming each include that runs upward or sideways.
#   tests/check_layers.sh [-v] [source root]
verbose=0
[ "$1" = -v ] && { verbose=1; shift; }
root=${1:-$(dirname "$0")/..}
cd "$root" || exit 2

# The layer of a file, from its directory (bottom = 0).
layer_of() {
    case "$1" in
    sim/base/*) echo 0 ;;
    sim/format/*|sim/reuse/*) echo 1 ;;
    policies/*|traces/model/*) echo 2 ;;
    sim/driver/*) echo 3 ;;
    sim/replay/*|traces/eval/*) echo 4 ;;
    sim/cmd/*|traces/cmd/*) echo 5 ;;
    sim/main.c) echo 6 ;;
    *) echo "" ;;
    esac
}

bad=0
for f in $(find sim policies traces -name '*.[ch]' -o -name '*.def' | sort); do
    from=$(layer_of "$f")
    if [ -z "$from" ]; then
        echo "$f: not in a layer directory (tests/check_layers.sh lists them)"
        bad=1
        continue
    fi
    for inc in $(sed -n 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"\([^"]*\)".*/\1/p' "$f"); do
        to=$(layer_of "$inc")
        if [ -z "$to" ]; then
            echo "$f: includes \"$inc\", which is not in a layer directory"
            bad=1
            continue
        fi
        [ $verbose = 1 ] && echo "$f ($from) -> $inc ($to)"
        if [ "$(dirname "$f")" != "$(dirname "$inc")" ] && [ "$to" -ge "$from" ]; then
            echo "$f (layer $from) includes $inc (layer $to): includes must run downward"
            bad=1
        fi
    done
done
exit $bad
