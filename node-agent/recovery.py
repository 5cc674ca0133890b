"""Recovery of an operation its agent did not see to the end: the decision table.

Pure: what the host shows now (`RecoveryFacts`) and what the journal says the VM was
(`Expected`) give the single next step (`decide_recovery`); the service's recovery loop
gathers the facts and carries the step out, the modes own how a handover is done. Also the
pause such an operation reports (`pause_bounds`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from vmupdate_agent import guard as cpr_guard
from vmupdate_agent.models import CprMode, Outcome, Phase, ProgressEvent, RequestedMode

# Recovery of an operation the agent did not see to the end.

MIGRATING = frozenset({"setup", "active", "device", "pre-switchover", "cancelling",
                       "wait-unplug", "postcopy-active", "postcopy-paused",
                       "postcopy-recover", "postcopy-recover-setup"})
# Runstates a stopped guest can be continued from.
CONTINUABLE = frozenset({"paused", "postmigrate", "prelaunch", "finish-migrate"})


@dataclass(frozen=True)
class QemuFacts:
    """What the QEMU answering at a QMP socket says right now."""

    pid: int
    runstate: str
    migration: str  # query-migrate's status, "none" when there was none
    version: str  # x.y.z
    package: str = ""

    def is_version(self, expected: str) -> bool:
        return expected in (self.version, self.package, f"{self.version} ({self.package})")


@dataclass(frozen=True)
class RecoveryFacts:
    guard_phase: str | None = None
    guard_qemu_pid: int | None = None
    guard_reason: str = ""  # why the guard rolled back (commit-timeout, new-exited, ...)
    guard_error: str = ""
    # The watcher does not read its FIFO any more: nobody can roll back.
    watcher_gone: bool = False
    vm: QemuFacts | None = None  # whoever answers at the VM's QMP socket
    vm_error: str = ""
    # A cpr-transfer target QEMU still in the operation's work folder (its own QMP socket).
    transfer_target_pids: tuple[int, ...] = ()
    transfer_target: QemuFacts | None = None
    mode: CprMode | None = None
    # The QEMU the operation started from still exists (cpr-reboot quits it mid-operation).
    old_alive: bool = True
    # The device state a cpr-reboot saved, when its file exists.
    saved_state: str = ""
    # The keeper (cpr-transfer, cpr-reboot) is bringing the guest back after the agent died.
    keeper_acting: bool = False
    # When the guard's watcher or the keeper resumed the guest (or restarted the old QEMU).
    resumed_ns: int | None = None
    # When the guard started (the guest was stopped by then), for an agent that died before
    # it journaled QEMU's STOP.
    guard_started_ns: int | None = None


@dataclass(frozen=True)
class Expected:
    """What the journal says about the VM before the operation."""

    pid_before: int
    version_before: str
    was_running: bool
    expected_version: str | None = None


class Action(enum.StrEnum):
    WAIT = "wait"
    COMMIT = "commit"  # tell the guard the new QEMU is good (then it cannot roll back)
    ABORT = "abort"  # tell the guard to roll back (only while the guest has not run)
    CONT = "cont"
    KILL_TRANSFER_TARGET = "kill-transfer-target"
    ADOPT_TRANSFER_TARGET = "adopt-transfer-target"
    LOAD_SAVED_STATE = "load-saved-state"  # cpr-reboot: give the waiting new QEMU the state
    DONE = "done"


@dataclass(frozen=True)
class RecoveryStep:
    action: Action
    message: str
    outcome: Outcome | None = None  # with DONE


def decide_recovery(f: RecoveryFacts, e: Expected, *, final: bool = False) -> RecoveryStep:
    """The next step to bring an interrupted operation's VM to a running, recorded state.

    `final`: the time to wait is over; decide with what is known (never WAIT).
    """
    phase = f.guard_phase
    if f.keeper_acting and not final:
        return RecoveryStep(Action.WAIT, "the keeper is bringing the guest back")
    if phase == cpr_guard.PHASE_ROLLBACK_FAILED:
        return RecoveryStep(Action.DONE, f"the guard could not bring the old QEMU back: "
                            f"{f.guard_error or 'no reason given'}", Outcome.LOST)
    if phase == cpr_guard.PHASE_ROLLING_BACK:
        if final:
            return RecoveryStep(Action.DONE, "the guard's rollback did not finish in time",
                                Outcome.LOST)
        return RecoveryStep(Action.WAIT, "the guard is rolling back")
    if f.mode == CprMode.CPR_REBOOT and not f.old_alive:
        step = _after_reboot_quit(f, final)
        if step is not None:
            return step
    if f.transfer_target_pids:
        t = f.transfer_target
        if t is not None and t.runstate == "running":
            return RecoveryStep(Action.ADOPT_TRANSFER_TARGET,
                                f"the guest runs in the cpr-transfer target (pid {t.pid}); "
                                "quitting the old QEMU and handing over its QMP socket")
        if t is None and not final:
            return RecoveryStep(Action.WAIT, "the cpr-transfer target does not answer yet")
        return RecoveryStep(Action.KILL_TRANSFER_TARGET,
                            "the cpr-transfer target never ran the guest; stopping it so the "
                            "old QEMU can continue")
    vm = f.vm
    if vm is None:
        if final:
            return RecoveryStep(Action.DONE, f"no QEMU answers at the VM's QMP socket "
                                f"({f.vm_error})", Outcome.LOST)
        return RecoveryStep(Action.WAIT, f"no QEMU answers yet ({f.vm_error})")
    if phase == cpr_guard.PHASE_WATCHING and not f.watcher_gone:
        if vm.pid != e.pid_before:
            if final:
                return RecoveryStep(Action.DONE, f"the guard watches, but pid {vm.pid} answers "
                                    f"instead of {e.pid_before}", Outcome.LOST)
            return RecoveryStep(Action.WAIT, "the guard watches; the VM's pid does not answer")
        if vm.runstate == "running":
            # The guest already runs in the new QEMU: a rollback now would lose its progress.
            return RecoveryStep(Action.COMMIT, "the new QEMU runs the guest; committing")
        if vm.migration in ("failed", "cancelled"):
            return RecoveryStep(Action.ABORT, "the new QEMU failed to load the state; rolling "
                                "back to the old QEMU")
        if vm.migration != "completed":
            if final:
                return RecoveryStep(Action.ABORT, "the new QEMU did not load the state in time; "
                                    "rolling back to the old QEMU")
            return RecoveryStep(Action.WAIT, "the new QEMU is loading the state")
        if e.expected_version and not vm.is_version(e.expected_version):
            return RecoveryStep(Action.ABORT, f"the new QEMU reports {vm.version}, expected "
                                f"{e.expected_version}; rolling back (the guest has not run)")
        return RecoveryStep(Action.COMMIT, f"the new QEMU {vm.version} has loaded the state "
                            "and waits paused; committing the guard")
    if vm.migration in MIGRATING or vm.runstate == "inmigrate":
        if final:
            return RecoveryStep(Action.DONE, f"the VM is stuck in migration ({vm.migration}, "
                                f"{vm.runstate})", Outcome.LOST)
        return RecoveryStep(Action.WAIT, f"a migration is in progress ({vm.migration})")
    if vm.runstate != "running" and e.was_running and vm.runstate in CONTINUABLE:
        return RecoveryStep(Action.CONT, f"the VM is {vm.runstate}; continuing it")
    where = f"QEMU {vm.version} in pid {vm.pid}, {vm.runstate}"
    if phase == cpr_guard.PHASE_ROLLED_BACK:
        why = _ROLLBACK_REASONS.get(f.guard_reason, f.guard_reason or "no reason given")
        return RecoveryStep(Action.DONE, f"rolled back: {why}; the guard restarted the old "
                            f"QEMU on the preserved state: {where}", Outcome.ROLLED_BACK)
    if phase in (cpr_guard.PHASE_COMMITTED, cpr_guard.PHASE_WATCHING):
        return RecoveryStep(Action.DONE, f"updated in place: {where}", Outcome.UPDATED)
    if vm.pid == e.pid_before and vm.version == e.version_before:
        return RecoveryStep(Action.DONE, f"not updated: the update had not reached the point "
                            f"of no return; the VM runs {where}, as before", Outcome.FAILED)
    return RecoveryStep(Action.DONE, f"updated: {where}", Outcome.UPDATED)


def _waits_for_state(q: QemuFacts | None) -> bool:
    return q is not None and q.runstate == "inmigrate" and q.migration == "none"


def _after_reboot_quit(f: RecoveryFacts, final: bool) -> RecoveryStep | None:
    """cpr-reboot interrupted after the old QEMU quit: only the saved device state and the
    RAM file hold the VM now, so the new QEMU is never stopped, but given the state (it was
    started with a deferred incoming migration). None: the general rules apply (loading,
    paused after the load, running)."""
    target = f.transfer_target if f.transfer_target_pids else None
    if f.transfer_target_pids and target is None:
        if final:
            return RecoveryStep(Action.DONE, "the old QEMU had quit and the new one never "
                                "answered on QMP" + _restart_hint(f), Outcome.LOST)
        return RecoveryStep(Action.WAIT, "the new QEMU does not answer yet")
    if _waits_for_state(target) or _waits_for_state(f.vm):
        if not f.saved_state:
            return RecoveryStep(Action.DONE, "the old QEMU had quit, but its saved state is "
                                "gone", Outcome.LOST)
        return RecoveryStep(Action.LOAD_SAVED_STATE, f"the old QEMU has quit and the new one "
                            f"waits for the state: loading {f.saved_state}")
    if target is not None:
        if final:
            return RecoveryStep(Action.DONE, f"the new QEMU is {target.runstate} (migration "
                                f"{target.migration}), not waiting for the state"
                                + _restart_hint(f), Outcome.LOST)
        return RecoveryStep(Action.WAIT, f"the new QEMU is {target.runstate}")
    if f.vm is None:
        # Nothing was started after the quit (the agent died in between), or it died.
        return RecoveryStep(Action.DONE, "the old QEMU had quit and no new one runs"
                            + _restart_hint(f), Outcome.LOST)
    return None


def _restart_hint(f: RecoveryFacts) -> str:
    if not f.saved_state:
        return "; no saved state was found"
    return (f"; the VM's device state is saved in {f.saved_state} and its RAM is in its "
            f"memory-backend file: start its QEMU again with its command line plus "
            f"`-incoming defer`, then migrate-set-capabilities x-ignore-shared, "
            f"migrate-set-parameters mode=cpr-reboot, migrate-incoming file:{f.saved_state}")


_ROLLBACK_REASONS = {
    "commit-timeout": "no commit came within the guard's timeout",
    "new-exited": "the new QEMU exited before the commit",
    "abort": "the update was aborted before the commit",
    "exec-new-failed": "the new QEMU could not be exec'd",
    "agent-gone": "the agent died before the commit",
}


def infer_mode(requested: RequestedMode, workdir_files: frozenset[str]) -> CprMode | None:
    """The mode an interrupted operation used: the one requested, or (Auto, which picks
    cpr-exec or cpr-transfer) what it left in its work folder."""
    if requested != RequestedMode.AUTO:
        return CprMode(requested.value)
    if "guard.status" in workdir_files:
        return CprMode.CPR_EXEC
    if "new-qemu.log" in workdir_files or "cpr.sock" in workdir_files:
        return CprMode.CPR_TRANSFER
    return None


def pause_bounds(events: Sequence[ProgressEvent], facts: RecoveryFacts, resumed: list[int]
                 ) -> tuple[int | None, int | None]:
    """When the guest of an interrupted operation stopped and ran again, as far as known:
    the STOP journaled by the agent that died; the first resume after it that the agent saw
    (RESUMED), the watcher or keeper recorded, or the recovery did itself."""
    stopped = next((e.guest_stopped_ns for e in events if e.guest_stopped_ns),
                   facts.guard_started_ns)
    if stopped is None:
        return None, None
    seen = [e.time_ns for e in events if e.phase == Phase.RESUMED and e.time_ns >= stopped]
    for candidate in (seen[:1], [facts.resumed_ns] if facts.resumed_ns else [], resumed[:1]):
        if candidate and candidate[0] >= stopped:
            return stopped, candidate[0]
    return stopped, None
