"""The status builder: phases, counts, conditions (kstatus style)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.operator.builders import T0, host, make_plan, on_target, row, spec, vm
from vmupdate_api.crd.conditions import Reason, find_condition
from vmupdate_api.crd.vmupdate import UpdatePhase, VMPhase, VMUpdateStatus
from vmupdate_api.crd.vmupdate_spec import VMUpdateSpec
from vmupdate_operator import planning
from vmupdate_operator.status import (
    DRY_RUN_COMPLETE,
    RUNNING_PREFLIGHT,
    SELECTION_TOO_LARGE,
    build_status,
    decide_phase,
    with_start_time,
)

NOW = T0 + timedelta(seconds=1)


def build(the_spec: VMUpdateSpec, plan: planning.Plan, previous: VMUpdateStatus | None = None,
          generation: int = 1, now: object = NOW) -> VMUpdateStatus:
    return build_status(previous=previous, spec=the_spec, generation=generation, plan=plan,
                        now=now)  # type: ignore[arg-type]


def conditions(status: VMUpdateStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status.value, c.reason) for c in status.conditions}


def message(status: VMUpdateStatus, type_: str) -> str:
    c = find_condition(status.conditions, type_)
    assert c is not None
    return c.message


def test_progressing_while_vms_update() -> None:
    s = spec(strategy={"maxParallel": 1, "maxParallelPerHost": 1})
    status = build(s, make_plan(s, [host("a", vm("x"), vm("y"))]))
    assert status.phase == UpdatePhase.PROGRESSING
    assert conditions(status) == {"Ready": ("False", Reason.ROLLOUT_IN_PROGRESS),
                                  "Progressing": ("True", Reason.UPDATING_VMS),
                                  "Degraded": ("False", Reason.NO_FAILURES)}
    assert message(status, "Progressing") == "updating x on a; 1 VM(s) waiting"
    assert message(status, "Ready").startswith("0 of 2 selected VM(s) run QEMU 11.1.3 at ")
    assert (status.targets, status.in_progress, status.pending) == (2, 1, 1)


def test_succeeded_when_every_vm_runs_the_target() -> None:
    s = spec()
    rows = [row("a", "x", VMPhase.UPDATED, operation_id="vmu-x-g1-y-a0", pause_ms=30),
            row("a", "y", VMPhase.UPDATED, operation_id="vmu-x-g1-z-a0", pause_ms=50)]
    status = build(s, make_plan(s, [host("a", on_target("x"), on_target("y"))], rows))
    assert status.phase == UpdatePhase.SUCCEEDED
    assert conditions(status) == {"Ready": ("True", Reason.ALL_VMS_UPDATED),
                                  "Progressing": ("False", Reason.ROLLOUT_COMPLETE),
                                  "Degraded": ("False", Reason.NO_FAILURES)}
    assert (status.updated, status.pause_p50_ms, status.pause_max_ms) == (2, 30, 50)


def test_no_matching_vm_is_ready_and_says_so() -> None:
    s = spec(selector={"vmNames": ["nothing"]})
    status = build(s, make_plan(s, [host("a", vm("x"))]))
    assert status.phase == UpdatePhase.SUCCEEDED and status.targets == 0
    assert conditions(status)["Ready"] == ("True", Reason.NO_MATCHING_VMS)
    assert "kubectl get vmhosts" in message(status, "Ready")


def test_paused_with_work_left() -> None:
    s = spec(paused=True)
    status = build(s, make_plan(s, [host("a", vm("x"))]))
    assert status.phase == UpdatePhase.PAUSED
    assert conditions(status)["Progressing"] == ("False", Reason.ROLLOUT_PAUSED)
    assert "set spec.paused to false" in message(status, "Progressing")


def test_paused_with_nothing_left_is_succeeded() -> None:
    s = spec(paused=True)
    status = build(s, make_plan(s, [host("a", on_target("x"))]))
    assert status.phase == UpdatePhase.SUCCEEDED


def test_halted_is_failed_even_with_updates_still_running() -> None:
    s = spec(paused=True)
    rows = [row("a", "x", VMPhase.FAILED, operation_id="op-x", message="boom"),
            row("a", "y", VMPhase.UPDATING, operation_id="op-y")]
    plan = make_plan(s, [host("a", vm("x"), vm("y"), vm("z"))], rows)
    status = build(s, plan)
    assert status.phase == UpdatePhase.FAILED
    assert conditions(status) == {"Ready": ("False", Reason.ROLLOUT_HALTED),
                                  "Progressing": ("False", Reason.ROLLOUT_HALTED),
                                  "Degraded": ("True", Reason.FAILURE_LIMIT_EXCEEDED)}
    assert message(status, "Progressing").endswith("1 update(s) still finishing")
    assert "x on a" in message(status, "Degraded")


def test_degraded_when_done_with_failures_under_continue() -> None:
    s = spec(strategy={"failurePolicy": "Continue"})
    rows = [row("a", "x", VMPhase.ROLLED_BACK, operation_id="op-x", message="guard rolled back"),
            row("a", "y", VMPhase.UPDATED, operation_id="op-y")]
    status = build(s, make_plan(s, [host("a", vm("x"), on_target("y"))], rows))
    assert status.phase == UpdatePhase.DEGRADED
    assert conditions(status) == {"Ready": ("False", Reason.VM_UPDATE_FAILED),
                                  "Progressing": ("False", Reason.ROLLOUT_COMPLETE),
                                  "Degraded": ("True", Reason.VM_UPDATE_FAILED)}
    assert "x on a (guard rolled back)" in message(status, "Degraded")


def test_failures_under_continue_show_while_progressing() -> None:
    s = spec(strategy={"failurePolicy": "Continue"})
    rows = [row("a", "x", VMPhase.FAILED, operation_id="op-x")]
    status = build(s, make_plan(s, [host("a", vm("x"), vm("y"))], rows))
    assert status.phase == UpdatePhase.PROGRESSING
    assert conditions(status)["Degraded"] == ("True", Reason.VM_UPDATE_FAILED)


@pytest.mark.parametrize(("reason", "rows"), [
    (Reason.CANARY_FAILED, [row("a", "x", VMPhase.FAILED, operation_id="op")]),
    (Reason.PAUSE_BUDGET_EXCEEDED, [row(
        "a", "x", VMPhase.UPDATED, pause_ms=5000,
        operation_id="vmu-5f0c6a3e-1b2d-4c5e-8f90-a1b2c3d4e5f6-g1-x-a0")]),
])
def test_halt_reasons_become_degraded_reasons(reason: Reason, rows: list[object]) -> None:
    s = spec(strategy={"canary": 1, "pauseBudgetMs": 1000})
    inventory = host("a", on_target("x") if reason == Reason.PAUSE_BUDGET_EXCEEDED else vm("x"),
                     vm("y"))
    status = build(s, make_plan(s, [inventory], rows))  # type: ignore[arg-type]
    assert status.phase == UpdatePhase.FAILED
    assert conditions(status)["Degraded"] == ("True", reason)


def test_waiting_reasons_when_nothing_runs() -> None:
    s = spec()
    stale = host("a", vm("x"), heartbeat=T0 - timedelta(minutes=5))
    status = build(s, make_plan(s, [stale]))
    assert status.phase == UpdatePhase.PROGRESSING
    assert message(status, "Progressing").startswith("1 VM(s) waiting: host a unavailable")


def test_dry_run_phases() -> None:
    s = spec(dryRun=True)
    running = build(s, make_plan(s, [host("a", vm("x"))]))
    assert running.phase == UpdatePhase.PROGRESSING
    assert conditions(running)["Progressing"] == ("True", RUNNING_PREFLIGHT)
    assert message(running, "Progressing") == "checking x on a"

    passed = [row("a", "x", VMPhase.DRY_RUN_PASSED), row("a", "y", VMPhase.UPDATED)]
    status = build(s, make_plan(s, [host("a", vm("x"), on_target("y"))], passed))
    assert status.phase == UpdatePhase.DRY_RUN_COMPLETE
    assert conditions(status) == {"Ready": ("True", Reason.DRY_RUN_PASSED),
                                  "Progressing": ("False", DRY_RUN_COMPLETE),
                                  "Degraded": ("False", Reason.NO_FAILURES)}
    assert status.start_time is None

    failed = [row("a", "x", VMPhase.DRY_RUN_FAILED, message="target-sha256: mismatch")]
    status = build(s, make_plan(s, [host("a", vm("x"))], failed))
    assert status.phase == UpdatePhase.DRY_RUN_COMPLETE
    assert conditions(status)["Ready"] == ("False", Reason.DRY_RUN_FAILED)
    assert conditions(status)["Degraded"] == ("True", Reason.DRY_RUN_FAILED)
    assert "x on a (target-sha256: mismatch)" in message(status, "Ready")


def test_dry_run_paused() -> None:
    s = spec(dryRun=True, paused=True)
    assert build(s, make_plan(s, [host("a", vm("x"))])).phase == UpdatePhase.PAUSED


def test_conditions_carry_the_generation() -> None:
    s = spec()
    status = build(s, make_plan(s, [host("a", vm("x"))], generation=7, observed=7),
                   generation=7)
    assert status.observed_generation == 7
    assert {c.observed_generation for c in status.conditions} == {7}


def test_transition_time_moves_only_when_the_status_flips() -> None:
    s = spec(strategy={"maxParallel": 1, "maxParallelPerHost": 1})
    hosts = [host("a", vm("x"), vm("y"))]
    plan1 = make_plan(s, hosts)
    first = build(s, plan1, now=T0)
    later = T0 + timedelta(minutes=3)
    plan2 = make_plan(s, hosts, list(plan1.rows), now=later)
    second = build(s, plan2, previous=first, now=later)
    for type_ in ("Ready", "Progressing", "Degraded"):
        a, b = (find_condition(x.conditions, type_) for x in (first, second))
        assert a is not None and b is not None and a.last_transition_time == b.last_transition_time
    done = [r.model_copy(update={"phase": VMPhase.UPDATED, "operation_id": "op"})
            for r in plan2.rows]
    third = build(s, make_plan(s, [host("a", on_target("x"), on_target("y"))], done,
                               now=later), previous=second, now=later)
    ready = find_condition(third.conditions, "Ready")
    degraded = find_condition(third.conditions, "Degraded")
    assert ready is not None and ready.last_transition_time == later
    assert degraded is not None and degraded.last_transition_time == T0


def test_start_time_is_kept_and_set_once() -> None:
    s = spec()
    status = build(s, make_plan(s, [host("a", vm("x"))]))
    assert status.start_time is None
    started = with_start_time(status, NOW)
    assert started.start_time is not None
    assert with_start_time(started, NOW + timedelta(hours=1)).start_time == started.start_time
    again = build(s, make_plan(s, [host("a", vm("x"))]), previous=started)
    assert again.start_time == started.start_time


def test_too_many_vms_is_degraded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning, "MAX_VM_ROWS", 1)
    s = spec(paused=True)
    status = build(s, make_plan(s, [host("a", vm("x"), vm("y"))]))
    assert conditions(status)["Degraded"] == ("True", SELECTION_TOO_LARGE)


def test_status_validates_and_round_trips() -> None:
    s = spec()
    status = build(s, make_plan(s, [host("a", vm("x"))]))
    assert VMUpdateStatus.model_validate(status.to_wire()).to_wire() == status.to_wire()


def test_decide_phase_needs_rows_only() -> None:
    s = spec()
    plan = make_plan(s, [])
    assert decide_phase(s, [], plan) == UpdatePhase.SUCCEEDED
