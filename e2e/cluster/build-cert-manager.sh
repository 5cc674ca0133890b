#!/usr/bin/env bash
# Build cert-manager's controller for the test sandbox from the Go module proxy (module
# github.com/cert-manager/cert-manager) and unpack its CRDs (the module's deploy/crds/).
#
# Result: ${VMUPDATE_CACHE:-/var/cache/vmupdate}/cert-manager/<CERT_MANAGER_VERSION>/
#   bin/cert-manager-controller, crds/*.yaml, .complete (written last).
# Idempotent: a complete cache returns at once. Concurrent runs are serialised with flock.
# Go's module and build caches are e2e/cluster/build.sh's ($VMUPDATE_CACHE/go/), so the
# Kubernetes libraries both use are compiled once.
#
# Why our own main (e2e/cluster/certmanager/main.go): upstream's cmd/controller is a nested
# module (module path .../controller-binary, with `replace ../../`), which the proxy does not
# serve (its @v/list answers 404). The main wires the published module's controller packages
# as cmd/controller/app does, limited to the SelfSigned and CA issuers the chart uses.
#
# The version: the newest the proxy lists (v1.21.2), whose go.mod asks for go 1.26.0; this
# machine's Go is 1.26.x. A newer Go toolchain is never downloaded (GOTOOLCHAIN=local):
# a version needing one fails here with Go's message.
#
# Usage: e2e/cluster/build-cert-manager.sh [--print-dir]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
. "$here/versions.env"
CERT_MANAGER_VERSION="${VMUPDATE_CERT_MANAGER_VERSION:-$CERT_MANAGER_VERSION}"
MODULE=github.com/cert-manager/cert-manager

CACHE="${VMUPDATE_CACHE:-/var/cache/vmupdate}"
OUT="$CACHE/cert-manager/$CERT_MANAGER_VERSION"
BIN="$OUT/bin/cert-manager-controller"
MARKER="$OUT/.complete"
MAIN_SUM=$(sha256sum "$here/certmanager/main.go" | cut -c1-16)
SPEC="cert-manager=$CERT_MANAGER_VERSION go=$(go env GOVERSION) main=$MAIN_SUM"

if [[ "${1:-}" == "--print-dir" ]]; then
  echo "$OUT"
  exit 0
fi

complete() {
  [[ -f "$MARKER" && "$(cat "$MARKER")" == "$SPEC" && -x "$BIN" ]] && ls "$OUT"/crds/*.yaml >/dev/null 2>&1
}
if complete; then
  echo "cert-manager $CERT_MANAGER_VERSION up to date in $OUT"
  exit 0
fi

mkdir -p "$OUT" "$CACHE/go"
exec 9>"$OUT.lock"
if ! flock -n 9; then
  echo "waiting for another build-cert-manager.sh (lock $OUT.lock) ..." >&2
  flock 9
fi
if complete; then
  echo "cert-manager $CERT_MANAGER_VERSION up to date in $OUT"
  exit 0
fi
rm -f "$MARKER"

export GOMODCACHE="$CACHE/go/mod"
export GOCACHE="$CACHE/go/build"
export GOFLAGS="-buildvcs=false"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
GOBUILD_P="${VMUPDATE_GO_P:-$(nproc)}"
t0=$(date +%s)

src="$OUT/src"
rm -rf "$src"
mkdir -p "$src" "$OUT/bin"
cd "$src"
cp "$here/certmanager/main.go" main.go
# The main module's go.mod gives the Go version and every dependency's version.
go mod download -json "$MODULE@$CERT_MANAGER_VERSION" >download.json ||
  { cat download.json >&2; exit 1; }
dir=$(sed -n 's/^\t"Dir": "\(.*\)",$/\1/p' download.json)
[[ -f "$dir/go.mod" ]] || { echo "no source for $MODULE@$CERT_MANAGER_VERSION" >&2; exit 1; }
{
  echo "module vmupdate.test/certmanagerbuild"
  echo
  sed -n 's/^go \(.*\)$/go \1/p' "$dir/go.mod"
  echo
  echo "require $MODULE $CERT_MANAGER_VERSION"
} >go.mod
# go mod tidy resolves what main.go imports at the versions cert-manager's go.mod pins
# (minimal version selection), and writes go.sum.
go mod tidy >tidy.log 2>&1 || { cat tidy.log >&2; exit 1; }
echo "==> go build cert-manager-controller $CERT_MANAGER_VERSION ($(date +%T)), go -p $GOBUILD_P" >&2
go build -p "$GOBUILD_P" -trimpath -o "$BIN.tmp" -ldflags "-s -w \
  -X $MODULE/pkg/util.AppVersion=$CERT_MANAGER_VERSION \
  -X $MODULE/pkg/util.AppGitCommit=0000000000000000000000000000000000000000" .
mv -f "$BIN.tmp" "$BIN"

rm -rf "$OUT/crds"
mkdir -p "$OUT/crds"
cp "$dir"/deploy/crds/*.yaml "$OUT/crds/"
chmod -R u+w "$OUT/crds"
"$BIN" --version >&2

echo "$SPEC" >"$MARKER.tmp"
mv -f "$MARKER.tmp" "$MARKER"
echo "cert-manager $CERT_MANAGER_VERSION built in $OUT in $(($(date +%s) - t0)) s" >&2
