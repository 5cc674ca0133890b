"""A vhost-user-blk back end for rig VMs: qemu-storage-daemon from the sid root.

It runs in the sid root (through chroot, like the sid QEMU) and exports a raw image file as
``--export type=vhost-user-blk`` on a UNIX socket in the share, so every QEMU of the rig sees
the same socket path. It is our child: ``stop`` ends and reaps it.

    async with storage_daemon(rig, workdir) as backend:
        vm = await start_vm(rig, "sid", name="x", initrd=rig.disk_initrd(),
                            extra_args=backend.vm_args())
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .config import PROVISION_HINT, Rig, RigNotProvisioned
from .serial import SerialMonitor

QSD = "/usr/bin/qemu-storage-daemon"


@dataclass
class StorageDaemon:
    image: Path
    socket: Path
    log_path: Path
    proc: asyncio.subprocess.Process

    def vm_args(self, chardev: str = "vhu0", device: str = "vblk0") -> list[str]:
        """What a VM adds to use the export: QEMU connects to the daemon's socket."""
        return ["-chardev", f"socket,id={chardev},path={self.socket}",
                "-device", f"vhost-user-blk-pci,chardev={chardev},id={device}"]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def stop(self, timeout: float = 10.0) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), timeout)


async def start_storage_daemon(rig: Rig, workdir: Path, *, size_mib: int = 64,
                               timeout: float = 20.0) -> StorageDaemon:
    """Start the daemon on a new sparse image ``workdir/disk.img`` (workdir in the share)."""
    root = rig.qemu("sid").root
    assert root is not None
    if not (root / QSD.lstrip("/")).exists():
        raise RigNotProvisioned(f"{root}{QSD} is missing (qemu-storage-daemon); "
                                f"{PROVISION_HINT}")
    workdir.mkdir(parents=True, exist_ok=True)
    image, sock, log_path = workdir / "disk.img", workdir / "vhost-user-blk.sock", \
        workdir / "qsd.log"
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    with open(log_path, "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            "chroot", str(root), QSD,
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,"
                        f"addr.type=unix,addr.path={sock}",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)
    daemon = StorageDaemon(image, sock, log_path, proc)
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if proc.returncode is not None or time.monotonic() > deadline:
            await daemon.stop()
            raise RuntimeError(f"qemu-storage-daemon did not export {sock}: {daemon.log()}")
        await asyncio.sleep(0.01)
    return daemon


@contextlib.asynccontextmanager
async def storage_daemon(rig: Rig, workdir: str | os.PathLike[str],
                         **kwargs: int) -> AsyncIterator[StorageDaemon]:
    daemon = await start_storage_daemon(rig, Path(workdir), **kwargs)
    try:
        yield daemon
    finally:
        await daemon.stop()


# --- the disk guest's own report (guest/diskio.c) ---------------------------------------------


@dataclass(frozen=True)
class DiskLine:
    t_ns: int
    """Host monotonic time at which the line was read."""
    writes: int
    token: str
    ok: bool
    verified: int
    """Writes read back and found intact so far (each read checks the write made 1024
    writes earlier)."""


DISK_LAG = 1024  # diskio reads back the write made this many writes earlier


def disk_lines(serial: SerialMonitor) -> list[DiskLine]:
    out: list[DiskLine] = []
    for line in serial.lines:
        parts = line.text.split()
        if len(parts) == 5 and parts[0] == "DISK" and parts[3] in ("ok", "BAD"):
            with contextlib.suppress(ValueError):
                out.append(DiskLine(line.t_ns, int(parts[1]), parts[2], parts[3] == "ok",
                                    int(parts[4])))
    return out


def disk_errors(serial: SerialMonitor) -> list[str]:
    return [line.text for line in serial.lines if line.text.startswith("DISK-ERROR")]
