#!/usr/bin/env bash
# What a real Kubernetes node needs here, besides the binaries of e2e/cluster/build.sh
# (kubelet, kube-proxy) and the project's image (e2e/image/build.sh):
#   - Debian's containerd, runc, the CNI plugins, iptables, conntrack, socat, buildah, podman;
#   - the pod sandbox ("pause") image: no registry is reachable for registry.k8s.io/pause, so
#     e2e/node/pause.c is built static into a one-file image, as an OCI archive cached under
#     ${VMUPDATE_CACHE:-/var/cache/vmupdate}/node/ keyed by the source's hash.
# Idempotent and locked; prints the pause archive's path last. Root only.
set -euo pipefail
die() { echo "e2e/node/provision.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE="${VMUPDATE_CACHE:-/var/cache/vmupdate}/node"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 3600 9 || die "timed out waiting for $CACHE/.lock"

PACKAGES=(containerd runc containernetworking-plugins iptables conntrack socat buildah podman
  gcc libc6-dev)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "e2e/node/provision.sh: apt-get install ${missing[*]}" >&2
  apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    --no-install-recommends "${missing[@]}" >"$CACHE/apt.log" 2>&1 ||
    { tail -n 20 "$CACHE/apt.log" >&2; die "apt-get install failed (log: $CACHE/apt.log)"; }
fi
# The distribution's containerd service is not ours: the tests start their own instance.
if systemctl is-enabled containerd >/dev/null 2>&1; then
  systemctl disable --now containerd >/dev/null 2>&1 || true
fi

key=$(sha256sum "$here/pause.c" | cut -c1-16)
archive="$CACHE/pause-$key.oci.tar"
if [ ! -f "$archive" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  gcc -static -O2 -Wall -Wextra -Werror -o "$tmp/pause" "$here/pause.c"
  ctr=$(buildah from scratch)
  buildah copy "$ctr" "$tmp/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --cmd '' "$ctr"
  buildah commit -q "$ctr" "localhost/vmupdate-pause:$key" >/dev/null
  buildah rm "$ctr" >/dev/null
  podman save --format oci-archive -o "$archive.tmp" "localhost/vmupdate-pause:$key" >/dev/null 2>&1
  mv -f "$archive.tmp" "$archive"
fi
ln -sfn "$(basename "$archive")" "$CACHE/pause.oci.tar"
echo "$archive"
