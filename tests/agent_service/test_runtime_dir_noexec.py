"""runtime_dir on a noexec mount: QEMU must exec the guard from there (cpr-exec) and every
update runs the pinned copy of its target from there, so a noexec mount would fail an exec
in the middle of an update. It is refused before: at the agent's start, and (a mount
changed later, or another view in the VM's root) by preflight and by the update itself
before the guest is stopped, with an error that names runtime_dir, noexec and the fix."""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from pathlib import Path

import pytest

from tests.agent_service.conftest import QemuEnv
from tests.agent_service.harness import AgentFactory, op_workdirs
from tests.agent_service.test_update import update_request
from tests.agent_service.tmpfs import Mounts, mounts
from vmupdate_api.gen import agent_v1_pb2 as pb

pytestmark = pytest.mark.qemu


def assert_names_the_fix(message: str, runtime_dir: Path) -> None:
    assert f"runtime_dir: {runtime_dir} is on a noexec mount" in message, message
    assert "without noexec" in message and "remount,exec" in message, message


async def test_the_agent_refuses_to_start_on_a_noexec_runtime_dir(
        agents: AgentFactory, empty_globs: list[str]) -> None:
    with mounts() as m:
        # Short: the runtime dir's sockets must fit in sun_path.
        parent = m.tmpfs(Path("/tmp") / f"vmu-nx-{secrets.token_hex(3)}",
                         "size=16m,noexec,mode=0755")
        agent = agents.make(socket_globs=empty_globs, runtime_parent=parent)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vmupdate_agent.server", "--config", str(agent.config_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2, (out, err)
        assert_names_the_fix(err.decode(), agent.runtime_dir)
        # Nothing was installed there (no guard, no pinned copies).
        assert not (agent.runtime_dir / "bin").exists()


def shared_noexec_parent(env: QemuEnv, m: Mounts) -> Path:
    """A fresh tmpfs under the rig's share, also mounted at the same path inside the sid root
    (where the VMs' QEMU runs), as a runtime dir must be."""
    host = env.rig.share / "at" / f"nx-{secrets.token_hex(3)}"
    m.tmpfs(host, "size=256m,mode=0755")
    root = env.rig.sid.root
    assert root is not None
    m.bind(host, root / str(host).lstrip("/"))
    return host


async def test_a_runtime_dir_remounted_noexec_is_refused_before_the_guest_stops(
        qemu_env: QemuEnv) -> None:
    with mounts() as m:
        parent = shared_noexec_parent(qemu_env, m)
        vm = await qemu_env.vm("noexec")
        pid, token = vm.pid, vm.token
        agent = await qemu_env.agent(runtime_parent=parent)
        client = await agent.client()
        # The agent started on an exec mount; now both views (the agent's and the VM root's)
        # become noexec, as a host's changed fstab would do after a reboot of the agent alone.
        root = qemu_env.rig.sid.root
        assert root is not None
        Mounts.remount(parent, "noexec")
        Mounts.remount(root / str(parent).lstrip("/"), "noexec")

        report = await client.preflight(pb.PreflightRequest(
            vm="noexec", target=pb.Target(binary=qemu_env.sid_binary,
                                          expected_version=qemu_env.rig.sid.version),
            mode=pb.MODE_CPR_EXEC))
        assert not report.passed
        failed = {c.name: c.message for c in report.checks if not c.passed}
        assert list(failed) == ["runtime-dir-exec"], failed
        assert_names_the_fix(failed["runtime-dir-exec"], agent.runtime_dir)

        mark = time.monotonic_ns()
        for mode in (pb.MODE_CPR_EXEC, pb.MODE_CPR_TRANSFER):
            result = await client.update(update_request(
                qemu_env, f"op-noexec-{mode}", "noexec", mode=mode), timeout=300)
            assert result.outcome == pb.OUTCOME_FAILED, result.message
            assert_names_the_fix(result.message, agent.runtime_dir)
            assert "nothing was changed" in result.message
            assert result.pid_after == pid and result.pause_ms == 0
        # Nothing was run or copied there, and the guest never stopped.
        assert op_workdirs(agent) == []
        assert not (agent.runtime_dir / "vmupdate-pinned").exists()
        await vm.serial.wait_ticks(10, after=mark, timeout=30)
        vm.serial.assert_continuous(since=mark)
        assert vm.pid == pid and vm.token == token
        assert await vm.query_status() == "running"
        blackout = vm.serial.max_gap_ms(since=mark)
        print(f"\nFAULT-ROW runtime_dir-noexec outcome=FAILED (refused before the guest "
              f"stopped) max_blackout_ms={blackout:.0f}")

        # Back on an exec mount, the same VM updates.
        Mounts.remount(parent, "exec")
        Mounts.remount(root / str(parent).lstrip("/"), "exec")
        result = await client.update(update_request(qemu_env, "op-exec", "noexec"),
                                     timeout=300)
        assert result.outcome == pb.OUTCOME_UPDATED, result.message
        await agent.stop()
