"""Every bad request is refused with the status and a message naming the field, and leaves
nothing behind (no journal entry, no work folder)."""

from __future__ import annotations

import math
from typing import Any

import grpc
import grpc.aio
import pytest

from tests.agent_service.harness import AgentFactory, journal_files, op_workdirs
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator.agent_client import AgentClient, AgentError, RetryPolicy

INVALID = grpc.StatusCode.INVALID_ARGUMENT
GOOD_TARGET: dict[str, Any] = {"binary": "/nonexistent/allowed/qemu-system-x86_64"}


def update(**fields: Any) -> pb.UpdateRequest:
    base: dict[str, Any] = {"operation_id": "op-1", "vm": "vm1", "target": GOOD_TARGET,
                            "mode": pb.MODE_AUTO}
    base.update(fields)
    target = base.pop("target")
    timeouts = base.pop("timeouts", None)
    request = pb.UpdateRequest(**base)
    if target is not None:
        request.target.CopyFrom(pb.Target(**target))
    if timeouts is not None:
        request.timeouts.CopyFrom(pb.Timeouts(**timeouts))
    return request


# (request, status, words the message must contain)
UPDATE_CASES: list[tuple[str, pb.UpdateRequest, grpc.StatusCode, tuple[str, ...]]] = [
    ("no operation id", update(operation_id=""), INVALID, ("operation_id: is empty",)),
    ("operation id with a path", update(operation_id="../../etc/x"), INVALID,
     ("operation_id:", "[A-Za-z0-9._-]")),
    ("operation id too long", update(operation_id="a" * 129), INVALID, ("operation_id:",)),
    ("no vm", update(vm=""), INVALID, ("vm: is empty",)),
    ("no target", update(target=None), INVALID, ("target: is required",)),
    ("empty binary", update(target={"binary": ""}), INVALID, ("target.binary: is empty",)),
    ("relative binary", update(target={"binary": "bin/qemu"}), INVALID,
     ("target.binary: must be an absolute path", "'bin/qemu'")),
    ("binary with ..", update(target={"binary": "/nonexistent/allowed/../../bin/sh"}), INVALID,
     ("target.binary: must not contain '..'",)),
    ("binary too long", update(target={"binary": "/" + "a" * 5000}), INVALID,
     ("target.binary: is 5001 characters long",)),
    ("binary with control characters", update(target={"binary": "/a\nb"}), INVALID,
     ("target.binary: contains control characters",)),
    ("bad sha256", update(target={**GOOD_TARGET, "sha256": "abc"}), INVALID,
     ("target.sha256: must be 64 hexadecimal digits",)),
    ("too many extra args",
     update(target={**GOOD_TARGET, "extra_args": ["-msg", "timestamp=on"] * 33}), INVALID,
     ("target.extra_args",)),
    ("mode unset", update(mode=pb.MODE_UNSPECIFIED), INVALID, ("mode: must be set",)),
    ("unknown mode", update(mode=42), INVALID, ("mode: unknown mode 42", "MODE_CPR_EXEC")),
    ("negative timeout", update(timeouts={"handover_seconds": -1}), INVALID,
     ("timeouts.handover_seconds:", "greater than 0")),
    ("huge timeout", update(timeouts={"load_seconds": 1e9}), INVALID,
     ("timeouts.load_seconds:", "less than or equal to 600")),
    ("NaN timeout", update(timeouts={"guard_commit_seconds": math.nan}), INVALID,
     ("timeouts.guard_commit_seconds:", "finite")),
    ("command timeout too long", update(timeouts={"qmp_command_seconds": 601}), INVALID,
     ("timeouts.qmp_command_seconds:",)),
    ("pause budget too large", update(pause_budget_ms=600_001), INVALID,
     ("pause_budget_ms:", "600000")),
    ("two bad fields", update(vm="", mode=9), INVALID, ("vm: is empty", "mode: unknown mode 9")),
    ("binary outside the allowed directories", update(target={"binary": "/usr/bin/qemu"}),
     grpc.StatusCode.PERMISSION_DENIED,
     ("target.binary: /usr/bin/qemu is outside the directories this host allows",
      "/nonexistent/allowed")),
    ("unknown VM", update(vm="ghost"), grpc.StatusCode.NOT_FOUND,
     ("vm: no VM 'ghost' on this host",)),
    ("a socket the agent does not manage", update(vm="/run/other/qmp.sock"),
     grpc.StatusCode.NOT_FOUND, ("vm: /run/other/qmp.sock is not the QMP socket",)),
]


async def refused_update(client: AgentClient, request: pb.UpdateRequest
                         ) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for event in client.stub.Update(request, timeout=30):
            raise AssertionError(f"got an event for a bad request: {event}")
    return err.value


async def test_bad_updates_are_refused_and_leave_nothing(agents: AgentFactory,
                                                         empty_globs: list[str]) -> None:
    agent = await agents.start(socket_globs=empty_globs)
    client = await agent.client()
    failures = []
    for name, request, code, words in UPDATE_CASES:
        err = await refused_update(client, request)
        details = err.details() or ""
        if err.code() != code or not all(w in details for w in words):
            failures.append(f"{name}: got {err.code().name} {details!r}, want {code.name} "
                            f"with {words}")
    assert not failures, "\n".join(failures)
    assert journal_files(agent) == []
    assert op_workdirs(agent) == []


async def test_oversized_message_is_refused(agents: AgentFactory,
                                            empty_globs: list[str]) -> None:
    agent = await agents.start(socket_globs=empty_globs)
    client = await agent.client()
    # Over the agent's max_receive_message_length: refused by gRPC before it is parsed.
    huge = update(target={**GOOD_TARGET, "extra_args": ["x" * (2 << 20)]})
    err = await refused_update(client, huge)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (err.details() or "")
    # Just under it, a too-long field is named by the validation.
    long_arg = update(target={**GOOD_TARGET, "extra_args": ["x" * 5000]})
    err = await refused_update(client, long_arg)
    assert err.code() == INVALID
    assert "target.extra_args: [0] is longer than 4096" in (err.details() or "")
    assert journal_files(agent) == [] and op_workdirs(agent) == []


async def test_bad_preflights_and_lookups_are_refused(agents: AgentFactory,
                                                      empty_globs: list[str]) -> None:
    agent = await agents.start(socket_globs=empty_globs)
    client = await agent.client(retry=RetryPolicy(attempts=1))

    async def refused(call: Any) -> AgentError:
        with pytest.raises(AgentError) as err:
            await call
        return err.value

    cases = [
        (pb.PreflightRequest(vm="vm1", mode=pb.MODE_AUTO), INVALID, "target: is required"),
        (pb.PreflightRequest(vm="vm1", target=pb.Target(binary="qemu"), mode=pb.MODE_AUTO),
         INVALID, "target.binary: must be an absolute path"),
        (pb.PreflightRequest(vm="vm1", target=pb.Target(binary="/nonexistent/allowed/q"),
                             mode=7), INVALID, "mode: unknown mode 7"),
        (pb.PreflightRequest(vm="", target=pb.Target(binary="/nonexistent/allowed/q"),
                             mode=pb.MODE_AUTO), INVALID, "vm: is empty"),
        # Preflight runs the binary (probe, dry run): the allowed directories apply.
        (pb.PreflightRequest(vm="vm1", target=pb.Target(binary="/bin/sh"), mode=pb.MODE_AUTO),
         grpc.StatusCode.PERMISSION_DENIED, "target.binary: /bin/sh is outside"),
        (pb.PreflightRequest(vm="ghost", target=pb.Target(binary="/nonexistent/allowed/q"),
                             mode=pb.MODE_AUTO), grpc.StatusCode.NOT_FOUND, "vm: no VM 'ghost'"),
    ]
    for request, code, words in cases:
        err = await refused(client.preflight(request))
        assert (err.code, words in err.details) == (code, True), (request, err)

    err = await refused(client.get_operation("nope"))
    assert err.code == grpc.StatusCode.NOT_FOUND and "operation_id: no operation nope" in \
        err.details
    err = await refused(client.get_operation("../x"))
    assert err.code == INVALID and err.details.startswith("operation_id:")
    with pytest.raises(AgentError) as watch_err:
        async for _ in client.watch("nope", timeout=10):
            pass
    assert watch_err.value.code == grpc.StatusCode.NOT_FOUND
    assert journal_files(agent) == [] and op_workdirs(agent) == []
