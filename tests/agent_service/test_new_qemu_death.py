"""The new QEMU SIGKILLed at each phase of each mode, with the agent alive.

The agent must notice at once (never a full handover or load timeout with the guest
stopped) and bring the guest back in the old QEMU wherever the guest has not run in the new
one yet: cpr-exec through the guard's watcher (the new QEMU is the VM's own pid, so only the
watcher can exec the old binary again), cpr-transfer by resuming the old process, cpr-reboot
by starting the old binary on the saved state. Once the guest has run in the new QEMU,
killing it is killing the VM: the agent must say so (LOST, at once), not report an update.

How the kill lands at a phase: the agent is frozen (SIGSTOP) the moment it reports the
phase, the new QEMU is SIGKILLed, the agent is let go (SIGCONT); or, for the phases no event
marks ("before the handover", "waiting for the state"), the new QEMU is killed as soon as
it exists. The rows of docs/faults.md come from here (`-s` prints `FAULT-ROW` lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e.rig import TestVM
from e2e.rig.vm import wait_gone
from tests.agent_service.conftest import QemuEnv
from tests.agent_service.harness import AgentProcess, op_workdir
from tests.agent_service.test_update import check_stream, update_request
from vmupdate_agent import guard, procfs
from vmupdate_agent.modes.common import pids_with_arg
from vmupdate_api.gen import agent_v1_pb2 as pb

pytestmark = pytest.mark.qemu

UPDATED, FAILED = pb.OUTCOME_UPDATED, pb.OUTCOME_FAILED
ROLLED_BACK, LOST = pb.OUTCOME_ROLLED_BACK, pb.OUTCOME_LOST
QEMU_EXE = "qemu-system-x86_64"
# Far below every timeout the guest could otherwise wait out stopped (handover 15 s, load
# 30 s, guard commit 20 s): the guest runs again this soon after the kill, or the agent
# waited for something that could no longer happen.
NOTICED_WITHIN_S = 5.0


# Not a phase the agent reports: the moment the new QEMU has read the state file (seen with
# inotify: the reader opens it after the writer closed it, and closes it once loaded).
LOADED = -1
# A row may freeze the agent at one of its fault points (vmupdate_agent.faultpoints, named
# by a string), where it stops itself: the events inside the pause (EXECED, TRANSFERRED) are
# reported only after it, and after cpr-exec's commit only a fraction of a millisecond
# separates the agent from the resume: too little to land a freeze from outside.
IN_OPEN, IN_CLOSE_WRITE, IN_CLOSE_NOWRITE = 0x20, 0x08, 0x10
_EVENT = struct.Struct("iIII")


class StateFileWatch:
    """Freezes the agent (SIGSTOP, from a thread: at once) when the new QEMU opens the state
    file to load it; `loaded` is set when that QEMU has closed it again."""

    def __init__(self, workdir: Path, agent_pid: int) -> None:
        self.agent_pid = agent_pid
        self.loaded = threading.Event()
        self.frozen = threading.Event()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_CLOEXEC)
        assert self._fd >= 0
        workdir.mkdir(parents=True, exist_ok=True)
        wd = self._libc.inotify_add_watch(self._fd, str(workdir).encode(),
                                          IN_OPEN | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE)
        assert wd >= 0, ctypes.get_errno()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        written = False
        while not self.loaded.is_set():
            try:
                buf = os.read(self._fd, 65536)
            except OSError:
                return
            at = 0
            while at < len(buf):
                _, mask, _, size = _EVENT.unpack_from(buf, at)
                name = buf[at + _EVENT.size: at + _EVENT.size + size].rstrip(b"\0")
                at += _EVENT.size + size
                if name != b"state":
                    continue
                if mask & IN_CLOSE_WRITE:
                    written = True
                elif mask & IN_OPEN and written and not self.frozen.is_set():
                    os.kill(self.agent_pid, signal.SIGSTOP)
                    self.frozen.set()
                elif mask & IN_CLOSE_NOWRITE and self.frozen.is_set():
                    self.loaded.set()

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class Row:
    name: str
    mode: int
    # The phase the agent is frozen at before the kill; None: kill the new QEMU as soon as
    # it exists (after `after` is reported), with the agent running.
    freeze_at: int | str | None
    after: int
    outcomes: frozenset[int]


ROWS = [
    Row("cpr_exec-after-exec-before-load", pb.MODE_CPR_EXEC, "cpr-exec:execed", pb.PHASE_STOPPING,
        frozenset({ROLLED_BACK})),
    # LOADED: frozen while the new QEMU reads the state file, killed once it closed it.
    Row("cpr_exec-after-load-before-commit", pb.MODE_CPR_EXEC, LOADED, pb.PHASE_STOPPING,
        frozenset({ROLLED_BACK})),
    # Stopped by its fault point after the commit, killed before the `cont`.
    Row("cpr_exec-after-commit-before-resume", pb.MODE_CPR_EXEC, "cpr-exec:committed",
        pb.PHASE_EXECED, frozenset({ROLLED_BACK})),
    Row("cpr_transfer-before-handover", pb.MODE_CPR_TRANSFER, None, pb.PHASE_STOPPING,
        frozenset({FAILED})),
    Row("cpr_transfer-after-transfer", pb.MODE_CPR_TRANSFER, "cpr-transfer:transferred",
        pb.PHASE_STOPPING, frozenset({FAILED})),
    # The guest runs in the new QEMU: killing it kills the VM. The agent, stopped at its
    # fault point right after the resume (the old QEMU not quit yet), says LOST.
    Row("cpr_transfer-after-resume", pb.MODE_CPR_TRANSFER, "cpr-transfer:resumed",
        pb.PHASE_STOPPING, frozenset({LOST})),
    # Killed before or after the old QEMU quit: the old one resumes, or its binary is
    # started again on the saved state.
    Row("cpr_reboot-waiting-for-state", pb.MODE_CPR_REBOOT, None, pb.PHASE_SAVED,
        frozenset({FAILED, ROLLED_BACK})),
    Row("cpr_reboot-after-load", pb.MODE_CPR_REBOOT, LOADED, pb.PHASE_STOPPING,
        frozenset({ROLLED_BACK})),
]


def exe_name(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def new_qemu_pids(vm: TestVM, workdir: Path, mode: int, old_pid: int) -> list[int]:
    """The operation's new QEMU: a QEMU process whose command line names the operation's
    work folder (the old one's never does; the keeper and the guard are other binaries)."""
    candidates = ([old_pid] if mode == pb.MODE_CPR_EXEC
                  else pids_with_arg(str(workdir / "qmp.sock")))
    return [p for p in candidates if procfs.alive(p) and exe_name(p) == QEMU_EXE
            and any(str(workdir) in a for a in procfs.cmdline(p))]


async def wait_new_qemu(vm: TestVM, workdir: Path, mode: int, old_pid: int, *,
                        listening: bool, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        pids = new_qemu_pids(vm, workdir, mode, old_pid)
        if pids and (not listening or (workdir / "qmp.sock").exists()):
            return pids[0]
        assert time.monotonic() < deadline, "the new QEMU never appeared"
        await asyncio.sleep(0.001)


@dataclass
class Attempt:
    result: pb.UpdateResult
    seen: list[pb.OperationEvent]
    killed_ns: int
    new_pid: int
    result_ms: float
    workdir: Path

    def notes(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                         for f in sorted(self.workdir.glob("*"))
                         if f.suffix in (".log", ".status"))


async def run_and_kill(env: QemuEnv, agent: AgentProcess, vm: TestVM, row: Row, op_id: str,
                       pid: int) -> Attempt | None:
    """One update with its new QEMU killed at the row's phase; None when the kill could not
    land there (the agent had already resumed the guest: the update is let finish)."""
    client = await agent.client()
    seen: list[pb.OperationEvent] = []
    reached = asyncio.Event()
    workdir = op_workdir(agent, op_id)

    def on_event(event: pb.OperationEvent) -> None:
        seen.append(event)
        if isinstance(row.freeze_at, str):
            return  # the agent stops itself there
        if event.progress.phase == row.after and not reached.is_set():
            if row.freeze_at not in (None, LOADED):
                os.kill(agent.pid, signal.SIGSTOP)
            reached.set()

    watch = StateFileWatch(workdir, agent.pid) if row.freeze_at == LOADED else None
    request = update_request(env, op_id, vm.name, mode=row.mode)
    waiting = asyncio.create_task(client.update(request, on_event=on_event, timeout=600))
    try:
        if isinstance(row.freeze_at, str):
            await agent.stopped_itself()
        else:
            await asyncio.wait_for(reached.wait(), 120)
        if watch is not None:
            assert await asyncio.to_thread(watch.loaded.wait, 120), "no load was seen"
            new_pid = await wait_new_qemu(vm, workdir, row.mode, pid, listening=False,
                                          timeout=5)
        elif row.freeze_at is None:
            new_pid = await wait_new_qemu(vm, workdir, row.mode, pid,
                                          listening=row.mode == pb.MODE_CPR_REBOOT)
        else:
            new_pid = await wait_new_qemu(vm, workdir, row.mode, pid, listening=False)
            if row.freeze_at == "cpr-exec:committed":
                # Stopped before the `cont`: the guest has not run in the new QEMU. The
                # agent does not wait for the watcher to take the commit; it does, at once.
                assert not any(e.progress.phase == pb.PHASE_RESUMED for e in seen)
                status = await asyncio.to_thread(
                    guard.wait_status, workdir / "guard.status",
                    frozenset({guard.PHASE_COMMITTED}), timeout=5)
                assert status.get("phase") == guard.PHASE_COMMITTED, status
        os.kill(new_pid, signal.SIGKILL)
        killed = time.monotonic_ns()
    finally:
        if watch is not None:
            watch.close()
        if row.freeze_at is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent.pid, signal.SIGCONT)
    result = await asyncio.wait_for(waiting, 300)
    result_ms = (time.monotonic_ns() - killed) / 1e6
    check_stream(seen, op_id)
    return Attempt(result, seen, killed, new_pid, result_ms, workdir)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_new_qemu_killed(qemu_env: QemuEnv, row: Row) -> None:
    vm = await qemu_env.vm("newdeath",
                           backend="file" if row.mode == pb.MODE_CPR_REBOOT else "memfd")
    token = vm.token
    agent = await qemu_env.agent(
        stop_at=(row.freeze_at,) if isinstance(row.freeze_at, str) else ())
    attempt = None
    for n in range(4):
        pid = vm.pid
        mark = time.monotonic_ns()
        attempt = await run_and_kill(qemu_env, agent, vm, row, f"op-newdeath-{n}", pid)
        if attempt is not None:
            break
    assert attempt is not None, "the kill never landed before the agent resumed the guest"
    result = attempt.result
    assert result.outcome in row.outcomes, f"{result.message}\n{attempt.notes()}"
    assert result.pid_before == pid
    print(f"\nresult: {pb.Outcome.Name(result.outcome)}: {result.message}")

    if row.freeze_at == "cpr-transfer:resumed":
        # The guest ran in the new QEMU, which is gone: the VM died with it. The agent says
        # so at once (or had reported the update before the kill), and leaves no old QEMU
        # behind paused with a stale copy of the guest.
        if result.outcome == LOST:
            assert "after the guest had run in it" in result.message, result.message
        assert attempt.result_ms < NOTICED_WITHIN_S * 1000, attempt.result_ms
        await wait_gone(pid, 10)  # the agent quits it: no stale copy of the guest left
        await wait_gone(attempt.new_pid, 10)
        print(f"FAULT-ROW {row.name} outcome={pb.Outcome.Name(result.outcome)} "
              f"reported_after_kill_ms={attempt.result_ms:.0f} max_blackout_ms=n/a "
              f"(the guest died with its QEMU)")
        return

    try:
        first = await vm.serial.wait_ticks(1, after=attempt.killed_ns, timeout=60)
    except TimeoutError as exc:
        raise AssertionError(f"the guest stays stopped after the kill:\n"
                             f"{agent.log()[-3000:]}") from exc
    back_ms = (first.t_ns - attempt.killed_ns) / 1e6
    await vm.serial.wait_ticks(20, after=first.t_ns, timeout=30)
    blackout = vm.serial.max_gap_ms(since=mark)
    vm.serial.assert_continuous(since=mark)
    assert vm.token == token
    assert await vm.query_status() == "running"
    assert not procfs.alive(attempt.new_pid) or attempt.new_pid == vm.pid
    assert back_ms < NOTICED_WITHIN_S * 1000, (
        f"the guest ran again only {back_ms:.0f} ms after its new QEMU died\n"
        f"{agent.log()[-3000:]}")
    assert result.pid_after == vm.pid, (result.pid_after, vm.pid)
    if result.outcome == ROLLED_BACK:
        assert result.pid_after != attempt.new_pid
    if row.freeze_at not in (None, pb.PHASE_STOPPING) or row.mode == pb.MODE_CPR_REBOOT:
        # The guest had stopped before the kill: a failed update reports that pause too
        # (from QEMU's STOP to the RESUME of whichever QEMU runs it now).
        assert result.pause_ms > 0, result
    print(f"FAULT-ROW {row.name} outcome={pb.Outcome.Name(result.outcome)} "
          f"back_after_kill_ms={back_ms:.0f} result_after_kill_ms={attempt.result_ms:.0f} "
          f"max_blackout_ms={blackout:.0f} reported_pause_ms={result.pause_ms:.0f}")

    # The VM can be updated again afterwards.
    client = await agent.client()
    again = await client.update(update_request(qemu_env, "op-after", vm.name, mode=row.mode),
                                timeout=300)
    assert again.outcome == UPDATED, again.message
    await vm.serial.wait_ticks(5, timeout=30)
    vm.serial.assert_continuous(since=mark)
