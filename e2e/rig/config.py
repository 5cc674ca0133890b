"""The provisioned rig, as described by ``$SHARE/rig.json`` (written by ``provision.sh``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Flavour = Literal["backports", "sid", "trixie", "trixie-backports"]
ROOTED: tuple[Flavour, ...] = ("sid", "trixie", "trixie-backports")  # run in the sid root

DEFAULT_SHARE = "/var/lib/vmupdate-rig"
PROVISION_HINT = (
    "run `sudo e2e/rig/provision.sh` (as root) from the repository root to provision the "
    "QEMU test rig"
)


class RigNotProvisioned(RuntimeError):
    """rig.json is missing, incomplete, or points at files that are gone."""


@dataclass(frozen=True)
class QemuInfo:
    flavour: Flavour
    wrapper: Path
    """Executable to start this QEMU with (works from the host; for sid also inside the root)."""
    binary: str
    """The real binary, as a path seen by this QEMU (inside the sid root for sid)."""
    version: str
    """``x.y.z`` from ``qemu-system-x86_64 -version``."""
    version_line: str
    package_version: str
    alt_wrapper: Path | None = None
    """sid only: a second path to the same binary (a hard link inside the root)."""
    alt_binary: str | None = None
    root: Path | None = None
    """The private debootstrap root the QEMU runs in (through chroot): the sid root for sid,
    trixie and trixie-backports; None for backports (the host's root)."""
    sha256: str = ""
    """Of the binary: genuinely different builds have different ones."""

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.version.split("."))


@dataclass(frozen=True)
class Rig:
    share: Path
    vms_dir: Path
    kernel: Path
    initrd: Path
    kernel_append: str
    kernel_package: str
    backports: QemuInfo
    """bookworm-backports' QEMU 10.0.x, on the host."""
    sid: QemuInfo
    """sid's QEMU 11.1.x, in the sid root."""
    trixie: QemuInfo
    """trixie's own build of QEMU 10.0.x, in the sid root."""
    trixie_backports: QemuInfo
    """trixie-backports' own build of QEMU 11.1.x, in the sid root."""
    raw: dict[str, Any]

    def disk_initrd(self) -> Path:
        """The disk guest's initramfs (the ticker plus ``diskio``, a disk I/O load on the
        first virtio disk that checks what it reads back). Looked up when asked for, so a
        rig.json written before it existed still serves every other test."""
        path = Path(self.raw.get("disk_initrd") or self.share / "guest" / "initrd-disk.img")
        if not path.is_file():
            raise RigNotProvisioned(f"the disk guest {path} is missing; {PROVISION_HINT}")
        return path

    def qemu(self, flavour: Flavour) -> QemuInfo:
        by_flavour = {"backports": self.backports, "sid": self.sid, "trixie": self.trixie,
                      "trixie-backports": self.trixie_backports}
        if flavour not in by_flavour:
            raise ValueError(f"unknown QEMU flavour {flavour!r} (want one of "
                             f"{', '.join(by_flavour)})")
        return by_flavour[flavour]


def rig_json_path() -> Path:
    return Path(os.environ.get("VMUPDATE_RIG_SHARE", DEFAULT_SHARE)) / "rig.json"


def _need(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] in (None, ""):
        raise RigNotProvisioned(f"{where}: key {key!r} missing; {PROVISION_HINT}")
    return d[key]


def _qemu(d: dict[str, Any], flavour: Flavour, src: Path) -> QemuInfo:
    where = f"{src} qemu.{flavour}"
    info = QemuInfo(
        flavour=flavour,
        wrapper=Path(_need(d, "wrapper", where)),
        binary=str(_need(d, "binary", where)),
        version=str(_need(d, "version", where)),
        version_line=str(_need(d, "version_line", where)),
        package_version=str(_need(d, "package_version", where)),
        alt_wrapper=Path(_need(d, "alt_wrapper", where)) if flavour == "sid" else None,
        alt_binary=str(_need(d, "alt_binary", where)) if flavour == "sid" else None,
        root=Path(_need(d, "root", where)) if flavour in ROOTED else None,
        sha256=str(_need(d, "sha256", where)),
    )
    for w in (info.wrapper, info.alt_wrapper):
        if w is not None and not os.access(w, os.X_OK):
            raise RigNotProvisioned(f"{where}: wrapper {w} is not executable; {PROVISION_HINT}")
    if info.root is not None:
        probe = info.root / info.binary.lstrip("/")
        if not probe.exists():
            raise RigNotProvisioned(f"{where}: {probe} is missing; {PROVISION_HINT}")
        # The share must be mounted into the root (mounts do not survive a reboot).
        share = Path(_need(d, "_share", where))
        inside = info.root / str(share).lstrip("/")
        try:
            same = os.stat(share).st_ino == os.stat(inside).st_ino and (
                os.stat(share).st_dev == os.stat(inside).st_dev
            )
        except OSError:
            same = False
        if not same:
            raise RigNotProvisioned(
                f"{where}: the share {share} is not mounted at {inside} (after a reboot?); "
                f"{PROVISION_HINT}"
            )
    return info


def load_rig(path: str | os.PathLike[str] | None = None) -> Rig:
    """Read rig.json (default ``$VMUPDATE_RIG_SHARE/rig.json``) and check it is usable.

    Raises RigNotProvisioned, never returns a half rig: tests must fail loudly, not skip.
    """
    src = Path(path) if path is not None else rig_json_path()
    try:
        raw = json.loads(src.read_text())
    except FileNotFoundError:
        raise RigNotProvisioned(f"{src} does not exist; {PROVISION_HINT}") from None
    except (OSError, ValueError) as e:
        raise RigNotProvisioned(f"{src} is unreadable ({e}); {PROVISION_HINT}") from e
    if not isinstance(raw, dict):
        raise RigNotProvisioned(f"{src} is not a JSON object; {PROVISION_HINT}")
    share = Path(_need(raw, "share", str(src)))
    qemu = _need(raw, "qemu", str(src))
    if not isinstance(qemu, dict):
        raise RigNotProvisioned(f"{src}: 'qemu' is not an object; {PROVISION_HINT}")
    bpo = dict(_need(qemu, "backports", f"{src} qemu"))
    rooted = {f: dict(_need(qemu, f.replace("-", "_"), f"{src} qemu")) for f in ROOTED}
    for d in rooted.values():
        d["_share"] = str(share)
    rig = Rig(
        share=share,
        vms_dir=Path(raw.get("vms_dir") or share / "vms"),
        kernel=Path(_need(raw, "kernel", str(src))),
        initrd=Path(_need(raw, "initrd", str(src))),
        kernel_append=str(raw.get("kernel_append") or "console=ttyS0 quiet panic=-1"),
        kernel_package=str(raw.get("kernel_package") or ""),
        backports=_qemu(bpo, "backports", src),
        sid=_qemu(rooted["sid"], "sid", src),
        trixie=_qemu(rooted["trixie"], "trixie", src),
        trixie_backports=_qemu(rooted["trixie-backports"], "trixie-backports", src),
        raw=raw,
    )
    for f in (rig.kernel, rig.initrd):
        if not f.is_file():
            raise RigNotProvisioned(f"{src}: {f} is missing; {PROVISION_HINT}")
    rig.vms_dir.mkdir(parents=True, exist_ok=True)
    return rig
