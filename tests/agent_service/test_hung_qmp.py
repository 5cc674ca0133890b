"""A QMP peer that never answers: a listener that accepts and never greets, a QEMU frozen
with SIGSTOP, before and in the middle of an update.

Inventory, preflight and update time out with a message that says which socket and why
(a VM listed before is listed as last seen, not ready, rather than left out); the agent
never hangs, and other VMs are listed and updated meanwhile. A QEMU that stops
answering in the middle of an update: the update fails or finishes on the new QEMU, and
after SIGCONT the guest runs, never lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from e2e.rig import TestVM
from tests.agent_service.conftest import QemuEnv
from tests.agent_service.harness import op_workdir
from tests.agent_service.test_new_qemu_death import StateFileWatch, wait_new_qemu
from tests.agent_service.test_update import update_request
from vmupdate_agent import procfs
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator.agent_client import AgentError

pytestmark = pytest.mark.qemu

# The agent's QMP timeout in these tests (config timeouts.qmp_command_s; per update
# request qmp_command_seconds): every wait on a silent monitor ends after it.
QMP_S = 2.0


@contextlib.asynccontextmanager
async def silent_listener(path: Path) -> AsyncIterator[list[asyncio.StreamWriter]]:
    """A UNIX socket that accepts connections and never says a word."""
    path.parent.mkdir(parents=True, exist_ok=True)
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the agent gives up and closes

    server = await asyncio.start_unix_server(accept, path=str(path))
    try:
        yield held
    finally:
        server.close()
        for w in held:
            w.close()
        await server.wait_closed()


@contextlib.contextmanager
def frozen(vm: TestVM) -> Iterator[None]:
    pid = vm.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def assert_silent(error: str, path: str) -> None:
    """The error names the socket and what it did not do within the QMP timeout."""
    assert (f"QMP at {path} did not greet within {QMP_S:.1f}s" in error
            or f"QMP at {path} did not accept a connection within {QMP_S:.1f}s" in error
            ), error


def target(env: QemuEnv) -> pb.Target:
    return pb.Target(binary=env.sid_binary, expected_version=env.rig.sid.version)


async def test_a_silent_monitor_times_out_and_blocks_no_other_vm(qemu_env: QemuEnv) -> None:
    good = await qemu_env.vm("good")
    mute = await qemu_env.vm("mute")
    fake = qemu_env.vm_root / "silent" / "qmp.sock"
    agent = await qemu_env.agent(timeouts={"qmp_command_s": QMP_S})
    client = await agent.client()
    async with silent_listener(fake) as held:
        with frozen(mute):
            t0 = time.monotonic()
            listed = await client.list_vms(timeout=60)
            list_s = time.monotonic() - t0
            assert [v.name for v in listed.vms] == ["good"]
            unreachable = {u.qmp_path: u.error for u in listed.unreachable}
            assert set(unreachable) == {str(fake), mute.qmp_path.as_posix()}, unreachable
            for path, error in unreachable.items():
                assert_silent(error, path)
            assert held, "the agent never connected to the silent listener"

            # Asked for by its socket: a clear refusal, not a hang.
            for ref in (str(fake), str(mute.qmp_path)):
                t0 = time.monotonic()
                with pytest.raises(AgentError) as refused:
                    await client.preflight(pb.PreflightRequest(vm=ref, target=target(qemu_env),
                                                               mode=pb.MODE_CPR_EXEC),
                                           timeout=60)
                assert_silent(refused.value.details, ref)
                with pytest.raises(AgentError) as refused:
                    await client.update(update_request(qemu_env, f"op-{len(held)}-x", ref),
                                        timeout=60)
                assert_silent(refused.value.details, ref)
                refuse_s = time.monotonic() - t0

            # Meanwhile the good VM updates; a listing runs concurrently with it.
            mark = time.monotonic_ns()
            listing = asyncio.create_task(client.list_vms(timeout=60))
            result = await client.update(update_request(qemu_env, "op-good", "good"),
                                         timeout=300)
            assert result.outcome == pb.OUTCOME_UPDATED, result.message
            await listing
            good.serial.assert_continuous(since=mark)
    # Thawed, the frozen VM is listed again and never stopped running its guest.
    await mute.wait_ticking(timeout=30)
    assert await mute.query_status() == "running"
    assert [v.name for v in (await client.list_vms(timeout=60)).vms] == ["good", "mute"]
    # Frozen again, after a good listing: listed as last seen, not ready, and why; not left
    # out (the operator would take a VM left out for gone, and skip it).
    with frozen(mute):
        listed = await client.list_vms(timeout=60)
    assert [u.qmp_path for u in listed.unreachable] == [str(fake)], listed  # nobody there
    rows = {v.name: v for v in listed.vms}
    assert set(rows) == {"good", "mute"} and rows["good"].readiness.ready
    assert not rows["mute"].readiness.ready and rows["mute"].pid == mute.pid
    [why] = rows["mute"].readiness.reasons
    assert "its QMP monitor did not answer just now" in why
    assert_silent(why, mute.qmp_path.as_posix())
    print(f"\nFAULT-ROW qmp-silent-listener-and-frozen-qemu outcome=unreachable/refused "
          f"list_s={list_s:.1f} refuse_s={refuse_s:.1f} (qmp timeout {QMP_S:.0f}s) "
          f"other_vm=UPDATED")


MID_ROWS = [
    # (mode, the phase after which the old QEMU is frozen, outcomes)
    # Before the STOP: the agent's commands time out; nothing was sent that changes the VM.
    (pb.MODE_CPR_EXEC, pb.PHASE_PREFLIGHT, {pb.OUTCOME_FAILED}),
    # After the STOP, the state handed over: the new QEMU runs the guest; the frozen old
    # one is killed instead of quit.
    # (TRANSFERRED is reported after the resume: the agent stops itself at the fault point
    # where it was, vmupdate_agent.faultpoints.)
    (pb.MODE_CPR_TRANSFER, "cpr-transfer:transferred", {pb.OUTCOME_UPDATED}),
    # After the STOP, the state saved: the old QEMU does not quit, so it is killed; the new
    # one loads the saved state.
    (pb.MODE_CPR_REBOOT, pb.PHASE_SAVED, {pb.OUTCOME_UPDATED}),
]


def mid_id(row: tuple[int, int | str, set[int]]) -> str:
    mode, phase, _ = row
    at = (phase.split(":", 1)[1] if isinstance(phase, str)
          else pb.Phase.Name(phase).removeprefix("PHASE_").lower())
    return f"{pb.Mode.Name(mode).removeprefix('MODE_').lower()}-after-{at}"


@pytest.mark.parametrize("row", MID_ROWS, ids=[mid_id(r) for r in MID_ROWS])
async def test_a_qemu_that_stops_answering_mid_update_is_not_lost(
        qemu_env: QemuEnv, row: tuple[int, int | str, set[int]]) -> None:
    mode, phase, outcomes = row
    vm = await qemu_env.vm("hang", backend="file" if mode == pb.MODE_CPR_REBOOT else "memfd")
    pid, token = vm.pid, vm.token
    agent = await qemu_env.agent(stop_at=(phase,) if isinstance(phase, str) else ())
    client = await agent.client()
    stopped = asyncio.Event()

    def on_event(event: pb.OperationEvent) -> None:
        # The agent is frozen while the QEMU is, so the QEMU stops right at the phase.
        if event.progress.phase == phase and not stopped.is_set():
            os.kill(agent.pid, signal.SIGSTOP)
            os.kill(pid, signal.SIGSTOP)
            os.kill(agent.pid, signal.SIGCONT)
            stopped.set()

    mark = time.monotonic_ns()
    request = update_request(qemu_env, "op-hang", "hang", mode=mode,
                             timeouts=pb.Timeouts(qmp_command_seconds=QMP_S))
    waiting = asyncio.create_task(client.update(request, on_event=on_event, timeout=300))
    try:
        if isinstance(phase, str):
            await agent.stopped_itself()
            os.kill(pid, signal.SIGSTOP)
            os.kill(agent.pid, signal.SIGCONT)
        else:
            await asyncio.wait_for(stopped.wait(), 120)
        t0 = time.monotonic()
        result = await asyncio.wait_for(waiting, 120)
        result_s = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert result.outcome in outcomes, result.message
    if result.outcome == pb.OUTCOME_FAILED:
        assert "got no answer" in result.message and f"QEMU pid {pid} hung?" in result.message
        assert result.pid_after == pid
    else:
        assert result.pid_after != pid and not procfs.alive(pid)
    # Thawed (or gone): the guest runs, continuous, in whichever QEMU the result names; the
    # old one, thawed, does not go on with anything it was told before it froze.
    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=60)
    await asyncio.sleep(1.0)
    assert vm.pid == result.pid_after
    assert await vm.query_status() == "running"
    vm.serial.assert_continuous(since=mark)
    assert vm.token == token
    blackout = vm.serial.max_gap_ms(since=mark)
    print(f"\nFAULT-ROW qmp-frozen-{mid_id(row)} outcome={pb.Outcome.Name(result.outcome)} "
          f"result_after_freeze_s={result_s:.1f} max_blackout_ms={blackout:.0f} "
          f"reported_pause_ms={result.pause_ms:.0f}")


@pytest.mark.parametrize("mode", [pb.MODE_CPR_EXEC, pb.MODE_CPR_REBOOT],
                         ids=["cpr_exec", "cpr_reboot"])
async def test_a_new_qemu_that_stops_answering_after_the_load_is_rolled_back(
        qemu_env: QemuEnv, mode: int) -> None:
    """The new QEMU loads the state and freezes before the guest runs in it: the agent's
    next QMP call times out, and the old QEMU takes over at once (cpr-exec: the watcher is
    told to abort, kills it and execs the old binary; cpr-reboot: the agent kills it and
    starts the old binary on the saved state), not after the guard's commit timeout."""
    vm = await qemu_env.vm("hangnew",
                           backend="file" if mode == pb.MODE_CPR_REBOOT else "memfd")
    pid, token = vm.pid, vm.token
    agent = await qemu_env.agent()
    client = await agent.client()
    workdir = op_workdir(agent, "op-hangnew")
    watch = StateFileWatch(workdir, agent.pid)
    mark = time.monotonic_ns()
    request = update_request(qemu_env, "op-hangnew", "hangnew", mode=mode,
                             timeouts=pb.Timeouts(qmp_command_seconds=QMP_S,
                                                  guard_commit_seconds=60))
    waiting = asyncio.create_task(client.update(request, timeout=300))
    new_pid = 0
    try:
        assert await asyncio.to_thread(watch.loaded.wait, 120), "no load was seen"
        new_pid = await wait_new_qemu(vm, workdir, mode, pid, listening=False, timeout=5)
        os.kill(new_pid, signal.SIGSTOP)
        frozen_at = time.monotonic_ns()
    finally:
        watch.close()
        os.kill(agent.pid, signal.SIGCONT)
    result = await asyncio.wait_for(waiting, 120)
    result_s = (time.monotonic_ns() - frozen_at) / 1e9
    with contextlib.suppress(ProcessLookupError):
        os.kill(new_pid, signal.SIGCONT)
    assert result.outcome == pb.OUTCOME_ROLLED_BACK, result.message
    assert not procfs.alive(new_pid)
    # Well before the guard's commit timeout (60 s here): a few QMP timeouts at most.
    assert result_s < 6 * QMP_S, result_s
    first = await vm.serial.wait_ticks(1, after=frozen_at, timeout=30)
    await vm.serial.wait_ticks(20, after=first.t_ns, timeout=30)
    assert vm.pid == result.pid_after
    assert await vm.query_status() == "running"
    vm.serial.assert_continuous(since=mark)
    assert vm.token == token
    blackout = vm.serial.max_gap_ms(since=mark)
    print(f"\nFAULT-ROW qmp-new-qemu-frozen-after-load-"
          f"{pb.Mode.Name(mode).removeprefix('MODE_').lower()} "
          f"outcome={pb.Outcome.Name(result.outcome)} result_after_freeze_s={result_s:.1f} "
          f"back_after_freeze_ms={(first.t_ns - frozen_at) / 1e6:.0f} "
          f"max_blackout_ms={blackout:.0f} reported_pause_ms={result.pause_ms:.0f}")
