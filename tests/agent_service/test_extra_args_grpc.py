"""The agent's request validation refuses every bad extraArgs of the shared table, on the
real gRPC server over mutual TLS: Update and Preflight answer INVALID_ARGUMENT naming
target.extra_args and the entry, and nothing is left behind (no journal, no work folder)."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from tests.agent_service.harness import AgentFactory, journal_files, op_workdirs
from tests.extra_args_cases import BAD_EXTRA_ARGS
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator.agent_client import AgentError, RetryPolicy

TARGET = "/nonexistent/allowed/qemu-system-x86_64"


async def test_every_bad_extra_args_case_is_refused(agents: AgentFactory,
                                                    empty_globs: list[str]) -> None:
    agent = await agents.start(socket_globs=empty_globs)
    client = await agent.client(retry=RetryPolicy(attempts=1))
    failures = []
    for name, args, _ in BAD_EXTRA_ARGS:
        target = pb.Target(binary=TARGET, extra_args=args)
        update = pb.UpdateRequest(operation_id=f"op-{name}", vm="vm1", target=target,
                                  mode=pb.MODE_AUTO)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for event in client.stub.Update(update, timeout=30):
                raise AssertionError(f"{name}: got an event: {event}")
        details = err.value.details() or ""
        if err.value.code() != grpc.StatusCode.INVALID_ARGUMENT \
                or "target.extra_args: [" not in details:
            failures.append(f"Update {name}: {err.value.code().name} {details!r}")
        with pytest.raises(AgentError) as perr:
            await client.preflight(pb.PreflightRequest(vm="vm1", target=target,
                                                       mode=pb.MODE_AUTO))
        if perr.value.code != grpc.StatusCode.INVALID_ARGUMENT \
                or "target.extra_args: [" not in perr.value.details:
            failures.append(f"Preflight {name}: {perr.value.code.name} {perr.value.details!r}")
    assert not failures, "\n".join(failures)
    assert journal_files(agent) == [] and op_workdirs(agent) == []


async def test_allowed_extra_args_pass_validation(agents: AgentFactory,
                                                  empty_globs: list[str]) -> None:
    """The allowlist is not a wall: an allowed pair gets past validation (to the VM lookup)."""
    agent = await agents.start(socket_globs=empty_globs)
    client = await agent.client(retry=RetryPolicy(attempts=1))
    with pytest.raises(AgentError) as err:
        await client.preflight(pb.PreflightRequest(
            vm="vm1", mode=pb.MODE_AUTO,
            target=pb.Target(binary=TARGET, extra_args=["-msg", "timestamp=on"])))
    assert err.value.code == grpc.StatusCode.NOT_FOUND, err.value.details
