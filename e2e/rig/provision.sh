#!/usr/bin/env bash
# Provision the QEMU test rig of vmupdate on a Debian 12 host (run as root).
#
#   * QEMU 10.0.x from <codename>-backports on the host (narrow apt pin).
#   * QEMU 11.x from sid in a private debootstrap root (never installed into the host root).
#   * Debian 13's own builds of QEMU: trixie (10.0.x) and trixie-backports (11.1.x), unpacked
#     into the share and run in the sid root.
#   * A runtime SHARE folder, bind-mounted into the sid root at the same path, with wrapper
#     executables (SHARE/bin), the guest kernel + initramfs (SHARE/guest) and SHARE/rig.json.
#
# Idempotent and cached: everything slow is kept under $VMUPDATE_CACHE/rig, keyed by exact
# package version, with a completion marker written last; the sid root is also kept as a
# tarball.  Concurrent runs serialise on a lock.  A warm run only re-checks, re-establishes
# the mounts (they do not survive a reboot) and rewrites the wrappers and rig.json.
#
# Environment:
#   VMUPDATE_CACHE       cache root (default /var/cache/vmupdate); the rig uses its rig/ folder
#   VMUPDATE_RIG_SHARE   runtime share (default /var/lib/vmupdate-rig)
#   VMUPDATE_RIG_REFRESH=1  look for newer sid QEMU / kernel / busybox packages
#
# Paths as seen by the QEMUs (see also e2e/rig/README.md):
#   SHARE/bin/qemu-backports  exec /usr/bin/qemu-system-x86_64 (host)
#   SHARE/bin/qemu-sid        host: exec chroot ROOT /usr/bin/qemu-system-x86_64
#                             inside ROOT: exec /usr/bin/qemu-system-x86_64
#   SHARE/bin/qemu-sid-alt    the same sid binary through a hard link at
#                             /usr/lib/vmupdate-rig/qemu-system-x86_64-alt (inside ROOT)
#   SHARE/bin/qemu-trixie, qemu-trixie-backports
#                             trixie's and trixie-backports' own builds, unpacked at
#                             SHARE/qemu/<suite>/usr/bin/qemu-system-x86_64, run in ROOT
set -Eeuo pipefail
umask 022
export LC_ALL=C DEBIAN_FRONTEND=noninteractive

die() { echo "provision.sh: ERROR: $*" >&2; exit 1; }
trap 'echo "provision.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

[ "$(id -u)" = 0 ] || die "must run as root"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${VMUPDATE_CACHE:-/var/cache/vmupdate}
CACHE=$CACHE_ROOT/rig
SHARE=${VMUPDATE_RIG_SHARE:-/var/lib/vmupdate-rig}
REFRESH=${VMUPDATE_RIG_REFRESH:-0}
case "$SHARE" in /*) ;; *) die "VMUPDATE_RIG_SHARE must be an absolute path";; esac
case "$CACHE" in /*) ;; *) die "VMUPDATE_CACHE must be an absolute path";; esac
SHARE=${SHARE%/}
ROOT_MARKER=/etc/vmupdate-rig-sid-root      # exists only inside the sid root
ALT_BIN=/usr/lib/vmupdate-rig/qemu-system-x86_64-alt
KERNEL_APPEND="console=ttyS0 quiet panic=-1 rdinit=/init"

T0=$(date +%s.%N)
TLAST=$T0
step() {  # step NAME: print how long the previous step took
    local now; now=$(date +%s.%N)
    awk -v n="$1" -v a="$now" -v b="$TLAST" -v t="$T0" \
        'BEGIN { printf "provision.sh: %-34s +%6.2fs (total %6.2fs)\n", n, a-b, a-t }'
    TLAST=$now
}

mkdir -p "$CACHE" "$SHARE"
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    echo "provision.sh: waiting for another provision run (lock $CACHE/.lock)"
    flock -w 3600 9 || die "timed out waiting for $CACHE/.lock"
fi

# ---------------------------------------------------------------------------------------
# Distribution facts: codename and mirror (read from the host's apt configuration).
. /etc/os-release
CODENAME=${VERSION_CODENAME:-}
[ -n "$CODENAME" ] || die "cannot tell the Debian codename from /etc/os-release"
[ "$CODENAME" = bookworm ] || echo "provision.sh: warning: written for Debian 12 (bookworm), this is $CODENAME"

mirror_uri() {
    local f uri=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        # deb822: the stanza whose Suites has exactly $CODENAME
        uri=$(awk -v c="$CODENAME" '
            BEGIN { RS=""; FS="\n" }
            {
              u=""; s=0; d=0
              for (i=1; i<=NF; i++) {
                if ($i ~ /^URIs:/)   { sub(/^URIs:[ \t]*/, "", $i); split($i, a, /[ \t]+/); u=a[1] }
                if ($i ~ /^Suites:/) { n=split($i, b, /[ \t]+/); for (j=2; j<=n; j++) if (b[j]==c) s=1 }
                if ($i ~ /^Types:/ && $i ~ /[ \t]deb([ \t]|$)/) d=1
              }
              if (u != "" && s && d) { print u; exit }
            }' "$f")
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ] && [ -e /etc/apt/sources.list ]; then
        uri=$(awk -v c="$CODENAME" '$1=="deb" { o=2; if ($2 ~ /^\[/) { while ($o !~ /\]$/) o++; o++ }
              if ($(o+1)==c) { print $o; exit } }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || die "no apt source for '$CODENAME' in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
    echo "${uri%/}"
}
MIRROR=$(mirror_uri)

APT_UPDATED=0
APT_LOCK_WAIT="-o DPkg::Lock::Timeout=600"   # others may be running apt on this host
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        echo "provision.sh: apt-get update"
        apt-get update -q $APT_LOCK_WAIT >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
}
pkg_installed() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed; }
apt_install_host() {  # install missing host packages
    local missing=() p
    for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} = 0 ] && return 0
    apt_update_once
    echo "provision.sh: apt-get install ${missing[*]}"
    apt-get install -y -q $APT_LOCK_WAIT --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}
# key: a package version made safe for a file name (':' would make tar think of a host)
vkey() { printf '%s' "$1" | tr ':/' '__'; }

# ---------------------------------------------------------------------------------------
# Host tools.
apt_install_host debootstrap gcc libc6-dev cpio gzip zstd util-linux coreutils
step "host tools"

# ---------------------------------------------------------------------------------------
# (a) QEMU 10.0.x from backports on the host, narrow pin.
BPO_SOURCES=/etc/apt/sources.list.d/vmupdate-rig-backports.sources
BPO_PIN=/etc/apt/preferences.d/vmupdate-rig-backports
QEMU_BPO_PKGS="qemu-system-x86 qemu-system-common qemu-system-data qemu-system-modules-spice qemu-system-gui qemu-utils qemu-block-extra"
write_if_changed() {  # write_if_changed FILE (content on stdin); returns 0 if it changed
    local tmp; tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    if [ -e "$1" ] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
    chmod 644 "$tmp"; mv -f "$tmp" "$1"; return 0
}
bpo_changed=0
write_if_changed "$BPO_SOURCES" <<EOF && bpo_changed=1
# written by vmupdate e2e/rig/provision.sh: backports for QEMU 10.0 (see $BPO_PIN)
Types: deb
URIs: $MIRROR
Suites: $CODENAME-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
write_if_changed "$BPO_PIN" <<EOF && bpo_changed=1
# written by vmupdate e2e/rig/provision.sh: take only QEMU (and the firmware it needs)
# from backports; nothing else from there is ever installed.
Package: qemu-system-x86 qemu-system-common qemu-system-data qemu-system-modules-spice qemu-system-gui qemu-utils qemu-block-extra seabios ipxe-qemu
Pin: release n=$CODENAME-backports
Pin-Priority: 990

Package: *
Pin: release n=$CODENAME-backports
Pin-Priority: -1
EOF
host_qemu_ok() {
    local v
    v=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null) || return 1
    pkg_installed qemu-system-x86 && pkg_installed qemu-utils || return 1
    case "$v" in *bpo*) ;; *) return 1;; esac
    [ -x /usr/bin/qemu-system-x86_64 ] || return 1
    /usr/bin/qemu-system-x86_64 -version | head -1 | grep -Eq 'version (1[0-9]|[2-9][0-9])\.'
}
if [ "$bpo_changed" = 1 ] || ! host_qemu_ok || [ "$REFRESH" = 1 ]; then
    APT_UPDATED=0
    apt_update_once
    apt-get install -y -q $APT_LOCK_WAIT --no-install-recommends qemu-system-x86 qemu-utils \
        >/dev/null \
        || die "installing QEMU from $CODENAME-backports failed"
    host_qemu_ok || die "host QEMU is not the backports 10.x one: $(dpkg-query -W qemu-system-x86 2>&1)"
fi
BPO_PKG_VERSION=$(dpkg-query -W -f='${Version}' qemu-system-x86)
BPO_VERSION_LINE=$(/usr/bin/qemu-system-x86_64 -version | head -1)
step "backports QEMU $BPO_PKG_VERSION"

# ---------------------------------------------------------------------------------------
# (b) sid root with QEMU >= 10.2.
SID_DIR=$CACHE/sid
mkdir -p "$SID_DIR"
# sid's Release is valid for a week only; a mirror that serves a frozen snapshot of the
# archive has it "expired".  Signatures are still checked.
SID_APT_OPTS="-o Acquire::Check-Valid-Until=false"

# Unmount everything below $1 (deepest first).  Never remove a tree with mounts inside.
umount_below() {
    local d=$1 m
    [ -d "$d" ] || return 0
    d=$(realpath "$d")
    findmnt -rn -o TARGET | awk -v d="$d" 'index($0, d"/")==1 || $0==d' | sort -r |
    while read -r m; do
        m=$(printf '%b' "$m")   # findmnt -r escapes blanks as \x20
        umount -l "$m" 2>/dev/null || umount -R -l "$m" 2>/dev/null || true
    done
}
safe_rm_tree() {
    local d=$1
    [ -e "$d" ] || return 0
    umount_below "$d"
    if findmnt -rn -o TARGET | grep -q "^$(realpath "$d")/"; then
        die "refusing to remove $d: something is still mounted below it"
    fi
    rm -rf --one-file-system "$d"
}

build_sid_root() {  # prints the key of the finished root on stdout
    local build=$SID_DIR/build.$$ ver key dest
    safe_rm_tree "$build"
    mkdir -p "$build"
    echo "provision.sh: debootstrap --variant=minbase sid (this takes about a minute)" >&2
    if ! debootstrap --variant=minbase --components=main sid "$build" "$MIRROR" \
            >"$SID_DIR/debootstrap.log" 2>&1; then
        tail -n 30 "$SID_DIR/debootstrap.log" >&2
        safe_rm_tree "$build"
        die "debootstrap sid failed (log: $SID_DIR/debootstrap.log)"
    fi
    step "debootstrap sid" >&2
    printf '#!/bin/sh\nexit 101\n' >"$build/usr/sbin/policy-rc.d"
    chmod 755 "$build/usr/sbin/policy-rc.d"
    cp -L /etc/resolv.conf "$build/etc/resolv.conf" 2>/dev/null || true
    mount -t proc proc "$build/proc"
    mount --rbind /dev "$build/dev"; mount --make-rslave "$build/dev"
    local rc=0
    {
        chroot "$build" apt-get update -q $SID_APT_OPTS &&
        chroot "$build" apt-get install -y -q --no-install-recommends qemu-system-x86 qemu-utils &&
        chroot "$build" apt-get clean
    } >"$SID_DIR/apt.log" 2>&1 || rc=$?
    umount_below "$build"
    if [ "$rc" != 0 ]; then
        tail -n 30 "$SID_DIR/apt.log" >&2
        safe_rm_tree "$build"
        die "installing QEMU into the sid root failed (log: $SID_DIR/apt.log)"
    fi
    rm -f "$build/usr/sbin/policy-rc.d"
    rm -rf "$build"/var/lib/apt/lists/* "$build"/var/cache/apt/*.bin
    ver=$(chroot "$build" dpkg-query -W -f='${Version}' qemu-system-x86)
    mkdir -p "$build$(dirname "$ALT_BIN")"
    ln -f "$build/usr/bin/qemu-system-x86_64" "$build$ALT_BIN"
    echo "$ver" >"$build$ROOT_MARKER"
    key=$(vkey "$ver")
    dest=$SID_DIR/$key
    if [ -e "$dest/complete" ] && [ -d "$dest/root" ]; then
        echo "provision.sh: sid QEMU $ver already cached" >&2
        safe_rm_tree "$build"
    else
        safe_rm_tree "$dest"
        mkdir -p "$dest"
        echo "provision.sh: saving the sid root as a tarball" >&2
        tar -C "$build" --one-file-system --numeric-owner -cf - . | zstd -q -T0 -3 -o "$dest/root.tar.zst.tmp"
        mv -f "$dest/root.tar.zst.tmp" "$dest/root.tar.zst"
        mv "$build" "$dest/root"
        echo "$ver" >"$dest/complete"
    fi
    echo "$key"
}

restore_sid_root() {  # re-extract $1's root from its tarball
    local dest=$SID_DIR/$1 tmp
    tmp=$dest/root.tmp.$$
    safe_rm_tree "$tmp"
    mkdir -p "$tmp"
    echo "provision.sh: re-extracting the sid root from its tarball" >&2
    zstd -q -d -c "$dest/root.tar.zst" | tar -C "$tmp" --numeric-owner -xf -
    mv "$tmp" "$dest/root"
}

SID_KEY=""
if [ -L "$SID_DIR/current" ]; then
    SID_KEY=$(readlink "$SID_DIR/current")
    [ -e "$SID_DIR/$SID_KEY/complete" ] || SID_KEY=""
fi
if [ -n "$SID_KEY" ] && [ "$REFRESH" = 1 ]; then
    # Is there a newer qemu-system-x86 in sid?  Ask the current root's apt.
    r=$SID_DIR/$SID_KEY/root
    if [ -d "$r" ]; then
        cp -L /etc/resolv.conf "$r/etc/resolv.conf" 2>/dev/null || true
        chroot "$r" apt-get update -q $SID_APT_OPTS >/dev/null 2>&1 || die "apt-get update in the sid root failed"
        cand=$(chroot "$r" apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
        rm -rf "$r"/var/lib/apt/lists/*
        [ -e "$SID_DIR/$(vkey "$cand")/complete" ] || SID_KEY=""
    fi
fi
if [ -z "$SID_KEY" ]; then
    SID_KEY=$(build_sid_root)
    ln -sfn "$SID_KEY" "$SID_DIR/current"
fi
[ -d "$SID_DIR/$SID_KEY/root" ] || restore_sid_root "$SID_KEY"
SID_ROOT=$SID_DIR/$SID_KEY/root
SID_PKG_VERSION=$(cat "$SID_DIR/$SID_KEY/complete")
[ -e "$SID_ROOT$ROOT_MARKER" ] && [ -x "$SID_ROOT/usr/bin/qemu-system-x86_64" ] \
    || die "sid root $SID_ROOT is damaged: remove $SID_DIR/$SID_KEY and run again"
step "sid root $SID_PKG_VERSION"

# ---------------------------------------------------------------------------------------
# (c) mounts: SHARE at the same path, /dev (with /dev/shm), /proc, /sys.
mkdir -p "$SHARE"/{bin,guest,vms} "$SID_ROOT$SHARE"
ensure_rbind() {  # ensure_rbind SRC DST
    if ! mountpoint -q "$2"; then
        mount --rbind "$1" "$2"
        mount --make-rslave "$2"
    fi
}
ensure_rbind /dev "$SID_ROOT/dev"
mountpoint -q "$SID_ROOT/proc" || mount -t proc proc "$SID_ROOT/proc"
ensure_rbind /sys "$SID_ROOT/sys"
if ! mountpoint -q "$SID_ROOT$SHARE"; then
    mount --bind "$SHARE" "$SID_ROOT$SHARE"
    mount --make-slave "$SID_ROOT$SHARE" 2>/dev/null || true
fi
# The share inside must be the share outside (same inode), else paths would diverge.
[ "$(stat -c %d:%i "$SHARE")" = "$(stat -c %d:%i "$SID_ROOT$SHARE")" ] \
    || die "$SID_ROOT$SHARE is not the share $SHARE"
[ -d "$SID_ROOT/dev/shm" ] || die "/dev/shm missing inside the sid root"
step "mounts"

# ---------------------------------------------------------------------------------------
# (c2) genuinely different builds: Debian 13 (trixie)'s QEMU 10.0.x and trixie-backports'
# own build of 11.1.x.  Their qemu-system-x86 packages are unpacked (dpkg -x) into the share,
# so they are at the same path on the host and in the sid root, and run in the sid root with
# its libraries and firmware (trixie's libc is newer than the host's: they cannot run on the
# host; see e2e/rig/README.md).  Cached by package version; apt runs inside the sid root
# with private sources and lists (nothing is installed there).
BUILDS=$CACHE/builds
mkdir -p "$BUILDS" "$SHARE/qemu"
TRIXIE_APT=/var/lib/vmupdate-rig-apt    # inside the sid root
trixie_apt() {  # trixie_apt DIR CMD ARGS...: apt-get/apt-cache in the sid root, in DIR
    local dir=$1 cmd=$2; shift 2
    chroot "$SID_ROOT" /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$dir" "$cmd" \
        -o Dir::Etc::SourceList=$TRIXIE_APT/sources.list -o Dir::Etc::SourceParts=$TRIXIE_APT/none \
        -o Dir::State::Lists=$TRIXIE_APT/lists -o Dir::Cache::Archives=$TRIXIE_APT/archives \
        -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o Dir::Etc::Preferences=/dev/null \
        -o Dir::Etc::PreferencesParts=$TRIXIE_APT/none -o APT::Sandbox::User=root \
        $SID_APT_OPTS "$@"
}
TRIXIE_LISTS=0
trixie_lists() {
    [ "$TRIXIE_LISTS" = 1 ] && return 0
    mkdir -p "$SID_ROOT$TRIXIE_APT"/lists/partial "$SID_ROOT$TRIXIE_APT"/archives/partial \
             "$SID_ROOT$TRIXIE_APT"/none "$SID_ROOT$TRIXIE_APT"/debs
    printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
        "$MIRROR" trixie "$MIRROR" trixie-backports >"$SID_ROOT$TRIXIE_APT/sources.list"
    cp -L /etc/resolv.conf "$SID_ROOT/etc/resolv.conf" 2>/dev/null || true
    if ! trixie_apt / apt-get update -q >"$BUILDS/apt-update.log" 2>&1; then
        tail -n 20 "$BUILDS/apt-update.log" >&2
        die "apt-get update (trixie sources) in the sid root failed"
    fi
    TRIXIE_LISTS=1
}
fetch_build() {  # fetch_build SUITE: SUITE's qemu-system-x86 unpacked in the cache; prints its key
    local suite=$1 key="" ver tmp
    if [ -L "$BUILDS/$suite.current" ] && [ "$REFRESH" != 1 ]; then
        key=$(readlink "$BUILDS/$suite.current")
        [ -e "$BUILDS/$key/complete" ] || key=""
    fi
    if [ -z "$key" ]; then
        trixie_lists
        ver=$(trixie_apt / apt-cache madison qemu-system-x86 | awk -F'|' -v s=" $suite/main " '
            index($3, s) { gsub(/ /, "", $2); print $2; exit }')
        [ -n "$ver" ] || die "no qemu-system-x86 in $suite"
        key=$(vkey "qemu-system-x86_$ver")
        if [ ! -e "$BUILDS/$key/complete" ]; then
            echo "provision.sh: fetching qemu-system-x86 $ver ($suite)" >&2
            tmp=$TRIXIE_APT/debs/$key
            rm -rf "$SID_ROOT$tmp"; mkdir -p "$SID_ROOT$tmp"
            trixie_apt "$tmp" apt-get download -q "qemu-system-x86=$ver" >/dev/null \
                || die "apt-get download qemu-system-x86=$ver ($suite) failed"
            rm -rf "$BUILDS/$key"; mkdir -p "$BUILDS/$key"
            dpkg -x "$SID_ROOT$tmp"/*.deb "$BUILDS/$key/tree"
            rm -rf "$SID_ROOT$tmp"
            [ -x "$BUILDS/$key/tree/usr/bin/qemu-system-x86_64" ] || die "$key has no qemu-system-x86_64"
            echo "$ver" >"$BUILDS/$key/complete"
        fi
        ln -sfn "$key" "$BUILDS/$suite.current"
    fi
    echo "$key"
}
install_build() {  # install_build SUITE KEY: the unpacked build at SHARE/qemu/SUITE
    local dst=$SHARE/qemu/$1
    if [ "$(cat "$dst/.key" 2>/dev/null)" != "$2" ]; then
        rm -rf "$dst.tmp.$$"
        cp -a "$BUILDS/$2/tree" "$dst.tmp.$$"
        echo "$2" >"$dst.tmp.$$/.key"
        rm -rf "$dst"; mv "$dst.tmp.$$" "$dst"
    fi
}
# Every build in the root finds loadable modules in the root's one module folder, and QEMU
# aborts on a module of another build ("Only modules from the same build can be loaded"),
# e.g. when the agent's probe lists the types (qom-list-types loads all modules). The rig's
# VMs use no module (TCG and their devices are built in): sid's are moved aside, so no build
# loads any, and every build lists its own types.
MODDIR=$SID_ROOT/usr/lib/x86_64-linux-gnu/qemu
if compgen -G "$MODDIR/*.so" >/dev/null; then
    mkdir -p "$MODDIR.unused"
    mv -f "$MODDIR"/*.so "$MODDIR.unused/"
fi
TRIXIE_KEY=$(fetch_build trixie)
TBPO_KEY=$(fetch_build trixie-backports)
install_build trixie "$TRIXIE_KEY"
install_build trixie-backports "$TBPO_KEY"
TRIXIE_PKG_VERSION=$(cat "$BUILDS/$TRIXIE_KEY/complete")
TBPO_PKG_VERSION=$(cat "$BUILDS/$TBPO_KEY/complete")
TRIXIE_BIN=$SHARE/qemu/trixie/usr/bin/qemu-system-x86_64
TBPO_BIN=$SHARE/qemu/trixie-backports/usr/bin/qemu-system-x86_64
step "trixie builds"

# ---------------------------------------------------------------------------------------
# (d) wrappers.  They exec (never fork), so the QEMU pid is the pid that was started.
write_exec() {  # write_exec FILE (content on stdin), executable, atomically
    local tmp; tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"; chmod 755 "$tmp"
    if [ -e "$1" ] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; fi
}
write_exec "$SHARE/bin/qemu-backports" <<EOF
#!/bin/sh
# vmupdate rig: QEMU $BPO_PKG_VERSION from $CODENAME-backports (host root).
if [ -e $ROOT_MARKER ]; then
    echo "qemu-backports: the backports QEMU is not available inside the sid root" >&2
    exit 127
fi
exec /usr/bin/qemu-system-x86_64 "\$@"
EOF
for w in "qemu-sid|/usr/bin/qemu-system-x86_64|$SID_PKG_VERSION|sid" \
         "qemu-sid-alt|$ALT_BIN|$SID_PKG_VERSION|sid" \
         "qemu-trixie|$TRIXIE_BIN|$TRIXIE_PKG_VERSION|trixie" \
         "qemu-trixie-backports|$TBPO_BIN|$TBPO_PKG_VERSION|trixie-backports"; do
    IFS='|' read -r name bin pkgver suite <<<"$w"
    write_exec "$SHARE/bin/$name" <<EOF
#!/bin/sh
# vmupdate rig: QEMU $pkgver from $suite, run in the private sid root $SID_ROOT.
# Works from the host (enters the root) and from inside the root (a chrooted QEMU doing
# cpr-exec runs this same path).  chroot(1) changes the working directory to /.
if [ -e $ROOT_MARKER ]; then
    exec $bin "\$@"
fi
if [ "\$(id -u)" != 0 ]; then
    # The agent probes a target unprivileged (as nobody), and nobody may not chroot: a user
    # namespace of its own gives it that right over this root and nothing more.
    exec /usr/bin/unshare --user --map-root-user /usr/sbin/chroot $SID_ROOT $bin "\$@"
fi
exec /usr/sbin/chroot $SID_ROOT $bin "\$@"
EOF
done
step "wrappers"

# ---------------------------------------------------------------------------------------
# (e) guest: kernel and initramfs.
download_deb() {  # download_deb PKG=VERSION DIR: fetch one .deb into DIR
    mkdir -p "$2"
    (cd "$2" && apt-get download -q -o APT::Sandbox::User=root "$1" >/dev/null 2>&1) && return 0
    # the local package lists may be stale: refresh once and retry
    [ "$APT_UPDATED" = 1 ] && die "apt-get download $1 failed"
    apt_update_once
    (cd "$2" && apt-get download -q -o APT::Sandbox::User=root "$1" >/dev/null) \
        || die "apt-get download $1 failed"
}
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" { print $2 }'; }
kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
# Packages are resolved from the local package lists; those are updated only when that
# fails (fresh host, stale lists) or on refresh.
# kernel
KDIR=$CACHE/kernel
mkdir -p "$KDIR"
K_KEY=""
if [ -L "$KDIR/current" ] && [ "$REFRESH" != 1 ]; then
    K_KEY=$(readlink "$KDIR/current")
    [ -e "$KDIR/$K_KEY/complete" ] || K_KEY=""
fi
if [ -z "$K_KEY" ]; then
    [ "$REFRESH" = 1 ] && apt_update_once
    kpkg=$(kernel_pkg); kver=""
    [ -n "$kpkg" ] && kver=$(candidate "$kpkg")
    if [ -z "$kver" ]; then
        apt_update_once
        kpkg=$(kernel_pkg)
        [ -n "$kpkg" ] || die "cannot resolve linux-image-cloud-amd64"
        kver=$(candidate "$kpkg")
        [ -n "$kver" ] || die "no candidate version for $kpkg"
    fi
    K_KEY=$(vkey "${kpkg}_$kver")
    if [ ! -e "$KDIR/$K_KEY/complete" ]; then
        tmp=$KDIR/tmp.$$
        rm -rf "$tmp"
        download_deb "$kpkg=$kver" "$tmp/deb"
        dpkg -x "$tmp"/deb/*.deb "$tmp/x"
        rm -rf "$KDIR/$K_KEY"; mkdir -p "$KDIR/$K_KEY"
        cp "$tmp"/x/boot/vmlinuz-* "$KDIR/$K_KEY/vmlinuz"
        rm -rf "$tmp"
        echo "$kpkg $kver" >"$KDIR/$K_KEY/complete"
    fi
    ln -sfn "$K_KEY" "$KDIR/current"
fi
KERNEL_PKG=$(cat "$KDIR/$K_KEY/complete")

# busybox-static: downloaded and unpacked in the cache, not installed on the host
# (it conflicts with the host's busybox package).
BDIR=$CACHE/busybox
mkdir -p "$BDIR"
B_KEY=""
if [ -L "$BDIR/current" ] && [ "$REFRESH" != 1 ]; then
    B_KEY=$(readlink "$BDIR/current")
    [ -e "$BDIR/$B_KEY/complete" ] || B_KEY=""
fi
if [ -z "$B_KEY" ]; then
    [ "$REFRESH" = 1 ] && apt_update_once
    bver=$(candidate busybox-static)
    if [ -z "$bver" ]; then
        apt_update_once
        bver=$(candidate busybox-static)
        [ -n "$bver" ] || die "busybox-static not found in apt"
    fi
    B_KEY=$(vkey "$bver")
    if [ ! -e "$BDIR/$B_KEY/complete" ]; then
        tmp=$BDIR/tmp.$$
        rm -rf "$tmp"
        download_deb "busybox-static=$bver" "$tmp/deb"
        dpkg -x "$tmp"/deb/*.deb "$tmp/x"
        rm -rf "$BDIR/$B_KEY"; mkdir -p "$BDIR/$B_KEY"
        cp "$tmp/x/bin/busybox" "$BDIR/$B_KEY/busybox"
        rm -rf "$tmp"
        echo "busybox-static $bver" >"$BDIR/$B_KEY/complete"
    fi
    ln -sfn "$B_KEY" "$BDIR/current"
fi
BUSYBOX=$BDIR/$B_KEY/busybox

# initramfs, keyed by its inputs
IDIR=$CACHE/initrd
I_KEY=$(cat "$HERE/guest/ticker.c" "$HERE/guest/init" "$BUSYBOX" <(gcc --version | head -1) \
        | sha256sum | cut -c1-16)
if [ ! -e "$IDIR/$I_KEY/complete" ]; then
    tmp=$IDIR/tmp.$$
    rm -rf "$tmp"; mkdir -p "$tmp/root"/{bin,sbin,dev,proc,sys,tmp}
    gcc -static -O2 -Wall -Wextra -Werror -o "$tmp/root/sbin/ticker" "$HERE/guest/ticker.c" \
        || die "building the guest ticker failed"
    strip "$tmp/root/sbin/ticker" 2>/dev/null || true
    cp "$BUSYBOX" "$tmp/root/bin/busybox"
    ln -s busybox "$tmp/root/bin/sh"
    install -m 755 "$HERE/guest/init" "$tmp/root/init"
    mknod -m 600 "$tmp/root/dev/console" c 5 1
    mknod -m 666 "$tmp/root/dev/null" c 1 3
    (cd "$tmp/root" && find . -print0 | sort -z | cpio --null -o -H newc -R 0:0 --quiet) \
        | gzip -9n >"$tmp/initrd.img"
    rm -rf "$IDIR/$I_KEY"; mkdir -p "$IDIR/$I_KEY"
    mv "$tmp/initrd.img" "$IDIR/$I_KEY/initrd.img"
    rm -rf "$tmp"
    echo "$I_KEY" >"$IDIR/$I_KEY/complete"
fi
# The disk guest (initrd-disk.img): the same ticker plus diskio, a disk I/O load that checks
# what it reads back, on the first virtio disk (tests of devices that carry guest I/O across
# an update, e.g. vhost-user-blk). The kernel's virtio drivers are modules: they are taken
# from the same kernel package, cached beside its vmlinuz. The plain guest is not changed.
VIRTIO_MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"
MDIR=$KDIR/$K_KEY/virtio-modules
if [ ! -e "$MDIR/complete" ]; then
    tmp=$KDIR/tmp-modules.$$
    rm -rf "$tmp"
    read -r kpkg kver <"$KDIR/$K_KEY/complete"
    download_deb "$kpkg=$kver" "$tmp/deb"
    dpkg -x "$tmp"/deb/*.deb "$tmp/x"
    rm -rf "$MDIR"; mkdir -p "$MDIR"
    for m in $VIRTIO_MODULES; do
        f=$(find "$tmp/x/lib/modules" -name "$m.ko" | head -1)
        [ -n "$f" ] || die "$kpkg has no module $m.ko (the disk guest needs it)"
        cp "$f" "$MDIR/"
    done
    rm -rf "$tmp"
    echo "$kpkg $kver" >"$MDIR/complete"
fi
D_KEY=$(cat "$HERE/guest/ticker.c" "$HERE/guest/diskio.c" "$HERE/guest/init-disk" "$BUSYBOX" \
        "$MDIR"/*.ko <(gcc --version | head -1) | sha256sum | cut -c1-16)
if [ ! -e "$IDIR/disk-$D_KEY/complete" ]; then
    tmp=$IDIR/tmp-disk.$$
    rm -rf "$tmp"; mkdir -p "$tmp/root"/{bin,sbin,dev,proc,sys,tmp,lib/modules}
    for prog in ticker diskio; do
        gcc -static -O2 -Wall -Wextra -Werror -o "$tmp/root/sbin/$prog" "$HERE/guest/$prog.c" \
            || die "building the guest's $prog failed"
        strip "$tmp/root/sbin/$prog" 2>/dev/null || true
    done
    cp "$BUSYBOX" "$tmp/root/bin/busybox"
    ln -s busybox "$tmp/root/bin/sh"
    cp "$MDIR"/*.ko "$tmp/root/lib/modules/"
    install -m 755 "$HERE/guest/init-disk" "$tmp/root/init"
    mknod -m 600 "$tmp/root/dev/console" c 5 1
    mknod -m 666 "$tmp/root/dev/null" c 1 3
    (cd "$tmp/root" && find . -print0 | sort -z | cpio --null -o -H newc -R 0:0 --quiet) \
        | gzip -9n >"$tmp/initrd.img"
    rm -rf "$IDIR/disk-$D_KEY"; mkdir -p "$IDIR/disk-$D_KEY"
    mv "$tmp/initrd.img" "$IDIR/disk-$D_KEY/initrd.img"
    rm -rf "$tmp"
    echo "disk-$D_KEY" >"$IDIR/disk-$D_KEY/complete"
fi
install_file() {  # install_file SRC DST: copy atomically if different
    if [ -e "$2" ] && cmp -s "$1" "$2"; then return 0; fi
    cp "$1" "$2.tmp.$$"; chmod 644 "$2.tmp.$$"; mv -f "$2.tmp.$$" "$2"
}
install_file "$KDIR/$K_KEY/vmlinuz" "$SHARE/guest/vmlinuz"
install_file "$IDIR/$I_KEY/initrd.img" "$SHARE/guest/initrd.img"
install_file "$IDIR/disk-$D_KEY/initrd.img" "$SHARE/guest/initrd-disk.img"
step "guest ($KERNEL_PKG)"

# ---------------------------------------------------------------------------------------
# (f) rig.json, last.  Versions from the binaries, run through the wrappers.
qver() { sed -n '1s/.*version \([0-9][0-9.]*\).*/\1/p'; }
BPO_LINE=$("$SHARE/bin/qemu-backports" -version | head -1)
SID_LINE=$("$SHARE/bin/qemu-sid" -version | head -1)
SID_ALT_LINE=$("$SHARE/bin/qemu-sid-alt" -version | head -1)
BPO_VERSION=$(printf '%s\n' "$BPO_LINE" | qver)
SID_VERSION=$(printf '%s\n' "$SID_LINE" | qver)
[ -n "$BPO_VERSION" ] && [ -n "$SID_VERSION" ] || die "cannot read QEMU versions"
[ "$SID_LINE" = "$SID_ALT_LINE" ] || die "qemu-sid-alt is not the same QEMU as qemu-sid"
TRIXIE_LINE=$("$SHARE/bin/qemu-trixie" -version | head -1)
TBPO_LINE=$("$SHARE/bin/qemu-trixie-backports" -version | head -1)
TRIXIE_VERSION=$(printf '%s\n' "$TRIXIE_LINE" | qver)
TBPO_VERSION=$(printf '%s\n' "$TBPO_LINE" | qver)
[ -n "$TRIXIE_VERSION" ] && [ -n "$TBPO_VERSION" ] || die "cannot read the trixie QEMU versions"
sha() { sha256sum "$1" | cut -c1-64; }
SID_SHA=$(sha "$SID_ROOT/usr/bin/qemu-system-x86_64")
TBPO_SHA=$(sha "$TBPO_BIN")
[ "$SID_SHA" != "$TBPO_SHA" ] || die "the sid and trixie-backports QEMUs are the same file"
ver_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" = "$2" ]; }
ver_ge "$BPO_VERSION" 10.0 || die "backports QEMU $BPO_VERSION < 10.0"
ver_ge "$SID_VERSION" 10.2 || die "sid QEMU $SID_VERSION < 10.2"
js() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }
tmp=$(mktemp "$SHARE/rig.json.XXXXXX")
cat >"$tmp" <<EOF
{
  "schema": 1,
  "share": $(js "$SHARE"),
  "vms_dir": $(js "$SHARE/vms"),
  "cache": $(js "$CACHE"),
  "qemu": {
    "backports": {
      "wrapper": $(js "$SHARE/bin/qemu-backports"),
      "binary": "/usr/bin/qemu-system-x86_64",
      "version": $(js "$BPO_VERSION"),
      "version_line": $(js "$BPO_LINE"),
      "package_version": $(js "$BPO_PKG_VERSION"),
      "sha256": $(js "$(sha /usr/bin/qemu-system-x86_64)")
    },
    "sid": {
      "wrapper": $(js "$SHARE/bin/qemu-sid"),
      "alt_wrapper": $(js "$SHARE/bin/qemu-sid-alt"),
      "binary": "/usr/bin/qemu-system-x86_64",
      "alt_binary": $(js "$ALT_BIN"),
      "root": $(js "$SID_ROOT"),
      "version": $(js "$SID_VERSION"),
      "version_line": $(js "$SID_LINE"),
      "package_version": $(js "$SID_PKG_VERSION"),
      "sha256": $(js "$SID_SHA")
    },
    "trixie": {
      "wrapper": $(js "$SHARE/bin/qemu-trixie"),
      "binary": $(js "$TRIXIE_BIN"),
      "root": $(js "$SID_ROOT"),
      "version": $(js "$TRIXIE_VERSION"),
      "version_line": $(js "$TRIXIE_LINE"),
      "package_version": $(js "$TRIXIE_PKG_VERSION"),
      "sha256": $(js "$(sha "$TRIXIE_BIN")")
    },
    "trixie_backports": {
      "wrapper": $(js "$SHARE/bin/qemu-trixie-backports"),
      "binary": $(js "$TBPO_BIN"),
      "root": $(js "$SID_ROOT"),
      "version": $(js "$TBPO_VERSION"),
      "version_line": $(js "$TBPO_LINE"),
      "package_version": $(js "$TBPO_PKG_VERSION"),
      "sha256": $(js "$TBPO_SHA")
    }
  },
  "kernel": $(js "$SHARE/guest/vmlinuz"),
  "kernel_package": $(js "$KERNEL_PKG"),
  "initrd": $(js "$SHARE/guest/initrd.img"),
  "disk_initrd": $(js "$SHARE/guest/initrd-disk.img"),
  "kernel_append": $(js "$KERNEL_APPEND")
}
EOF
chmod 644 "$tmp"
mv -f "$tmp" "$SHARE/rig.json"
step "rig.json"
echo "provision.sh: ok: backports QEMU $BPO_VERSION, sid QEMU $SID_VERSION, trixie QEMU $TRIXIE_VERSION, trixie-backports QEMU $TBPO_VERSION, share $SHARE"
