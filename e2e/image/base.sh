#!/usr/bin/env bash
# Provide the Dockerfile's FROM images without a container registry, from Debian packages:
#   docker.io/library/debian:bookworm-slim      a debootstrapped bookworm minbase root
#   docker.io/library/python:3.11-slim-bookworm the same plus bookworm's python3 (3.11) and pip
# (pip's "externally managed" marker removed and `python` -> python3, as in the official image;
# the host's CA bundle, which the way to the Python index may need).
#
# Each root is cached as a tarball keyed by the versions of its packages under
# ${VMUPDATE_CACHE:-/var/cache/vmupdate}/image/base/, and imported into the local
# containers storage (podman/buildah) with the tarball's key as a label; a run that finds both
# does nothing. VMUPDATE_IMAGE_REFRESH=1 debootstraps again (newer packages).
# Locked (flock). Root only. Mirror: the host's apt configuration.
set -euo pipefail
die() { echo "e2e/image/base.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, containers storage)"
for t in debootstrap podman; do command -v "$t" >/dev/null || die "$t missing (apt-get install $t)"; done

CACHE="${VMUPDATE_CACHE:-/var/cache/vmupdate}/image/base"
SUITE=bookworm
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 3600 9 || die "timed out waiting for $CACHE/.lock"

mirror_uri() { # the URI of the host's deb822 stanza for $SUITE
  local f uri=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    uri=$(awk -v c="$SUITE" '
      BEGIN { RS=""; FS="\n" }
      { u=""; s=0
        for (i=1; i<=NF; i++) {
          if ($i ~ /^URIs:/)   { sub(/^URIs:[ \t]*/, "", $i); split($i, a, /[ \t]+/); u=a[1] }
          if ($i ~ /^Suites:/) { n=split($i, b, /[ \t]+/); for (j=2; j<=n; j++) if (b[j]==c) s=1 }
        }
        if (u != "" && s) { print u; exit } }' "$f")
    [ -n "$uri" ] && break
  done
  [ -n "$uri" ] || die "no apt source for $SUITE in /etc/apt/sources.list.d/*.sources"
  echo "${uri%/}"
}

# build_root NAME INCLUDE: debootstrap into a temp dir, slim it, tar it; prints the tarball
build_root() {
  local name=$1 include=$2 dir tar key
  dir=$(mktemp -d "$CACHE/build.XXXXXX")
  trap 'rm -rf --one-file-system "$dir"' RETURN
  echo "e2e/image/base.sh: debootstrap $SUITE for $name" >&2
  debootstrap --variant=minbase ${include:+--include="$include"} "$SUITE" "$dir/root" \
    "$(mirror_uri)" >"$CACHE/$name.debootstrap.log" 2>&1 ||
    { tail -n 20 "$CACHE/$name.debootstrap.log" >&2; die "debootstrap failed for $name"; }
  # What the official slim images leave out; apt lists (a Dockerfile's RUN runs apt-get update).
  rm -rf "$dir"/root/usr/share/doc/* "$dir"/root/usr/share/man/* "$dir"/root/usr/share/info/* \
    "$dir"/root/var/lib/apt/lists/* "$dir"/root/var/cache/apt/*.bin "$dir"/root/var/cache/apt/archives/*.deb \
    "$dir"/root/var/log/*.log "$dir"/root/etc/hostname "$dir"/root/etc/resolv.conf
  rm -f "$dir"/root/usr/lib/python3*/EXTERNALLY-MANAGED
  # The host's trust store (it may hold a local CA that the way to the Python index needs).
  if [ -d "$dir/root/etc/ssl/certs" ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$dir/root/etc/ssl/certs/ca-certificates.crt"
  fi
  key=$({ chroot "$dir/root" dpkg-query -W -f='${Package}=${Version}\n'
          cat "$dir"/root/etc/ssl/certs/ca-certificates.crt 2>/dev/null || true; } |
        sha256sum | cut -c1-16)
  tar="$CACHE/$name-$key.tar"
  tar -C "$dir/root" --numeric-owner -cf "$tar.tmp" .
  mv -f "$tar.tmp" "$tar"
  ln -sfn "$(basename "$tar")" "$CACHE/$name.tar"
  find "$CACHE" -maxdepth 1 -name "$name-*.tar" ! -name "$(basename "$tar")" -delete
  echo "$tar"
}

# ensure NAME REF INCLUDE CHANGES...: the tarball (cached) imported as REF (label = its key)
ensure() {
  local name=$1 ref=$2 include=$3 tar key have args=() c
  shift 3
  tar="$CACHE/$name.tar"
  if [ "${VMUPDATE_IMAGE_REFRESH:-0}" = 1 ] || [ ! -f "$tar" ]; then
    tar=$(build_root "$name" "$include")
  fi
  tar=$(readlink -f "$tar")
  key=$(basename "$tar" .tar)
  have=$(podman image inspect --format '{{index .Labels "dev.vmupdate.base"}}' "$ref" 2>/dev/null || true)
  if [ "$have" = "$key" ]; then
    echo "e2e/image/base.sh: $ref is $key"
    return
  fi
  for c in "$@" "LABEL dev.vmupdate.base=$key"; do args+=(--change "$c"); done
  podman import "${args[@]}" "$tar" "$ref" >/dev/null
  echo "e2e/image/base.sh: imported $ref ($key)"
}

ensure debian-bookworm-slim docker.io/library/debian:bookworm-slim "" \
  "CMD [\"bash\"]"
ensure python-3.11-slim-bookworm docker.io/library/python:3.11-slim-bookworm \
  "python3,python3-pip,python-is-python3,ca-certificates" \
  "ENV LANG=C.UTF-8" "CMD [\"python3\"]"
