"""The provisioned rig, as described by ``$SHARE/rig.json`` (written by ``provision.sh``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Flavour = Literal["backports", "sid"]

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
    """sid only: the private debootstrap root the QEMU runs in (through chroot)."""

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
    sid: QemuInfo
    raw: dict[str, Any]

    def qemu(self, flavour: Flavour) -> QemuInfo:
        if flavour == "backports":
            return self.backports
        if flavour == "sid":
            return self.sid
        raise ValueError(f"unknown QEMU flavour {flavour!r} (want 'backports' or 'sid')")


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
        root=Path(_need(d, "root", where)) if flavour == "sid" else None,
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
    sid = dict(_need(qemu, "sid", f"{src} qemu"))
    sid["_share"] = str(share)
    rig = Rig(
        share=share,
        vms_dir=Path(raw.get("vms_dir") or share / "vms"),
        kernel=Path(_need(raw, "kernel", str(src))),
        initrd=Path(_need(raw, "initrd", str(src))),
        kernel_append=str(raw.get("kernel_append") or "console=ttyS0 quiet panic=-1"),
        kernel_package=str(raw.get("kernel_package") or ""),
        backports=_qemu(bpo, "backports", src),
        sid=_qemu(sid, "sid", src),
        raw=raw,
    )
    for f in (rig.kernel, rig.initrd):
        if not f.is_file():
            raise RigNotProvisioned(f"{src}: {f} is missing; {PROVISION_HINT}")
    rig.vms_dir.mkdir(parents=True, exist_ok=True)
    return rig
