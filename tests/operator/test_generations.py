"""Editing the spec is a new rollout: rows back to Pending with new ids, VMs already on the
new target Updated without an operation, running operations finish, a bounded history of the
earlier rollouts, and editing the target back is the rollback."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from tests.operator.builders import (
    NEW,
    NEW_VERSION,
    OLD,
    OLD_VERSION,
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
from tests.operator.test_rollout import Agent, Writer, make_body, make_rollout, until
from vmupdate_api.crd.constants import MAX_HISTORY
from vmupdate_api.crd.vmupdate import RolloutTarget, UpdatePhase, VMPhase, VMUpdateStatus
from vmupdate_api.crd.vmupdate_spec import VMUpdateSpec
from vmupdate_operator import planning
from vmupdate_operator.operation_ids import operation_id, parse_operation_id, vm_identity
from vmupdate_operator.records import record_name
from vmupdate_operator.status import build_status

NOW = T0 + timedelta(seconds=1)
OLD_TARGET = {"binary": OLD, "version": OLD_VERSION}


def op(name: str, generation: int) -> str:
    return operation_id(UID, generation, vm_identity("a", name, uuid_for(name)))


def by_name(plan: planning.Plan) -> dict[str, object]:
    return {r.name: r for r in plan.rows}


def test_an_edit_sends_every_vm_not_on_the_new_target_back_to_pending() -> None:
    # Generation 1 moved x and y to NEW; generation 2 wants OLD back (the rollback).
    before = T0 - timedelta(seconds=30)  # the inventory (T0) is newer than both operations
    rows = [row("a", "x", VMPhase.UPDATED, operation_id=op("x", 1), pause_ms=30.5,
                pid_before=1, pid_after=1, finished_at=before),
            row("a", "y", VMPhase.FAILED, operation_id=op("y", 1), finished_at=before),
            row("a", "z", VMPhase.UPDATED, message="already runs the target")]
    hosts = [host("a", on_target("x"), vm("y"), on_target("z"))]
    back = spec(target=OLD_TARGET, strategy={"maxParallel": 1, "maxParallelPerHost": 1})
    plan = make_plan(back, hosts, rows, generation=2, observed=1)
    got = {r.name: r for r in plan.rows}
    # y already runs OLD: Updated with no operation; x (on NEW) and z start again, one at a
    # time, under generation 2's ids.
    assert got["y"].phase == VMPhase.UPDATED and got["y"].operation_id is None
    assert got["x"].phase == VMPhase.PREFLIGHT and got["x"].operation_id == op("x", 2)
    assert got["x"].pause_ms is None and got["x"].pid_after is None
    assert got["z"].phase == VMPhase.PENDING and got["z"].operation_id is None
    assert [r.name for r in plan.started] == ["x"]


def test_an_operation_running_at_the_edit_finishes_then_its_vm_starts_again() -> None:
    running = row("a", "x", VMPhase.UPDATING, operation_id=op("x", 1), started_at=T0)
    hosts = [host("a", vm("x"))]
    new_spec = spec(target=OLD_TARGET | {"binary": "/opt/q/bin/qemu"})
    plan = make_plan(new_spec, hosts, [running], generation=2, observed=1)
    assert plan.rows[0] == running and plan.started == ()  # never touched while in flight
    # It finishes (the agent's result for the old target), after the edit was observed.
    done = running.model_copy(update={"phase": VMPhase.UPDATED, "finished_at": NOW})
    # An inventory older than the end of that operation decides nothing (it may show the VM
    # on any QEMU): the row waits.
    stale = make_plan(new_spec, [host("a", on_target("x"))], [done], generation=2, observed=2)
    assert stale.rows[0].phase == VMPhase.PENDING and stale.started == ()
    assert "inventory of a taken after" in (stale.rows[0].message or "")
    fresh = host("a", on_target("x"), heartbeat=NOW + timedelta(seconds=2))
    later = make_plan(new_spec, [fresh], stale.rows, generation=2, observed=2,
                      now=NOW + timedelta(seconds=3))
    assert later.rows[0].phase == VMPhase.PREFLIGHT
    ref = parse_operation_id(later.rows[0].operation_id)
    assert ref is not None and ref.generation == 2


def test_the_rollback_is_not_judged_on_an_inventory_older_than_the_last_update() -> None:
    """Found in e2e: right after generation 2 moved x off OLD, the VMHost still listed it on
    OLD; editing the target back to OLD must not call x "already on the target"."""
    updated_at = T0 + timedelta(seconds=5)
    rows = [row("a", "x", VMPhase.UPDATED, operation_id=op("x", 2), finished_at=updated_at)]
    listed_before = host("a", vm("x"), heartbeat=T0)  # x on OLD, as before generation 2
    back = spec(target=OLD_TARGET)
    plan = make_plan(back, [listed_before], rows, generation=3, observed=2,
                     now=updated_at + timedelta(seconds=1))
    assert plan.rows[0].phase == VMPhase.PENDING and plan.started == ()
    listed_after = host("a", on_target("x"), heartbeat=updated_at + timedelta(seconds=1))
    plan = make_plan(back, [listed_after], plan.rows, generation=3, observed=3,
                     now=updated_at + timedelta(seconds=2))
    assert plan.rows[0].phase == VMPhase.PREFLIGHT
    assert plan.rows[0].operation_id == op("x", 3)


def test_a_rollout_of_this_generation_is_left_alone() -> None:
    rows = [row("a", "x", VMPhase.UPDATED, operation_id=op("x", 2), finished_at=T0)]
    plan = make_plan(spec(), [host("a", on_target("x"))], rows, generation=2, observed=2)
    assert plan.rows[0] == rows[0]


def test_superseded() -> None:
    gen1 = op("x", 1)
    cases = [
        (VMPhase.UPDATING, gen1, True, False),
        (VMPhase.PREFLIGHT, gen1, False, False),
        (VMPhase.UPDATED, gen1, False, True),
        (VMPhase.UPDATED, op("x", 2), False, False),
        (VMPhase.UPDATED, None, False, False),
        (VMPhase.UPDATED, None, True, True),
        (VMPhase.PENDING, None, True, False),
        (VMPhase.PENDING, gen1, True, True),
        (VMPhase.SKIPPED, None, True, True),
        (VMPhase.BLOCKED, None, True, True),
        (VMPhase.ROLLED_BACK, gen1, False, True),
    ]
    for phase, op_id, new_rollout, expected in cases:
        r = row("a", "x", phase, operation_id=op_id)
        assert planning.superseded(r, 2, new_rollout) is expected, (phase, op_id, new_rollout)


def status_after(the_spec: VMUpdateSpec, plan: planning.Plan, previous: VMUpdateStatus | None,
                 generation: int, now: object = NOW) -> VMUpdateStatus:
    return build_status(previous=previous, spec=the_spec, generation=generation, plan=plan,
                        now=now)  # type: ignore[arg-type]


def test_the_history_keeps_each_earlier_rollout() -> None:
    s1 = spec()
    hosts = [host("a", vm("x"))]
    first = status_after(s1, make_plan(s1, hosts), None, 1)
    assert first.target == RolloutTarget(binary=NEW, version=NEW_VERSION)
    assert first.history == []
    # Generation 1 finished: x updated with a 42.5 ms pause.
    done_rows = [row("a", "x", VMPhase.UPDATED, operation_id=op("x", 1), pause_ms=42.5,
                     finished_at=NOW)]
    plan1 = make_plan(s1, [host("a", on_target("x"))], done_rows)
    s1_done = status_after(s1, plan1, first.model_copy(update={"start_time": T0}), 1)
    assert s1_done.phase == UpdatePhase.SUCCEEDED and s1_done.completion_time is not None
    # The target is edited back: generation 2.
    s2 = spec(target=OLD_TARGET)
    later = NOW + timedelta(minutes=5)
    plan2 = make_plan(s2, [host("a", on_target("x"))], plan1.rows, generation=2, observed=1,
                      now=later)
    second = status_after(s2, plan2, s1_done, 2, later)
    assert second.observed_generation == 2 and second.start_time is None
    assert second.target == RolloutTarget(binary=OLD, version=OLD_VERSION)
    [record] = second.history
    assert record.generation == 1 and record.target == RolloutTarget(binary=NEW,
                                                                     version=NEW_VERSION)
    assert (record.phase, record.start_time, record.finish_time) == (
        UpdatePhase.SUCCEEDED, T0, s1_done.completion_time)
    assert (record.targets, record.updated, record.failed, record.pause_max_ms) == (
        1, 1, 0, 42.5)
    # The same generation again: no second record.
    again = status_after(s2, plan2, second, 2, later)
    assert len(again.history) == 1


def test_a_superseded_rollout_that_never_finished_ends_when_superseded() -> None:
    s1 = spec()
    plan1 = make_plan(s1, [host("a", vm("x"))])
    first = status_after(s1, plan1, None, 1)
    assert first.phase == UpdatePhase.PROGRESSING and first.completion_time is None
    later = NOW + timedelta(minutes=1)
    second = status_after(spec(target=OLD_TARGET), make_plan(
        spec(target=OLD_TARGET), [host("a", vm("x"))], plan1.rows, generation=2, observed=1),
        first, 2, later)
    assert second.history[0].phase == UpdatePhase.PROGRESSING
    assert second.history[0].finish_time == later.replace(microsecond=0)


def test_the_history_is_bounded() -> None:
    s = spec()
    plan = make_plan(s, [host("a", vm("x"))])
    status = status_after(s, plan, None, 1)
    for generation in range(2, MAX_HISTORY + 5):
        plan = make_plan(s, [host("a", vm("x"))], plan.rows, generation=generation,
                         observed=generation - 1)
        status = status_after(s, plan, status, generation)
    assert len(status.history) == MAX_HISTORY
    assert [h.generation for h in status.history] == list(range(4, MAX_HISTORY + 4))


async def test_an_operation_that_never_reached_its_agent_is_not_sent_after_an_edit() -> None:
    """The row was persisted with a generation-1 id, then the spec changed before the agent
    got the request: nothing starts for the old rollout; the VM starts under generation 2."""
    s = spec()
    hosts = [host("a", vm("x"))]
    stale = row("a", "x", VMPhase.PREFLIGHT, operation_id=op("x", 1), started_at=T0)
    status = VMUpdateStatus(observed_generation=1).counted([stale])
    writer = Writer()
    writer.records.objects[record_name("rollout", UID, "a")] = {"x": stale}  # as stored
    agent = Agent(writer, hosts)
    r = make_rollout(make_body(s, status, generation=2), writer, agent)
    task = asyncio.create_task(r.run())
    try:
        await until(lambda: writer.last is not None and writer.last.updated == 1)
    finally:
        r.stop(deleting=False)
        await asyncio.wait_for(task, 5)
    assert agent.executions == [op("x", 2)]
    assert writer.last is not None and writer.vms[0].operation_id == op("x", 2)
