"""An agent killed in the middle of an update: the restarted agent finds the VM, finishes or
rolls back the update, records the outcome, and the client that was waiting gets it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from e2e.rig import TestVM
from e2e.rig.vm import launch_detached, qmp_peer_pid, wait_gone
from tests.agent_service.conftest import QemuEnv
from tests.agent_service.harness import AgentProcess, op_workdir
from tests.agent_service.test_update import check_stream, phases, update_request
from vmupdate_agent import guard, procfs
from vmupdate_agent.modes.common import pids_with_arg
from vmupdate_agent.qmp import QmpError, QmpSession
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


async def frozen_at(env: QemuEnv, agent: AgentProcess, op_id: str, vm_name: str,
                    phase: int | str, **request_fields: Any
                    ) -> tuple[asyncio.Task[pb.UpdateResult], list[pb.OperationEvent]]:
    """Start an update through the client library and freeze the agent (SIGSTOP) as soon as
    it reports `phase`: it gets no further than a few ms past it. A `phase` that is a fault
    point's name (the agent started with it in `stop_at`): the agent stops itself there.
    Returns the client's waiting call (it reattaches to a restarted agent) and the events
    it saw."""
    client = await agent.client()
    seen: list[pb.OperationEvent] = []
    if isinstance(phase, str):
        assert phase in agent.stop_at, (phase, agent.stop_at)
        request = update_request(env, op_id, vm_name, **request_fields)
        waiting = asyncio.create_task(client.update(request, on_event=seen.append,
                                                    timeout=600))
        await agent.stopped_itself()
        return waiting, seen
    frozen = asyncio.Event()

    def on_event(event: pb.OperationEvent) -> None:
        seen.append(event)
        if event.progress.phase == phase and not frozen.is_set():
            os.kill(agent.pid, signal.SIGSTOP)
            frozen.set()

    request = update_request(env, op_id, vm_name, **request_fields)
    waiting = asyncio.create_task(client.update(request, on_event=on_event, timeout=600))
    await asyncio.wait_for(frozen.wait(), 120)
    return waiting, seen


async def kill_keeper(agent: AgentProcess, op_id: str) -> None:
    """SIGKILL the operation's keeper (cpr-transfer, cpr-reboot), as a host that lost it
    would: then only a restarted agent can resolve the operation."""
    status = guard.read_status(op_workdir(agent, op_id) / "keeper.status")
    assert status is not None and status["phase"] == guard.KEEPER_WATCHING, status
    os.kill(status["keeper_pid"], signal.SIGKILL)
    # A zombie until the agent (its subreaper, frozen now) reaps it.
    deadline = time.monotonic() + 30
    while procfs.alive(status["keeper_pid"]):
        assert time.monotonic() < deadline, "the keeper did not die"
        await asyncio.sleep(0.01)


async def test_hung_agent_gets_the_guards_rollback_recorded(qemu_env: QemuEnv) -> None:
    """The agent hangs (alive, so its watcher waits) after the exec: no commit comes, the
    guard rolls back after its timeout; the agent killed and restarted records that."""
    vm = await qemu_env.vm("rollback")
    pid = vm.pid
    mark = time.monotonic_ns()
    agent = await qemu_env.agent()
    timeouts = pb.Timeouts(guard_commit_seconds=2)
    waiting, seen = await frozen_at(qemu_env, agent, "op-rb", "rollback", pb.PHASE_STOPPING,
                                    timeouts=timeouts)
    status = await guard_phase(op_workdir(agent, "op-rb") / "guard.status",
                               {guard.PHASE_ROLLED_BACK, guard.PHASE_ROLLBACK_FAILED}, 60)
    assert status["phase"] == guard.PHASE_ROLLED_BACK, status
    assert status["reason"] == "commit-timeout", status
    os.kill(agent.pid, signal.SIGKILL)
    await agent.kill()

    await agent.start()
    result = await asyncio.wait_for(waiting, 300)
    assert result.outcome == pb.OUTCOME_ROLLED_BACK, result.message
    assert "no commit came within the guard's timeout" in result.message
    assert result.pid_before == pid and result.pid_after == status["qemu_pid"] != pid
    assert result.pause_ms >= 2000  # the guest waited for the commit timeout
    client = await agent.client()
    op = await client.get_operation("op-rb")
    assert op.resolved_after_restart and op.result == result
    check_stream(seen, "op-rb")
    assert phases(seen)[-1] == pb.PHASE_RECOVERED

    assert await vm.query_status() == "running" and vm.pid == status["qemu_pid"]
    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=30)
    vm.serial.assert_continuous(since=mark)


@dataclass
class RebootCut:
    """A cpr-reboot whose agent was killed after the old QEMU quit."""

    agent: AgentProcess
    waiting: asyncio.Task[pb.UpdateResult]
    seen: list[pb.OperationEvent]
    workdir: Path
    new_pid: int | None  # the new QEMU waiting for the state, if one was left running


async def cut_a_reboot_after_the_quit(env: QemuEnv, vm: TestVM, *, start_new: bool
                                      ) -> RebootCut:
    """Freeze the agent as soon as it reports the state saved, then bring the host to where
    the agent would have been a moment later: the new QEMU up on its own socket, waiting for
    the state (the agent may have started it just before it froze), or no new QEMU at all
    (`start_new=False`: it died, or the agent died before starting it); and the old QEMU
    quit. Its keeper is lost too, or it would have resumed the old QEMU."""
    agent = await env.agent()
    waiting, seen = await frozen_at(env, agent, "op-reboot", vm.name, pb.PHASE_SAVED,
                                    mode=pb.MODE_CPR_REBOOT)
    workdir = op_workdir(agent, "op-reboot")
    temp_qmp = workdir / "qmp.sock"
    await asyncio.sleep(1.0)  # a new QEMU the agent launched as it froze shows up by now
    await kill_keeper(agent, "op-reboot")
    os.kill(agent.pid, signal.SIGKILL)
    await agent.kill()
    new_pid = None
    if start_new:
        if not pids_with_arg(str(temp_qmp)):
            args = [a.replace(str(vm.qmp_path), str(temp_qmp)) for a in vm.args]
            await launch_detached([env.sid_binary, *args, "-S", "-incoming", "defer"],
                                  cwd=workdir, log_path=workdir / "started-by-test.log")
        new_pid = await wait_listening(temp_qmp, 30)
    else:
        # (The agent, a subreaper, would have reaped it: it had to go first.)
        for pid in pids_with_arg(str(temp_qmp)):
            os.kill(pid, signal.SIGKILL)
            await wait_gone(pid, 30)
    old_pid = vm.pid
    old = await QmpSession.open(str(vm.qmp_path))
    with contextlib.suppress(QmpError):  # the connection may drop before the answer
        await old.cmd("quit")
    await old.close()
    await wait_gone(old_pid, 30)
    if new_pid is not None:
        logs = {f.name: f.read_text(errors="replace")[-800:] for f in workdir.glob("*.log")}
        assert procfs.alive(new_pid), f"the new QEMU died with the old one: {logs}"
    return RebootCut(agent, waiting, seen, workdir, new_pid)


@pytest.mark.parametrize("socket_moved", [False, True],
                         ids=["new-qemu-on-its-own-socket", "new-qemu-on-the-vms-socket"])
async def test_killed_agent_finishes_a_cpr_reboot_after_the_old_qemu_quit(
        qemu_env: QemuEnv, socket_moved: bool) -> None:
    """Only the saved state and the RAM file hold the VM now. The restarted agent gives the
    state to the new QEMU waiting for it (never stops it: nothing else can run the VM now)
    and resumes the guest where it was."""
    vm = await qemu_env.vm("reboot", backend="file")
    pid, token = vm.pid, vm.token
    mark = time.monotonic_ns()
    cut = await cut_a_reboot_after_the_quit(qemu_env, vm, start_new=True)
    if socket_moved:  # the agent hands the VM's socket path over right after the quit
        (cut.workdir / "qmp.sock").replace(vm.qmp_path)

    await cut.agent.start()
    result = await asyncio.wait_for(cut.waiting, 300)
    assert result.outcome == pb.OUTCOME_UPDATED, result.message
    assert result.mode == pb.MODE_CPR_REBOOT
    assert result.pid_before == pid and result.pid_after == cut.new_pid
    check_stream(cut.seen, "op-reboot")
    client = await cut.agent.client()
    op = await client.get_operation("op-reboot")
    assert op.resolved_after_restart and op.result == result

    assert await vm.query_status() == "running" and vm.pid == cut.new_pid
    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=30)
    assert vm.token == token
    vm.serial.assert_continuous(since=mark)
    # An ordinary QEMU again: the next update (cpr-exec) is not refused over x-ignore-shared.
    again = await client.update(update_request(qemu_env, "op-after", "reboot"), timeout=120)
    assert again.outcome == pb.OUTCOME_UPDATED, again.message


async def test_a_reboot_cut_with_no_new_qemu_is_lost_and_says_how_to_restart_it(
        qemu_env: QemuEnv) -> None:
    """No QEMU runs the VM and the agent cannot start one in the VM's context any more (it
    held that context through the old process): reported lost, loudly, with the way back;
    following it brings the guest back where it was."""
    vm = await qemu_env.vm("reboot", backend="file")
    token = vm.token
    mark = time.monotonic_ns()
    cut = await cut_a_reboot_after_the_quit(qemu_env, vm, start_new=False)

    await cut.agent.start()
    result = await asyncio.wait_for(cut.waiting, 300)
    assert result.outcome == pb.OUTCOME_LOST, result.message
    state = cut.workdir / "state"
    assert f"migrate-incoming file:{state}" in result.message, result.message

    await launch_detached([qemu_env.sid_binary, *vm.args, "-incoming", "defer"],
                          cwd=vm.workdir, log_path=vm.workdir / "by-hand.log")
    new_pid = await wait_listening(vm.qmp_path, 30)
    by_hand = await QmpSession.open(str(vm.qmp_path))
    try:
        await by_hand.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        await by_hand.cmd("migrate-set-parameters", {"mode": "cpr-reboot"})
        await by_hand.cmd("migrate-incoming", {"uri": f"file:{state}"})
    finally:
        await by_hand.close()
    assert vm.pid == new_pid
    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=30)
    assert vm.token == token
    vm.serial.assert_continuous(since=mark)


async def killed_at(env: QemuEnv, vm: TestVM, op_id: str, phase: int | str,
                    **request_fields: Any) -> tuple[AgentProcess, asyncio.Task[pb.UpdateResult],
                                                    list[pb.OperationEvent]]:
    """Start an update, SIGKILL the agent as soon as it reports `phase` (or stops itself at
    that fault point), and its keeper before it (so that the restarted agent finds the host
    as the dead one left it)."""
    agent = await env.agent(stop_at=(phase,) if isinstance(phase, str) else ())
    waiting, seen = await frozen_at(env, agent, op_id, vm.name, phase, **request_fields)
    await kill_keeper(agent, op_id)
    os.kill(agent.pid, signal.SIGKILL)
    await agent.kill()
    return agent, waiting, seen


async def test_killed_agent_resumes_the_old_qemu_when_the_transfer_target_never_ran(
        qemu_env: QemuEnv) -> None:
    """Killed once the state was handed over, before the new QEMU was resumed: the guest
    never ran there, so the target is stopped and the old QEMU continues."""
    vm = await qemu_env.vm("transfer")
    pid, token = vm.pid, vm.token
    mark = time.monotonic_ns()
    # TRANSFERRED is reported after the resume: the agent stops itself where it was.
    agent, waiting, seen = await killed_at(qemu_env, vm, "op-tr", "cpr-transfer:transferred",
                                           mode=pb.MODE_CPR_TRANSFER)
    target_qmp = op_workdir(agent, "op-tr") / "qmp.sock"
    targets = pids_with_arg(str(target_qmp))
    assert len(targets) == 1, targets

    await agent.start()
    result = await asyncio.wait_for(waiting, 300)
    assert result.outcome == pb.OUTCOME_FAILED, result.message
    assert "not updated" in result.message and result.pid_after == pid
    check_stream(seen, "op-tr")
    await wait_gone(targets[0], 30)
    assert await vm.query_status() == "running" and vm.pid == pid
    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=30)
    assert vm.token == token
    vm.serial.assert_continuous(since=mark)


async def test_killed_agent_adopts_the_transfer_target_that_runs_the_guest(
        qemu_env: QemuEnv) -> None:
    """Killed after the new QEMU was resumed, before the old one was quit: the guest runs in
    the new one, so the old one is quit and the new one takes over the VM's socket."""
    vm = await qemu_env.vm("transfer")
    pid, token = vm.pid, vm.token
    mark = time.monotonic_ns()
    # Stopped by its fault point right after the resume (a freeze on the RESUMED event may
    # land after the agent quit the old QEMU and dismissed the keeper).
    agent, waiting, seen = await killed_at(qemu_env, vm, "op-tr", "cpr-transfer:resumed",
                                           mode=pb.MODE_CPR_TRANSFER)

    await agent.start()
    result = await asyncio.wait_for(waiting, 300)
    assert result.outcome == pb.OUTCOME_UPDATED, result.message
    assert result.pid_before == pid and result.pid_after not in (0, pid)
    check_stream(seen, "op-tr")
    await wait_gone(pid, 30)
    assert await vm.query_status() == "running" and vm.pid == result.pid_after
    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=30)
    assert vm.token == token
    vm.serial.assert_continuous(since=mark)


async def wait_listening(qmp_path: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (peer := qmp_peer_pid(qmp_path)) is None:
        assert time.monotonic() < deadline, f"nobody listens on {qmp_path}"
        await asyncio.sleep(0.01)
    return peer
