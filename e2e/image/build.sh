#!/usr/bin/env bash
# Build the project's image from the Dockerfile with buildah, as a user would with any builder:
#   1. e2e/image/base.sh provides the FROM images from Debian packages (no registry here);
#   2. buildah build --pull=never --layers (a warm run reuses every unchanged step);
#   3. an OCI archive of it for a node's containerd: ${VMUPDATE_CACHE}/image/vmupdate-<id>.oci.tar.
# The image is docker.io/library/vmupdate:<version from pyproject.toml>: the name the chart's
# default `image.repository: vmupdate` resolves to. Prints the archive's path last.
# Root only; the build's RUN steps reach the apt mirror and the Python index through the
# host's network (--network=host).
set -euo pipefail
die() { echo "e2e/image/build.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (containers storage)"
command -v buildah >/dev/null || die "buildah missing (apt-get install buildah podman)"
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE="${VMUPDATE_CACHE:-/var/cache/vmupdate}/image"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$top/pyproject.toml" | head -1)
[ -n "$version" ] || die "no version in pyproject.toml"
ref="docker.io/library/vmupdate:$version"

"$top/e2e/image/base.sh"
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock -w 3600 9 || die "timed out waiting for $CACHE/.build.lock"

t0=$(date +%s)
# crun refuses this machine kind's hybrid cgroup hierarchy; runc runs on v1, v2 and hybrid.
buildah build --pull=never --layers --network=host --runtime=runc \
  -f "$top/Dockerfile" -t "$ref" "$top" >"$CACHE/build.log" 2>&1 ||
  { tail -n 40 "$CACHE/build.log" >&2; die "buildah build failed (log: $CACHE/build.log)"; }
id=$(buildah inspect --type image --format '{{.FromImageID}}' "$ref")
echo "e2e/image/build.sh: built $ref (${id:0:12}) in $(($(date +%s) - t0)) s" >&2

# Keyed by the image's id: several source trees may build on one machine (same tag, shared
# storage); each test imports the archive of the image its own build made.
archive="$CACHE/vmupdate-${id:0:16}.oci.tar"
if [ ! -f "$archive" ]; then
  rm -f "$archive.tmp"
  podman save --format oci-archive -o "$archive.tmp" "$ref" >/dev/null
  mv -f "$archive.tmp" "$archive"
fi
touch "$archive"
find "$CACHE" -maxdepth 1 -name 'vmupdate-*.oci.tar' -mmin +1440 -delete
echo "e2e/image/build.sh: $ref $(podman image inspect --format '{{.Size}}' "$ref") bytes" >&2
echo "$archive"
