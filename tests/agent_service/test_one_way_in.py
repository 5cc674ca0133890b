"""One way in: the CLI and the gRPC service share admission, the VM's lock, the journal and
recovery (real QEMU, the agent service as its own process, the CLI as its own process).
A little over 450 lines on purpose: the CLI and service processes these tests share.

- A CLI update and a gRPC update started at once on one VM: exactly one runs, the other is
  refused naming it (operation id, program, pid); the guest runs on, continuous.
- A CLI update SIGKILLed after the exec (cpr-exec) or the transfer (cpr-transfer): the guard's
  watcher or the keeper brings the guest back, and the next CLI run (or a starting service)
  resolves the journaled operation, says what it found, and then runs its own update (a new
  id) or shows the recorded one (the same id).
- The CLI's binary checks are the service's: the same path rule and the same pinned copy.

The rows of docs/faults.md's section on the CLI come from here (`-s` prints `FAULT-ROW`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest

from e2e.rig import TestVM
from tests.agent_service.conftest import QemuEnv
from tests.agent_service.harness import AgentProcess, op_workdir
from tests.agent_service.test_update import check_stream, update_request
from vmupdate_agent import faultpoints, procfs, vmlock
from vmupdate_agent.journal import Journal, OperationState
from vmupdate_agent.models import Outcome
from vmupdate_api.gen import agent_v1_pb2 as pb

pytestmark = pytest.mark.qemu

CLI = [sys.executable, "-m", "vmupdate_agent.cli"]
BACK_WITHIN_S = 2.0
EXIT_BUSY = 5


@dataclass
class CliRun:
    rc: int
    out: str
    err: str
    pid: int


async def run_cli(agent: AgentProcess, *args: str, timeout: float = 300) -> CliRun:
    """`vmupdate-agent --config <the agent's configuration> ARGS`: the same state dir (journal,
    locks) and runtime dir as the service, as on a host."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, "--config", str(agent.config_path), *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return CliRun(proc.returncode or 0, out.decode(), err.decode(), proc.pid)


def cli_update_args(env: QemuEnv, vm: str, op_id: str, mode: str = "cpr-exec") -> list[str]:
    return ["update", vm, "--binary", env.sid_binary, "--version", env.rig.sid.version,
            "--mode", mode, "--op-id", op_id]


async def grpc_update(agent: AgentProcess, request: pb.UpdateRequest
                      ) -> list[pb.OperationEvent] | grpc.aio.AioRpcError:
    client = await agent.client()
    try:
        return [e async for e in client.stub.Update(request, timeout=300)]
    except grpc.aio.AioRpcError as exc:
        return exc


async def settled(vm: TestVM, mark: int) -> None:
    """The guest runs, prints on, and never lost a line or its boot token since `mark`."""
    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=60)
    vm.serial.assert_continuous(since=mark)
    assert await vm.query_status() == "running"


async def test_a_cli_update_and_a_grpc_update_racing_for_one_vm(qemu_env: QemuEnv) -> None:
    vm = await qemu_env.vm("race")
    token = vm.token
    agent = await qemu_env.agent()
    mark = time.monotonic_ns()
    winners: list[str] = []
    lock_file = vmlock.lock_path(agent.state_dir, str(vm.qmp_path))
    # Both at once: the gRPC request leaves the moment the CLI first touches the VM (its
    # probe takes the VM's lock; the CLI needs about a second to start before that), plus
    # a few ms more in some rounds, so that either may take the VM first.
    for i, extra_s in enumerate((0.0, 0.0, 0.005, 0.010, 0.020, 0.040)):
        cli_id, grpc_id = f"cli-race-{i}", f"grpc-race-{i}"
        started = time.monotonic_ns()
        proc = await asyncio.create_subprocess_exec(
            *CLI, "--config", str(agent.config_path), "--json",
            *cli_update_args(qemu_env, "race", cli_id), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        cli_done = asyncio.create_task(proc.communicate())
        deadline = time.monotonic() + 60
        while True:
            holder = await asyncio.to_thread(vmlock.read_holder, lock_file)
            if holder is not None and holder.pid == proc.pid:
                break
            assert time.monotonic() < deadline and not cli_done.done(), "the CLI never came"
            await asyncio.sleep(0.001)
        await asyncio.sleep(extra_s)
        by_grpc = await grpc_update(agent, update_request(qemu_env, grpc_id, "race"))
        out, err = await asyncio.wait_for(cli_done, 300)
        cli = CliRun(proc.returncode or 0, out.decode(), err.decode(), proc.pid)
        if isinstance(by_grpc, grpc.aio.AioRpcError):
            # The CLI ran; the service refused, naming the CLI's operation, program and pid.
            assert cli.rc == 0, cli.err
            assert json.loads(cli.out)["outcome"] == "updated"
            assert by_grpc.code() == grpc.StatusCode.FAILED_PRECONDITION, by_grpc.details()
            details = by_grpc.details() or ""
            assert f"vm: race is busy: operation {cli_id} (update by vmupdate-agent update, " \
                   f"pid {cli.pid})" in details, details
            winners.append("cli")
        else:
            # The service ran; the CLI was refused (exit 5), naming the service's operation.
            result = check_stream(by_grpc, grpc_id)
            assert result.outcome == pb.OUTCOME_UPDATED, result.message
            assert cli.rc == EXIT_BUSY, (cli.rc, cli.out, cli.err)
            assert f"refused: vm: race is busy: operation {grpc_id}" in cli.err
            assert f"(update by the agent service, pid {agent.pid})" in cli.err \
                or f"operation {grpc_id} has been running on it" in cli.err, cli.err
            assert cli.out == ""
            winners.append("grpc")
        # The loser left nothing: no journal record, no work folder.
        loser = grpc_id if winners[-1] == "cli" else cli_id
        assert not (agent.state_dir / "operations" / f"{loser}.json").exists()
        assert not op_workdir(agent, loser).exists()
        await settled(vm, mark)
        print(f"\nFAULT-ROW cli-vs-grpc round={i} extra_ms={extra_s * 1000:.0f} "
              f"winner={winners[-1]} "
              f"max_blackout_ms={vm.serial.max_gap_ms(since=started):.0f}")
    assert vm.token == token
    journal = Journal(agent.state_dir)
    records, bad = journal.records()
    assert not bad
    assert all(r.state == OperationState.DONE for r in records)
    assert len(records) == 6  # one update per round, never two
    print(f"\nFAULT-ROW cli-vs-grpc winners={','.join(winners)} "
          f"max_blackout_ms={vm.serial.max_gap_ms(since=mark):.0f}")


async def test_a_busy_vm_is_refused_both_ways(qemu_env: QemuEnv) -> None:
    """Not left to timing: each side holds the VM, frozen (SIGSTOP) right after it accepted
    the update (the guest still runs), while the other asks for it."""
    vm = await qemu_env.vm("busy")
    agent = await qemu_env.agent()
    mark = time.monotonic_ns()
    # The service runs an update; the CLI's update and preflight are refused meanwhile.
    client = await agent.client()
    accepted = asyncio.Event()
    events: list[pb.OperationEvent] = []

    async def by_grpc() -> None:
        async for event in client.stub.Update(update_request(qemu_env, "op-svc", "busy"),
                                              timeout=300):
            if not accepted.is_set():
                os.kill(agent.pid, signal.SIGSTOP)
            events.append(event)
            accepted.set()

    running = asyncio.create_task(by_grpc())
    await asyncio.wait_for(accepted.wait(), 60)
    try:
        cli = await run_cli(agent, *cli_update_args(qemu_env, "busy", "op-cli"))
        pre = await run_cli(agent, "preflight", "busy", "--binary", qemu_env.sid_binary)
        inventory = await run_cli(agent, "inventory")
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    # The inventory does not probe a VM in the middle of an operation: it says who has it.
    assert inventory.rc == 0, inventory.err
    assert f"{vm.qmp_path}: cannot inspect: busy: {vm.qmp_path}: operation op-svc (update by " \
           f"the agent service, pid {agent.pid})" in inventory.out, inventory.out
    assert cli.rc == EXIT_BUSY, (cli.rc, cli.out, cli.err)
    assert "refused: vm: busy is busy: operation op-svc" in cli.err
    assert f"(update by the agent service, pid {agent.pid})" in cli.err, cli.err
    assert pre.rc == EXIT_BUSY and "operation op-svc" in pre.err, pre.err
    await asyncio.wait_for(running, 300)
    assert events[-1].result.outcome == pb.OUTCOME_UPDATED
    assert not (agent.state_dir / "operations" / "op-cli.json").exists()

    # The CLI runs an update; the service refuses Update and Preflight, and lists the VM busy.
    proc = await asyncio.create_subprocess_exec(
        *CLI, "--config", str(agent.config_path), *cli_update_args(qemu_env, "busy", "op-cli"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert line.split()[0] == b"accepted", line
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in client.stub.Update(update_request(qemu_env, "op-svc2", vm.uuid),
                                              timeout=60):
                pass
        with pytest.raises(grpc.aio.AioRpcError) as refused_pre:
            await client.stub.Preflight(pb.PreflightRequest(
                vm="busy", target=pb.Target(binary=qemu_env.sid_binary), mode=pb.MODE_AUTO),
                timeout=60)
        listed = await client.list_vms()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (f"vm: busy is busy: operation op-cli (update by vmupdate-agent update, "
            f"pid {proc.pid})") in (refused.value.details() or "")
    assert refused_pre.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Listed as last seen, not ready, with the CLI's operation: not left out, which the
    # operator would take for a VM gone.
    assert list(listed.unreachable) == []
    [busy] = [v for v in listed.vms if v.qmp_path == str(vm.qmp_path)]
    assert busy.busy_operation_id == "op-cli" and not busy.readiness.ready
    assert "busy: " in busy.readiness.reasons[0] and "op-cli" in busy.readiness.reasons[0]
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, (out, err)
    # GetOperation reads the CLI's journaled operation: one journal for both.
    op = await client.get_operation("op-cli")
    assert op.state == pb.OPERATION_STATE_DONE and op.result.outcome == pb.OUTCOME_UPDATED
    assert not (agent.state_dir / "operations" / "op-svc2.json").exists()
    await settled(vm, mark)


@dataclass
class KilledCli:
    pid: int
    killed_ns: int
    back_ms: float
    seen: list[str]


async def kill_cli_at(env: QemuEnv, agent: AgentProcess, vm: TestVM, op_id: str, mode: str,
                      point: str) -> KilledCli:
    """Run a CLI update that stops itself at the fault `point` (vmupdate_agent.faultpoints:
    the events inside the pause are printed only after it) and SIGKILL it there; then wait
    for the guest to print again, with no agent anywhere."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, "--config", str(agent.config_path), *cli_update_args(env, vm.name, op_id, mode),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, faultpoints.ENV: point})
    assert proc.stdout is not None and proc.stderr is not None
    seen: list[str] = []

    async def read_lines() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            seen.append(line.decode().split()[0])

    reader = asyncio.create_task(read_lines())
    try:
        deadline = time.monotonic() + 120
        while procfs.stat_state(proc.pid) != "T":
            if proc.returncode is not None or time.monotonic() > deadline:
                err = await proc.stderr.read()
                raise AssertionError(f"the CLI did not stop at {point}: {seen} {err.decode()}")
            await asyncio.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic_ns()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(reader, 10)
    first = await vm.serial.wait_ticks(1, after=killed, timeout=30)
    back_ms = (first.t_ns - killed) / 1e6
    assert back_ms <= BACK_WITHIN_S * 1000, f"the guest ran again {back_ms:.0f} ms after"
    return KilledCli(proc.pid, killed, back_ms, seen)


@pytest.mark.parametrize(("mode", "phase", "outcome"), [
    ("cpr-exec", "cpr-exec:execed", Outcome.ROLLED_BACK),
    ("cpr-transfer", "cpr-transfer:transferred", Outcome.FAILED),
], ids=["cpr_exec-at-execed", "cpr_transfer-at-transferred"])
async def test_a_killed_cli_update_is_resolved_by_the_next_cli_run(
        qemu_env: QemuEnv, mode: str, phase: str, outcome: Outcome) -> None:
    vm = await qemu_env.vm("killed", backend="memfd")
    token = vm.token
    agent = qemu_env.make_agent()  # its configuration only: no service runs
    mark = time.monotonic_ns()
    killed = await kill_cli_at(qemu_env, agent, vm, "op-killed", mode, phase)
    journal = Journal(agent.state_dir)
    left = journal.load("op-killed")
    assert left is not None and left.state == OperationState.RUNNING

    # The same id again: the earlier operation is resolved first, then its recorded result
    # is what this run shows (the id names one update forever).
    again = await run_cli(agent, "--json", *cli_update_args(qemu_env, "killed", "op-killed",
                                                            mode))
    assert (f"vmupdate-agent: operation op-killed on killed was left running by a process "
            f"that stopped; resolved: {outcome.value}") in again.err, again.err
    shown = json.loads(again.out)
    assert shown["outcome"] == outcome.value
    assert again.rc == {Outcome.ROLLED_BACK: 3, Outcome.FAILED: 1}[outcome]
    record = journal.load("op-killed")
    assert record is not None and record.state == OperationState.DONE
    assert record.resolved_after_restart and record.result is not None
    assert record.result.outcome == outcome
    if outcome == Outcome.ROLLED_BACK:
        assert record.result.pause_ms is not None and record.result.pause_ms > 0
    await settled(vm, mark)

    # A new id: the update proceeds.
    new = await run_cli(agent, "--json", *cli_update_args(qemu_env, "killed", "op-next",
                                                          mode))
    assert new.rc == 0, new.err
    result = json.loads(new.out)
    assert result["outcome"] == "updated" and result["version_after"] == \
        qemu_env.rig.sid.version
    assert "left running" not in new.err
    await settled(vm, mark)
    assert vm.token == token
    blackout = vm.serial.max_gap_ms(since=mark)
    print(f"\nFAULT-ROW killed-cli-{mode}-at-{phase.split(':')[1]} outcome={outcome.value} "
          f"back_after_kill_ms={killed.back_ms:.0f} max_blackout_ms={blackout:.0f} "
          f"reported_pause_ms={record.result.pause_ms or 0:.0f} rerun_rc={again.rc} "
          f"next_update={result['outcome']}")


async def test_a_killed_cli_update_is_resolved_by_a_starting_service(
        qemu_env: QemuEnv) -> None:
    vm = await qemu_env.vm("svc")
    agent = qemu_env.make_agent()
    mark = time.monotonic_ns()
    killed = await kill_cli_at(qemu_env, agent, vm, "op-cli-svc", "cpr-exec",
                               "cpr-exec:execed")
    await agent.start()
    client = await agent.client()
    deadline = time.monotonic() + 120
    while (op := await client.get_operation("op-cli-svc")).state != pb.OPERATION_STATE_DONE:
        assert time.monotonic() < deadline, op
        await asyncio.sleep(0.2)
    assert op.resolved_after_restart
    assert op.result.outcome == pb.OUTCOME_ROLLED_BACK, op.result.message
    await settled(vm, mark)
    # The service then updates the VM itself.
    result = await client.update(update_request(qemu_env, "op-after", "svc"), timeout=300)
    assert result.outcome == pb.OUTCOME_UPDATED, result.message
    await settled(vm, mark)
    print(f"\nFAULT-ROW killed-cli-cpr-exec-at-execed-service-start "
          f"outcome={pb.Outcome.Name(op.result.outcome)} back_after_kill_ms={killed.back_ms:.0f} "
          f"max_blackout_ms={vm.serial.max_gap_ms(since=mark):.0f}")



async def test_a_service_starting_while_a_cli_update_runs_leaves_it_to_the_cli(
        qemu_env: QemuEnv) -> None:
    """The journal says `running`, but the CLI that runs it holds the VM: the starting service
    does not resolve it under the CLI's feet; it shows the VM busy and takes the CLI's
    result once the CLI lets go."""
    vm = await qemu_env.vm("own")
    agent = qemu_env.make_agent()
    mark = time.monotonic_ns()
    proc = await asyncio.create_subprocess_exec(
        *CLI, "--config", str(agent.config_path), *cli_update_args(qemu_env, "own", "op-own"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert line.split()[0] == b"accepted", line
        await agent.start()
        client = await agent.client()
        op = await client.get_operation("op-own")
        listed = await client.list_vms()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert op.state == pb.OPERATION_STATE_RUNNING
    assert [(v.name, v.busy_operation_id) for v in listed.vms] == [("own", "op-own")]
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, (out, err)
    deadline = time.monotonic() + 60
    while (op := await client.get_operation("op-own")).state != pb.OPERATION_STATE_DONE:
        assert time.monotonic() < deadline, op
        await asyncio.sleep(0.2)
    assert not op.resolved_after_restart and op.result.outcome == pb.OUTCOME_UPDATED
    assert "op-own on own was running when its process stopped" not in agent.log()
    await settled(vm, mark)


async def test_the_clis_binary_checks_are_the_services(qemu_env: QemuEnv) -> None:
    """The path rule (resolved in the VM's root, no writable directory on the way) and the
    pinned copy's sha256: the CLI is refused as the service is, with the same sentences,
    and the VM is not touched."""
    vm = await qemu_env.vm("pin")
    pid, mark = vm.pid, time.monotonic_ns()
    at = qemu_env.rig.share / "at"
    tag = secrets.token_hex(3)
    allowed, outside, writable = at / f"ok-{tag}", at / f"out-{tag}", at / f"gw-{tag}"
    try:
        for d in (allowed, outside, writable):
            d.mkdir(parents=True)
            shutil.copyfile(qemu_env.rig.sid.wrapper, d / "qemu")
            (d / "qemu").chmod(0o755)
        (allowed / "link").symlink_to(outside / "qemu")
        writable.chmod(0o775)
        agent = qemu_env.make_agent(allowed_binary_dirs=[
            str(allowed), str(writable), str(qemu_env.rig.sid.wrapper.parent)])
        refusals = [
            (allowed / "link", f"target.binary: {allowed / 'link'} resolves to "
                               f"{outside / 'qemu'}, outside the directories this host allows"),
            (writable / "qemu", f"target.binary: the directory {writable} is writable by"),
        ]
        for binary, words in refusals:
            for command in ("update", "preflight"):
                run = await run_cli(agent, command, "pin", "--binary", str(binary))
                assert run.rc == 1, (command, run.rc, run.err)
                assert f"vmupdate-agent: refused: {words}" in run.err, run.err
        assert not (agent.state_dir / "operations").exists() or \
            not list((agent.state_dir / "operations").iterdir())
        # sha256: checked on the private copy the update would run.
        run = await run_cli(agent, "--json", "update", "pin", "--binary", qemu_env.sid_binary,
                            "--sha256", "0" * 64, "--op-id", "op-sha")
        assert run.rc == 1, run.err
        result = json.loads(run.out)
        assert result["outcome"] == "failed" and "target.sha256:" in result["message"]
        assert "nothing was changed" in result["message"]
        assert vm.pid == pid
        await settled(vm, mark)
    finally:
        for d in (allowed, outside, writable):
            shutil.rmtree(d, ignore_errors=True)


async def test_a_preflight_and_listings_at_once_all_answer(qemu_env: QemuEnv) -> None:
    """In one process the VM's lock and its monitor are taken in one order: listings that
    come while a preflight holds the VM wait for it and then list the VM (no deadlock, no
    'busy' row for a preflight), a second preflight waits its turn too."""
    vm = await qemu_env.vm("look")
    agent = await qemu_env.agent()
    client = await agent.client()
    request = pb.PreflightRequest(vm="look", target=pb.Target(binary=qemu_env.sid_binary),
                                  mode=pb.MODE_AUTO)
    async def preflight() -> pb.PreflightResponse:
        return await client.stub.Preflight(request, timeout=120)

    async def listing() -> pb.ListVMsResponse:
        return await client.stub.ListVMs(pb.ListVMsRequest(), timeout=120)

    first = asyncio.create_task(preflight())
    await asyncio.sleep(0.3)  # the first preflight holds the VM now
    answers = await asyncio.wait_for(asyncio.gather(listing(), preflight(), listing()), 180)
    assert (await first).report.passed
    listed_a, second, listed_b = answers
    assert second.report.passed
    for listed in (listed_a, listed_b):
        assert [v.name for v in listed.vms] == ["look"] and not listed.unreachable, listed
    assert await vm.query_status() == "running"
