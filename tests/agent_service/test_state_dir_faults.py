"""The agent's state dir (the operation journal) full: a small tmpfs.

Full before an update: the update is refused before anything touches the VM, with an error
that names the state dir and the fix. Full in the middle of one: the journal's writes fail,
the update goes on (the guest is stopped: this is no moment to give up), the client still
gets the result, and the guest runs; once there is room again, a restarted agent resolves
the operation from the VM itself."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from tests.agent_service.conftest import QemuEnv
from tests.agent_service.harness import op_workdirs
from tests.agent_service.test_update import update_request
from tests.agent_service.tmpfs import fill, mounts
from vmupdate_api.gen import agent_v1_pb2 as pb

pytestmark = pytest.mark.qemu


async def test_a_full_state_dir_refuses_the_update_before_the_guest_stops(
        qemu_env: QemuEnv, tmp_path: Path) -> None:
    with mounts() as m:
        small = m.tmpfs(tmp_path / "small", "size=256k,mode=0700")
        state_dir = small / "state"
        vm = await qemu_env.vm("full")
        pid, token = vm.pid, vm.token
        agent = await qemu_env.agent(state_dir=str(state_dir))
        client = await agent.client()
        filler = fill(small)
        mark = time.monotonic_ns()
        # The raw call: the client library would retry (UNAVAILABLE: room may come back).
        call = client.stub.Update(update_request(qemu_env, "op-full", "full"), timeout=60)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        message = refused.value.details() or ""
        assert f"state_dir {state_dir} is full" in message, message
        assert "free space there" in message, message
        # Nothing touched the VM: no work folder, same process, the guest never stopped.
        assert op_workdirs(agent) == []
        await vm.serial.wait_ticks(10, after=mark, timeout=30)
        vm.serial.assert_continuous(since=mark)
        assert vm.pid == pid and vm.token == token
        assert await vm.query_status() == "running"
        blackout = vm.serial.max_gap_ms(since=mark)
        print(f"\nFAULT-ROW state_dir-full-before outcome=refused "
              f"({refused.value.code().name}) max_blackout_ms={blackout:.0f}")

        # With room again, the same request goes through.
        filler.unlink()
        result = await client.update(update_request(qemu_env, "op-full", "full"), timeout=300)
        assert result.outcome == pb.OUTCOME_UPDATED, result.message


async def test_a_state_dir_that_fills_mid_update_loses_no_vm(
        qemu_env: QemuEnv, tmp_path: Path) -> None:
    with mounts() as m:
        small = m.tmpfs(tmp_path / "small", "size=256k,mode=0700")
        state_dir = small / "state"
        vm = await qemu_env.vm("fills")
        pid, token = vm.pid, vm.token
        agent = await qemu_env.agent(state_dir=str(state_dir))
        client = await agent.client()
        frozen = asyncio.Event()

        def on_event(event: pb.OperationEvent) -> None:
            # Accepted and journaled; frozen before the guest stops, filled, let go.
            if event.progress.phase == pb.PHASE_PREFLIGHT and not frozen.is_set():
                os.kill(agent.pid, signal.SIGSTOP)
                frozen.set()

        mark = time.monotonic_ns()
        waiting = asyncio.create_task(client.update(
            update_request(qemu_env, "op-fills", "fills"), on_event=on_event, timeout=300))
        await asyncio.wait_for(frozen.wait(), 120)
        filler = fill(small)
        os.kill(agent.pid, signal.SIGCONT)
        result = await asyncio.wait_for(waiting, 300)
        assert result.outcome == pb.OUTCOME_UPDATED, result.message
        assert "not journaled" in agent.log()
        await vm.serial.wait_ticks(10, after=mark, timeout=30)
        vm.serial.assert_continuous(since=mark)
        assert vm.pid == pid and vm.token == token
        assert await vm.query_status() == "running"
        blackout = vm.serial.max_gap_ms(since=mark)
        print(f"\nFAULT-ROW state_dir-fills-mid-update outcome="
              f"{pb.Outcome.Name(result.outcome)} max_blackout_ms={blackout:.0f} "
              f"reported_pause_ms={result.pause_ms:.0f}")

        # The journal still says RUNNING (its result could not be written). With room again,
        # a restarted agent resolves it from the VM: updated, the guest running.
        filler.unlink()
        await agent.stop()
        await agent.start()
        client = await agent.client()
        deadline = time.monotonic() + 120
        while (op := await client.get_operation("op-fills")).state != pb.OPERATION_STATE_DONE:
            assert time.monotonic() < deadline, op
            await asyncio.sleep(0.2)
        assert op.result.outcome == pb.OUTCOME_UPDATED, op.result.message
        assert op.resolved_after_restart
        assert await vm.query_status() == "running"
