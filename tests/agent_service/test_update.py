"""Updates through the gRPC service on real QEMU VMs (the rig's sid QEMU, cpr-exec)."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import pytest
from google.protobuf.message import Message

from tests.agent_service.conftest import QemuEnv
from tests.agent_service.harness import CuttableProxy, journal_files, op_workdirs
from vmupdate_agent import workdirs
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator.agent_client import AgentError

pytestmark = pytest.mark.qemu

EXPECTED_PHASES = [pb.PHASE_ACCEPTED, pb.PHASE_PREFLIGHT, pb.PHASE_STOPPING, pb.PHASE_EXECED,
                   pb.PHASE_SAVED, pb.PHASE_RESUMED, pb.PHASE_VERIFIED, pb.PHASE_FINISHED]


def update_request(env: QemuEnv, op_id: str, vm: str, **fields: object) -> pb.UpdateRequest:
    request = pb.UpdateRequest(operation_id=op_id, vm=vm, mode=pb.MODE_CPR_EXEC,
                               target=pb.Target(binary=env.sid_binary,
                                                expected_version=env.rig.sid.version))
    for name, value in fields.items():
        if isinstance(value, Message):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def phases(events: list[pb.OperationEvent]) -> list[int]:
    return [e.progress.phase for e in events if e.HasField("progress")]


def check_stream(events: list[pb.OperationEvent], op_id: str) -> pb.UpdateResult:
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert all(e.operation_id == op_id for e in events)
    assert events[-1].HasField("result") and not any(e.HasField("result") for e in events[:-1])
    for e in events[:-1]:
        assert e.progress.message and e.progress.time.seconds > 0
    times = [e.progress.time.ToNanoseconds() for e in events[:-1]]
    assert times == sorted(times)
    return events[-1].result


async def test_update_streams_end_to_end(qemu_env: QemuEnv) -> None:
    vm = await qemu_env.vm("e2e")
    pid = vm.pid
    agent = await qemu_env.agent()
    client = await agent.client()

    listed = await client.list_vms()
    [row] = listed.vms
    assert (row.name, row.uuid, row.pid, row.qmp_path) == ("e2e", vm.uuid, pid,
                                                           str(vm.qmp_path))
    assert row.readiness.ready and pb.MODE_CPR_EXEC in row.readiness.modes
    assert f"{row.version.major}.{row.version.minor}.{row.version.micro}" == \
        qemu_env.rig.sid.version
    assert row.runstate == "running" and row.busy_operation_id == ""

    report = await client.preflight(pb.PreflightRequest(
        vm="e2e", target=pb.Target(binary=qemu_env.sid_binary), mode=pb.MODE_AUTO))
    assert report.passed, [c for c in report.checks if not c.passed]
    assert report.mode == pb.MODE_CPR_EXEC
    assert "target-allowed-directory" in {c.name for c in report.checks}

    mark = time.monotonic_ns()
    events = [e async for e in client.stub.Update(update_request(qemu_env, "op-e2e", "e2e"),
                                                  timeout=300)]
    result = check_stream(events, "op-e2e")
    assert phases(events) == EXPECTED_PHASES, [pb.Phase.Name(p) for p in phases(events)]
    assert result.outcome == pb.OUTCOME_UPDATED, result.message
    assert result.mode == pb.MODE_CPR_EXEC
    assert result.pid_before == result.pid_after == pid  # cpr-exec: same process
    assert result.version_before == result.version_after == qemu_env.rig.sid.version
    assert 0 < result.pause_ms < 5000
    assert {"accepted", "preflight", "stopping", "execed", "saved", "total"} <= \
        set(result.phase_ms)
    assert sum(v for k, v in result.phase_ms.items() if k != "total") == \
        pytest.approx(result.phase_ms["total"], abs=0.01)
    assert result.preflight.passed and not result.pause_budget_exceeded

    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=30)
    vm.serial.assert_continuous(since=mark)
    assert vm.pid == pid and await vm.query_status() == "running"

    op = await client.get_operation("op-e2e")
    assert op.state == pb.OPERATION_STATE_DONE and not op.resolved_after_restart
    assert op.result == result
    assert list(op.events) == [e.progress for e in events[:-1]]
    assert (op.vm_name, op.vm_uuid, op.qmp_path) == ("e2e", vm.uuid, str(vm.qmp_path))
    assert op.request.target.binary == qemu_env.sid_binary
    assert journal_files(agent) == ["op-e2e.json"]


async def test_same_operation_id_updates_once(qemu_env: QemuEnv) -> None:
    vm = await qemu_env.vm("idem")
    agent = await qemu_env.agent()
    client = await agent.client()
    request = update_request(qemu_env, "op-idem", "idem")

    async def run() -> list[pb.OperationEvent]:
        return [e async for e in client.stub.Update(request, timeout=300)]

    # Two identical requests at once (a retry racing the original), then a third after.
    first, second = await asyncio.gather(run(), run())
    third = await run()
    results = [check_stream(s, "op-idem") for s in (first, second, third)]
    assert results[0].outcome == pb.OUTCOME_UPDATED
    assert results[0] == results[1] == results[2]
    assert first == second == third  # the same events, the same timestamps: one operation
    assert op_workdirs(agent) == [workdirs.folder_name("op-idem")]  # the engine ran once
    assert journal_files(agent) == ["op-idem.json"]
    # The same id for another request is refused, not run.
    other = update_request(qemu_env, "op-idem", "idem", pause_budget_ms=5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in client.stub.Update(other, timeout=30):
            pass
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "operation_id: op-idem was already used for another request" in err.value.details()
    assert vm.pid == results[0].pid_after


async def test_update_refused_by_preflight_changes_nothing(qemu_env: QemuEnv) -> None:
    vm = await qemu_env.vm("refused")
    pid = vm.pid
    agent = await qemu_env.agent()
    client = await agent.client()
    request = update_request(qemu_env, "op-refused", "refused")
    request.target.expected_version = "9.9.9"  # not what the binary is
    result = await client.update(request, timeout=300)
    assert result.outcome == pb.OUTCOME_FAILED
    assert "preflight failed, nothing was changed" in result.message
    failed = [c.name for c in result.preflight.checks if not c.passed]
    assert failed == ["target-version"], failed
    assert (result.pid_after, result.version_after) == (pid, qemu_env.rig.sid.version)
    op = await client.get_operation("op-refused")
    assert [p.phase for p in op.events] == [pb.PHASE_ACCEPTED, pb.PHASE_FAILED]
    assert op_workdirs(agent) == []  # the engine stopped before making one
    assert vm.pid == pid and await vm.query_status() == "running"


async def test_reattach_after_disconnect(qemu_env: QemuEnv) -> None:
    vm = await qemu_env.vm("reattach")
    agent = await qemu_env.agent()
    first_client = await agent.client()
    call = first_client.stub.Update(update_request(qemu_env, "op-re", "reattach"),
                                    timeout=300)
    seen: list[pb.OperationEvent] = []
    async for event in call:
        seen.append(event)
        if event.progress.phase == pb.PHASE_PREFLIGHT:
            break
    call.cancel()
    await first_client.close()  # the client goes away mid-update

    second_client = await agent.client()
    rest = [e async for e in second_client.watch("op-re", after=seen[-1].sequence)]
    result = check_stream(seen + rest, "op-re")
    assert result.outcome == pb.OUTCOME_UPDATED
    assert result.pid_after == vm.pid
    # From the start, too, and GetOperation says the same.
    replay = [e async for e in second_client.watch("op-re")]
    assert replay == seen + rest
    assert (await second_client.get_operation("op-re")).result == result


async def test_client_update_survives_broken_connections(qemu_env: QemuEnv) -> None:
    vm = await qemu_env.vm("cut")
    agent = await qemu_env.agent()
    proxy = CuttableProxy(agent.port)
    await proxy.start()
    try:
        client = await agent.client(target=f"127.0.0.1:{proxy.port}")
        seen: list[pb.OperationEvent] = []

        def on_event(event: pb.OperationEvent) -> None:
            seen.append(event)
            # The network fails twice: right after acceptance, and in the middle.
            if event.progress.phase in (pb.PHASE_ACCEPTED, pb.PHASE_STOPPING):
                proxy.cut()

        result = await client.update(update_request(qemu_env, "op-cut", "cut"),
                                     on_event=on_event, timeout=300)
    finally:
        await proxy.close()
    assert proxy.cuts == 2
    assert result.outcome == pb.OUTCOME_UPDATED, result.message
    check_stream(seen, "op-cut")  # every event exactly once, in order
    assert phases(seen) == EXPECTED_PHASES
    assert result.pid_after == vm.pid
    assert op_workdirs(agent) == [workdirs.folder_name("op-cut")]


async def test_busy_vm_refuses_a_second_operation(qemu_env: QemuEnv) -> None:
    vm = await qemu_env.vm("busy")
    agent = await qemu_env.agent()
    client = await agent.client()
    events: list[pb.OperationEvent] = []
    accepted = asyncio.Event()

    async def first() -> None:
        async for event in client.stub.Update(update_request(qemu_env, "op-a", "busy"),
                                              timeout=300):
            events.append(event)
            accepted.set()

    running = asyncio.create_task(first())
    await asyncio.wait_for(accepted.wait(), 60)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in client.stub.Update(update_request(qemu_env, "op-b", vm.uuid),
                                          timeout=30):
            pass
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "vm: busy is busy: operation op-a" in err.value.details()
    with pytest.raises(AgentError) as agent_err:
        await client.preflight(pb.PreflightRequest(
            vm=str(vm.qmp_path), target=pb.Target(binary=qemu_env.sid_binary),
            mode=pb.MODE_AUTO))
    assert agent_err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    listed = await client.list_vms()
    assert [(v.name, v.busy_operation_id) for v in listed.vms] == [("busy", "op-a")]

    await asyncio.wait_for(running, 300)
    assert events[-1].result.outcome == pb.OUTCOME_UPDATED
    assert op_workdirs(agent) == [workdirs.folder_name("op-a")]  # op-b left nothing
    # Once it is done, the next operation runs: a second update in a row.
    second = await client.update(update_request(qemu_env, "op-b", vm.uuid), timeout=300)
    assert second.outcome == pb.OUTCOME_UPDATED, second.message
    assert second.pid_after == vm.pid == events[-1].result.pid_after
    assert await vm.query_status() == "running"


async def test_sigterm_lets_a_running_update_finish(qemu_env: QemuEnv) -> None:
    vm = await qemu_env.vm("term")
    agent = await qemu_env.agent()
    client = await agent.client()
    events: list[pb.OperationEvent] = []
    async for event in client.stub.Update(update_request(qemu_env, "op-term", "term"),
                                          timeout=300):
        events.append(event)
        if event.progress.phase == pb.PHASE_PREFLIGHT:
            assert agent.proc is not None
            agent.proc.terminate()  # SIGTERM in the middle of the update
    assert events[-1].result.outcome == pb.OUTCOME_UPDATED
    assert await asyncio.wait_for(agent.proc.wait(), 60) == 0
    assert await vm.query_status() == "running"
