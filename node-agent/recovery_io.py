"""Recovery's I/O: the single step `recovery.decide_recovery` chose, carried out.

At start-up an operation that was running when the agent died is resolved here: the facts
are gathered (the guard's and the keeper's status files, the old QEMU, a transfer target on
the work folder's socket, a saved cpr-reboot state), the decision taken by recovery.py, and
its one step taken (commit or abort through the guard, `cont`, kill or adopt the transfer
target, load the saved state), until the VM runs and the outcome is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

from vmupdate_agent import guard as cpr_guard
from vmupdate_agent import procfs
from vmupdate_agent.journal import OperationRecord
from vmupdate_agent.models import Outcome, Phase, UpdateResult
from vmupdate_agent.modes import cpr_reboot
from vmupdate_agent.modes.common import (
    Timeouts,
    hand_over_qmp,
    kill_quietly,
    new_qmp_path,
    pids_with_arg,
    write_pidfiles,
)
from vmupdate_agent.qmp import QmpError, QmpSession
from vmupdate_agent.recovery import (
    Action,
    Expected,
    QemuFacts,
    RecoveryFacts,
    RecoveryStep,
    decide_recovery,
    infer_mode,
    pause_bounds,
)

if TYPE_CHECKING:
    from vmupdate_agent.live import LiveOperation

log = logging.getLogger(__name__)


async def ask_qemu(path: str, *, timeout: float) -> tuple[QemuFacts | None, str]:
    try:
        async with await QmpSession.open(path, timeout=timeout,
                                         command_timeout=timeout) as session:
            status = await session.cmd("query-status")
            migration = await session.cmd("query-migrate")
            version = await session.cmd("query-version")
            q = version["qemu"]
            return QemuFacts(pid=session.peer_pid, runstate=str(status.get("status")),
                             migration=str(migration.get("status", "none")),
                             version=f"{q['major']}.{q['minor']}.{q['micro']}",
                             package=str(version.get("package", "")).strip()), ""
    except (QmpError, OSError, KeyError) as exc:
        return None, str(exc)


async def cont_vm(path: str, *, timeout: float) -> None:
    async with await QmpSession.open(path, timeout=timeout, command_timeout=timeout) as session:
        await session.cmd("cont")




_ACTION_PHASES = {
    Action.COMMIT: Phase.SAVED, Action.ABORT: Phase.RECOVERED, Action.CONT: Phase.RESUMED,
    Action.KILL_TRANSFER_TARGET: Phase.RECOVERED, Action.ADOPT_TRANSFER_TARGET:
        Phase.TRANSFERRED, Action.LOAD_SAVED_STATE: Phase.TRANSFERRED,
}


async def resolve(live: LiveOperation, timeouts: Timeouts) -> UpdateResult:
    """Bring the VM of an interrupted operation to a running state and say what it is."""
    rec = live.record
    expected = Expected(pid_before=rec.vm.pid, version_before=str(rec.vm.features.version),
                        was_running=rec.vm.runstate == "running",
                        expected_version=rec.request.target.expected_version or None)
    budget = timeouts.handover + timeouts.load + timeouts.guard_commit + timeouts.command
    deadline = time.monotonic() + budget
    # Past the deadline decisions stop waiting; past this, failing actions stop retrying.
    give_up_s = budget + 3 * timeouts.command + 10
    hard_stop = deadline - budget + give_up_s
    watcher_gone = False
    last = ""
    resumed: list[int] = []
    while True:
        facts = await _facts(rec, watcher_gone, timeouts.command)
        now = time.monotonic()
        step = decide_recovery(facts, expected, final=now >= deadline)
        if step.action == Action.DONE or now >= hard_stop:
            if step.action != Action.DONE:
                step = RecoveryStep(Action.DONE, f"gave up after {give_up_s:.0f}s: "
                                    f"{step.message}; last error: {last}", Outcome.LOST)
            return _resolved_result(live, facts, step, resumed)
        if step.action == Action.WAIT:
            await asyncio.sleep(0.05)
            continue
        live.note(_ACTION_PHASES[step.action], step.message)
        try:
            watcher_gone = await _act(step.action, rec, facts, timeouts, resumed
                                           ) or watcher_gone
        except (QmpError, OSError, cpr_guard.GuardError) as exc:
            last = f"{step.action}: {exc}"
            log.warning("operation %s: %s", rec.operation_id, last)
            await asyncio.sleep(0.2)

async def _facts(rec: OperationRecord, watcher_gone: bool,
                          timeout: float) -> RecoveryFacts:
    status: dict[str, object] = {}
    guard_error = ""
    try:
        status = cpr_guard.read_status(os.path.join(rec.workdir, "guard.status")) or {}
    except (cpr_guard.GuardError, ValueError) as exc:
        guard_error = str(exc)
    vm, vm_error = await ask_qemu(rec.vm.qmp_path, timeout=min(timeout, 3.0))
    target_sock = new_qmp_path(rec.workdir)
    target_pids: tuple[int, ...] = ()
    target = None
    if os.path.exists(target_sock):
        target_pids = tuple(await asyncio.to_thread(pids_with_arg, target_sock))
        if target_pids:
            target, _ = await ask_qemu(target_sock, timeout=min(timeout, 3.0))
    qemu_pid = status.get("qemu_pid")
    try:
        files = frozenset(os.listdir(rec.workdir))
    except OSError:
        files = frozenset()
    state = os.path.join(rec.workdir, cpr_reboot.STATE_FILE)
    keeper: dict[str, object] = {}
    with contextlib.suppress(cpr_guard.GuardError, ValueError):
        keeper = cpr_guard.read_status(os.path.join(rec.workdir, "keeper.status")) or {}
    keeper_pid = keeper.get("keeper_pid")
    acting = (keeper.get("phase") == cpr_guard.KEEPER_ACTING and isinstance(keeper_pid, int)
              and procfs.alive(keeper_pid))
    back = [v for v in (keeper.get("t_resumed_ns"), status.get("t_resumed_ns"),
                        status.get("t_rollback_ns")) if isinstance(v, int)]
    return RecoveryFacts(
        keeper_acting=acting, resumed_ns=back[0] if back else None,
        guard_started_ns=t if isinstance(t := status.get("t_guard_ns"), int) else None,
        mode=infer_mode(rec.request.mode, files), old_alive=procfs.alive(rec.vm.pid),
        saved_state=state if cpr_reboot.STATE_FILE in files else "",
        guard_phase=str(status["phase"]) if "phase" in status else None,
        guard_qemu_pid=qemu_pid if isinstance(qemu_pid, int) else None,
        guard_reason=str(status.get("reason") or ""),
        guard_error=str(status.get("error") or guard_error), watcher_gone=watcher_gone,
        vm=vm, vm_error=vm_error, transfer_target_pids=target_pids,
        transfer_target=target)

async def _act(action: Action, rec: OperationRecord, facts: RecoveryFacts,
               timeouts: Timeouts, resumed: list[int]) -> bool:
    """Carry out one step; True when it found the guard's watcher gone."""
    fifo = os.path.join(rec.workdir, "guard.commit")
    if action in (Action.COMMIT, Action.ABORT):
        try:
            cpr_guard.send(fifo, action.value)
        except cpr_guard.WatcherGone:
            return True
        if action == Action.COMMIT:
            await _wait_guard(os.path.join(rec.workdir, "guard.status"),
                              cpr_guard.FINAL_PHASES, timeout=5.0)
    elif action == Action.CONT:
        await cont_vm(rec.vm.qmp_path, timeout=timeouts.command)
        resumed.append(time.time_ns())
    elif action == Action.KILL_TRANSFER_TARGET:
        for pid in facts.transfer_target_pids:
            await kill_quietly(pid, timeout=timeouts.command)
    elif action == Action.ADOPT_TRANSFER_TARGET:
        await _adopt_transfer_target(rec, facts, timeouts)
    elif action == Action.LOAD_SAVED_STATE:
        await _load_saved_state(rec, facts, timeouts)
    return False

async def _load_saved_state(rec: OperationRecord, facts: RecoveryFacts,
                            timeouts: Timeouts) -> None:
    # As the engine does once the old QEMU is gone: the VM's socket path is the new one's.
    if facts.transfer_target_pids and os.path.exists(new_qmp_path(rec.workdir)):
        hand_over_qmp(rec.workdir, rec.vm.qmp_path)
    async with await QmpSession.open(rec.vm.qmp_path, timeout=timeouts.command,
                                     command_timeout=timeouts.command) as s:
        await cpr_reboot.load_saved_state(s, f"file:{facts.saved_state}", timeouts.load)
        await cpr_reboot.leave_cpr_reboot(s)
        write_pidfiles(rec.vm.argv, s.peer_pid)

async def _adopt_transfer_target(rec: OperationRecord, facts: RecoveryFacts,
                                 timeouts: Timeouts) -> None:
    old = rec.vm.pid
    if procfs.alive(old):
        with contextlib.suppress(QmpError, OSError):
            async with await QmpSession.open(rec.vm.qmp_path, timeout=timeouts.command,
                                             command_timeout=timeouts.command) as s:
                if s.peer_pid == old:
                    with contextlib.suppress(QmpError):
                        await s.cmd("quit")
        await kill_quietly(old, timeout=timeouts.command)
    # As the engine does once the old QEMU is gone: the VM's socket path is the new one's.
    hand_over_qmp(rec.workdir, rec.vm.qmp_path)
    if facts.transfer_target is not None:
        write_pidfiles(rec.vm.argv, facts.transfer_target.pid)

def _resolved_result(live: LiveOperation, facts: RecoveryFacts, step: RecoveryStep,
                     resumed: list[int]) -> UpdateResult:
    rec = live.record
    assert step.outcome is not None
    phase = {Outcome.UPDATED: Phase.FINISHED, Outcome.ROLLED_BACK: Phase.RECOVERED
             }.get(step.outcome, Phase.FAILED)
    live.note(phase, step.message)
    try:
        files = frozenset(os.listdir(rec.workdir))
    except OSError:
        files = frozenset()
    vm = facts.vm
    stopped, back = pause_bounds(live.events, facts, resumed)
    return UpdateResult(
        vm=rec.vm.name, outcome=step.outcome, mode=infer_mode(rec.request.mode, files),
        mode_reason="found after the operation was interrupted", message=step.message,
        pid_before=rec.vm.pid, pid_after=vm.pid if vm else None,
        version_before=str(rec.vm.features.version), version_after=vm.version if vm else None,
        paused_at_ns=stopped, resumed_at_ns=back,
        pause_ms=round((back - stopped) / 1e6, 3) if stopped and back else None)



async def _wait_guard(path: str, phases: frozenset[str], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = cpr_guard.read_status(path)
        if status is not None and status.get("phase") in phases:
            return
        await asyncio.sleep(0.005)
