#!/usr/bin/env bash
# Build the binaries of the local Kubernetes test sandbox from the Go module proxy:
#   kube-apiserver, kube-controller-manager, kubectl (k8s.io/kubernetes), etcd, helm;
#   then the node's kubelet, kube-scheduler and kube-proxy (same scratch module).
#
# Result: ${VMUPDATE_CACHE:-/var/cache/vmupdate}/k8s/<K8S_VERSION>/bin/, with a marker
# file written last per set (.complete: control plane, .complete-node: node binaries; two
# markers so a checkout that knows only the first set still finds its cache complete). Idempotent: a complete cache returns at once. Concurrent runs are
# serialised with flock. Go's module and build caches live under $VMUPDATE_CACHE/go/, so a
# rebuild after a version bump only compiles what changed.
#
# Why a scratch module: k8s.io/kubernetes' go.mod replaces every k8s.io/* staging module
# with ./staging/..., which is not in its module zip, so `go install` of its commands fails.
# A scratch module that requires k8s.io/kubernetes and replaces each staging module with
# its published v0.Y.Z release builds the same code. etcd and helm get the same treatment
# (their go.mod files also carry replace directives).
#
# Usage: e2e/cluster/build.sh [--print-bin-dir]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
. "$here/versions.env"
K8S_VERSION="${VMUPDATE_K8S_VERSION:-$K8S_VERSION}"
ETCD_VERSION="${VMUPDATE_ETCD_VERSION:-$ETCD_VERSION}"
HELM_VERSION="${VMUPDATE_HELM_VERSION:-$HELM_VERSION}"

CACHE="${VMUPDATE_CACHE:-/var/cache/vmupdate}"
OUT="$CACHE/k8s/$K8S_VERSION"
BIN="$OUT/bin"
MARKER="$OUT/.complete"
SPEC="k8s=$K8S_VERSION etcd=$ETCD_VERSION helm=$HELM_VERSION go=$(go env GOVERSION) build=3"
BINARIES=(kube-apiserver kube-controller-manager kubectl etcd helm)
NODE_MARKER="$OUT/.complete-node"
NODE_SPEC="k8s=$K8S_VERSION go=$(go env GOVERSION) node=1"
NODE_BINARIES=(kubelet kube-scheduler kube-proxy)

if [[ "${1:-}" == "--print-bin-dir" ]]; then
  echo "$BIN"
  exit 0
fi

base_complete() {
  [[ -f "$MARKER" && "$(cat "$MARKER")" == "$SPEC" ]] || return 1
  local b
  for b in "${BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}
node_complete() {
  [[ -f "$NODE_MARKER" && "$(cat "$NODE_MARKER")" == "$NODE_SPEC" ]] || return 1
  local b
  for b in "${NODE_BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}
complete() { base_complete && node_complete; }

if complete; then
  echo "k8s sandbox binaries up to date in $BIN"
  exit 0
fi

mkdir -p "$OUT" "$CACHE/go"
exec 9>"$OUT.lock"
if ! flock -n 9; then
  echo "waiting for another build.sh (lock $OUT.lock) ..." >&2
  flock 9
fi
if complete; then # another run finished while we waited
  echo "k8s sandbox binaries up to date in $BIN"
  exit 0
fi

export GOMODCACHE="$CACHE/go/mod"
export GOCACHE="$CACHE/go/build"
export GOFLAGS="-buildvcs=false"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
# Limit parallel compile jobs if asked (default: one per core).
GOBUILD_P="${VMUPDATE_GO_P:-$(nproc)}"

t_all=$(date +%s)
step() { # step NAME CMD...: run (errexit applies) and print how long it took
  local name="$1" t0
  shift
  t0=$(date +%s)
  echo "==> $name" >&2
  "$@"
  echo "<== $name: $(($(date +%s) - t0)) s" >&2
}

# go get, with its long list of resolved modules kept out of the output unless it fails.
go_get() {
  go get "$@" >go-get.log 2>&1 || { cat go-get.log >&2; return 1; }
}

mkdir -p "$BIN"
SRC="$OUT/src"

# ---------------------------------------------------------------- kubernetes
k8s_module() {
  local dir="$SRC/kubernetes" gomod staging_version
  mkdir -p "$dir"
  cd "$dir"
  # The module's go.mod (from the proxy) lists the staging modules to replace.
  # (Some versions are listed by the proxy but their zip is refused: fail clearly.)
  go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >download.json ||
    { cat download.json >&2; return 1; }
  gomod=$(sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p' download.json)
  [[ -f "$gomod" ]] || { echo "no go.mod for k8s.io/kubernetes@$K8S_VERSION" >&2; return 1; }
  staging_version="v0.${K8S_VERSION#v1.}"
  {
    echo "module vmupdate.test/k8sbuild"
    echo
    sed -n 's/^go \(.*\)$/go \1/p' "$gomod"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^\t\(k8s.io/[^ ]*\) => ./staging/.*$#\t\1 => \1 '"$staging_version"'#p' "$gomod"
    echo ")"
  } >go.mod
  rm -f go.sum
  go_get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION"
}

k8s_ldflags() { # sets K8S_LDFLAGS: the version stamp (needs the module downloaded)
  local gomod info minor date
  gomod=$(sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p' "$SRC/kubernetes/download.json")
  info="${gomod%.mod}.info"
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info")
  K8S_LDFLAGS="-s -w"
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    K8S_LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    K8S_LDFLAGS+=" -X $pkg.gitCommit=0000000000000000000000000000000000000000"
    K8S_LDFLAGS+=" -X $pkg.gitTreeState=archive -X $pkg.buildDate=${date:-1970-01-01T00:00:00Z}"
  done
}

k8s_build() { # k8s_build CMD...
  cd "$SRC/kubernetes"
  local b
  for b in "$@"; do
    echo "    go build $b ($(date +%T))" >&2
    go build -p "$GOBUILD_P" -trimpath -ldflags "$K8S_LDFLAGS" -o "$BIN/.$b.tmp" "k8s.io/kubernetes/cmd/$b"
    mv -f "$BIN/.$b.tmp" "$BIN/$b"
  done
}

# ---------------------------------------------------------------- etcd
etcd_build() {
  local dir="$SRC/etcd"
  mkdir -p "$dir"
  cd "$dir"
  printf 'module vmupdate.test/etcdbuild\n\ngo 1.24\n' >go.mod
  rm -f go.sum
  go_get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go build -p "$GOBUILD_P" -trimpath -ldflags "-s -w" -o "$BIN/.etcd.tmp" go.etcd.io/etcd/server/v3
  mv -f "$BIN/.etcd.tmp" "$BIN/etcd"
}

# ---------------------------------------------------------------- helm
helm_build() {
  local dir="$SRC/helm" cg maj min v=helm.sh/helm/v3
  mkdir -p "$dir"
  cd "$dir"
  printf 'module vmupdate.test/helmbuild\n\ngo 1.24\n' >go.mod
  rm -f go.sum
  go_get "$v/cmd/helm@$HELM_VERSION"
  # Helm's default Kubernetes version for `helm template`/lint, as its Makefile sets it.
  cg=$(go list -m -f '{{.Version}}' k8s.io/client-go) # v0.Y.Z
  cg=${cg#v}
  maj=$((${cg%%.*} + 1))
  min=$(echo "$cg" | cut -d. -f2)
  go build -p "$GOBUILD_P" -trimpath -o "$BIN/.helm.tmp" -ldflags "-s -w \
    -X $v/internal/version.version=$HELM_VERSION -X $v/internal/version.gitTreeState=clean \
    -X $v/pkg/lint/rules.k8sVersionMajor=$maj -X $v/pkg/lint/rules.k8sVersionMinor=$min \
    -X $v/pkg/chartutil.k8sVersionMajor=$maj -X $v/pkg/chartutil.k8sVersionMinor=$min" \
    "$v/cmd/helm"
  mv -f "$BIN/.helm.tmp" "$BIN/helm"
}

# The node's binaries come from the same scratch module: its go.mod gains their packages.
k8s_node_module() {
  cd "$SRC/kubernetes"
  go_get "k8s.io/kubernetes/cmd/kubelet@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-scheduler@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-proxy@$K8S_VERSION"
}

if ! base_complete; then
  rm -f "$MARKER"
  echo "building k8s sandbox ($SPEC) into $BIN, go -p $GOBUILD_P" >&2
  step "kubernetes: scratch module + go get" k8s_module
  k8s_ldflags
  step "kubernetes: go build kube-apiserver kube-controller-manager kubectl" \
    k8s_build kube-apiserver kube-controller-manager kubectl
  step "etcd $ETCD_VERSION" etcd_build
  step "helm $HELM_VERSION" helm_build

  "$BIN/kubectl" version --client >&2
  "$BIN/etcd" --version >&2
  "$BIN/helm" version --short >&2

  echo "$SPEC" >"$MARKER.tmp"
  mv -f "$MARKER.tmp" "$MARKER"
fi

if ! node_complete; then
  rm -f "$NODE_MARKER"
  echo "building k8s node binaries ($NODE_SPEC) into $BIN, go -p $GOBUILD_P" >&2
  [[ -f "$SRC/kubernetes/download.json" ]] || step "kubernetes: scratch module + go get" k8s_module
  step "kubernetes: go get kubelet kube-scheduler kube-proxy" k8s_node_module
  k8s_ldflags
  step "kubernetes: go build kubelet kube-scheduler kube-proxy" \
    k8s_build kubelet kube-scheduler kube-proxy
  "$BIN/kubelet" --version >&2
  "$BIN/kube-scheduler" --version >&2
  "$BIN/kube-proxy" --version >&2
  echo "$NODE_SPEC" >"$NODE_MARKER.tmp"
  mv -f "$NODE_MARKER.tmp" "$NODE_MARKER"
fi
echo "k8s sandbox binaries built in $BIN in $(($(date +%s) - t_all)) s" >&2
