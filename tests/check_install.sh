#!/bin/sh
# Installs the build's kvsim into a scratch prefix with cmake --install (what `make install`
# runs), then checks that the installed binary is there, is executable and runs (its command
# list names `run`). Usage: tests/check_install.sh BUILD_DIR
set -eu
build=${1:?usage: check_install.sh BUILD_DIR}
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build" --prefix "$prefix" > /dev/null
test -x "$prefix/bin/kvsim" || { echo "check_install: $prefix/bin/kvsim was not installed" >&2; exit 1; }
"$prefix/bin/kvsim" --help 2>&1 | grep -q '^  run ' || { echo "check_install: the installed kvsim does not run" >&2; exit 1; }
echo "check_install: kvsim installed into a scratch prefix and runs"
