"""An agent killed in the middle of an update: the restarted agent finds the VM, finishes or
rolls back the update, records the outcome, and the client that was waiting gets it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.agent_service.conftest import QemuEnv
from tests.agent_service.harness import AgentProcess
from tests.agent_service.test_update import check_stream, phases, update_request
from vmupdate_agent import guard
from vmupdate_api.gen import agent_v1_pb2 as pb

pytestmark = pytest.mark.qemu


async def guard_phase(path: Path, wanted: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        status = guard.read_status(path)
        if status is not None and status.get("phase") in wanted:
            return status
        await asyncio.sleep(0.01)
    raise AssertionError(f"guard status {status} never reached {wanted}")


async def freeze_then_kill(env: QemuEnv, agent: AgentProcess, op_id: str, vm_name: str,
                           **request_fields: Any
                           ) -> tuple[asyncio.Task[pb.UpdateResult], list[pb.OperationEvent]]:
    """Start an update through the client library; freeze the agent as soon as it reports
    STOPPING (the migrate command is already on its way to QEMU), wait until the guard has
    exec'd the new QEMU, then SIGKILL the agent. QEMU and the guard carry on without it."""
    client = await agent.client()
    seen: list[pb.OperationEvent] = []
    frozen = asyncio.Event()

    def on_event(event: pb.OperationEvent) -> None:
        seen.append(event)
        if event.progress.phase == pb.PHASE_STOPPING and not frozen.is_set():
            os.kill(agent.pid, signal.SIGSTOP)
            frozen.set()

    request = update_request(env, op_id, vm_name, **request_fields)
    waiting = asyncio.create_task(client.update(request, on_event=on_event, timeout=600))
    await asyncio.wait_for(frozen.wait(), 120)
    await guard_phase(agent.runtime_dir / "ops" / op_id / "guard.status",
                      {guard.PHASE_WATCHING}, 30)
    os.kill(agent.pid, signal.SIGKILL)
    await agent.kill()
    return waiting, seen


async def test_killed_agent_commits_the_update_after_restart(qemu_env: QemuEnv) -> None:
    vm = await qemu_env.vm("crash")
    pid = vm.pid
    mark = time.monotonic_ns()
    agent = await qemu_env.agent()
    waiting, seen = await freeze_then_kill(qemu_env, agent, "op-crash", "crash")
    # The new QEMU loaded the state and waits paused for a commit nobody sends.
    assert await vm.query_status() == "paused"
    assert not waiting.done()  # the client keeps trying to reattach

    await agent.start()  # the same host, the same configuration
    result = await asyncio.wait_for(waiting, 300)
    assert result.outcome == pb.OUTCOME_UPDATED, result.message
    assert result.pid_before == result.pid_after == pid
    assert result.mode == pb.MODE_CPR_EXEC
    check_stream(seen, "op-crash")  # every event once, the numbering unbroken by the restart
    assert pb.PHASE_STOPPING in phases(seen) and phases(seen)[-2:] == [pb.PHASE_RESUMED,
                                                                       pb.PHASE_FINISHED]
    client = await agent.client()
    op = await client.get_operation("op-crash")
    assert op.state == pb.OPERATION_STATE_DONE and op.resolved_after_restart
    assert op.result == result
    status = guard.read_status(agent.runtime_dir / "ops" / "op-crash" / "guard.status")
    assert status is not None and status["phase"] == guard.PHASE_COMMITTED

    assert await vm.query_status() == "running" and vm.pid == pid
    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=30)
    vm.serial.assert_continuous(since=mark)
    # Asking again returns the recorded operation.
    again = await client.update(update_request(qemu_env, "op-crash", "crash"), timeout=60)
    assert again == result


async def test_killed_agent_records_the_guards_rollback(qemu_env: QemuEnv) -> None:
    vm = await qemu_env.vm("rollback")
    pid = vm.pid
    mark = time.monotonic_ns()
    agent = await qemu_env.agent()
    timeouts = pb.Timeouts(guard_commit_seconds=2)
    waiting, seen = await freeze_then_kill(qemu_env, agent, "op-rb", "rollback",
                                           timeouts=timeouts)
    # No commit comes: the guard rolls back to the old QEMU on the preserved state.
    status = await guard_phase(agent.runtime_dir / "ops" / "op-rb" / "guard.status",
                               {guard.PHASE_ROLLED_BACK, guard.PHASE_ROLLBACK_FAILED}, 60)
    assert status["phase"] == guard.PHASE_ROLLED_BACK, status

    await agent.start()
    result = await asyncio.wait_for(waiting, 300)
    assert result.outcome == pb.OUTCOME_ROLLED_BACK, result.message
    assert "no commit came within the guard's timeout" in result.message
    assert result.pid_before == pid and result.pid_after == status["qemu_pid"] != pid
    client = await agent.client()
    op = await client.get_operation("op-rb")
    assert op.resolved_after_restart and op.result == result
    check_stream(seen, "op-rb")
    assert phases(seen)[-1] == pb.PHASE_RECOVERED

    assert await vm.query_status() == "running" and vm.pid == status["qemu_pid"]
    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=30)
    vm.serial.assert_continuous(since=mark)
