#!/usr/bin/env bash
# The image of a VM pod: the rig's sid QEMU root (e2e/rig/provision.sh) as a container image,
# built with buildah from the root's cached tarball, so a pod's QEMU is the very build the
# host's sid VMs run. The target builds are NOT in it: /usr/lib/vmupdate-rig (the
# qemu-system-x86_64-alt hard link) is removed, a VM pod mounts it from the host (hostPath), as
# a user's VM pods get a distribution's QEMU update from the host.
# Image: localhost/vmupdate-qemu:<sid package version>; OCI archive cached by that version and
# this script's hash under ${VMUPDATE_CACHE:-/var/cache/vmupdate}/image/. Prints the archive's
# path and the image's name last. Locked (flock). Root only.
set -euo pipefail
die() { echo "e2e/image/qemu.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (containers storage)"
for t in buildah podman zstd python3; do command -v "$t" >/dev/null || die "$t missing"; done
SHARE="${VMUPDATE_RIG_SHARE:-/var/lib/vmupdate-rig}"
CACHE="${VMUPDATE_CACHE:-/var/cache/vmupdate}/image"
[ -f "$SHARE/rig.json" ] || die "no $SHARE/rig.json: run e2e/rig/provision.sh first"
root=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["qemu"]["sid"]["root"])' \
  "$SHARE/rig.json")
tarball="$(dirname "$root")/root.tar.zst"
[ -f "$tarball" ] || die "no $tarball: run e2e/rig/provision.sh"
version=$(basename "$(dirname "$root")")          # the sid package version, e.g. 1_11.1.3+ds-1
key="$version-$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-8)"
tag=$(echo "$version" | tr -c 'A-Za-z0-9_.\n-' '_')
ref="localhost/vmupdate-qemu:$tag"
archive="$CACHE/qemu-$key.oci.tar"
mkdir -p "$CACHE"
exec 9>"$CACHE/.qemu.lock"
flock -w 3600 9 || die "timed out waiting for $CACHE/.qemu.lock"

if [ ! -f "$archive" ]; then
  t0=$(date +%s)
  ctr=$(buildah from --pull=never scratch)
  trap 'buildah umount "$ctr" >/dev/null 2>&1 || true; buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
  mnt=$(buildah mount "$ctr")
  zstd -dc "$tarball" | tar -C "$mnt" --numeric-owner -xf -
  # Targets come from the host; docs and locales are not needed to run QEMU.
  rm -rf "$mnt/usr/lib/vmupdate-rig" "$mnt"/usr/share/doc/* "$mnt"/usr/share/man/* \
    "$mnt"/usr/share/locale/* "$mnt"/var/cache/apt/* "$mnt"/var/lib/apt/lists/*
  mkdir -p "$mnt/usr/lib/vmupdate-rig"             # the hostPath's mount point
  buildah umount "$ctr" >/dev/null
  buildah config --entrypoint '["/usr/bin/qemu-system-x86_64"]' --cmd '' \
    --label "dev.vmupdate.qemu=$key" "$ctr"
  buildah commit -q "$ctr" "$ref" >/dev/null
  rm -f "$archive.tmp"
  podman save --format oci-archive -o "$archive.tmp" "$ref" >/dev/null
  mv -f "$archive.tmp" "$archive"
  find "$CACHE" -maxdepth 1 -name 'qemu-*.oci.tar' ! -name "$(basename "$archive")" -delete
  echo "e2e/image/qemu.sh: built $ref in $(($(date +%s) - t0)) s" >&2
fi
echo "e2e/image/qemu.sh: $ref $(stat -c %s "$archive") bytes (archive)" >&2
echo "$archive"
echo "$ref"
