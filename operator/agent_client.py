"""The operator's typed async client of a node agent (vmupdate.agent.v1.NodeAgent).

- One mTLS channel per agent, credentials read from files (the operator's client
  certificate and the CA that signed the agents' serving certificates).
- Every call has a deadline. Calls that fail with UNAVAILABLE (agent restarting, network
  blip) are retried with capped exponential backoff: every unary RPC of the API is a read
  or idempotent, so a retry cannot do anything twice.
- `update()` survives a broken stream: it reattaches with WatchOperation from the last event
  it saw, and resends the Update only when the agent does not know the operation (the first
  request never arrived) — safe because the operation id makes Update idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_api.gen import agent_v1_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "vmupdate.agent.v1.NodeAgent"
API_VERSIONS = ("v1",)
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# A stream may also end this way when the agent stops while it is open; reading it again
# (WatchOperation) is always safe.
STREAM_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})

Req = TypeVar("Req")
Resp = TypeVar("Resp")
EventCallback = Callable[[pb.OperationEvent], Awaitable[None] | None]


class AgentError(Exception):
    """A call to an agent failed for good; `code` is the gRPC status."""

    def __init__(self, target: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"agent {target}: {code.name}: {details}")
        self.target = target
        self.code = code
        self.details = details


@dataclass(frozen=True)
class ClientTls:
    ca_file: str  # the CA that signs the agents' serving certificates
    cert_file: str  # the operator's client certificate (its identity is allowlisted)
    key_file: str
    # The name to check the agent's certificate against, when it differs from the host in
    # the target (e.g. dialing by IP a certificate issued for the node name).
    server_name: str | None = None

    def read(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_file).read_bytes(),
            private_key=Path(self.key_file).read_bytes(),
            certificate_chain=Path(self.cert_file).read_bytes())


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # per unary call, the first included
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        """Sleeps between attempts, with jitter so many clients do not retry in lockstep."""
        delay = self.initial_backoff_s
        while True:
            yield delay * random.uniform(0.5, 1.0)
            delay = min(delay * self.multiplier, self.max_backoff_s)


def pick_api_version(offered: Sequence[str], supported: Sequence[str] = API_VERSIONS
                     ) -> str | None:
    """The newest API version both sides speak ("v2" > "v1")."""
    common = [v for v in supported if v in offered]
    return max(common, key=lambda v: int(v.lstrip("v") or 0), default=None)


class AgentClient:
    def __init__(self, target: str, channel: grpc.aio.Channel, *, timeout: float = 30.0,
                 retry: RetryPolicy | None = None) -> None:
        self.target = target
        self.channel = channel
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.stub = pb_grpc.NodeAgentStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)

    @classmethod
    async def connect(cls, target: str, tls: ClientTls, *, timeout: float = 30.0,
                      retry: RetryPolicy | None = None) -> AgentClient:
        """A client on a new mTLS channel to `target` ("host:port"). Connects lazily."""
        credentials = await asyncio.to_thread(tls.read)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.keepalive_time_ms", 30_000),
            # Reconnect soon after an agent restart (gRPC's default backs off up to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        channel = grpc.aio.secure_channel(target, credentials, options=options)
        return cls(target, channel, timeout=timeout, retry=retry)

    async def close(self) -> None:
        await self.channel.close(None)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _error(self, exc: grpc.aio.AioRpcError) -> AgentError:
        return AgentError(self.target, exc.code(), exc.details() or "")

    async def _unary(self, call: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req,
                     timeout: float | None) -> Resp:
        deadline = time.monotonic() + (timeout or self.timeout)
        delays = self.retry.delays()
        for attempt in range(1, self.retry.attempts + 1):
            remaining = deadline - time.monotonic()
            try:
                return await call(request, timeout=max(remaining, 0.001))
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.retry.attempts:
                    raise self._error(exc) from exc
                pause = next(delays)
                if time.monotonic() + pause >= deadline:
                    raise self._error(exc) from exc
                log.debug("%s: %s, retrying in %.2fs", self.target, exc.code().name, pause)
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    # --- the API ----------------------------------------------------------------------------

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the agent's health check says SERVING (retrying while it cannot answer)."""
        deadline = time.monotonic() + timeout
        delays = self.retry.delays()
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentError(self.target, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"not ready within {timeout:.0f}s ({last})")
            try:
                # wait_for_ready: wait for the channel to connect within this attempt
                # instead of failing at once while it backs off.
                answer = await self._health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                    timeout=min(remaining, 5.0), wait_for_ready=True)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    raise self._error(exc) from exc  # waiting does not help
                last = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(min(next(delays), max(deadline - time.monotonic(), 0)))

    async def get_info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        return await self._unary(self.stub.GetInfo, pb.GetInfoRequest(), timeout)

    async def negotiate(self, *, timeout: float | None = None) -> str:
        """The API version to use with this agent; AgentError if there is none in common."""
        info = await self.get_info(timeout=timeout)
        version = pick_api_version(info.api_versions)
        if version is None:
            raise AgentError(self.target, grpc.StatusCode.FAILED_PRECONDITION,
                             f"agent {info.agent_version} speaks {list(info.api_versions)}, "
                             f"this client {list(API_VERSIONS)}")
        return version

    async def list_vms(self, *, timeout: float | None = None) -> pb.ListVMsResponse:
        return await self._unary(self.stub.ListVMs, pb.ListVMsRequest(), timeout)

    async def preflight(self, request: pb.PreflightRequest, *, timeout: float | None = None
                        ) -> pb.PreflightReport:
        answer = await self._unary(self.stub.Preflight, request, timeout or 120.0)
        return answer.report

    async def get_operation(self, operation_id: str, *, timeout: float | None = None
                            ) -> pb.Operation:
        return await self._unary(self.stub.GetOperation,
                                 pb.GetOperationRequest(operation_id=operation_id), timeout)

    async def watch(self, operation_id: str, *, after: int = 0, timeout: float = 900.0
                    ) -> AsyncIterator[pb.OperationEvent]:
        """The operation's events after `after`, live, ending with the result (one stream)."""
        call = self.stub.WatchOperation(
            pb.WatchOperationRequest(operation_id=operation_id, after_sequence=after),
            timeout=timeout)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    async def update(self, request: pb.UpdateRequest, *, on_event: EventCallback | None = None,
                     timeout: float = 900.0) -> pb.UpdateResult:
        """Run (or follow) the update `request.operation_id` names until its result.

        `on_event` sees each event once, in order, across reattachments. Raises AgentError
        when the agent refuses the request or no result comes within `timeout`.
        """
        op_id = request.operation_id
        deadline = time.monotonic() + timeout
        seen = 0
        reattach = False
        delays = self.retry.delays()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentError(self.target, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"no result for operation {op_id} within {timeout:.0f}s "
                                 f"(last event {seen})")
            call = (self.stub.WatchOperation(
                        pb.WatchOperationRequest(operation_id=op_id, after_sequence=seen),
                        timeout=remaining)
                    if reattach else self.stub.Update(request, timeout=remaining))
            try:
                async for event in call:
                    if event.sequence <= seen:
                        continue  # a resent Update replays the operation from its start
                    seen = event.sequence
                    delays = self.retry.delays()  # progress: back off from the start again
                    if on_event is not None:
                        pending = on_event(event)
                        if pending is not None:
                            await pending
                    if event.HasField("result"):
                        return event.result
                why = "the stream ended without a result"
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if reattach and code == grpc.StatusCode.NOT_FOUND:
                    # The agent never journaled it: the first Update did not arrive.
                    reattach = False
                    continue
                if code not in STREAM_RETRYABLE:
                    raise self._error(exc) from exc
                why = f"{code.name}: {exc.details()}"
            reattach = True
            pause = min(next(delays), max(deadline - time.monotonic(), 0))
            log.info("%s: operation %s stream broke (%s); reattaching in %.2fs", self.target,
                     op_id, why, pause)
            await asyncio.sleep(pause)
