"""Hand-made CPR updates, the yardstick for the agent's reported pause.

Under TCG a freshly started QEMU re-translates the guest's code after RESUME, so the guest's
first serial line comes tens of ms after the pause has ended (KVM has none of this). That
cold start is QEMU's, not the update's, and the agent's pause (QEMU's STOP -> RESUME) rightly
does not contain it; to compare the pause with the serial blackout, the blackout must be
corrected by it. It depends on the mode (a cpr-transfer's old QEMU exits while the new one
warms up) and on the load of the moment, so it is measured beside the agent's updates: the
same mode, binary and VM, done here by hand with the fewest QMP commands that do it.

Each function returns QEMU's own STOP and RESUME timestamps (wall clock, ns).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from e2e.rig import TestVM
from e2e.rig.vm import launch_detached, pid_alive, wait_gone
from vmupdate_agent import procfs
from vmupdate_agent.modes.migration import wait_incoming_loaded, wait_outgoing_done
from vmupdate_agent.qmp import QmpError, QmpSession

TICK_PERIOD_MS = 10.0
_TIMEOUT = 30.0
_IGNORE_SHARED = "x-ignore-shared"


async def _resume(new: QmpSession) -> int:
    mark = new.mark()
    await new.cmd("cont")
    return (await new.wait_event("RESUME", since=mark, timeout=_TIMEOUT)).qemu_time_ns


async def _quit(session: QmpSession, pid: int) -> None:
    with contextlib.suppress(QmpError):  # the connection may drop before the answer
        await session.cmd("quit")
    await session.close()
    await wait_gone(pid, _TIMEOUT)


def _kill_launched(workdir: Path) -> None:
    """A failed hand-made update leaves no QEMU behind: the one it launched (detached, so
    not reaped by the test) is killed; PID 1 reaps it."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((workdir / "launch.pid").read_text()), signal.SIGKILL)


async def cpr_exec(vm: TestVM, binary: str, workdir: Path) -> tuple[int, int]:
    state = workdir / "state"
    old = await QmpSession.open(str(vm.qmp_path))
    await old.cmd("migrate-set-parameters", {"mode": "cpr-exec", "cpr-exec-command": [
        binary, *vm.args, "-S", "-incoming", f"file:{state}"]})
    mark = old.mark()
    await old.cmd("migrate", {"uri": f"file:{state}"})
    stop = (await old.wait_event("STOP", since=mark, timeout=_TIMEOUT)).qemu_time_ns
    await old.wait_disconnected(_TIMEOUT)
    await old.close()
    new = await QmpSession.open_retrying(str(vm.qmp_path), timeout=_TIMEOUT)
    try:
        await wait_incoming_loaded(new, _TIMEOUT)
        return stop, await _resume(new)
    finally:
        await new.close()


async def cpr_transfer(vm: TestVM, binary: str, workdir: Path) -> tuple[int, int]:
    """The new QEMU listens on its own QMP socket, takes over the VM's once the old one has
    quit (as the agent does, so `vm` follows it)."""
    main_sock, cpr_sock = workdir / "main.sock", workdir / "cpr.sock"
    new_qmp = workdir / "qmp.sock"
    args = [a.replace(str(vm.qmp_path), str(new_qmp)) for a in vm.args]
    channels = [{"channel-type": kind, "addr": {"transport": "socket", "type": "unix",
                                                "path": str(path)}}
                for kind, path in (("main", main_sock), ("cpr", cpr_sock))]
    await launch_detached([binary, *args, "-S", "-incoming", f"unix:{main_sock}",
                           "-incoming", json.dumps(channels[1])],
                          cwd=workdir, log_path=workdir / "qemu.log")
    try:
        return await _transfer(vm, workdir, channels, new_qmp)
    except BaseException:
        _kill_launched(workdir)
        raise


async def _transfer(vm: TestVM, workdir: Path, channels: Sequence[Mapping[str, object]],
                    new_qmp: Path) -> tuple[int, int]:
    cpr_sock = workdir / "cpr.sock"
    deadline = time.monotonic() + _TIMEOUT
    # The old QEMU connects to it: the new one must listen first (the file appears at bind).
    while not (cpr_sock.exists() and procfs.unix_listening(
            int((workdir / "launch.pid").read_text()), str(cpr_sock))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the new QEMU opened no cpr channel: "
                               f"{(workdir / 'qemu.log').read_text()[-500:]}")
        await asyncio.sleep(0.002)
    old_pid = vm.pid
    old = await QmpSession.open(str(vm.qmp_path))
    await old.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
    mark = old.mark()
    await old.cmd("migrate", {"channels": channels})
    stop = (await old.wait_event("STOP", since=mark, timeout=_TIMEOUT)).qemu_time_ns
    new = await QmpSession.open_retrying(str(new_qmp), timeout=_TIMEOUT)
    try:
        await wait_incoming_loaded(new, _TIMEOUT)
        resume = await _resume(new)
    finally:
        await new.close()
    await _quit(old, old_pid)
    new_qmp.replace(vm.qmp_path)
    await vm.refresh_pid()
    return stop, resume


async def cpr_reboot(vm: TestVM, binary: str, workdir: Path) -> tuple[int, int]:
    """Guest RAM in a shared file (the VM's backend must be 'file'), device state to a file,
    quit, start the new QEMU on the VM's QMP socket, load, resume."""
    state = f"file:{workdir / 'state'}"
    old_pid = vm.pid
    old = await QmpSession.open(str(vm.qmp_path))
    await old.cmd("migrate-set-parameters", {"mode": "cpr-reboot"})
    await old.cmd("migrate-set-capabilities", {"capabilities": [
        {"capability": _IGNORE_SHARED, "state": True}]})
    mark = old.mark()
    await old.cmd("migrate", {"uri": state})
    stop = (await old.wait_event("STOP", since=mark, timeout=_TIMEOUT)).qemu_time_ns
    saved = await wait_outgoing_done(old, _TIMEOUT)
    assert saved.get("status") == "completed", saved
    await _quit(old, old_pid)
    await launch_detached([binary, *vm.args, "-S", "-incoming", "defer"],
                          cwd=workdir, log_path=workdir / "qemu.log")
    try:
        resume = await _reboot_load(vm, state)
    except BaseException:
        _kill_launched(workdir)
        raise
    await vm.refresh_pid()
    assert pid_alive(vm.pid)
    return stop, resume


async def _reboot_load(vm: TestVM, state: str) -> int:
    new = await QmpSession.open_retrying(str(vm.qmp_path), timeout=_TIMEOUT)
    try:
        await new.cmd("migrate-set-parameters", {"mode": "cpr-reboot"})
        await new.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": _IGNORE_SHARED, "state": True}]})
        await new.cmd("migrate-incoming", {"uri": state})
        await wait_incoming_loaded(new, _TIMEOUT)
        resume = await _resume(new)
        # An ordinary QEMU again, as the agent leaves it.
        await new.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": _IGNORE_SHARED, "state": False}]})
        await new.cmd("migrate-set-parameters", {"mode": "normal"})
    finally:
        await new.close()
    return resume


def _serial_ns(vm: TestVM) -> list[int]:
    """Host arrival times of the guest's lines, on the wall clock QEMU stamps events with."""
    wall_to_mono = time.time_ns() - time.monotonic_ns()
    return [t.t_ns + wall_to_mono for t in vm.serial.ticks]


def cold_start_ms(vm: TestVM, stop_ns: int, resume_ns: int) -> float:
    """How long after RESUME the guest's first line came, beyond what was left of its own
    10 ms sleep when it was stopped (its clock stops with the VM). Call it once the guest
    has printed on the other side."""
    ticks = _serial_ns(vm)
    last = max(t for t in ticks if t < stop_ns)
    first = min(t for t in ticks if t > resume_ns)
    remaining_sleep = max(0.0, TICK_PERIOD_MS - (stop_ns - last) / 1e6)
    return (first - resume_ns) / 1e6 - remaining_sleep
