"""The guard's watcher killed before the commit (an OOM kill, a mistaken `kill`): nothing can
roll back any more, and the new QEMU has loaded the state and passed its checks. The agent,
finding no watcher at its commit, resumes the guest in it and says so, rather than leaving
the guest paused until the operation times out. Real QEMU; the agent is its own process and
stops itself just after the exec, while the test kills the watcher."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tests.agent_service.conftest import QemuEnv
from tests.agent_service.harness import op_workdir
from tests.agent_service.test_restart import frozen_at
from tests.agent_service.test_update import check_stream
from vmupdate_agent import guard, procfs
from vmupdate_api.gen import agent_v1_pb2 as pb

pytestmark = pytest.mark.qemu


async def test_the_guest_is_resumed_when_the_watcher_died_before_the_commit(
        qemu_env: QemuEnv) -> None:
    vm = await qemu_env.vm("wdeath")
    pid, token = vm.pid, vm.token
    agent = await qemu_env.agent(stop_at=("cpr-exec:execed",))
    mark = time.monotonic_ns()
    waiting, seen = await frozen_at(qemu_env, agent, "op-wdeath", "wdeath", "cpr-exec:execed",
                                    mode=pb.MODE_CPR_EXEC)
    status_path = op_workdir(agent, "op-wdeath") / "guard.status"
    try:
        status = await asyncio.to_thread(guard.wait_status, status_path,
                                         frozenset({guard.PHASE_WATCHING}), timeout=30)
        watcher = int(status["watcher_pid"])
        assert watcher != pid
        os.kill(watcher, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while procfs.alive(watcher):
            assert time.monotonic() < deadline, "the watcher survived SIGKILL"
            await asyncio.sleep(0.01)
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    result = await asyncio.wait_for(waiting, 120)
    assert result.outcome == pb.OUTCOME_UPDATED, result.message
    assert "watcher was gone before the commit" in result.message, result.message
    assert result.pid_after == pid == vm.pid
    assert result.version_after == qemu_env.rig.sid.version
    assert 0 < result.pause_ms < 60_000
    check_stream(seen, "op-wdeath")
    assert await vm.query_status() == "running"
    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=30)
    vm.serial.assert_continuous(since=mark)
    assert vm.token == token  # the same guest, not rebooted
    # the guard's status was left as the watcher last wrote it
    assert (guard.read_status(status_path) or {}).get("phase") == guard.PHASE_WATCHING
