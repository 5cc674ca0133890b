"""The loop's row bookkeeping: a task's news replaces exactly its row, wherever it is; a
fleet's records, written host by host, end as the loop's rows."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from tests.operator.builders import host, row, spec, vm
from tests.operator.test_rollout import (
    Agent,
    Writer,
    make_body,
    make_rollout,
    phase_is,
    run_until,
    until,
)
from vmupdate_api.crd.vmupdate import UpdatePhase, VMPhase
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator import rollout as rollout_module
from vmupdate_operator.planning import key_of
from vmupdate_operator.rollout import _replaced


def test_changed_rows_are_replaced_in_place_on_random_sorted_rows() -> None:
    rng = random.Random(7)
    for _ in range(50):
        rows = sorted({key_of(r): r for r in (row(f"h{rng.randrange(9)}", f"vm{rng.randrange(30)}")
                                              for _ in range(rng.randint(1, 60)))}.values(),
                      key=key_of)
        by_key = {key_of(r): r for r in rows}
        changed = set(rng.sample(sorted(by_key), rng.randint(0, len(rows))))
        for key in changed:
            by_key[key] = by_key[key].model_copy(update={"phase": VMPhase.UPDATED})
        out = _replaced(rows, by_key, changed)
        assert out == [by_key[key_of(r)] for r in rows]
        assert all(a is b for a, b in zip(out, rows, strict=True) if key_of(a) not in changed)
        assert [r.phase for r in rows] == [VMPhase.PENDING] * len(rows)  # not changed


def test_duplicate_or_unsorted_rows_are_all_taken_from_the_map() -> None:
    a, b, c = row("h1", "x"), row("h1", "y"), row("h2", "x")
    new_a = a.model_copy(update={"phase": VMPhase.UPDATED})
    # Records read at start may hold a VM twice: every copy takes the new row.
    assert _replaced([a, a, b], {key_of(a): new_a, key_of(b): b}, {key_of(a)}) == [new_a,
                                                                                  new_a, b]
    unsorted = [c, b, a]
    by_key = {key_of(c): c, key_of(b): b, key_of(a): new_a}
    assert _replaced(unsorted, by_key, {key_of(a)}) == [c, b, new_a]


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollout_module, "COALESCE_S", 0.005)
    monkeypatch.setattr(rollout_module, "backoff", lambda *a, **k: iter(lambda: 0.01, None))


@pytest.mark.usefixtures("fast")
async def test_a_fleet_written_host_by_host_ends_as_its_rows_with_every_event_once() -> None:
    """The loop writes, reports and adopts only the hosts whose rows changed: with writes
    failing now and then, every record still ends as the loop's row, every VM's start and
    end is reported once, and no operation runs twice."""
    writer, events = Writer(), []
    hosts = [host(f"h{i:02d}", *(vm(f"vm{j}", pid=100 + j,
                                   uuid=f"00000000-0000-4000-8000-{i:06d}{j:06d}")
                                for j in range(3)))
             for i in range(12)]
    agent = Agent(writer, hosts)
    r = make_rollout(make_body(spec(strategy={"maxParallel": 4, "maxParallelPerHost": 2})),
                     writer, agent, events)
    task = asyncio.create_task(r.run())
    try:
        for _ in range(6):  # the API server goes away and comes back, mid-rollout
            await until(lambda: len(agent.executions) >= 3, 5)
            writer.fail = True
            await asyncio.sleep(0.03)
            writer.fail = False
            await asyncio.sleep(0.03)
        await until(phase_is(writer, UpdatePhase.SUCCEEDED), 10)
    finally:
        r.stop(deleting=False)
        await asyncio.wait_for(task, 5)
    assert len(writer.vms) == 36 and all(v.phase == VMPhase.UPDATED for v in writer.vms)
    assert writer.vms == sorted(r.rows, key=key_of)  # every record is the loop's row
    assert len(agent.executions) == len(set(agent.executions)) == 36
    reasons = [e[1] for e in events]
    assert reasons.count("UpdateStarted") == reasons.count("VMUpdated") == 36
    started = [e[2].split(":")[0] for e in events if e[1] == "UpdateStarted"]
    assert len(set(started)) == 36


class CrashingAgent(Agent):
    """The first Update call fails with an operator bug (not an agent error)."""

    crashed = False

    async def update(self, request: pb.UpdateRequest, **kwargs: Any) -> pb.UpdateResult:
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("a bug in the operator")
        return await super().update(request, **kwargs)


@pytest.mark.usefixtures("fast")
async def test_a_row_whose_task_ended_in_flight_is_followed_again() -> None:
    writer = Writer()
    agent = CrashingAgent(writer, [host("a", vm("x")), host("b", vm("y"))])
    r = make_rollout(make_body(spec(strategy={"maxParallel": 1, "maxParallelPerHost": 1})),
                     writer, agent)
    await run_until(r, phase_is(writer, UpdatePhase.SUCCEEDED))
    assert agent.crashed and len(agent.executions) == 2
    assert all(v.phase == VMPhase.UPDATED for v in writer.vms)
