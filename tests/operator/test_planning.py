"""The rollout planner, rule by rule (see vmupdate_operator.planning).

Over 450 lines: one rule per group of tests, of the one planner.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.operator.builders import (
    NEW,
    NEW_VERSION,
    OLD,
    T0,
    UID,
    by_name,
    host,
    make_plan,
    on_target,
    phases,
    row,
    spec,
    started,
    uuid_for,
    vm,
)
from vmupdate_api.crd.conditions import Reason
from vmupdate_api.crd.vmupdate import VMPhase
from vmupdate_operator import planning
from vmupdate_operator.operation_ids import operation_id, parse_operation_id, vm_identity

P, PF, U, UP, F, RB, S = (VMPhase.PENDING, VMPhase.PREFLIGHT, VMPhase.UPDATING,
                          VMPhase.UPDATED, VMPhase.FAILED, VMPhase.ROLLED_BACK, VMPhase.SKIPPED)


def op(name: str, generation: int = 1, attempt: int = 0, host_name: str = "a") -> str:
    return operation_id(UID, generation, vm_identity(host_name, name, uuid_for(name)), attempt)


def updated(host_name: str, name: str, **fields: object) -> object:
    fields.setdefault("operation_id", op(name, host_name=host_name))
    fields.setdefault("finished_at", T0 - timedelta(seconds=30))
    return row(host_name, name, UP, **fields)


# --- selection ------------------------------------------------------------------------------


def test_every_vm_of_every_host_with_an_empty_host_selector() -> None:
    plan = make_plan(spec(), [host("a", vm("x"), vm("y")), host("b", vm("z"))])
    assert [(r.host, r.name) for r in plan.rows] == [("a", "x"), ("a", "y"), ("b", "z")]


@pytest.mark.parametrize(("selector", "expected"), [
    ({"hostNames": ["b"]}, ["z"]),
    ({"hostSelector": {"matchLabels": {"zone": "1"}}}, ["x", "y"]),
    ({"hostSelector": {"matchExpressions": [
        {"key": "zone", "operator": "In", "values": ["2", "3"]}]}}, ["z"]),
    ({"hostSelector": {"matchExpressions": [
        {"key": "zone", "operator": "NotIn", "values": ["1"]}]}}, ["z"]),
    ({"hostSelector": {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}}, ["z"]),
    ({"hostSelector": {"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}},
     ["x", "y"]),
    ({"vmNames": ["x*"]}, ["x"]),
    ({"vmNames": ["[xz]"]}, ["x", "z"]),
    ({"vmNames": ["[!x]"]}, ["y", "z"]),
    ({"vmNames": ["?"]}, ["x", "y", "z"]),
    ({"vmNames": ["X"]}, []),  # case-sensitive
    ({"qemuVersions": ["10.0"]}, ["x", "z"]),
    ({"qemuVersions": ["10.0.2"]}, ["x"]),
    ({"qemuVersions": ["10"]}, ["x", "y", "z"]),
    ({"qemuVersions": ["10.0.1"]}, []),
    ({"hostNames": ["a"], "vmNames": ["y", "z"]}, ["y"]),  # fields AND, entries OR
])
def test_selector_fields(selector: dict[str, object], expected: list[str]) -> None:
    hosts = [host("a", vm("x"), vm("y", version="10.1.0"), labels={"zone": "1"}),
             host("b", vm("z", version="10.0.5"), labels={"zone": "2", "gpu": ""})]
    plan = make_plan(spec(selector=selector), hosts)
    assert sorted(r.name for r in plan.rows) == expected


def test_version_prefix_is_dotted() -> None:
    plan = make_plan(spec(selector={"qemuVersions": ["10.0"]}),
                     [host("a", vm("x", version="10.01.1"), vm("y", version="10.0.9"))])
    assert [r.name for r in plan.rows] == ["y"]


def test_a_vm_on_the_target_is_selected_whatever_its_version_says() -> None:
    plan = make_plan(spec(selector={"qemuVersions": ["10.0"]}), [host("a", on_target("x"))])
    assert phases(plan) == {"x": UP}
    assert by_name(plan)["x"].message == planning.ALREADY_ON_TARGET


def test_vm_this_rollout_updated_stays_selected_whatever_its_version() -> None:
    # Updated from 10.0.2, then found on another binary whose version no longer matches
    # qemuVersions: still this rollout's VM, so it is brought back to the target.
    rows = [updated("a", "x", to_version=NEW_VERSION)]
    plan = make_plan(spec(selector={"qemuVersions": ["10.0"]}),
                     [host("a", vm("x", version="11.0.0", binary="/other"))], rows)
    assert started(plan) == ["x"]


def test_pending_vm_that_leaves_the_selection_is_skipped() -> None:
    rows = [row("a", "x"), row("a", "y")]
    plan = make_plan(spec(selector={"vmNames": ["y"]}), [host("a", vm("x"), vm("y"))], rows)
    assert phases(plan)["x"] == S
    assert by_name(plan)["x"].message == "no longer matches spec.selector"
    assert started(plan) == ["y"]


def test_selection_does_not_touch_rows_in_flight() -> None:
    rows = [row("a", "x", U, operation_id=op("x"))]
    plan = make_plan(spec(selector={"vmNames": ["other"]}), [host("a", vm("x"))], rows)
    assert by_name(plan)["x"] == rows[0]


# --- observation ----------------------------------------------------------------------------


def test_new_rows_take_the_vm_facts() -> None:
    plan = make_plan(spec(paused=True), [host("a", vm("x", pid=77))])
    [r] = plan.rows
    assert (r.host, r.name, r.uuid, r.from_version, r.phase) == ("a", "x", uuid_for("x"),
                                                                  "10.0.2", P)


def test_pending_vm_found_on_target_is_updated_without_an_operation() -> None:
    plan = make_plan(spec(), [host("a", on_target("x", pid=9))], [row("a", "x")])
    r = by_name(plan)["x"]
    assert (r.phase, r.operation_id, r.pid_before, r.pid_after, r.to_version) == (
        UP, None, None, 9, NEW_VERSION)
    assert plan.started == ()


def test_binary_and_version_must_both_match_the_target() -> None:
    hosts = [host("a", vm("x", binary=NEW), vm("y", version=NEW_VERSION))]
    plan = make_plan(spec(), hosts)
    assert started(plan) == ["x", "y"]


def test_updated_vm_found_on_an_old_binary_again_is_updated_again() -> None:
    rows = [updated("a", "x", finished_at=T0 - timedelta(seconds=5), pid_before=1, pid_after=1,
                    pause_ms=40)]
    plan = make_plan(spec(), [host("a", vm("x"), heartbeat=T0)], rows)
    r = by_name(plan)["x"]
    assert r.phase == PF and started(plan) == ["x"]
    assert r.operation_id == op("x", attempt=1)
    assert r.pause_ms is None and r.pid_after is None


def test_a_target_that_never_sticks_is_not_updated_again_and_again() -> None:
    """E.g. target.binary a wrapper that execs another binary: after each update the VM runs
    a binary that is not target.binary. Two more tries, then Failed, saying why."""
    second = [updated("a", "x", finished_at=T0 - timedelta(seconds=5),
                      operation_id=op("x", attempt=1))]
    plan = make_plan(spec(), [host("a", vm("x"), heartbeat=T0)], second)
    assert by_name(plan)["x"].operation_id == op("x", attempt=2)
    third = [updated("a", "x", finished_at=T0 - timedelta(seconds=5),
                     operation_id=op("x", attempt=2))]
    plan = make_plan(spec(), [host("a", vm("x"), heartbeat=T0)], third)
    r = by_name(plan)["x"]
    assert r.phase == F and plan.started == ()
    assert r.message is not None and "after each of 3 updates" in r.message
    assert "must be the path the updated QEMU runs as" in r.message
    assert plan.halt is not None  # a failure: with failurePolicy Halt, the rollout stops


def test_an_inventory_from_before_the_update_finished_is_not_a_fallback() -> None:
    rows = [updated("a", "x", finished_at=T0)]  # heartbeat == finished: listed before
    plan = make_plan(spec(), [host("a", vm("x"), heartbeat=T0)], rows)
    assert phases(plan) == {"x": UP}


def test_fallback_on_an_unavailable_host_is_not_concluded() -> None:
    rows = [updated("a", "x", finished_at=T0 - timedelta(seconds=200))]
    plan = make_plan(spec(), [host("a", vm("x"), heartbeat=T0 - timedelta(seconds=100))], rows)
    assert phases(plan) == {"x": UP}


def test_pending_vm_gone_from_a_fresh_inventory_is_skipped() -> None:
    rows = [row("a", "x"), row("a", "y", F, operation_id=op("y")), row("a", "z", U,
                                                                     operation_id=op("z"))]
    plan = make_plan(spec(), [host("a")], rows)
    assert phases(plan) == {"x": S, "y": F, "z": U}
    assert by_name(plan)["x"].message == "VM no longer found on host a"


def test_pending_vm_of_a_deleted_vmhost_is_skipped() -> None:
    plan = make_plan(spec(), [], [row("gone", "x")])
    assert phases(plan) == {"x": S}
    assert "no VMHost" in (by_name(plan)["x"].message or "")


def test_nothing_is_concluded_from_a_stale_host() -> None:
    stale = host("a", heartbeat=T0 - timedelta(seconds=61))  # lists no VMs any more
    plan = make_plan(spec(), [stale], [row("a", "x")])
    assert phases(plan) == {"x": P} and plan.started == ()
    assert "no agent heartbeat since 2025-06-01T11:58:59Z" in (by_name(plan)["x"].message or "")
    assert plan.waiting == (by_name(plan)["x"].message,)


def test_skipped_vm_that_comes_back_is_pending_again() -> None:
    rows = [row("a", "x", S, message="VM no longer found on host a",
                finished_at=T0 - timedelta(seconds=1))]
    plan = make_plan(spec(paused=True), [host("a", vm("x"))], rows)
    assert phases(plan) == {"x": P}


def test_skipped_vm_listed_by_an_older_inventory_stays_skipped() -> None:
    rows = [row("a", "x", S, message="agent: NOT_FOUND", finished_at=T0)]
    plan = make_plan(spec(), [host("a", vm("x"), heartbeat=T0)], rows)
    assert phases(plan) == {"x": S} and plan.started == ()


def test_another_vm_under_the_same_name_is_a_new_row() -> None:
    rows = [row("a", "x", F, uuid=uuid_for("old"), operation_id=op("old"), message="boom")]
    plan = make_plan(spec(strategy={"failurePolicy": "Continue"}),
                     [host("a", vm("x"))], rows)
    r = by_name(plan)["x"]
    assert r.uuid == uuid_for("x") and r.phase == PF


# --- starting: limits -----------------------------------------------------------------------


def test_max_parallel_across_the_cluster() -> None:
    hosts = [host("a", vm("a1"), vm("a2")), host("b", vm("b1"), vm("b2"))]
    plan = make_plan(spec(strategy={"maxParallel": 3, "maxParallelPerHost": 2}), hosts)
    assert started(plan) == ["a1", "a2", "b1"]
    assert by_name(plan)["b2"].message == "waiting: 3 VM(s) in flight (strategy.maxParallel)"


def test_max_parallel_per_host() -> None:
    hosts = [host("a", vm("a1"), vm("a2")), host("b", vm("b1"))]
    plan = make_plan(spec(strategy={"maxParallel": 3, "maxParallelPerHost": 1}), hosts)
    assert started(plan) == ["a1", "b1"]
    assert "maxParallelPerHost" in (by_name(plan)["a2"].message or "")


def test_rows_in_flight_count_against_the_limits() -> None:
    hosts = [host("a", vm("a1"), vm("a2")), host("b", vm("b1"), vm("b2"))]
    rows = [row("a", "a1", U, operation_id=op("a1"))]
    plan = make_plan(spec(strategy={"maxParallel": 2, "maxParallelPerHost": 1}), hosts, rows)
    assert started(plan) == ["b1"]


def test_started_rows_carry_everything_needed_to_resume() -> None:
    plan = make_plan(spec(), [host("a", vm("x", pid=321))])
    [r] = plan.started
    assert r == by_name(plan)["x"]
    assert r.phase == PF and r.pid_before == 321 and r.from_version == "10.0.2"
    assert r.started_at == T0 + timedelta(seconds=1) and r.finished_at is None
    assert r.operation_id == op("x")
    ref = parse_operation_id(r.operation_id)
    assert ref is not None and (ref.uid, ref.generation, ref.attempt) == (UID, 1, 0)


def test_operation_ids_are_deterministic_per_uid_generation_and_vm() -> None:
    hosts = [host("a", vm("x"))]
    first = make_plan(spec(), hosts).started[0].operation_id
    assert make_plan(spec(), hosts).started[0].operation_id == first
    assert make_plan(spec(), hosts, generation=2, observed=2).started[0].operation_id != first
    other = "0a0c6a3e-1b2d-4c5e-8f90-a1b2c3d4e5f6"
    assert make_plan(spec(), hosts, uid=other).started[0].operation_id != first


def test_vm_without_a_uuid_gets_a_stable_id_from_host_and_name() -> None:
    nil = "00000000-0000-0000-0000-000000000000"
    plan_a = make_plan(spec(), [host("a", vm("x", uuid=nil)), host("b", vm("x", uuid=nil))])
    ids = [r.operation_id for r in plan_a.started]
    assert len(set(ids)) == 2
    assert ids == [r.operation_id for r in make_plan(
        spec(), [host("a", vm("x", uuid=nil)), host("b", vm("x", uuid=nil))]).started]


def test_start_order_is_host_then_name() -> None:
    hosts = [host("b", vm("a")), host("a", vm("z"), vm("c"))]
    plan = make_plan(spec(strategy={"maxParallel": 1, "maxParallelPerHost": 1}), hosts)
    assert started(plan) == ["c"]


# --- canary ---------------------------------------------------------------------------------


def test_canary_goes_alone() -> None:
    hosts = [host("a", vm("x"), vm("y")), host("b", vm("z"))]
    plan = make_plan(spec(strategy={"canary": 1}), hosts)
    assert started(plan) == ["x"] and plan.canary_active
    assert by_name(plan)["x"].message == "canary: update requested from the agent"
    assert by_name(plan)["y"].message == "waiting for the canary to finish"


def test_nothing_else_starts_while_the_canary_runs() -> None:
    rows = [row("a", "x", U, operation_id=op("x"))]
    plan = make_plan(spec(strategy={"canary": 1}), [host("a", vm("x"), vm("y"))], rows)
    assert plan.started == ()


def test_after_the_canary_the_rest_goes_in_parallel() -> None:
    rows = [updated("a", "x")]
    hosts = [host("a", on_target("x"), vm("y")), host("b", vm("z"))]
    plan = make_plan(spec(strategy={"canary": 1, "maxParallelPerHost": 1}), hosts, rows)
    assert started(plan) == ["y", "z"] and not plan.canary_active


def test_two_canaries_go_one_after_the_other() -> None:
    rows = [updated("a", "x")]
    hosts = [host("a", on_target("x"), vm("y"), vm("z"))]
    plan = make_plan(spec(strategy={"canary": 2}), hosts, rows)
    assert started(plan) == ["y"] and plan.canary_active


def test_vms_already_on_target_are_not_canaries() -> None:
    hosts = [host("a", on_target("done"), vm("x"), vm("y"))]
    plan = make_plan(spec(strategy={"canary": 1}), hosts)
    assert started(plan) == ["x"] and plan.canary_active


@pytest.mark.parametrize("policy", ["Halt", "Continue"])
def test_a_failed_canary_always_halts(policy: str) -> None:
    strategy: dict[str, object] = {"canary": 1, "failurePolicy": policy}
    if policy == "Halt":
        strategy["maxFailures"] = 5
    rows = [row("a", "x", RB, operation_id=op("x"), message="new QEMU crashed")]
    plan = make_plan(spec(strategy=strategy), [host("a", vm("x"), vm("y"))], rows)
    assert plan.halt is not None and plan.halt.reason == Reason.CANARY_FAILED
    assert "canary VM x on a failed: new QEMU crashed" in plan.halt.message
    assert plan.started == () and by_name(plan)["y"].message == planning.HALTED


# --- failure policy -------------------------------------------------------------------------


def test_halt_at_the_first_failure_by_default() -> None:
    rows = [row("a", "x", F, operation_id=op("x"), message="preflight failed")]
    plan = make_plan(spec(), [host("a", vm("x"), vm("y"))], rows)
    assert plan.halt is not None and plan.halt.reason == Reason.FAILURE_LIMIT_EXCEEDED
    assert plan.started == ()


def test_halt_tolerates_max_failures() -> None:
    hosts = [host("a", vm("x"), vm("y"), vm("z"))]
    strategy = {"failurePolicy": "Halt", "maxFailures": 1}
    one = [row("a", "x", F, operation_id=op("x"))]
    assert make_plan(spec(strategy=strategy), hosts, one).halt is None
    two = [*one, row("a", "y", RB, operation_id=op("y"))]
    halt = make_plan(spec(strategy=strategy), hosts, two).halt
    assert halt is not None and "2 VM(s) failed (x on a, y on a)" in halt.message


def test_continue_goes_on_after_failures() -> None:
    rows = [row("a", "x", F, operation_id=op("x")), row("a", "y", F, operation_id=op("y"))]
    plan = make_plan(spec(strategy={"failurePolicy": "Continue"}),
                     [host("a", vm("x"), vm("y"), vm("z"))], rows)
    assert plan.halt is None and started(plan) == ["z"]


def test_running_updates_are_left_alone_when_halted() -> None:
    rows = [row("a", "x", F, operation_id=op("x")), row("a", "y", U, operation_id=op("y"))]
    plan = make_plan(spec(), [host("a", vm("x"), vm("y"))], rows)
    assert plan.halt is not None and by_name(plan)["y"] == rows[1]


# --- pause budget ---------------------------------------------------------------------------


def test_a_pause_over_budget_halts() -> None:
    rows = [updated("a", "x", pause_ms=2500)]
    plan = make_plan(spec(strategy={"pauseBudgetMs": 2000}),
                     [host("a", on_target("x"), vm("y"))], rows)
    assert plan.halt is not None and plan.halt.reason == Reason.PAUSE_BUDGET_EXCEEDED
    assert "x on a was paused 2500 ms, over pauseBudgetMs 2000" in plan.halt.message
    assert phases(plan)["x"] == UP and plan.started == ()


def test_a_pause_at_the_budget_is_fine() -> None:
    rows = [updated("a", "x", pause_ms=2000)]
    plan = make_plan(spec(strategy={"pauseBudgetMs": 2000}),
                     [host("a", on_target("x"), vm("y"))], rows)
    assert plan.halt is None and started(plan) == ["y"]


def test_a_pause_of_an_earlier_generation_does_not_halt() -> None:
    rows = [updated("a", "x", pause_ms=2500, operation_id=op("x", generation=1))]
    plan = make_plan(spec(strategy={"pauseBudgetMs": 2000}),
                     [host("a", on_target("x"), vm("y"))], rows, generation=2, observed=1)
    assert plan.halt is None and started(plan) == ["y"]


# --- paused, hold ---------------------------------------------------------------------------


def test_paused_starts_nothing_and_says_why() -> None:
    rows = [row("a", "y", U, operation_id=op("y"))]
    plan = make_plan(spec(paused=True), [host("a", vm("x"), vm("y"))], rows)
    assert plan.started == () and phases(plan) == {"x": P, "y": U}
    assert by_name(plan)["x"].message == planning.PAUSED and plan.waiting == (planning.PAUSED,)


def test_hold_starts_nothing() -> None:
    plan = make_plan(spec(), [host("a", vm("x"))], hold="being deleted")
    assert plan.started == () and by_name(plan)["x"].message == "being deleted"


def test_halt_message_wins_over_paused() -> None:
    rows = [row("a", "x", F, operation_id=op("x"))]
    plan = make_plan(spec(paused=True), [host("a", vm("x"), vm("y"))], rows)
    assert by_name(plan)["y"].message == planning.HALTED


# --- generations ----------------------------------------------------------------------------


def test_a_new_generation_retries_failed_vms_under_new_ids() -> None:
    rows = [row("a", "x", F, operation_id=op("x")), row("a", "y", RB, operation_id=op("y")),
            updated("a", "z")]
    hosts = [host("a", vm("x"), vm("y"), on_target("z"))]
    plan = make_plan(spec(), hosts, rows, generation=2, observed=1)
    assert plan.halt is None and started(plan) == ["x", "y"]
    assert {r.operation_id for r in plan.started} == {op("x", 2), op("y", 2)}
    assert phases(plan)["z"] == UP


def test_the_same_generation_never_retries_a_failure() -> None:
    rows = [row("a", "x", F, operation_id=op("x"))]
    plan = make_plan(spec(strategy={"failurePolicy": "Continue"}), [host("a", vm("x"))], rows)
    assert phases(plan) == {"x": F} and plan.started == ()


def test_rows_in_flight_keep_their_old_generation_ids() -> None:
    rows = [row("a", "x", U, operation_id=op("x", 1))]
    plan = make_plan(spec(), [host("a", vm("x"))], rows, generation=2, observed=1)
    assert by_name(plan)["x"] == rows[0]


# --- dry run --------------------------------------------------------------------------------


def test_dry_run_starts_preflights_without_operation_ids() -> None:
    hosts = [host("a", vm("x"), vm("y")), host("b", vm("z"), on_target("t"))]
    plan = make_plan(spec(dryRun=True, strategy={"canary": 1, "maxParallelPerHost": 1}), hosts)
    assert started(plan) == ["x", "z"]  # no canary, per-host limit
    assert all(r.operation_id is None and r.phase == PF for r in plan.started)
    assert phases(plan)["t"] == UP


def test_dry_run_results_are_final_for_the_generation() -> None:
    rows = [row("a", "x", VMPhase.DRY_RUN_FAILED, message="share=off")]
    plan = make_plan(spec(dryRun=True), [host("a", vm("x"))], rows)
    assert phases(plan) == {"x": VMPhase.DRY_RUN_FAILED} and plan.halt is None


def test_leaving_dry_run_plans_a_real_rollout() -> None:
    rows = [row("a", "x", VMPhase.DRY_RUN_PASSED), row("a", "y", VMPhase.DRY_RUN_FAILED)]
    plan = make_plan(spec(), [host("a", vm("x"), vm("y"))], rows, generation=2, observed=1)
    assert started(plan) == ["x", "y"] and all(r.operation_id for r in plan.started)


def test_dry_run_failures_do_not_halt() -> None:
    rows = [row("a", "x", VMPhase.DRY_RUN_FAILED)]
    plan = make_plan(spec(dryRun=True), [host("a", vm("x"), vm("y"))], rows)
    assert plan.halt is None and started(plan) == ["y"]


# --- size limit -----------------------------------------------------------------------------


def test_rows_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning, "MAX_VM_ROWS", 2)
    plan = make_plan(spec(paused=True), [host("a", vm("x"), vm("y"), vm("z"))],
                     [row("a", "z")])
    assert sorted(r.name for r in plan.rows) == ["x", "z"] and plan.dropped == 1


# --- unavailable hosts ----------------------------------------------------------------------


@pytest.mark.parametrize(("inventory", "why"), [
    (host("a", vm("x"), endpoint=None), "has not published an endpoint"),
    (host("a", vm("x"), heartbeat=None), "has not reported yet"),
])
def test_vms_of_unavailable_hosts_wait(inventory: object, why: str) -> None:
    plan = make_plan(spec(), [inventory])  # type: ignore[list-item]
    assert plan.started == () and why in (by_name(plan)["x"].message or "")


# --- VMs their host reports not ready -------------------------------------------------------

SHARE_OFF = "cpr-exec: memory backend ram0 has share=off; restart the VM with share=on"


def test_a_vm_that_is_not_ready_waits_and_says_why_while_the_others_go_on() -> None:
    inventory = host("a", vm("x", ready=False, not_ready_reasons=(SHARE_OFF,)), vm("y"))
    plan = make_plan(spec(), [inventory])
    assert [r.name for r in plan.started] == ["y"]
    x = by_name(plan)["x"]
    assert x.phase == P and x.operation_id is None
    assert x.message == f"not started: not ready for an in-place update: {SHARE_OFF}"
    assert plan.waiting == (planning.NOT_READY,) and plan.halt is None


def test_a_not_ready_vm_neither_fails_nor_holds_up_the_canary() -> None:
    inventory = host("a", vm("a1", ready=False), vm("a2"), vm("a3"))
    plan = make_plan(spec(strategy={"canary": 1, "failurePolicy": "Halt", "maxFailures": 0}),
                     [inventory])
    assert [r.name for r in plan.started] == ["a2"] and plan.canary_active
    assert by_name(plan)["a1"].message == ("not started: not ready for an in-place update: "
                                           "its agent gave no reason")


def test_a_not_ready_vm_starts_once_its_host_reports_it_ready() -> None:
    first = make_plan(spec(), [host("a", vm("x", ready=False))])
    assert first.started == ()
    again = make_plan(spec(), [host("a", vm("x"))], rows=first.rows)
    assert [r.name for r in again.started] == ["x"]


def test_a_dry_run_still_asks_the_agent_about_a_not_ready_vm() -> None:
    plan = make_plan(spec(dryRun=True), [host("a", vm("x", ready=False))])
    assert [r.name for r in plan.started] == ["x"]


def test_stale_after_is_configurable() -> None:
    inventory = host("a", vm("x"), heartbeat=T0 - timedelta(seconds=20))
    assert make_plan(spec(), [inventory]).started
    assert not make_plan(spec(), [inventory], stale_after=timedelta(seconds=10)).started


def test_targets_use_new_binary_constant() -> None:
    assert NEW != OLD  # builders sanity: the target differs from the VMs' binary
