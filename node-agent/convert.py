"""The edge of the gRPC API: requests validated into specs (specs.py), answers built from models.

Everything a client sends is checked here before anything else looks at it: each rule names
the proto field it concerns, so a rejected request says what to fix (INVALID_ARGUMENT). The
other direction turns the engine's pydantic models into protobuf messages; both directions
are plain functions without I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from vmupdate_agent.models import (
    CprMode,
    Outcome,
    Phase,
    Preference,
    PreflightReport,
    ProgressEvent,
    Readiness,
    RequestedMode,
    UpdateResult,
    VMInfo,
)
from vmupdate_agent.specs import OPERATION_ID, PreflightSpec, TimeoutsSpec, UpdateSpec
from vmupdate_api.gen import agent_v1_pb2 as pb

if TYPE_CHECKING:
    from vmupdate_agent.journal import OperationRecord

S = TypeVar("S", PreflightSpec, UpdateSpec)

class InvalidRequest(ValueError):
    """A request field is wrong; the message starts with the field's name."""



def describe(exc: ValidationError) -> str:
    """'field.path: what is wrong; ...' — the proto's field names, pydantic's noise removed."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "request"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


_MODES_IN = {pb.MODE_AUTO: RequestedMode.AUTO, pb.MODE_CPR_EXEC: RequestedMode.CPR_EXEC,
             pb.MODE_CPR_TRANSFER: RequestedMode.CPR_TRANSFER,
             pb.MODE_CPR_REBOOT: RequestedMode.CPR_REBOOT}


def _mode_problem(v: int) -> str | None:
    if v == pb.MODE_UNSPECIFIED:
        return "must be set: MODE_AUTO lets the agent choose, or name a mode"
    if v not in _MODES_IN:
        known = ", ".join(pb.Mode.Name(m) for m in _MODES_IN)
        return f"unknown mode {v} (known: {known})"
    return None


_PREFER_IN = {pb.PREFERENCE_UNSPECIFIED: Preference.SAME_PID,
              pb.PREFERENCE_SAME_PID: Preference.SAME_PID,
              pb.PREFERENCE_SHORTEST_PAUSE: Preference.SHORTEST_PAUSE}


_PREFER_OUT = {Preference.SAME_PID: pb.PREFERENCE_SAME_PID,
               Preference.SHORTEST_PAUSE: pb.PREFERENCE_SHORTEST_PAUSE}


def _prefer_problem(v: int) -> str | None:
    if v not in _PREFER_IN:
        known = ", ".join(pb.Preference.Name(p) for p in _PREFER_IN)
        return f"unknown preference {v} (known: {known})"
    return None


def _validated(model: type[S], data: dict[str, Any], mode: int, prefer: int) -> S:
    """`model` from `data`, the request's mode and preference; every wrong field named in one
    message."""
    problems = []
    why, why_prefer = _mode_problem(mode), _prefer_problem(prefer)
    try:
        requested = _MODES_IN.get(mode, RequestedMode.AUTO)  # type: ignore[call-overload]
        preference = _PREFER_IN.get(prefer, Preference.SAME_PID)  # type: ignore[call-overload]
        spec = model.model_validate({**data, "mode": requested, "prefer": preference})
    except ValidationError as exc:
        problems.append(describe(exc))
    if why is not None:
        problems.append(f"mode: {why}")
    if why_prefer is not None:
        problems.append(f"prefer: {why_prefer}")
    if problems:
        raise InvalidRequest("; ".join(problems))
    return spec



def _target_data(msg: pb.UpdateRequest | pb.PreflightRequest) -> dict[str, Any] | None:
    if not msg.HasField("target"):
        return None
    t = msg.target
    return {"binary": t.binary, "expected_version": t.expected_version, "sha256": t.sha256,
            "extra_args": tuple(t.extra_args)}


def _missing(field: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: is required ({what})")


def preflight_spec(msg: pb.PreflightRequest) -> PreflightSpec:
    target = _target_data(msg)
    if target is None:
        raise _missing("target", "at least target.binary")
    return _validated(PreflightSpec, {"vm": msg.vm, "target": target}, msg.mode, msg.prefer)


def update_spec(msg: pb.UpdateRequest) -> UpdateSpec:
    target = _target_data(msg)
    if target is None:
        raise _missing("target", "at least target.binary")
    t = msg.timeouts
    timeouts = {name: (getattr(t, name) or None) for name in TimeoutsSpec.model_fields}
    data = {"operation_id": msg.operation_id, "vm": msg.vm, "target": target,
            "timeouts": timeouts, "pause_budget_ms": msg.pause_budget_ms}
    return _validated(UpdateSpec, data, msg.mode, msg.prefer)


def operation_id(value: str, field: str = "operation_id") -> str:
    """Check a bare operation id (GetOperation, WatchOperation)."""
    if not OPERATION_ID.fullmatch(value):
        raise InvalidRequest(f"{field}: {value[:140]!r} is not a valid operation id")
    return value


# --- answers --------------------------------------------------------------------------------

_MODES_OUT = {CprMode.CPR_EXEC: pb.MODE_CPR_EXEC, CprMode.CPR_TRANSFER: pb.MODE_CPR_TRANSFER,
              CprMode.CPR_REBOOT: pb.MODE_CPR_REBOOT}
_REQUESTED_OUT = {v: k for k, v in _MODES_IN.items()}
PHASES: dict[Phase, pb.Phase] = {
    Phase.ACCEPTED: pb.PHASE_ACCEPTED, Phase.PREFLIGHT: pb.PHASE_PREFLIGHT,
    Phase.STOPPING: pb.PHASE_STOPPING, Phase.SAVED: pb.PHASE_SAVED,
    Phase.EXECED: pb.PHASE_EXECED, Phase.TRANSFERRED: pb.PHASE_TRANSFERRED,
    Phase.RESUMED: pb.PHASE_RESUMED, Phase.VERIFIED: pb.PHASE_VERIFIED,
    Phase.FINISHED: pb.PHASE_FINISHED, Phase.FAILED: pb.PHASE_FAILED,
    Phase.RECOVERED: pb.PHASE_RECOVERED,
}
OUTCOMES: dict[Outcome, pb.Outcome] = {
    Outcome.UPDATED: pb.OUTCOME_UPDATED, Outcome.FAILED: pb.OUTCOME_FAILED,
    Outcome.ROLLED_BACK: pb.OUTCOME_ROLLED_BACK, Outcome.LOST: pb.OUTCOME_LOST,
}


def mode_to_pb(mode: CprMode | None) -> pb.Mode:
    return pb.MODE_UNSPECIFIED if mode is None else _MODES_OUT[mode]


def vm_to_pb(vm: VMInfo, readiness: Readiness, *, busy_operation_id: str = "") -> pb.VM:
    v = vm.features.version
    msg = pb.VM(
        qmp_path=vm.qmp_path, pid=vm.pid, name=vm.name, uuid=vm.uuid, argv=vm.argv,
        root=vm.root, binary=vm.binary,
        version=pb.QemuVersion(major=v.major, minor=v.minor, micro=v.micro, package=v.package),
        cpr_modes=[mode_to_pb(m) for m in vm.features.cpr_modes],
        legacy_cpr_dialect=vm.features.legacy_cpr_dialect,
        has_cpr_exec_command=vm.features.has_cpr_exec_command,
        runstate=vm.runstate, machine_type=vm.machine_type,
        memory_backends=[pb.MemoryBackend(id=b.id, kind=b.kind, size_bytes=b.size_bytes,
                                          share=b.share, mem_path=b.mem_path or "")
                         for b in vm.memory_backends],
        memory_bytes=vm.memory_bytes,
        migration_blockers=vm.migration_blockers,
        enabled_capabilities=vm.enabled_capabilities,
        taps=[pb.TapDevice(id=t.id, ifname=t.ifname or "", fd=t.fd, vhost=t.vhost,
                           vhostfd=t.vhostfd) for t in vm.taps],
        vfio_devices=vm.vfio_devices, iommufd_objects=vm.iommufd_objects,
        vhost_devices=vm.vhost_devices, device_drivers=vm.device_drivers,
        readiness=pb.Readiness(ready=readiness.ready,
                               modes=[mode_to_pb(m) for m in readiness.modes],
                               reasons=readiness.reasons),
        busy_operation_id=busy_operation_id,
    )
    if vm.aux_ram_share is not None:
        msg.aux_ram_share = vm.aux_ram_share
    return msg


def report_to_pb(report: PreflightReport) -> pb.PreflightReport:
    return pb.PreflightReport(
        vm=report.vm, target=report.target, mode=mode_to_pb(report.mode),
        mode_reason=report.mode_reason, passed=report.passed,
        checks=[pb.CheckResult(name=c.name, passed=c.passed, message=c.message)
                for c in report.checks])


def progress_to_pb(event: ProgressEvent) -> pb.Progress:
    msg = pb.Progress(phase=PHASES[event.phase], message=event.message)
    msg.time.FromNanoseconds(event.time_ns)
    return msg


def phase_durations(events: Sequence[ProgressEvent]) -> dict[str, float]:
    """Milliseconds from each phase's event to the next one (summed when a phase repeats),
    and "total" from the first event to the last: the whole operation, preflight included,
    on one clock."""
    out: dict[str, float] = {}
    for event, following in itertools.pairwise(events):
        ms = (following.time_ns - event.time_ns) / 1e6
        out[event.phase.value] = round(out.get(event.phase.value, 0.0) + ms, 3)
    if events:
        out["total"] = round((events[-1].time_ns - events[0].time_ns) / 1e6, 3)
    return out


def pause_budget_exceeded(result: UpdateResult, budget_ms: int) -> bool:
    return budget_ms > 0 and result.pause_ms is not None and result.pause_ms > budget_ms


def result_to_pb(result: UpdateResult, *, pause_budget_ms: int = 0) -> pb.UpdateResult:
    msg = pb.UpdateResult(
        vm=result.vm, outcome=OUTCOMES[result.outcome], mode=mode_to_pb(result.mode),
        mode_reason=result.mode_reason, message=result.message, pid_before=result.pid_before,
        version_before=result.version_before, phase_ms=result.phase_ms,
        pause_budget_exceeded=pause_budget_exceeded(result, pause_budget_ms))
    if result.pid_after is not None:
        msg.pid_after = result.pid_after
    if result.version_after is not None:
        msg.version_after = result.version_after
    if result.pause_ms is not None:
        msg.pause_ms = result.pause_ms
    if result.preflight is not None:
        msg.preflight.CopyFrom(report_to_pb(result.preflight))
    return msg


def spec_to_pb(spec: UpdateSpec) -> pb.UpdateRequest:
    t, tm = spec.target, spec.timeouts
    return pb.UpdateRequest(
        operation_id=spec.operation_id, vm=spec.vm,
        target=pb.Target(binary=t.binary, expected_version=t.expected_version,
                         sha256=t.sha256, extra_args=t.extra_args),
        mode=_REQUESTED_OUT[spec.mode],
        timeouts=pb.Timeouts(**{k: v for k, v in tm.model_dump().items() if v is not None}),
        pause_budget_ms=spec.pause_budget_ms, prefer=_PREFER_OUT[spec.prefer])


def event_to_pb(operation_id: str, sequence: int, item: ProgressEvent | UpdateResult, *,
                pause_budget_ms: int = 0) -> pb.OperationEvent:
    msg = pb.OperationEvent(operation_id=operation_id, sequence=sequence)
    if isinstance(item, ProgressEvent):
        msg.progress.CopyFrom(progress_to_pb(item))
    else:
        msg.result.CopyFrom(result_to_pb(item, pause_budget_ms=pause_budget_ms))
    return msg


def record_to_pb(record: OperationRecord) -> pb.Operation:
    msg = pb.Operation(
        operation_id=record.operation_id,
        state=(pb.OPERATION_STATE_DONE if record.result is not None
               else pb.OPERATION_STATE_RUNNING),
        request=spec_to_pb(record.request), vm_name=record.vm.name, vm_uuid=record.vm.uuid,
        qmp_path=record.vm.qmp_path, events=[progress_to_pb(e) for e in record.events],
        resolved_after_restart=record.resolved_after_restart)
    msg.created_at.FromNanoseconds(record.created_ns)
    if record.finished_ns is not None:
        msg.finished_at.FromNanoseconds(record.finished_ns)
    if record.result is not None:
        msg.result.CopyFrom(result_to_pb(record.result,
                                         pause_budget_ms=record.request.pause_budget_ms))
    return msg
