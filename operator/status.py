"""The VMUpdate status builder: rows and a plan in, phase, counts and conditions out. Pure.

The status is bounded whatever the fleet: counts, the first in-flight and failed VMs, the
conditions and the history; every VM's record lives in its host's VMUpdateHost
(``records.py``).

Phase precedence (see ``vmupdate_api.crd.vmupdate``): Failed > Paused > Progressing >
Degraded > Succeeded; a dry run ends in DryRunComplete. Conditions follow Kubernetes API
conventions: CamelCase reasons, messages that say what to do, ``observedGeneration`` on each,
and ``lastTransitionTime`` that moves only when a condition's status changes
(:func:`vmupdate_api.crd.conditions.condition` keeps it otherwise).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

from vmupdate_api.crd.conditions import (
    COND_DEGRADED,
    COND_PROGRESSING,
    COND_READY,
    ConditionStatus,
    ConditionUpdate,
    Reason,
    condition,
)
from vmupdate_api.crd.constants import MAX_HISTORY, MAX_MESSAGE
from vmupdate_api.crd.vmupdate import (
    FAILED_VM_PHASES,
    IN_PROGRESS_VM_PHASES,
    RolloutRecord,
    RolloutTarget,
    UpdatePhase,
    VMPhase,
    VMRef,
    VMRolloutStatus,
    VMUpdateStatus,
)
from vmupdate_api.crd.vmupdate_spec import VMUpdateSpec
from vmupdate_operator.planning import Plan

# Reasons beyond conditions.Reason (the schema accepts any CamelCase reason).
RUNNING_PREFLIGHT = "RunningPreflight"
DRY_RUN_COMPLETE = "DryRunComplete"
SELECTION_TOO_LARGE = "SelectionTooLarge"

_LISTED = 3  # VMs named in a message before "and N more"
COMPLETE_PHASES = frozenset({UpdatePhase.SUCCEEDED, UpdatePhase.DEGRADED, UpdatePhase.FAILED,
                             UpdatePhase.DRY_RUN_COMPLETE})


def _names(rows: Iterable[VMRolloutStatus | VMRef], count: int, *, detail: bool = False
           ) -> str:
    """The first of ``count`` VMs (``rows``: them, in order; only the first few are read)."""
    parts = []
    for row in itertools.islice(rows, _LISTED):
        text = f"{row.name} on {row.host}"
        if detail and row.message:
            text += f" ({row.message})"
        parts.append(text)
    if count > _LISTED:
        parts.append(f"and {count - _LISTED} more")
    return ", ".join(parts)


def _of(rows: Sequence[VMRolloutStatus], phase: VMPhase) -> Iterator[VMRolloutStatus]:
    return (r for r in rows if r.phase == phase)


def _clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def decide_phase(spec: VMUpdateSpec, rows: Sequence[VMRolloutStatus], plan: Plan) -> UpdatePhase:
    pending = any(r.phase == VMPhase.PENDING for r in rows)
    in_flight = any(r.phase in IN_PROGRESS_VM_PHASES for r in rows)
    if spec.dry_run:
        if spec.paused and pending:
            return UpdatePhase.PAUSED
        return UpdatePhase.PROGRESSING if pending or in_flight else UpdatePhase.DRY_RUN_COMPLETE
    if plan.halt is not None:
        return UpdatePhase.FAILED
    if spec.paused and pending:
        return UpdatePhase.PAUSED
    if pending or in_flight:
        return UpdatePhase.PROGRESSING
    # Looked for only now: finding no failure means looking at every row.
    failed = any(r.phase in FAILED_VM_PHASES for r in rows)
    blocked = any(r.phase == VMPhase.BLOCKED for r in rows)
    return UpdatePhase.DEGRADED if failed or blocked else UpdatePhase.SUCCEEDED


def build_status(*, previous: VMUpdateStatus | None, spec: VMUpdateSpec, generation: int,
                 plan: Plan, now: datetime) -> VMUpdateStatus:
    """The status to write after a reconcile step (``previous``: what status holds now)."""
    rows = list(plan.rows)
    phase = decide_phase(spec, rows, plan)
    base = previous or VMUpdateStatus()
    history, start, completion = list(base.history), base.start_time, base.completion_time
    if base.observed_generation is not None and base.observed_generation != generation:
        # The spec changed: a new rollout; the one it supersedes goes into the history.
        history = [*history, rollout_record(base, now)][-MAX_HISTORY:]
        start, completion = None, None
    done = phase in COMPLETE_PHASES
    completion = (completion or now.replace(microsecond=0)) if done else None
    status = VMUpdateStatus(phase=phase, observed_generation=generation, start_time=start,
                            completion_time=completion,
                            target=RolloutTarget(binary=spec.target.binary,
                                                 version=spec.target.version),
                            history=history, conditions=list(base.conditions)
                            ).counted(rows)
    conditions = status.conditions
    for update in _conditions(spec, status, rows, plan, generation):
        conditions = condition(conditions, update, now)
    return status.model_copy(update={"conditions": conditions})


def _conditions(spec: VMUpdateSpec, status: VMUpdateStatus, rows: Sequence[VMRolloutStatus],
                plan: Plan, generation: int) -> list[ConditionUpdate]:
    phase = status.phase
    target = f"QEMU {spec.target.version} at {spec.target.binary}"
    # The counts and the first VMs of each kind, as status has them (a fleet's rows are
    # not looked at again; only the first Blocked ones are looked for).
    in_flight, failed = status.in_progress, status.failed
    pending, blocked = status.pending, status.blocked
    done = f"{status.updated} of {status.targets} selected VM(s) run {target}"
    overlap = (f"{blocked} selected VM(s) belong to other VMUpdates: "
               f"{_names(_of(rows, VMPhase.BLOCKED), blocked, detail=True)}"
               if blocked else "")
    failures = _names(status.failed_vms, failed, detail=True)

    def make(type_: str, ok: bool | None, reason: str, message: str) -> ConditionUpdate:
        value = (ConditionStatus.UNKNOWN if ok is None
                 else ConditionStatus.TRUE if ok else ConditionStatus.FALSE)
        return ConditionUpdate(type=type_, status=value, reason=reason, message=_clip(message),
                               observed_generation=generation)

    # Ready
    if phase == UpdatePhase.SUCCEEDED:
        ready = (make(COND_READY, True, Reason.ALL_VMS_UPDATED, done) if rows
                 else make(COND_READY, True, Reason.NO_MATCHING_VMS,
                           "no VM matches spec.selector (VMs that appear later are updated "
                           "too); check the selector against `kubectl get vmhosts -o wide`"))
    elif phase == UpdatePhase.DRY_RUN_COMPLETE:
        checked = status.dry_run_passed + status.failed
        ready = (make(COND_READY, True, Reason.DRY_RUN_PASSED,
                      f"preflight passed on {status.dry_run_passed} VM(s)"
                      + (f"; {status.updated} already run {target}" if status.updated else ""))
                 if not failed else
                 make(COND_READY, False, Reason.DRY_RUN_FAILED,
                      f"preflight failed on {failed} of {checked} VM(s): {failures}"))
    elif phase == UpdatePhase.FAILED and plan.halt is not None:
        ready = make(COND_READY, False, Reason.ROLLOUT_HALTED, f"{done}; halted")
    elif phase == UpdatePhase.DEGRADED and failed:
        ready = make(COND_READY, False, Reason.VM_UPDATE_FAILED,
                     f"{done}; {failed} failed: {failures}")
    elif phase == UpdatePhase.DEGRADED:
        ready = make(COND_READY, False, Reason.OVERLAPPING_VMUPDATE, f"{done}; {overlap}")
    else:
        ready = make(COND_READY, False, Reason.ROLLOUT_IN_PROGRESS, done)

    # Progressing
    if phase == UpdatePhase.PROGRESSING:
        reason = RUNNING_PREFLIGHT if spec.dry_run else Reason.UPDATING_VMS
        verb = "checking" if spec.dry_run else "updating"
        if in_flight:
            message = f"{verb} {_names(status.in_progress_vms, in_flight)}"
            if pending:
                message += f"; {pending} VM(s) waiting"
        else:
            message = f"{pending} VM(s) waiting: " + "; ".join(plan.waiting)
        progressing = make(COND_PROGRESSING, True, reason, message)
    elif phase == UpdatePhase.PAUSED:
        progressing = make(COND_PROGRESSING, False, Reason.ROLLOUT_PAUSED,
                           f"spec.paused is true: {pending} VM(s) wait"
                           + (f", {in_flight} still finishing" if in_flight else "")
                           + "; set spec.paused to false to go on")
    elif phase == UpdatePhase.FAILED and plan.halt is not None:
        progressing = make(COND_PROGRESSING, False, Reason.ROLLOUT_HALTED,
                           plan.halt.message
                           + (f"; {in_flight} update(s) still finishing" if in_flight
                              else ""))
    elif phase == UpdatePhase.DRY_RUN_COMPLETE:
        progressing = make(COND_PROGRESSING, False, DRY_RUN_COMPLETE,
                           "dry run complete: nothing was changed; set spec.dryRun to false to "
                           "update the VMs")
    elif blocked:
        progressing = make(COND_PROGRESSING, False, Reason.OVERLAPPING_VMUPDATE,
                           f"nothing this VMUpdate may do: {overlap}")
    else:
        progressing = make(COND_PROGRESSING, False, Reason.ROLLOUT_COMPLETE,
                           "nothing left to do until a selected VM appears or leaves the target")

    # Degraded
    if plan.halt is not None and not spec.dry_run:
        degraded = make(COND_DEGRADED, True, plan.halt.reason, plan.halt.message)
    elif failed:
        reason = Reason.DRY_RUN_FAILED if spec.dry_run else Reason.VM_UPDATE_FAILED
        degraded = make(COND_DEGRADED, True, reason,
                        f"{failed} VM(s) failed: {failures}")
    elif blocked and not spec.dry_run:
        degraded = make(COND_DEGRADED, True, Reason.OVERLAPPING_VMUPDATE, overlap)
    elif plan.dropped:
        degraded = make(COND_DEGRADED, True, SELECTION_TOO_LARGE,
                        f"{plan.dropped} selected VM(s) are not tracked: one VMUpdate tracks at "
                        f"most {len(rows)} VMs; split this VMUpdate (e.g. by "
                        "spec.selector.hostNames)")
    else:
        degraded = make(COND_DEGRADED, False, Reason.NO_FAILURES, "no VM failed")
    return [ready, progressing, degraded]


def rollout_record(status: VMUpdateStatus, now: datetime) -> RolloutRecord:
    """The history entry of the rollout ``status`` describes, as it is superseded ``now``."""
    return RolloutRecord(generation=status.observed_generation or 0, target=status.target,
                         phase=status.phase, start_time=status.start_time,
                         finish_time=status.completion_time or now.replace(microsecond=0),
                         targets=status.targets, updated=status.updated, failed=status.failed,
                         skipped=status.skipped, blocked=status.blocked,
                         pause_max_ms=status.pause_max_ms)


def with_start_time(status: VMUpdateStatus, now: datetime) -> VMUpdateStatus:
    """``status`` with ``startTime`` set if this rollout had none yet."""
    if status.start_time is not None:
        return status
    return status.model_copy(update={"start_time": now.replace(microsecond=0)})
