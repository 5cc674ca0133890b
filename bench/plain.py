"""Two yardsticks for the CPR pause, done on the benchmark's own VM with the VM's own
command line: a plain (copying) live migration to a new QEMU on the same host, and the
floor, the new QEMU's start-up on its own.

The plain migration is what an updater without CPR does: start the new QEMU with
`-incoming`, copy RAM over a unix socket while the guest runs, stop, copy the rest, resume
in the new process. Bandwidth is unthrottled (QEMU's default cap would measure the cap).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from pathlib import Path

from e2e.rig import TestVM
from e2e.rig.vm import launch_detached, wait_gone
from vmupdate_agent.modes.migration import wait_incoming_loaded, wait_outgoing_done
from vmupdate_agent.qmp import QmpError, QmpSession

TIMEOUT = 600.0  # a plain migration of 8 GiB under TCG on a loaded machine is slow
UNTHROTTLED = 100 * 1024**3  # bytes/s


def _moved_args(vm: TestVM, qmp: Path, mem_path: Path | None, serial: Path | None = None
                ) -> list[str]:
    """The VM's argv after argv[0] with its QMP socket, RAM file and serial log moved."""
    out = []
    for a in vm.args:
        a = a.replace(str(vm.qmp_path), str(qmp))
        if vm.mem_path is not None and mem_path is not None:
            a = a.replace(str(vm.mem_path), str(mem_path))
        if serial is not None:
            a = a.replace(str(vm.serial_path), str(serial))
        out.append(a)
    return out


def _fresh_ram_file(vm: TestVM) -> Path | None:
    """A new /dev/shm file for a second QEMU of a file-backed VM: two QEMUs must not share
    guest RAM unless CPR hands it over."""
    if vm.mem_path is None:
        return None
    return vm.mem_path.with_name(f"vmupdate-bench-{secrets.token_hex(6)}")


async def _wait_path(path: Path, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear: {log.read_text(errors='replace')[-500:]}")
        await asyncio.sleep(0.002)


async def plain_migration(vm: TestVM, binary: str, workdir: Path) -> tuple[int, int, int]:
    """Live-migrate ``vm`` to a new QEMU of ``binary``; the VM object follows it.

    Returns (migrate issued, STOP, RESUME), wall clock ns (QEMU's stamps for the events).
    """
    main_sock, new_qmp = workdir / "main.sock", workdir / "qmp.sock"
    new_mem = _fresh_ram_file(vm)
    args = _moved_args(vm, new_qmp, new_mem)
    log = workdir / "qemu.log"
    await launch_detached([binary, *args, "-S", "-incoming", f"unix:{main_sock}"],
                          cwd=workdir, log_path=log)
    await _wait_path(main_sock, log, 60)
    old_pid = vm.pid
    old = await QmpSession.open(str(vm.qmp_path), command_timeout=TIMEOUT)
    try:
        await old.cmd("migrate-set-parameters", {"max-bandwidth": UNTHROTTLED})
        mark = old.mark()
        issued = time.time_ns()
        await old.cmd("migrate", {"uri": f"unix:{main_sock}"})
        stop = (await old.wait_event("STOP", since=mark, timeout=TIMEOUT)).qemu_time_ns
        done = await wait_outgoing_done(old, TIMEOUT)
        if done.get("status") != "completed":
            raise QmpError(f"plain migration {done.get('status')}: {done.get('error-desc')}")
        new = await QmpSession.open_retrying(str(new_qmp), timeout=60)
        try:
            await wait_incoming_loaded(new, TIMEOUT)
            mark = new.mark()
            await new.cmd("cont")
            resume = (await new.wait_event("RESUME", since=mark, timeout=60)).qemu_time_ns
        finally:
            await new.close()
        with contextlib.suppress(QmpError):  # the connection may drop before the answer
            await old.cmd("quit")
    finally:
        await old.close()
    await wait_gone(old_pid, 60)
    # The VM is the new process from now on: its socket at the old path, its RAM file.
    new_qmp.replace(vm.qmp_path)
    if vm.mem_path is not None and new_mem is not None:
        old_mem = vm.mem_path
        vm.argv = [vm.argv[0], *_moved_args(vm, vm.qmp_path, new_mem)]
        vm.mem_path = new_mem
        old_mem.unlink(missing_ok=True)
    await vm.refresh_pid()
    return issued, stop, resume


async def _greeting(path: Path, deadline: float) -> None:
    """Connect to a QMP socket as soon as it exists and read the greeting line."""
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no QMP at {path}") from None
            await asyncio.sleep(0.001)
            continue
        try:
            line = await asyncio.wait_for(reader.readline(), max(0.1, deadline - time.monotonic()))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if b'"QMP"' not in line:
            raise QmpError(f"not a QMP greeting at {path}: {line[:200]!r}")
        return


async def startup_floor(vm: TestVM, binary: str, workdir: Path, timeout: float = 60.0
                        ) -> float:
    """ms from spawning ``binary`` with the VM's own argv plus `-S -incoming defer` (what
    the new QEMU of an update gets) to its QMP greeting. Its RAM, socket and serial log
    are its own; the process is ours, killed and reaped here."""
    workdir.mkdir(parents=True, exist_ok=True)
    qmp, mem = workdir / "floor.sock", _fresh_ram_file(vm)
    args = _moved_args(vm, qmp, mem, serial=workdir / "floor-serial.log")
    with open(workdir / "floor.log", "ab") as log:
        start = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            binary, *args, "-S", "-incoming", "defer", stdin=asyncio.subprocess.DEVNULL,
            stdout=log, stderr=log, cwd=workdir)
    try:
        await _greeting(qmp, start + timeout)
        return (time.monotonic() - start) * 1000
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.wait_for(proc.wait(), 30)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qmp)
        if mem is not None:
            mem.unlink(missing_ok=True)
