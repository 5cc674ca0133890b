"""The host's path rule on the real agent with a real VM: a target in a group-writable
directory, or a world-writable target file, is PERMISSION_DENIED by Update and Preflight
before anything runs, and '/' is refused as an allowed directory."""

from __future__ import annotations

import secrets
import shutil

import grpc
import grpc.aio
import pytest

from tests.agent_service.conftest import QemuEnv
from tests.agent_service.harness import journal_files
from vmupdate_agent.config import ConfigError, load
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator.agent_client import AgentError, RetryPolicy


@pytest.mark.parametrize(("dir_mode", "file_mode", "what"), [
    (0o775, 0o755, "directory"),
    (0o757, 0o755, "directory"),
    (0o755, 0o775, "file"),
    (0o755, 0o757, "file"),
], ids=["dir-group", "dir-others", "file-group", "file-others"])
async def test_writable_targets_are_refused(qemu_env: QemuEnv, dir_mode: int, file_mode: int,
                                            what: str) -> None:
    vm = await qemu_env.vm("pp")
    pid = vm.pid
    # The rig's share is visible at the same path inside the VM's root.
    bindir = qemu_env.rig.share / "at" / f"pp-{secrets.token_hex(3)}"
    bindir.mkdir(parents=True)
    try:
        binary = bindir / "qemu-system-x86_64"
        shutil.copyfile(qemu_env.rig.sid.wrapper, binary)
        binary.chmod(file_mode)
        bindir.chmod(dir_mode)
        agent = await qemu_env.agent(allowed_binary_dirs=[str(bindir)])
        client = await agent.client(retry=RetryPolicy(attempts=1))
        target = pb.Target(binary=str(binary))
        words = f"the {what} {bindir if what == 'directory' else binary} is writable by"
        with pytest.raises(AgentError) as err:
            await client.preflight(pb.PreflightRequest(vm="pp", target=target,
                                                       mode=pb.MODE_AUTO))
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED, err.value
        assert words in err.value.details and "chmod go-w" in err.value.details
        with pytest.raises(grpc.aio.AioRpcError) as rpc:
            async for _ in client.stub.Update(pb.UpdateRequest(
                    operation_id="op-pp", vm="pp", target=target, mode=pb.MODE_AUTO),
                    timeout=30):
                raise AssertionError("an update started with a writable target")
        assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert words in (rpc.value.details() or "")
        assert journal_files(agent) == []
        assert vm.pid == pid
        vm.serial.assert_continuous()
    finally:
        shutil.rmtree(bindir, ignore_errors=True)


async def test_root_is_not_an_allowed_directory(qemu_env: QemuEnv) -> None:
    agent = qemu_env.make_agent(allowed_binary_dirs=["/"])
    with pytest.raises(ConfigError, match="'/' would allow every binary on the host"):
        load(agent.config_path)
