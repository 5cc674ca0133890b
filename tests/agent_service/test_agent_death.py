"""No paused guest without an agent: the agent SIGKILLed at each phase of each mode.

Without a restart, the guest must run again within 2 s of the kill, measured from the serial
line: for cpr-exec the guard's watcher notices its agent is gone (a pidfd) and rolls back or,
after the commit, resumes; for cpr-transfer and cpr-reboot the keeper (the guard binary
started in the VM's host context before the guest stops) stops the new QEMU and continues
the old one, or finishes the handover when the guest already runs in the new one. Then the
agent is restarted and must record the outcome, with the guest's pause. The rows of the
fault table in docs/faults.md come from here (`-s` prints them).

The VM runs in a cgroup of its own, not the agent's: the keeper must live there too (it
outlives the agent's pod only if it is not in the agent's cgroup), and so must whichever
QEMU runs the guest at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.agent_service.conftest import QemuEnv
from tests.agent_service.harness import AgentProcess, op_workdir
from tests.agent_service.test_restart import frozen_at
from tests.agent_service.test_update import check_stream
from vmupdate_agent import guard, hostexec
from vmupdate_api.gen import agent_v1_pb2 as pb

pytestmark = pytest.mark.qemu

# The bound: the guest runs again this soon after its agent died.
BACK_WITHIN_S = 2.0

UPDATED, FAILED, ROLLED_BACK = pb.OUTCOME_UPDATED, pb.OUTCOME_FAILED, pb.OUTCOME_ROLLED_BACK
# A row's "phase" may be one of the agent's fault points (vmupdate_agent.faultpoints), where
# it stops itself and is killed: the events inside the pause (EXECED, TRANSFERRED) are
# reported only after it, and after cpr-exec's commit the `cont` is a fraction of a ms away.
ROWS = [
    # (mode, phase the agent is killed at, outcomes it may end with)
    # STOPPING is reported just before `migrate` is sent: the kill may land either side.
    (pb.MODE_CPR_EXEC, pb.PHASE_STOPPING, {FAILED, ROLLED_BACK}),
    (pb.MODE_CPR_EXEC, "cpr-exec:execed", {ROLLED_BACK}),
    # Killed after the commit, before the `cont`: the watcher resumes the guest in the new
    # QEMU.
    (pb.MODE_CPR_EXEC, "cpr-exec:committed", {UPDATED}),
    (pb.MODE_CPR_EXEC, pb.PHASE_RESUMED, {UPDATED}),
    (pb.MODE_CPR_TRANSFER, pb.PHASE_STOPPING, {FAILED}),
    (pb.MODE_CPR_TRANSFER, "cpr-transfer:transferred", {FAILED}),
    (pb.MODE_CPR_TRANSFER, pb.PHASE_RESUMED, {UPDATED}),
    (pb.MODE_CPR_REBOOT, pb.PHASE_STOPPING, {FAILED}),
    # SAVED: the new QEMU is being started beside the stopped old one, which is quit next.
    (pb.MODE_CPR_REBOOT, pb.PHASE_SAVED, {FAILED, UPDATED}),
    (pb.MODE_CPR_REBOOT, pb.PHASE_RESUMED, {UPDATED}),
]


PIDS = Path("/sys/fs/cgroup/pids")


@pytest_asyncio.fixture
async def vm_cgroup() -> AsyncIterator[Path]:
    """A pids cgroup of its own for the VM. Torn down before the VMs are stopped, so whatever
    is still in it is moved back to the root cgroup first (a cgroup with processes cannot be
    removed)."""
    path = PIDS / f"vmupdate-death-{secrets.token_hex(3)}"
    path.mkdir()
    try:
        yield path
    finally:
        deadline = time.monotonic() + 30
        while True:
            pids = (path / "cgroup.procs").read_text().split()
            if not pids:
                break
            assert time.monotonic() < deadline, f"cannot empty {path}: {pids}"
            for pid in pids:
                with contextlib.suppress(OSError):  # exited meanwhile
                    (PIDS / "cgroup.procs").write_text(pid)
            await asyncio.sleep(0.05)
        path.rmdir()


def cgroups_of(pid: int) -> tuple[tuple[str, str], ...]:
    return hostexec.credentials_of(pid).cgroups


def alive(pid: int) -> bool:
    """Running, not exited (a zombie, or reaped already)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def workdir_notes(agent: AgentProcess) -> str:
    workdir = op_workdir(agent, "op-death")
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                     for f in sorted(workdir.glob("*")) if f.suffix in (".log", ".status"))


def row_id(row: tuple[int, int | str, set[int]]) -> str:
    mode, phase, _ = row
    at = (phase.split(":", 1)[1] if isinstance(phase, str)
          else pb.Phase.Name(phase).removeprefix("PHASE_").lower())
    return f"{pb.Mode.Name(mode).removeprefix('MODE_').lower()}-at-{at}"


@pytest.mark.parametrize("row", ROWS, ids=[row_id(r) for r in ROWS])
async def test_guest_runs_again_when_the_agent_dies(qemu_env: QemuEnv, vm_cgroup: Path,
                                                    row: tuple[int, int | str, set[int]]
                                                    ) -> None:
    mode, phase, outcomes = row
    vm = await qemu_env.vm("death", backend="file" if mode == pb.MODE_CPR_REBOOT else "memfd")
    pid, token = vm.pid, vm.token
    (vm_cgroup / "cgroup.procs").write_text(str(pid))
    vm_cgroups = cgroups_of(pid)
    assert ("pids", "/" + vm_cgroup.name) in [(h.split(":", 1)[1], p) for h, p in vm_cgroups]
    agent = await qemu_env.agent(stop_at=(phase,) if isinstance(phase, str) else ())
    assert cgroups_of(agent.pid) != vm_cgroups
    mark = time.monotonic_ns()
    waiting, seen = await frozen_at(qemu_env, agent, "op-death", "death", phase, mode=mode)
    keeper_cgroups = None
    if mode != pb.MODE_CPR_EXEC:
        # The keeper lives where the VM lives, not in its agent's cgroup. At RESUMED the
        # operation may be over and the keeper gone.
        keeper = guard.read_status(op_workdir(agent, "op-death") / "keeper.status") or {}
        if keeper.get("phase") == guard.KEEPER_WATCHING or phase != pb.PHASE_RESUMED:
            keeper_pid = int(keeper.get("keeper_pid", 0))
            # At RESUMED the keeper may finish between its status and its cgroups: a zombie
            # reads as the root memory cgroup on cgroup v1, so only a live one is compared.
            if phase == pb.PHASE_RESUMED:
                with contextlib.suppress(FileNotFoundError):
                    keeper_cgroups = cgroups_of(keeper_pid)
                if not alive(keeper_pid):
                    keeper_cgroups = None
            else:
                keeper_cgroups = cgroups_of(keeper_pid)
    os.kill(agent.pid, signal.SIGKILL)
    killed = time.monotonic_ns()
    await agent.kill()
    if keeper_cgroups is not None:
        assert keeper_cgroups == vm_cgroups, workdir_notes(agent)

    # No agent now. The guest must tick again within the bound.
    try:
        first = await vm.serial.wait_ticks(1, after=killed, timeout=30)
    except TimeoutError as exc:
        raise AssertionError(f"the guest stays stopped: {workdir_notes(agent)}") from exc
    back_ms = (first.t_ns - killed) / 1e6
    await vm.serial.wait_ticks(20, after=first.t_ns, timeout=30)
    blackout = vm.serial.max_gap_ms(since=mark)
    vm.serial.assert_continuous(since=mark)
    assert vm.token == token
    assert await vm.query_status() == "running"
    assert back_ms <= BACK_WITHIN_S * 1000, (
        f"the guest ran again {back_ms:.0f} ms after its agent died\n{agent.log()[-3000:]}")

    # A restarted agent records what happened, with the pause it can know.
    await agent.start()
    result = await asyncio.wait_for(waiting, 300)
    assert result.outcome in outcomes, result.message
    check_stream(seen, "op-death")
    client = await agent.client()
    op = await client.get_operation("op-death")
    assert op.state == pb.OPERATION_STATE_DONE and op.result == result
    if result.outcome == UPDATED:
        assert result.pid_after == vm.pid and result.version_after == qemu_env.rig.sid.version
    else:
        assert result.pid_after == vm.pid
    if result.outcome != FAILED or pid != vm.pid:
        assert result.pause_ms > 0, result
    assert await vm.query_status() == "running"
    assert cgroups_of(vm.pid) == vm_cgroups, "the guest left the VM's cgroup"
    print(f"\nFAULT-ROW {row_id(row)} outcome={pb.Outcome.Name(result.outcome)} "
          f"back_after_kill_ms={back_ms:.0f} max_blackout_ms={blackout:.0f} "
          f"reported_pause_ms={result.pause_ms:.0f} "
          f"restarted={op.resolved_after_restart}")
