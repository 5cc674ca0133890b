#!/bin/sh
# Build the cpr-exec guard: node-agent/guard/build.sh OUTDIR -> OUTDIR/vmupdate-cpr-guard
# Static, so it runs unchanged inside any QEMU root (chroot, container image).
# The version string is the SHA-256 of the source; `vmupdate-cpr-guard --version` prints it.
# Keep CFLAGS in sync with CFLAGS in __init__.py (a test checks).
set -eu
CC=${CC:-gcc}
CFLAGS="-static -O2 -Wall -Wextra -Werror -std=gnu11"
here=$(cd "$(dirname "$0")" && pwd)
src="$here/vmupdate-cpr-guard.c"
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
ver=$(sha256sum "$src" | cut -c1-64)
tmp="$out/.vmupdate-cpr-guard.$$"
trap 'rm -f "$tmp"' EXIT
# shellcheck disable=SC2086
$CC $CFLAGS -DGUARD_VERSION="\"$ver\"" -o "$tmp" "$src"
mv -f "$tmp" "$out/vmupdate-cpr-guard"
trap - EXIT
echo "$out/vmupdate-cpr-guard"
