"""The rollout loop against fake agents and a fake status writer: ordering and restarts.

What matters here is not the planning (test_planning) but the I/O discipline: an operation
id is in the written status before any agent hears of it; a restarted loop follows the
operations in its status and never starts one twice; nothing starts when status cannot be
written; a deleted VMUpdate waits for its running operations.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest

from tests.operator.builders import NEW, NEW_VERSION, OLD, T0, host, on_target, spec, vm
from vmupdate_api.crd.vmupdate import UpdatePhase, VMPhase, VMRolloutStatus, VMUpdateStatus
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator import rollout as rollout_module
from vmupdate_operator.agent_client import AgentError
from vmupdate_operator.inventory import HostInventory
from vmupdate_operator.kube import RecordWrite, StatusWriteError
from vmupdate_operator.rollout import Rollout, RolloutDeps

UID = "5f0c6a3e-1b2d-4c5e-8f90-a1b2c3d4e5f6"


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollout_module, "COALESCE_S", 0.005)
    monkeypatch.setattr(rollout_module, "backoff", lambda *a, **k: iter(lambda: 0.01, None))


class Records:
    """VMUpdateHost objects as the API server would hold them, from creates and merge
    patches."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.objects: dict[str, dict[str, VMRolloutStatus]] = {}
        self.bodies: dict[str, dict[str, Any]] = {}
        self.requests: list[RecordWrite] = []

    async def write(self, record: RecordWrite) -> None:
        await asyncio.sleep(0)
        if self.writer.fail:
            raise StatusWriteError("API server down")
        self.requests.append(record)
        if record.name not in self.objects:
            assert not record.exists and record.create
            self.bodies[record.name] = record.body
            self.objects[record.name] = {
                k: VMRolloutStatus.model_validate(v)
                for k, v in record.body["status"].get("vms", {}).items()}
        else:
            vms = self.objects[record.name]
            for k, v in record.patch["status"]["vms"].items():
                if v is None:
                    vms.pop(k, None)
                else:
                    vms[k] = VMRolloutStatus.model_validate(
                        {f: x for f, x in v.items() if x is not None})
        for row in self.objects[record.name].values():
            if row.operation_id:
                self.writer.operation_ids.add(row.operation_id)


class Writer:
    def __init__(self) -> None:
        self.written: list[VMUpdateStatus] = []
        self.fail = False
        self.during: Callable[[VMUpdateStatus], Any] | None = None
        self.operation_ids: set[str] = set()
        self.records = Records(self)

    async def write(self, name: str, status: VMUpdateStatus) -> None:
        await asyncio.sleep(0)
        if self.during is not None:
            await self.during(status)
        if self.fail:
            raise StatusWriteError("API server down")
        self.written.append(status)

    @property
    def last(self) -> VMUpdateStatus | None:
        return self.written[-1] if self.written else None

    @property
    def vms(self) -> list[VMRolloutStatus]:
        """Every record the VMUpdateHosts hold, in (host, name) order."""
        rows = [r for vms in self.records.objects.values() for r in vms.values()]
        return sorted(rows, key=lambda r: (r.host, r.name))

    def persisted_operation_ids(self) -> set[str]:
        return set(self.operation_ids)


class Agent:
    """One journal for every host (ids are unique anyway); VMs move to the target."""

    def __init__(self, writer: Writer, hosts: list[HostInventory]) -> None:
        self.writer = writer
        self.hosts = hosts
        self.journal: dict[str, tuple[pb.UpdateRequest, pb.UpdateResult | None]] = {}
        self.updates: list[str] = []  # operation ids of Update calls
        self.executions: list[str] = []  # operations actually run
        self.preflights: list[str] = []
        self.release = asyncio.Event()
        self.release.set()
        self.refuse: grpc.StatusCode | None = None
        self.unavailable = 0  # the next N calls fail with UNAVAILABLE

    async def client(self, host: str, endpoint: str) -> Agent:
        return self

    def _maybe_fail(self) -> None:
        if self.unavailable:
            self.unavailable -= 1
            raise AgentError("fake", grpc.StatusCode.UNAVAILABLE, "restarting")
        if self.refuse is not None:
            raise AgentError("fake", self.refuse, "refused")

    async def get_operation(self, operation_id: str, *, timeout: float | None = None
                            ) -> pb.Operation:
        self._maybe_fail()
        if operation_id not in self.journal:
            raise AgentError("fake", grpc.StatusCode.NOT_FOUND, "no such operation")
        request, result = self.journal[operation_id]
        state = pb.OPERATION_STATE_DONE if result else pb.OPERATION_STATE_RUNNING
        return pb.Operation(operation_id=operation_id, state=state, request=request,
                            result=result)

    async def update(self, request: pb.UpdateRequest, *,
                     on_event: Callable[[pb.OperationEvent], Any] | None = None,
                     timeout: float = 900.0) -> pb.UpdateResult:
        self._maybe_fail()
        op_id = request.operation_id
        assert op_id in self.writer.persisted_operation_ids(), "Update before status write"
        self.updates.append(op_id)
        if op_id in self.journal:
            if self.journal[op_id][0] != request:
                raise AgentError("fake", grpc.StatusCode.ALREADY_EXISTS, "other request")
        else:
            self.journal[op_id] = (request, None)
            self.executions.append(op_id)
        if on_event is not None:
            on_event(pb.OperationEvent(operation_id=op_id, sequence=1, progress=pb.Progress(
                phase=pb.PHASE_STOPPING, message="stopping the guest")))
        await self.release.wait()
        request, result = self.journal[op_id]
        if result is None:
            result = self._run(request)
            self.journal[op_id] = (request, result)
        return result

    def _run(self, request: pb.UpdateRequest) -> pb.UpdateResult:
        for i, h in enumerate(self.hosts):
            for v in h.vms:
                if v.uuid == request.vm:
                    moved = v.model_copy(update={"binary": NEW, "qemu_version": NEW_VERSION})
                    others = tuple(x for x in h.vms if x is not v)
                    self.hosts[i] = HostInventory(
                        name=h.name, labels=h.labels, endpoint=h.endpoint,
                        heartbeat=h.heartbeat, vms=(*others, moved))
                    return pb.UpdateResult(vm=v.name, outcome=pb.OUTCOME_UPDATED,
                                           mode=pb.MODE_CPR_EXEC, pid_before=v.pid or 0,
                                           pid_after=v.pid, version_before="10.0.2",
                                           version_after=NEW_VERSION, pause_ms=12.0,
                                           message="updated in place")
        raise AssertionError(f"no VM {request.vm}")

    async def preflight(self, request: pb.PreflightRequest, *, timeout: float | None = None
                        ) -> pb.PreflightReport:
        self._maybe_fail()
        self.preflights.append(request.vm)
        return pb.PreflightReport(vm=request.vm, passed=True, mode=pb.MODE_CPR_EXEC)


def make_body(the_spec: Any, status: VMUpdateStatus | None = None, generation: int = 1
              ) -> dict[str, Any]:
    return {"metadata": {"name": "rollout", "uid": UID, "generation": generation},
            "spec": the_spec.to_wire(), "status": status.to_wire() if status else None}


def make_rollout(body: dict[str, Any], writer: Writer, agent: Agent,
                 events: list[tuple[str, str, str]] | None = None) -> Rollout:
    sink = events if events is not None else []
    deps = RolloutDeps(writer=writer, records=writer.records, agents=agent,
                       hosts=lambda: agent.hosts, stored=lambda uid: writer.vms,
                       events=lambda *e: sink.append(e), clock=lambda: T0 + timedelta(seconds=1),
                       resync_s=0.02, update_timeout_s=5)
    return Rollout(body, deps)


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 (polling fakes' plain attributes)
            await asyncio.sleep(0.005)


def phase_is(writer: Writer, phase: UpdatePhase) -> Callable[[], bool]:
    return lambda: writer.last is not None and writer.last.phase == phase


async def run_until(r: Rollout, predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    task = asyncio.create_task(r.run())
    try:
        await until(predicate, timeout)
    finally:
        r.stop(deleting=False)
        await asyncio.wait_for(task, 5)


def three_hosts() -> list[HostInventory]:
    return [host("a", vm("x", pid=11), vm("y", pid=12)), host("b", vm("z", pid=13))]


async def test_a_rollout_converges_and_reports() -> None:
    writer, events = Writer(), []
    agent = Agent(writer, three_hosts())
    r = make_rollout(make_body(spec(strategy={"canary": 1})), writer, agent, events)
    await run_until(r, phase_is(writer, UpdatePhase.SUCCEEDED))
    last = writer.last
    assert last is not None and last.updated == 3 and last.start_time is not None
    assert sorted(agent.executions) == sorted(agent.updates) == sorted(
        row.operation_id for row in writer.vms if row.operation_id)
    assert {row.pid_before for row in writer.vms} == {11, 12, 13}
    assert [e[1] for e in events].count("UpdateStarted") == 3
    assert [e[1] for e in events].count("VMUpdated") == 3
    assert events[-1][:2] == ("Normal", "RolloutComplete")
    # startTime was written no later than the first operation id.
    first_with_op = next(s for s in writer.written
                         if any(v.operation_id for v in s.in_progress_vms))
    assert first_with_op.start_time is not None


async def test_a_restarted_loop_follows_and_never_starts_twice() -> None:
    writer = Writer()
    agent = Agent(writer, three_hosts())
    agent.release.clear()  # the first operation blocks, as if it were slow
    the_spec = spec(strategy={"maxParallel": 1, "maxParallelPerHost": 1})
    first = make_rollout(make_body(the_spec), writer, agent)
    task = asyncio.create_task(first.run())
    await until(lambda: agent.updates)
    task.cancel()  # the operator dies: its tasks are gone, the agent goes on
    await asyncio.gather(task, return_exceptions=True)
    agent.release.set()
    in_flight = agent.updates[0]

    # The next operator starts from what status says.
    second = make_rollout(make_body(the_spec, writer.last), writer, agent)
    await run_until(second, phase_is(writer, UpdatePhase.SUCCEEDED))
    assert agent.executions.count(in_flight) == 1 and len(agent.executions) == 3
    assert len(set(agent.executions)) == 3
    last = writer.last
    assert last is not None
    assert in_flight in {row.operation_id for row in writer.vms}


async def test_a_restart_after_the_agent_finished_records_its_result() -> None:
    writer = Writer()
    agent = Agent(writer, [host("a", vm("x"))])
    agent.release.clear()
    first = make_rollout(make_body(spec()), writer, agent)
    task = asyncio.create_task(first.run())
    await until(lambda: agent.updates)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    agent.release.set()
    await asyncio.sleep(0.05)  # the agent finished meanwhile; nobody listened

    second = make_rollout(make_body(spec(), writer.last), writer, agent)
    await run_until(second, phase_is(writer, UpdatePhase.SUCCEEDED))
    assert len(agent.executions) == 1
    last = writer.last
    assert last is not None
    assert writer.vms[0].phase == VMPhase.UPDATED and writer.vms[0].pause_ms == 12


async def test_nothing_starts_while_status_cannot_be_written() -> None:
    writer = Writer()
    writer.fail = True
    agent = Agent(writer, [host("a", vm("x"))])
    r = make_rollout(make_body(spec()), writer, agent)
    task = asyncio.create_task(r.run())
    await asyncio.sleep(0.2)
    assert agent.updates == [] and writer.written == []
    writer.fail = False
    await until(phase_is(writer, UpdatePhase.SUCCEEDED))
    r.stop(deleting=False)
    await task
    assert len(agent.executions) == 1


async def test_transient_agent_errors_are_retried_with_the_same_id() -> None:
    writer = Writer()
    agent = Agent(writer, [host("a", vm("x"))])
    agent.unavailable = 3
    r = make_rollout(make_body(spec()), writer, agent)
    await run_until(r, phase_is(writer, UpdatePhase.SUCCEEDED))
    assert len(agent.executions) == 1


async def test_a_refusal_fails_the_vm_and_halts() -> None:
    writer, events = Writer(), []
    agent = Agent(writer, [host("a", vm("x"), vm("y"))])
    agent.refuse = grpc.StatusCode.PERMISSION_DENIED
    r = make_rollout(make_body(spec(strategy={"maxParallel": 1, "maxParallelPerHost": 1})),
                     writer, agent, events)
    await run_until(r, phase_is(writer, UpdatePhase.FAILED))
    last = writer.last
    assert last is not None
    phases = {row.name: row.phase for row in writer.vms}
    assert phases == {"x": VMPhase.FAILED, "y": VMPhase.PENDING}
    assert "PERMISSION_DENIED" in (writer.vms[0].message or "")
    assert ("Warning", "RolloutHalted") in [e[:2] for e in events]


async def test_vm_gone_at_the_agent_is_skipped() -> None:
    writer = Writer()
    agent = Agent(writer, [host("a", vm("x"))])
    agent.refuse = grpc.StatusCode.NOT_FOUND
    r = make_rollout(make_body(spec()), writer, agent)
    await run_until(r, lambda: writer.last is not None
                    and writer.vms[0].phase == VMPhase.SKIPPED)


async def test_dry_run_asks_preflight_only() -> None:
    writer = Writer()
    agent = Agent(writer, three_hosts())
    r = make_rollout(make_body(spec(dryRun=True)), writer, agent)
    await run_until(r, phase_is(writer, UpdatePhase.DRY_RUN_COMPLETE))
    assert len(agent.preflights) == 3 and agent.updates == []
    last = writer.last
    assert last is not None and last.start_time is None and last.dry_run_passed == 3


async def test_deletion_waits_for_running_operations() -> None:
    writer = Writer()
    agent = Agent(writer, [host("a", vm("x"), vm("y"))])
    agent.release.clear()
    r = make_rollout(make_body(spec(strategy={"maxParallel": 1, "maxParallelPerHost": 1})),
                     writer, agent)
    task = asyncio.create_task(r.run())
    await until(lambda: agent.updates)
    r.stop(deleting=True)
    await asyncio.sleep(0.1)
    assert not task.done()  # still waiting for x
    agent.release.set()
    await asyncio.wait_for(task, 5)
    last = writer.last
    assert last is not None
    phases = {row.name: (row.phase, row.message) for row in writer.vms}
    assert phases["x"][0] == VMPhase.UPDATED
    assert phases["y"] == (VMPhase.PENDING, rollout_module.DELETING)
    assert len(agent.executions) == 1


async def test_operator_exit_does_not_wait() -> None:
    writer = Writer()
    agent = Agent(writer, [host("a", vm("x"))])
    agent.release.clear()
    r = make_rollout(make_body(spec()), writer, agent)
    task = asyncio.create_task(r.run())
    await until(lambda: agent.updates)
    r.stop(deleting=False)
    await asyncio.wait_for(task, 2)
    agent.release.set()


async def test_vm_already_on_target_needs_no_agent() -> None:
    writer = Writer()
    agent = Agent(writer, [host("a", on_target("x"))])
    r = make_rollout(make_body(spec()), writer, agent)
    await run_until(r, phase_is(writer, UpdatePhase.SUCCEEDED))
    assert agent.updates == [] and agent.preflights == []
    last = writer.last
    assert last is not None and last.start_time is None


async def test_an_invalid_spec_is_reported_not_acted_on() -> None:
    writer, events = Writer(), []
    agent = Agent(writer, [host("a", vm("x"))])
    body = make_body(spec())
    body["spec"]["target"]["binary"] = "relative/path"
    r = make_rollout(body, writer, agent, events)
    task = asyncio.create_task(r.run())
    await until(lambda: events)
    r.stop(deleting=False)
    await task
    assert events[0][:2] == ("Warning", "InvalidSpec") and writer.written == []
    assert OLD  # the VM is untouched


async def test_each_operation_is_followed_by_one_task(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    caplog.set_level(logging.INFO, logger="vmupdate_operator.rollout")
    writer = Writer()
    agent = Agent(writer, [host("a", vm("x"))])
    agent.release.clear()

    async def finish_during_the_write(status: VMUpdateStatus) -> None:
        if (status.in_progress_vms and status.in_progress_vms[0].phase == VMPhase.UPDATING
                and not agent.release.is_set()):
            agent.release.set()
            await asyncio.sleep(0.05)  # the task posts its result and ends meanwhile

    writer.during = finish_during_the_write
    r = make_rollout(make_body(spec()), writer, agent)
    await run_until(r, phase_is(writer, UpdatePhase.SUCCEEDED))
    # A finished task whose result was not applied yet is not followed by a second one.
    assert len(agent.updates) == 1
    assert sum("following operation" in m for m in caplog.messages) == 1


async def test_a_vm_that_left_the_target_is_updated_again_and_reported() -> None:
    writer, events = Writer(), []
    agent = Agent(writer, [host("a", vm("x"))])
    r = make_rollout(make_body(spec()), writer, agent, events)
    await run_until(r, phase_is(writer, UpdatePhase.SUCCEEDED))
    # Someone puts it back on the old binary; a later inventory shows it.
    [h] = agent.hosts
    agent.hosts[0] = host("a", vm("x"), heartbeat=T0 + timedelta(minutes=1))
    assert h.vms[0].binary == NEW
    again = make_rollout(make_body(spec(), writer.last), writer, agent, events)
    await run_until(again, lambda: len(agent.executions) == 2
                    and phase_is(writer, UpdatePhase.SUCCEEDED)())
    assert agent.executions[1].endswith("-a1")
    assert ("Warning", "VMLeftTarget") in [e[:2] for e in events]
