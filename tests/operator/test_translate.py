"""Requests from rows and rows from the agents' answers."""

from __future__ import annotations

import grpc
import pytest

from tests.operator.builders import (
    NEW,
    NEW_VERSION,
    T0,
    UID,
    host,
    make_plan,
    on_target,
    row,
    spec,
    uuid_for,
    vm,
)
from vmupdate_api.crd.conditions import Reason
from vmupdate_api.crd.vmupdate import VMPhase
from vmupdate_api.crd.vmupdate_spec import CprMode, RolloutStrategy
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator import translate
from vmupdate_operator.operation_ids import operation_id, vm_identity
from vmupdate_operator.translate import OnError

STRATEGY = RolloutStrategy()


def op(name: str) -> str:
    return operation_id(UID, 1, vm_identity("a", name, uuid_for(name)))

NIL = "00000000-0000-0000-0000-000000000000"


def test_update_request_from_row_and_spec() -> None:
    s = spec(mode="CprExec", strategy={"pauseBudgetMs": 1500},
             target={"binary": NEW, "version": NEW_VERSION, "sha256": "a" * 64,
                     "extraArgs": ["-msg", "timestamp=on"]})
    r = row("a", "x", VMPhase.PREFLIGHT, operation_id="vmu-op")
    req = translate.update_request(r, s)
    assert req.operation_id == "vmu-op" and req.vm == uuid_for("x")
    assert req.mode == pb.MODE_CPR_EXEC and req.pause_budget_ms == 1500
    assert (req.target.binary, req.target.expected_version, req.target.sha256,
            list(req.target.extra_args)) == (NEW, NEW_VERSION, "a" * 64, ["-msg", "timestamp=on"])


def test_update_request_needs_the_persisted_operation_id() -> None:
    with pytest.raises(AssertionError):
        translate.update_request(row("a", "x"), spec())


@pytest.mark.parametrize(("uuid", "expected"), [(NIL, "x"), (None, "x"), ("", "x"),
                                                (uuid_for("x"), uuid_for("x"))])
def test_vms_are_named_by_uuid_unless_qemu_has_none(uuid: str | None, expected: str) -> None:
    assert translate.vm_reference(row("a", "x", uuid=uuid)) == expected


@pytest.mark.parametrize("mode", ["Auto", "CprExec", "CprTransfer", "CprReboot"])
def test_every_mode_maps(mode: str) -> None:
    req = translate.preflight_request(row("a", "x"), spec(mode=mode))
    assert pb.Mode.Name(req.mode) == "MODE_" + {"Auto": "AUTO", "CprExec": "CPR_EXEC",
                                                "CprTransfer": "CPR_TRANSFER",
                                                "CprReboot": "CPR_REBOOT"}[mode]


@pytest.mark.parametrize(("prefer", "expected"), [
    (None, pb.PREFERENCE_SAME_PID), ("SamePid", pb.PREFERENCE_SAME_PID),
    ("ShortestPause", pb.PREFERENCE_SHORTEST_PAUSE)])
def test_the_preference_reaches_the_agent(prefer: str | None, expected: int) -> None:
    strategy = {} if prefer is None else {"prefer": prefer}
    s = spec(mode="Auto", strategy=strategy)
    assert translate.preflight_request(row("a", "x"), s).prefer == expected
    r = row("a", "x", VMPhase.PREFLIGHT, operation_id="vmu-op")
    assert translate.update_request(r, s).prefer == expected


@pytest.mark.parametrize(("phase", "expected"), [
    (pb.PHASE_ACCEPTED, VMPhase.PREFLIGHT), (pb.PHASE_PREFLIGHT, VMPhase.PREFLIGHT),
    (pb.PHASE_STOPPING, VMPhase.UPDATING), (pb.PHASE_EXECED, VMPhase.UPDATING),
    (pb.PHASE_RESUMED, VMPhase.UPDATING), (pb.PHASE_FAILED, VMPhase.UPDATING),
])
def test_progress_moves_the_row(phase: int, expected: VMPhase) -> None:
    r = translate.with_progress(row("a", "x", VMPhase.PREFLIGHT),
                                pb.Progress(phase=phase, message="hello"))  # type: ignore[arg-type]
    assert r.phase == expected and r.message == f"{translate.phase_name(phase)}: hello"


def test_progress_never_goes_back_to_preflight() -> None:
    r = translate.with_progress(row("a", "x", VMPhase.UPDATING),
                                pb.Progress(phase=pb.PHASE_PREFLIGHT, message="again"))
    assert r.phase == VMPhase.UPDATING


def result(**fields: object) -> pb.UpdateResult:
    base: dict[str, object] = {"vm": "x", "outcome": pb.OUTCOME_UPDATED,
                               "mode": pb.MODE_CPR_EXEC, "message": "updated in place",
                               "pid_before": 10, "pid_after": 10, "version_before": "10.0.2",
                               "version_after": NEW_VERSION, "pause_ms": 41.6}
    base.update(fields)
    return pb.UpdateResult(**base)  # type: ignore[arg-type]


def test_updated_result() -> None:
    r = translate.with_result(row("a", "x", VMPhase.UPDATING), result(), T0, STRATEGY)
    assert (r.phase, r.mode, r.pid_before, r.pid_after, r.from_version, r.to_version,
            r.pause_ms, r.finished_at, r.message) == (
        VMPhase.UPDATED, CprMode.CPR_EXEC, 10, 10, "10.0.2", NEW_VERSION, 41.6, T0,
        "updated in place")


@pytest.mark.parametrize(("outcome", "phase", "prefix"), [
    (pb.OUTCOME_FAILED, VMPhase.FAILED, "boom"),
    (pb.OUTCOME_ROLLED_BACK, VMPhase.ROLLED_BACK, "boom"),
    (pb.OUTCOME_LOST, VMPhase.FAILED, "VM LOST"),
    (pb.OUTCOME_UNSPECIFIED, VMPhase.FAILED, "boom"),
])
def test_failed_results(outcome: int, phase: VMPhase, prefix: str) -> None:
    r = translate.with_result(row("a", "x", VMPhase.UPDATING),
                              result(outcome=outcome, message="boom"), T0, STRATEGY)
    assert r.phase == phase and r.message is not None and r.message.startswith(prefix)


def test_result_without_optional_fields() -> None:
    bare = pb.UpdateResult(vm="x", outcome=pb.OUTCOME_FAILED, pid_before=10,
                           version_before="10.0.2", message="refused")
    r = translate.with_result(row("a", "x", VMPhase.PREFLIGHT, pid_before=10), bare, T0,
                              STRATEGY)
    assert (r.pid_after, r.to_version, r.pause_ms, r.mode) == (None, None, None, None)


@pytest.mark.parametrize(("pause", "over"), [
    (1000.4, True), (1000.001, True), (1000.0, False), (1000.0004, False), (999.9, False),
])
def test_the_row_message_and_the_halt_judge_the_pause_alike(pause: float, over: bool) -> None:
    """One judgement (RolloutStrategy.over_pause_budget) of one stored value, in float ms."""
    strategy = RolloutStrategy.model_validate({"pauseBudgetMs": 1000})
    # The agent's own flag is not what decides (it may judge differently or not at all).
    r = translate.with_result(row("a", "x", VMPhase.UPDATING, operation_id=op("x")),
                              result(pause_ms=pause, pause_budget_exceeded=not over),
                              T0, strategy)
    assert r.pause_ms is not None and abs(r.pause_ms - pause) < 0.001
    assert ("over strategy.pauseBudgetMs 1000" in (r.message or "")) is over
    plan = make_plan(spec(strategy={"pauseBudgetMs": 1000}),
                     [host("a", on_target("x"), vm("y"))], [r])
    halted = plan.halt is not None and plan.halt.reason == Reason.PAUSE_BUDGET_EXCEEDED
    assert halted is over


def test_long_messages_are_clipped() -> None:
    r = translate.with_result(row("a", "x"), result(message="x" * 5000), T0, STRATEGY)
    assert r.message is not None and len(r.message) == translate.MAX_ROW_MESSAGE


def report(passed: bool, *checks: tuple[str, bool, str], mode: int = pb.MODE_CPR_EXEC,
           reason: str = "cpr-exec: QEMU 11.1 on both sides") -> pb.PreflightReport:
    return pb.PreflightReport(
        vm="x", passed=passed, mode=mode, mode_reason=reason,  # type: ignore[arg-type]
        checks=[pb.CheckResult(name=n, passed=p, message=m) for n, p, m in checks])


def test_dry_run_pass() -> None:
    r = translate.with_preflight(row("a", "x", VMPhase.PREFLIGHT),
                                 report(True, ("target-exists", True, "ok")), T0)
    assert r.phase == VMPhase.DRY_RUN_PASSED and r.mode == CprMode.CPR_EXEC
    assert r.message == "preflight passed; would use CprExec (cpr-exec: QEMU 11.1 on both sides)"


def test_dry_run_failure_names_every_failed_check() -> None:
    rep = report(False, ("target-exists", True, "ok"), ("target-sha256", False, "mismatch"),
                 ("memory-shared", False, "ram0 has share=off"))
    r = translate.with_preflight(row("a", "x", VMPhase.PREFLIGHT), rep, T0)
    assert r.phase == VMPhase.DRY_RUN_FAILED
    assert r.message == "target-sha256: mismatch; memory-shared: ram0 has share=off"


def test_dry_run_failure_without_a_mode() -> None:
    rep = report(False, mode=pb.MODE_UNSPECIFIED, reason="no CPR mode fits")
    r = translate.with_preflight(row("a", "x", VMPhase.PREFLIGHT), rep, T0)
    assert r.message == "mode: no CPR mode fits" and r.mode is None


@pytest.mark.parametrize(("code", "expected"), [
    (grpc.StatusCode.UNAVAILABLE, OnError.RETRY),
    (grpc.StatusCode.DEADLINE_EXCEEDED, OnError.RETRY),
    (grpc.StatusCode.FAILED_PRECONDITION, OnError.RETRY),
    (grpc.StatusCode.ABORTED, OnError.RETRY),
    (grpc.StatusCode.INTERNAL, OnError.RETRY),
    (grpc.StatusCode.NOT_FOUND, OnError.SKIP),
    (grpc.StatusCode.PERMISSION_DENIED, OnError.FAIL),
    (grpc.StatusCode.INVALID_ARGUMENT, OnError.FAIL),
    (grpc.StatusCode.ALREADY_EXISTS, OnError.FAIL),
    (grpc.StatusCode.UNAUTHENTICATED, OnError.FAIL),
])
def test_refusals(code: grpc.StatusCode, expected: OnError) -> None:
    assert translate.on_error(code) == expected


def test_with_error() -> None:
    r = row("a", "x", VMPhase.PREFLIGHT, operation_id="op")
    retry = translate.with_error(r, OnError.RETRY, "down", T0, dry_run=False)
    assert retry.phase == VMPhase.PREFLIGHT and retry.message == "retrying: down"
    assert translate.with_error(r, OnError.SKIP, "gone", T0, dry_run=False).phase == VMPhase.SKIPPED
    assert translate.with_error(r, OnError.FAIL, "no", T0, dry_run=False).phase == VMPhase.FAILED
    assert translate.with_error(r, OnError.FAIL, "no", T0,
                                dry_run=True).phase == VMPhase.DRY_RUN_FAILED
