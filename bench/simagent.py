"""A simulated node agent for the fleet benchmark: a gRPC server of the real NodeAgent API
(`vmupdate.agent.v1`, the generated stubs), behind the real agent's mutual TLS and client
allowlist (`vmupdate_agent.tls`), that runs no QEMU. It lists VMs it makes up, and an
Update replays measured phase timings (from a `bench` pause record) as progress events,
then a result; chosen VMs fail. Operations are journaled by id as the real agent does:
the same id again follows the recorded operation and never runs twice.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer

from vmupdate_agent.authz import AuthorizationInterceptor, Role, role_table
from vmupdate_agent.config import TlsConfig
from vmupdate_agent.tls import CertificateFiles
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_api.gen import agent_v1_pb2_grpc as pb_grpc

SERVICE_NAME = "vmupdate.agent.v1.NodeAgent"
MODE_PB = {"cpr-exec": pb.MODE_CPR_EXEC, "cpr-transfer": pb.MODE_CPR_TRANSFER,
           "cpr-reboot": pb.MODE_CPR_REBOOT}
PHASE_PB = {"accepted": pb.PHASE_ACCEPTED, "preflight": pb.PHASE_PREFLIGHT,
            "stopping": pb.PHASE_STOPPING, "saved": pb.PHASE_SAVED,
            "execed": pb.PHASE_EXECED, "transferred": pb.PHASE_TRANSFERRED,
            "resumed": pb.PHASE_RESUMED, "verified": pb.PHASE_VERIFIED}
# The phase each phase_ms key is opened by ("start" is before the first event).
REPLAYED = ("start", "accepted", "preflight", "stopping", "execed", "transferred", "saved",
            "resumed", "verified")


@dataclass(frozen=True)
class Replay:
    """What an update looks like: (phase, ms spent after its event), the pause, the mode."""

    mode: str = "cpr-exec"
    phases: tuple[tuple[str, float], ...] = (("start", 10.0), ("accepted", 30.0),
                                             ("preflight", 5.0), ("stopping", 20.0),
                                             ("execed", 45.0), ("saved", 5.0),
                                             ("resumed", 3.0))
    pause_ms: float = 59.0

    def scaled(self, factor: float) -> Replay:
        return Replay(self.mode, tuple((p, ms * factor) for p, ms in self.phases),
                      self.pause_ms * factor)


def replay_from_record(result: dict[str, Any]) -> Replay:
    """The median of each phase and of the agent's pause in one CPR case of a pause record."""
    if result.get("method") not in MODE_PB:
        raise ValueError(f"not a CPR case: {result.get('method')!r}")
    runs: list[dict[str, float]] = result["phase_ms"]
    pauses = result["series"]["agent_pause_ms"]
    if not runs or not pauses:
        raise ValueError(f"{result['method']}: the record has no agent rounds to replay")
    phases = tuple((p, statistics.median(r[p] for r in runs if p in r))
                   for p in REPLAYED if any(p in r for r in runs))
    return Replay(result["method"], phases, statistics.median(pauses))


@dataclass(frozen=True)
class Failures:
    """Which updates fail: VMs named here, and every `every`-th VM of the host (1-based)."""

    names: frozenset[str] = frozenset()
    every: int = 0

    def fails(self, index: int, name: str) -> bool:
        return name in self.names or (self.every > 0 and (index + 1) % self.every == 0)


def make_vms(node: str, count: int, *, binary: str, version: tuple[int, int, int],
             mode: str = "cpr-exec", memory_mib: int = 256) -> list[pb.VM]:
    """`count` ready VMs named `<node>-vm<i>`, all on `binary` at `version`."""
    major, minor, micro = version
    return [pb.VM(
        qmp_path=f"/run/vmupdate-sim/{node}/vm{i}.sock", pid=10_000 + i, name=f"{node}-vm{i}",
        uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"vmupdate-sim:{node}/{i}")),
        argv=[binary, "-name", f"{node}-vm{i}"], root="/", binary=binary,
        version=pb.QemuVersion(major=major, minor=minor, micro=micro),
        cpr_modes=list(MODE_PB.values()), runstate="running", machine_type="pc-q35-10.0",
        memory_bytes=memory_mib << 20, aux_ram_share=True,
        readiness=pb.Readiness(ready=True, modes=[MODE_PB[mode]]),
    ) for i in range(count)]


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


@dataclass
class _Op:
    request: pb.UpdateRequest
    vm: pb.VM
    created: Timestamp = field(default_factory=_now)
    events: list[pb.OperationEvent] = field(default_factory=list)
    done: bool = False
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


def _more(op: _Op, sent: int) -> Callable[[], bool]:
    return lambda: len(op.events) > sent or op.done


class SimAgent(pb_grpc.NodeAgentServicer):
    def __init__(self, node: str, vms: Sequence[pb.VM], *, replay: Replay = Replay(),
                 failures: Failures = Failures(), target_version: tuple[int, int, int]
                 = (11, 1, 3)) -> None:
        self.node = node
        self.vms = {vm.name: vm for vm in vms}
        self.replay = replay
        self.failures = failures
        self.target_version = target_version
        self.ops: dict[str, _Op] = {}
        self.updates_run = 0
        self.failed_at_ns: list[int] = []  # wall clock of each injected failure's result
        self._tasks: set[asyncio.Task[None]] = set()

    def _find(self, ref: str) -> tuple[int, pb.VM] | None:
        for i, vm in enumerate(self.vms.values()):
            if ref in (vm.name, vm.uuid, vm.qmp_path):
                return i, vm
        return None

    async def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.GetInfoResponse:
        return pb.GetInfoResponse(agent_version="sim", node_name=self.node,
                                  api_versions=["v1"], allowed_binary_dirs=["/"])

    async def ListVMs(self, request: pb.ListVMsRequest, context: Any) -> pb.ListVMsResponse:
        busy = {op.vm.name: op_id for op_id, op in self.ops.items() if not op.done}
        out = []
        for vm in self.vms.values():
            copy = pb.VM()
            copy.CopyFrom(vm)
            copy.busy_operation_id = busy.get(vm.name, "")
            out.append(copy)
        return pb.ListVMsResponse(vms=out)

    async def Preflight(self, request: pb.PreflightRequest, context: Any
                        ) -> pb.PreflightResponse:
        found = self._find(request.vm)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"vm: {request.vm} is not listed")
            raise AssertionError("unreachable: abort raises")
        return pb.PreflightResponse(report=pb.PreflightReport(
            vm=found[1].name, target=request.target.binary, mode=MODE_PB[self.replay.mode],
            mode_reason="simulated", passed=True,
            checks=[pb.CheckResult(name="simulated", passed=True, message="no checks run")]))

    async def Update(self, request: pb.UpdateRequest, context: Any
                     ) -> AsyncIterator[pb.OperationEvent]:
        op = self.ops.get(request.operation_id)
        if op is None:
            found = self._find(request.vm)
            if found is None:
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"vm: {request.vm} is not listed")
                raise AssertionError("unreachable: abort raises")
            if any(o.vm.name == found[1].name and not o.done for o in self.ops.values()):
                await context.abort(grpc.StatusCode.ABORTED,
                                    f"vm: {found[1].name} is busy with another operation")
            op = self.ops[request.operation_id] = _Op(request, found[1])
            task = asyncio.create_task(self._run(op, found[0]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        async for event in self._follow(op, 0):
            yield event

    async def WatchOperation(self, request: pb.WatchOperationRequest, context: Any
                             ) -> AsyncIterator[pb.OperationEvent]:
        op = self.ops.get(request.operation_id)
        if op is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"operation {request.operation_id} is not known here")
            raise AssertionError("unreachable: abort raises")
        async for event in self._follow(op, request.after_sequence):
            yield event

    async def GetOperation(self, request: pb.GetOperationRequest, context: Any
                           ) -> pb.Operation:
        op = self.ops.get(request.operation_id)
        if op is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"operation {request.operation_id} is not known here")
            raise AssertionError("unreachable: abort raises")
        out = pb.Operation(
            operation_id=request.operation_id, request=op.request, vm_name=op.vm.name,
            vm_uuid=op.vm.uuid, qmp_path=op.vm.qmp_path, created_at=op.created,
            state=pb.OPERATION_STATE_DONE if op.done else pb.OPERATION_STATE_RUNNING,
            events=[e.progress for e in op.events if e.HasField("progress")])
        if op.done:
            out.result.CopyFrom(op.events[-1].result)
            out.finished_at.CopyFrom(_now())
        return out

    async def _follow(self, op: _Op, after: int) -> AsyncIterator[pb.OperationEvent]:
        sent = after
        while True:
            async with op.changed:
                await op.changed.wait_for(_more(op, sent))
                batch = op.events[sent:]
                finished = op.done
            for event in batch:
                yield event
            sent += len(batch)
            if finished and sent >= len(op.events):
                return

    async def _emit(self, op: _Op, *, phase: pb.Phase | None = None, message: str = "",
                    result: pb.UpdateResult | None = None) -> None:
        async with op.changed:
            seq = len(op.events) + 1
            if result is not None:
                event = pb.OperationEvent(operation_id=op.request.operation_id, sequence=seq,
                                          result=result)
                op.done = True
            else:
                event = pb.OperationEvent(
                    operation_id=op.request.operation_id, sequence=seq,
                    progress=pb.Progress(phase=phase, time=_now(), message=message))
            op.events.append(event)
            op.changed.notify_all()

    async def _run(self, op: _Op, index: int) -> None:
        self.updates_run += 1
        vm, replay = op.vm, self.replay
        fail = self.failures.fails(index, vm.name)
        started = time.monotonic()
        phase_ms: dict[str, float] = {}
        for name, ms in replay.phases:
            if name in PHASE_PB:
                await self._emit(op, phase=PHASE_PB[name], message=f"simulated {name}")
            await asyncio.sleep(ms / 1000)
            phase_ms[name] = ms
            if fail and name == "stopping":
                break
        phase_ms["total"] = round((time.monotonic() - started) * 1000, 3)
        before = f"{vm.version.major}.{vm.version.minor}.{vm.version.micro}"
        result = pb.UpdateResult(vm=vm.name, mode=MODE_PB[replay.mode], pid_before=vm.pid,
                                 pid_after=vm.pid, version_before=before, phase_ms=phase_ms,
                                 mode_reason="simulated")
        if fail:
            result.outcome = pb.OUTCOME_FAILED
            result.message = "injected failure: the old QEMU runs on"
            result.version_after = before
            await self._emit(op, phase=pb.PHASE_FAILED, message=result.message)
            self.failed_at_ns.append(time.time_ns())
        else:
            major, minor, micro = self.target_version
            vm.binary = op.request.target.binary
            vm.argv[0] = op.request.target.binary
            vm.version.CopyFrom(pb.QemuVersion(major=major, minor=minor, micro=micro))
            result.outcome = pb.OUTCOME_UPDATED
            result.message = f"simulated update to {op.request.target.binary}"
            result.version_after = f"{major}.{minor}.{micro}"
            result.pause_ms = replay.pause_ms
            budget = op.request.pause_budget_ms
            result.pause_budget_exceeded = bool(budget and replay.pause_ms > budget)
            await self._emit(op, phase=pb.PHASE_FINISHED, message=result.message)
        await self._emit(op, result=result)


async def serve(agent: SimAgent, tls: TlsConfig, allowlist: Sequence[str], *,
                address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """Start `agent` on `address` with the real agent's mTLS and authorization, `allowlist`
    holding the operator role; (server, port)."""
    roles = role_table({Role.OPERATOR: list(allowlist)})
    server = grpc.aio.server(interceptors=[AuthorizationInterceptor(roles)])
    pb_grpc.add_NodeAgentServicer_to_server(agent, server)
    health = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_secure_port(address, CertificateFiles(tls).server_credentials())
    await server.start()
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port
