"""Between the agent API and the status rows: requests from rows, rows from answers. Pure."""

from __future__ import annotations

import enum
from datetime import datetime

import grpc

from vmupdate_api.crd.vmupdate import VMPhase, VMRolloutStatus
from vmupdate_api.crd.vmupdate_spec import (
    CprMode,
    Preference,
    RolloutStrategy,
    UpdateMode,
    UpdateTarget,
    VMUpdateSpec,
)
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator.operation_ids import NIL_UUID

MODE_TO_PB = {
    UpdateMode.AUTO: pb.MODE_AUTO,
    UpdateMode.CPR_EXEC: pb.MODE_CPR_EXEC,
    UpdateMode.CPR_TRANSFER: pb.MODE_CPR_TRANSFER,
    UpdateMode.CPR_REBOOT: pb.MODE_CPR_REBOOT,
}
PREFER_TO_PB = {
    None: pb.PREFERENCE_SAME_PID,
    Preference.SAME_PID: pb.PREFERENCE_SAME_PID,
    Preference.SHORTEST_PAUSE: pb.PREFERENCE_SHORTEST_PAUSE,
}
PB_TO_CPR_MODE = {
    pb.MODE_CPR_EXEC: CprMode.CPR_EXEC,
    pb.MODE_CPR_TRANSFER: CprMode.CPR_TRANSFER,
    pb.MODE_CPR_REBOOT: CprMode.CPR_REBOOT,
}
# Agent phases in which the VM is still untouched (checks); the later ones change it.
CHECKING_PHASES = frozenset({pb.PHASE_UNSPECIFIED, pb.PHASE_ACCEPTED, pb.PHASE_PREFLIGHT})
OUTCOME_PHASES = {
    pb.OUTCOME_UPDATED: VMPhase.UPDATED,
    pb.OUTCOME_FAILED: VMPhase.FAILED,
    pb.OUTCOME_ROLLED_BACK: VMPhase.ROLLED_BACK,
    pb.OUTCOME_LOST: VMPhase.FAILED,
}
MAX_ROW_MESSAGE = 1024


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ROW_MESSAGE else text[: MAX_ROW_MESSAGE - 1] + "…"


def vm_reference(row: VMRolloutStatus) -> str:
    """How to name the VM to its agent: the UUID when QEMU has a real one, else the name."""
    if row.uuid and row.uuid.lower() != NIL_UUID:
        return row.uuid
    return row.name


def target_to_pb(target: UpdateTarget) -> pb.Target:
    return pb.Target(binary=target.binary, expected_version=target.version,
                     sha256=target.sha256 or "", extra_args=list(target.extra_args or []))


def update_request(row: VMRolloutStatus, spec: VMUpdateSpec) -> pb.UpdateRequest:
    assert row.operation_id, "an update needs the operation id persisted in its row"
    return pb.UpdateRequest(operation_id=row.operation_id, vm=vm_reference(row),
                            target=target_to_pb(spec.target), mode=MODE_TO_PB[spec.mode],
                            pause_budget_ms=spec.strategy.pause_budget_ms,
                            prefer=PREFER_TO_PB[spec.strategy.prefer])


def preflight_request(row: VMRolloutStatus, spec: VMUpdateSpec) -> pb.PreflightRequest:
    return pb.PreflightRequest(vm=vm_reference(row), target=target_to_pb(spec.target),
                               mode=MODE_TO_PB[spec.mode],
                               prefer=PREFER_TO_PB[spec.strategy.prefer])


def phase_name(phase: int) -> str:
    return pb.Phase.Name(phase).removeprefix("PHASE_").lower()


def with_progress(row: VMRolloutStatus, progress: pb.Progress) -> VMRolloutStatus:
    """The row while its update runs: Preflight until the agent touches the VM, then Updating."""
    phase = VMPhase.PREFLIGHT if progress.phase in CHECKING_PHASES else VMPhase.UPDATING
    if row.phase == VMPhase.UPDATING:
        phase = VMPhase.UPDATING  # never back (a recovery step reports an early phase)
    message = f"{phase_name(progress.phase)}: {progress.message}".rstrip(": ")
    return row.model_copy(update={"phase": phase, "message": _clip(message)})


def row_pause_ms(result: pb.UpdateResult) -> float | None:
    """The pause as a row keeps it: float ms, to the microsecond."""
    return round(result.pause_ms, 3) if result.HasField("pause_ms") else None


def with_result(row: VMRolloutStatus, result: pb.UpdateResult, now: datetime,
                strategy: RolloutStrategy) -> VMRolloutStatus:
    phase = OUTCOME_PHASES.get(result.outcome, VMPhase.FAILED)
    message = result.message or pb.Outcome.Name(result.outcome)
    if result.outcome == pb.OUTCOME_LOST:
        message = f"VM LOST (the agent could not bring it back): {message}"
    pause_ms = row_pause_ms(result)
    if pause_ms is not None and strategy.over_pause_budget(pause_ms):
        message += f" (paused {strategy.format_ms(pause_ms)} ms, over strategy.pauseBudgetMs " \
                   f"{strategy.pause_budget_ms})"
    return row.model_copy(update={
        "phase": phase,
        "mode": PB_TO_CPR_MODE.get(result.mode),
        "pid_before": result.pid_before or row.pid_before,
        "pid_after": result.pid_after if result.HasField("pid_after") and result.pid_after
        else None,
        "from_version": result.version_before or row.from_version,
        "to_version": result.version_after if result.HasField("version_after") else None,
        "pause_ms": pause_ms,
        "finished_at": now,
        "message": _clip(message),
    })


def failed_checks(report: pb.PreflightReport) -> str:
    failures = [f"{c.name}: {c.message}" for c in report.checks if not c.passed]
    if report.mode == pb.MODE_UNSPECIFIED and report.mode_reason:
        failures.insert(0, f"mode: {report.mode_reason}")
    return "; ".join(failures) or "preflight did not pass"


def with_preflight(row: VMRolloutStatus, report: pb.PreflightReport, now: datetime
                   ) -> VMRolloutStatus:
    """A dry run's verdict on one VM, with every failed check's message."""
    mode = PB_TO_CPR_MODE.get(report.mode)
    if report.passed:
        phase = VMPhase.DRY_RUN_PASSED
        message = f"preflight passed; would use {mode.value if mode else 'no mode'}"
        if report.mode_reason:
            message += f" ({report.mode_reason})"
    else:
        phase = VMPhase.DRY_RUN_FAILED
        message = failed_checks(report)
    return row.model_copy(update={"phase": phase, "mode": mode, "finished_at": now,
                                  "message": _clip(message)})


class OnError(enum.Enum):
    """What an agent's refusal means for the VM."""

    RETRY = "retry"  # transient (agent restarting, VM busy): try again later, same id
    FAIL = "fail"  # the request cannot succeed as it is: the VM failed
    SKIP = "skip"  # the VM is not there any more


RETRY_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.FAILED_PRECONDITION,  # another operation holds the VM
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
})


def on_error(code: grpc.StatusCode) -> OnError:
    if code in RETRY_CODES:
        return OnError.RETRY
    if code == grpc.StatusCode.NOT_FOUND:
        return OnError.SKIP
    return OnError.FAIL


def with_error(row: VMRolloutStatus, what: OnError, message: str, now: datetime,
               *, dry_run: bool) -> VMRolloutStatus:
    if what == OnError.RETRY:
        return row.model_copy(update={"message": _clip(f"retrying: {message}")})
    if what == OnError.SKIP:
        return row.model_copy(update={"phase": VMPhase.SKIPPED, "finished_at": now,
                                      "message": _clip(message)})
    phase = VMPhase.DRY_RUN_FAILED if dry_run else VMPhase.FAILED
    return row.model_copy(update={"phase": phase, "finished_at": now, "message": _clip(message)})
