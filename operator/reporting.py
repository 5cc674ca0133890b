"""Kubernetes Events and the rollout metric from a rollout step's transitions: which VMs
changed phase, and whether the VMUpdate's phase did. Decisions only; the sink posts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from vmupdate_api.crd.vmupdate import (
    IN_PROGRESS_VM_PHASES,
    UpdatePhase,
    VMPhase,
    VMRolloutStatus,
    VMUpdateStatus,
)
from vmupdate_api.crd.vmupdate_spec import VMUpdateSpec
from vmupdate_operator.metrics import Metrics
from vmupdate_operator.planning import Key, key_of

EventSink = Callable[[str, str, str], None]  # (type Normal|Warning, reason, message)


def report(events: EventSink, metrics: Metrics, *, before_rows: dict[Key, VMRolloutStatus],
           after_rows: Sequence[VMRolloutStatus], before: VMUpdateStatus | None,
           after: VMUpdateStatus, spec: VMUpdateSpec, now: datetime) -> None:
    """Post the Events of one step (``before_rows``: the records by key before it)."""
    for row in after_rows:
        prev = before_rows.get(key_of(row))
        if prev is None or prev.phase != row.phase:
            row_event(events, prev, row, spec)
    old_phase = before.phase if before else None
    if after.phase != old_phase:
        phase_event(events, metrics, after, now)


def row_event(events: EventSink, prev: VMRolloutStatus | None, row: VMRolloutStatus,
              spec: VMUpdateSpec) -> None:
    where = f"VM {row.name} on {row.host}"
    target = f"QEMU {spec.target.version} at {spec.target.binary}"
    if prev is not None and prev.phase == VMPhase.UPDATED and row.phase in (
            VMPhase.PENDING, VMPhase.PREFLIGHT):
        events("Warning", "VMLeftTarget",
               f"{where} no longer runs {target} (found QEMU {row.from_version} "
               "by an inventory taken after its update); updating it again")
    if row.phase == VMPhase.PREFLIGHT and (prev is None
                                           or prev.phase not in IN_PROGRESS_VM_PHASES):
        if row.operation_id:
            events("Normal", "UpdateStarted",
                   f"{where}: updating to {target} (pid {row.pid_before}, QEMU "
                   f"{row.from_version}); operation {row.operation_id}")
        else:
            events("Normal", "PreflightStarted", f"{where}: checking {target}")
    elif row.phase == VMPhase.UPDATED and prev is not None and prev.phase in (
            IN_PROGRESS_VM_PHASES):
        pause = f", guest paused {row.pause_ms} ms" if row.pause_ms is not None else ""
        mode = row.mode.value if row.mode else "unknown mode"
        events("Normal", "VMUpdated",
               f"{where} runs {target} ({mode}, pid {row.pid_before} -> "
               f"{row.pid_after}{pause})")
    elif row.phase == VMPhase.FAILED:
        events("Warning", "VMUpdateFailed", f"{where}: {row.message}")
    elif row.phase == VMPhase.ROLLED_BACK:
        events("Warning", "VMRolledBack", f"{where}: {row.message}")
    elif row.phase == VMPhase.DRY_RUN_PASSED:
        events("Normal", "PreflightPassed", f"{where}: {row.message}")
    elif row.phase == VMPhase.DRY_RUN_FAILED:
        events("Warning", "PreflightFailed", f"{where}: {row.message}")
    elif row.phase == VMPhase.SKIPPED and prev is not None:
        events("Normal", "VMSkipped", f"{where}: {row.message}")


def phase_event(events: EventSink, metrics: Metrics, status: VMUpdateStatus,
                now: datetime) -> None:
    ready = next((c for c in status.conditions if c.type == "Ready"), None)
    progressing = next((c for c in status.conditions if c.type == "Progressing"), None)
    if status.phase == UpdatePhase.SUCCEEDED:
        events("Normal", "RolloutComplete", ready.message if ready else "")
        if status.start_time is not None and status.updated:
            metrics.rollout.observe((now - status.start_time).total_seconds())
    elif status.phase == UpdatePhase.FAILED:
        events("Warning", "RolloutHalted",
               progressing.message if progressing else "")
    elif status.phase == UpdatePhase.DRY_RUN_COMPLETE:
        events("Normal", "DryRunComplete", ready.message if ready else "")
    elif status.phase == UpdatePhase.PAUSED:
        events("Normal", "RolloutPaused",
               progressing.message if progressing else "")
