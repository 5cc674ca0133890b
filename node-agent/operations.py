"""Operations: admission, per-VM locks, live operations, journal writes and recovery at start.

The gRPC edge is servicer.py; the recovery I/O is recovery_io.py.

- Requests arrive validated into specs (servicer.py, convert.py); nothing is looked up,
  journaled or started for a request that fails validation.
- The binary a request names must lie under the host's allowed directories (pathpolicy's
  rule, called directly), checked here on every Preflight and Update before the engine runs
  anything (also through symlinks inside the VM's root), whatever the engine's own checks say.
- One operation per VM at a time; an operation id names one update forever: the same id
  again follows the journaled operation instead of starting a second one.
- An operation that was running when the agent died is resolved at start-up: the VM is found
  at its QMP socket, the guard's status says how far cpr-exec got, and the VM is finished,
  rolled back or resumed — never left paused — and the outcome journaled
  (`recovery.decide_recovery` holds the decisions, `recovery_io.resolve` the I/O).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from vmupdate_agent import discovery, pathpolicy, preflight, procfs, recovery_io
from vmupdate_agent.config import AgentConfig
from vmupdate_agent.convert import (
    event_to_pb,
    vm_to_pb,
)
from vmupdate_agent.engine import Engine, EngineSettings
from vmupdate_agent.journal import Journal, JournalError, OperationRecord, OperationState
from vmupdate_agent.live import LiveOperation
from vmupdate_agent.models import (
    Outcome,
    Phase,
    PreflightReport,
    ProgressEvent,
    UpdateResult,
    VMInfo,
)
from vmupdate_agent.modes.common import (
    Timeouts,
    UpdateAborted,
)
from vmupdate_agent.qmp import QmpError
from vmupdate_agent.specs import PreflightSpec, UpdateSpec
from vmupdate_api.gen import agent_v1_pb2 as pb

log = logging.getLogger(__name__)

# Waiting for another user of a VM's QMP monitor (a probe, a preflight) to finish.
SOCKET_WAIT_S = 60.0
# Waiting for other admissions (each probes VMs with its own deadlines).
ADMISSION_WAIT_S = 120.0
# Phases after which the engine may have changed the VM.
TOUCHING_PHASES = frozenset({Phase.STOPPING, Phase.SAVED, Phase.EXECED, Phase.TRANSFERRED,
                             Phase.RESUMED, Phase.VERIFIED})


class Refused(Exception):
    """A request the agent will not serve, with the gRPC status to say so."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- pure decisions -------------------------------------------------------------------------


def timeouts_for(spec: UpdateSpec, base: Timeouts) -> Timeouts:
    t = spec.timeouts
    return Timeouts(command=t.qmp_command_seconds or base.command,
                    handover=t.handover_seconds or base.handover,
                    load=t.load_seconds or base.load,
                    guard_commit=t.guard_commit_seconds or base.guard_commit)


def unchanged_result(vm: VMInfo, message: str) -> UpdateResult:
    """The result of an update that never touched the VM."""
    version = str(vm.features.version)
    return UpdateResult(vm=vm.name, outcome=Outcome.FAILED, mode=None, message=message,
                        pid_before=vm.pid, pid_after=vm.pid, version_before=version,
                        version_after=version)


def vm_matches(vm: VMInfo, ref: str) -> bool:
    return ref in (vm.name, vm.uuid, vm.qmp_path)


# --- I/O helpers ----------------------------------------------------------------------------


# --- operations -----------------------------------------------------------------------------


OperationBody = Callable[[LiveOperation], Awaitable[None]]


class Operations:
    """Admission, running, recovery and following of this agent's operations."""

    def __init__(self, config: AgentConfig, journal: Journal, settings: EngineSettings) -> None:
        self.config = config
        self.journal = journal
        self.settings = settings
        self._live: dict[str, LiveOperation] = {}
        self._admission = asyncio.Lock()
        self._sockets: dict[str, asyncio.Lock] = {}
        # VM uuid -> QMP socket, from the last probes: an update by uuid probes one VM. Names
        # are not cached: they need not be unique, and a request by name must see them all.
        self._known: dict[str, str] = {}
        self._accepting = True

    # --- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the journal and resolve the operations a previous agent left running."""
        await asyncio.to_thread(self.journal.open)
        removed = await asyncio.to_thread(self.journal.prune)
        if removed:
            log.info("pruned %d old operation records", len(removed))
        records, bad = await asyncio.to_thread(self.journal.records)
        for message in bad:
            log.error("journal: %s", message)
        for record in records:
            if record.state == OperationState.RUNNING:
                log.warning("operation %s on %s was running when the agent stopped; "
                            "resolving it", record.operation_id, record.vm.name)
                self._launch(LiveOperation(record, self.journal), self._recover)

    @property
    def running(self) -> list[str]:
        return [op_id for op_id, live in self._live.items() if live.result is None]

    async def drain(self, timeout: float) -> bool:
        """Refuse new operations and wait for the running ones; False if some still run."""
        self._accepting = False
        tasks = [live.task for live in self._live.values() if live.task is not None]
        if not tasks:
            return True
        log.info("waiting up to %.0fs for %d running operation(s)", timeout, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    # --- VMs --------------------------------------------------------------------------------

    def _socket(self, path: str) -> asyncio.Lock:
        return self._sockets.setdefault(path, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _holding(self, path: str, what: str) -> AsyncIterator[None]:
        """Exclusive use of a VM's QMP monitor (QEMU serves one client at a time)."""
        lock = self._socket(path)
        try:
            await asyncio.wait_for(lock.acquire(), SOCKET_WAIT_S)
        except TimeoutError:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          f"the QMP monitor {path} stayed in use for {SOCKET_WAIT_S:.0f}s; "
                          f"could not {what}") from None
        try:
            yield
        finally:
            lock.release()

    async def _probe(self, path: str) -> tuple[VMInfo, discovery.RawFacts]:
        async with self._holding(path, "probe the VM"):
            info, raw = await discovery.discover(path, timeout=self.settings.timeouts.command)
        if info.uuid:
            self._known[info.uuid] = path
        return info, raw

    def _busy_with(self, ref: str) -> LiveOperation | None:
        for live in self._live.values():
            if live.result is None and vm_matches(live.vm, ref):
                return live
        return None

    def _busy_paths(self) -> dict[str, LiveOperation]:
        return {live.vm.qmp_path: live for live in self._live.values() if live.result is None}

    async def _sockets_found(self) -> list[str]:
        return await asyncio.to_thread(discovery.find_sockets, self.config.socket_globs)

    async def resolve_vm(self, ref: str) -> VMInfo:
        """The VM a request names (name, uuid or QMP socket), probed now; it must be idle."""
        if ref.startswith("/"):
            ref = os.path.normpath(ref)
        busy = self._busy_with(ref)
        if busy is not None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, _busy_message(busy))
        sockets = await self._sockets_found()
        if ref.startswith("/"):
            if ref not in sockets:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"vm: {ref} is not the QMP socket of a "
                              "VM this agent manages (see ListVMs)")
            return await self._find(ref, [ref])
        cached = self._known.get(ref)
        if cached in sockets:
            with contextlib.suppress(Refused):
                return await self._find(ref, [cached])
            self._known.pop(ref, None)  # renamed or gone since: look at every VM
        return await self._find(ref, sockets)

    async def _find(self, ref: str, candidates: list[str]) -> VMInfo:
        busy_paths = self._busy_paths()
        candidates = [c for c in candidates if c not in busy_paths]
        probed = await asyncio.gather(*(self._probe(c) for c in candidates),
                                      return_exceptions=True)
        infos = [p[0] for p in probed if not isinstance(p, BaseException)]
        matches = [i for i in infos if vm_matches(i, ref)]
        if not matches:
            names = ", ".join(sorted(i.name for i in infos)) or "none"
            silent = "; ".join(f"{c}: {p}" for c, p in zip(candidates, probed, strict=True)
                               if isinstance(p, BaseException))
            raise Refused(grpc.StatusCode.NOT_FOUND,
                          f"vm: no VM {ref!r} on this host (VMs found: {names}"
                          + (f"; not answering: {silent}" if silent else "") + ")")
        if len(matches) > 1:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"vm: {len(matches)} VMs are named {ref!r}; use the uuid or the "
                          "QMP socket path")
        return matches[0]

    async def list_vms(self) -> pb.ListVMsResponse:
        sockets = await self._sockets_found()
        busy = self._busy_paths()
        answer = pb.ListVMsResponse()

        async def one(path: str) -> pb.VM | pb.UnreachableSocket:
            try:
                info, raw = await self._probe(path)
            except (QmpError, OSError, KeyError, ValueError, Refused) as exc:
                # ValueError: argv.ArgvError, a command line the agent cannot parse.
                return pb.UnreachableSocket(qmp_path=path, error=str(exc))
            hotplugged = discovery.hotplugged_devices(raw)
            return vm_to_pb(info, preflight.readiness(info, hotplugged))

        rows = await asyncio.gather(*(one(p) for p in sockets if p not in busy))
        for row in rows:
            if isinstance(row, pb.VM):
                answer.vms.append(row)
            else:
                answer.unreachable.append(row)
        for live in busy.values():
            # Not probed: the operation owns the monitor. Its facts from when it started.
            answer.vms.append(vm_to_pb(live.vm, preflight.readiness(live.vm),
                                       busy_operation_id=live.id))
        answer.vms.sort(key=lambda v: (v.name, v.qmp_path))
        return answer

    def _check_binary(self, binary: str, vm: VMInfo | None) -> None:
        root = procfs.PROC / str(vm.pid) / "root" if vm is not None else None
        why = pathpolicy.check(root, binary, self.settings.allowed_dirs)
        if why is not None:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, why)

    # --- preflight --------------------------------------------------------------------------

    async def preflight(self, spec: PreflightSpec) -> PreflightReport:
        self._check_binary(spec.target.binary, None)
        vm = await self.resolve_vm(spec.vm)
        self._check_binary(spec.target.binary, vm)
        engine = Engine(self.settings)
        async with self._holding(vm.qmp_path, "run the preflight"):
            try:
                return await engine.preflight(vm.qmp_path, spec.target.to_target(), spec.mode,
                                              prefer=spec.prefer)
            except (QmpError, OSError) as exc:
                raise Refused(grpc.StatusCode.UNAVAILABLE,
                              f"preflight of {vm.name} could not complete: {exc}") from exc

    # --- updates ----------------------------------------------------------------------------

    async def submit(self, spec: UpdateSpec) -> str:
        """Accept an Update (or recognise a repeated one); return the operation id to follow."""
        if not self._accepting:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the agent is shutting down; retry "
                          "later (the same operation_id is safe to send again)")
        try:
            await asyncio.wait_for(self._admission.acquire(), ADMISSION_WAIT_S)
        except TimeoutError:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the agent is busy admitting other "
                          "updates; retry") from None
        try:
            existing = await self._existing(spec.operation_id)
            if existing is not None:
                if existing.fingerprint != spec.fingerprint():
                    raise Refused(grpc.StatusCode.ALREADY_EXISTS,
                                  f"operation_id: {spec.operation_id} was already used for "
                                  f"another request (vm {existing.request.vm!r}, target "
                                  f"{existing.request.target.binary}); use a new id")
                return spec.operation_id
            self._check_binary(spec.target.binary, None)
            vm = await self.resolve_vm(spec.vm)
            self._check_binary(spec.target.binary, vm)
            record = OperationRecord(
                operation_id=spec.operation_id, fingerprint=spec.fingerprint(), request=spec,
                vm=vm, runtime_dir=self.settings.runtime_dir, state=OperationState.RUNNING,
                created_ns=time.time_ns())
            try:
                await asyncio.to_thread(self.journal.create, record)
            except FileExistsError:
                raise Refused(grpc.StatusCode.ABORTED, f"operation_id: {spec.operation_id} "
                              "was journaled concurrently; retry to follow it") from None
            except JournalError as exc:
                raise Refused(grpc.StatusCode.UNAVAILABLE,
                              f"cannot journal the operation: {exc}") from exc
            self._launch(LiveOperation(record, self.journal), self._run)
            return spec.operation_id
        finally:
            self._admission.release()

    async def _existing(self, op_id: str) -> OperationRecord | None:
        live = self._live.get(op_id)
        if live is not None:
            return live.record
        try:
            return await asyncio.to_thread(self.journal.load, op_id)
        except JournalError as exc:
            raise Refused(grpc.StatusCode.DATA_LOSS, f"operation_id: {exc}") from exc

    def _launch(self, live: LiveOperation, body: OperationBody) -> None:
        self._live[live.id] = live
        live.task = asyncio.create_task(self._guarded(live, body), name=f"operation:{live.id}")

    async def _guarded(self, live: LiveOperation, body: OperationBody) -> None:
        try:
            await body(live)
        except Exception:
            # A bug, not a VM problem. The operation stays registered, so its VM counts as
            # busy until a restart resolves it from the journal: safer than a second update
            # on a VM in an unknown state.
            log.exception("operation %s: the agent failed to see it through", live.id)
        finally:
            # Followers that come later read the journal.
            if live.result is not None:
                self._live.pop(live.id, None)

    async def _run(self, live: LiveOperation) -> None:
        spec, vm = live.record.request, live.vm
        settings = dataclasses.replace(self.settings,
                                       timeouts=timeouts_for(spec, self.settings.timeouts))
        try:
            async with self._holding(vm.qmp_path, "start the update"):
                result = await self._update(live, Engine(settings))
        except Refused as exc:
            live.note(Phase.FAILED, exc.message)
            result = unchanged_result(vm, f"not started: {exc.message}")
        await live.finish(result, resolved_after_restart=False)

    async def _update(self, live: LiveOperation, engine: Engine) -> UpdateResult:
        spec, vm = live.record.request, live.vm
        try:
            return await engine.update(vm.qmp_path, spec.target.to_target(), spec.mode,
                                       op_id=live.id, progress=live.add, prefer=spec.prefer)
        except UpdateAborted as exc:
            # Raised before the point of no return: the old QEMU runs on untouched.
            live.note(Phase.FAILED, str(exc))
            return unchanged_result(vm, str(exc))
        except Exception as exc:
            log.exception("operation %s: the engine failed unexpectedly", live.id)
            if not any(e.phase in TOUCHING_PHASES for e in live.events):
                live.note(Phase.FAILED, f"failed before the VM was touched: {exc}")
                return unchanged_result(vm, f"failed before the VM was touched: {exc}")
            live.note(Phase.FAILED, f"the update stopped unexpectedly ({exc}); finding out "
                      "what the VM is doing")
            return await self._resolve(live)

    async def _resolve(self, live: LiveOperation) -> UpdateResult:
        """Bring the VM of an interrupted operation to a running state (recovery_io)."""
        timeouts = timeouts_for(live.record.request, self.settings.timeouts)
        return await recovery_io.resolve(live, timeouts)

    async def _recover(self, live: LiveOperation) -> None:
        while True:
            with contextlib.suppress(Refused):  # the monitor stayed in use: wait again
                async with self._holding(live.vm.qmp_path, "resolve the operation"):
                    result = await self._resolve(live)
                break
        await live.finish(result, resolved_after_restart=True)

    # --- following --------------------------------------------------------------------------

    async def get(self, op_id: str) -> OperationRecord:
        live = self._live.get(op_id)
        if live is not None:
            return live.snapshot()
        record = await self._existing(op_id)
        if record is None:
            raise Refused(grpc.StatusCode.NOT_FOUND,
                          f"operation_id: no operation {op_id} on this agent")
        return record

    async def follow(self, op_id: str, after: int) -> AsyncIterator[pb.OperationEvent]:
        live = self._live.get(op_id)
        if live is None:
            record = await self.get(op_id)
            live = self._live.get(op_id)
            if live is None:
                budget = record.request.pause_budget_ms
                items: list[ProgressEvent | UpdateResult] = list(record.events)
                if record.result is None:
                    raise Refused(grpc.StatusCode.UNAVAILABLE,
                                  f"operation {op_id} is journaled as running but no agent "
                                  "task owns it; retry after the agent's restart")
                items.append(record.result)
                for seq, item in enumerate(items[after:], start=after + 1):
                    yield event_to_pb(op_id, seq, item, pause_budget_ms=budget)
                return
        budget = live.record.request.pause_budget_ms
        async for seq, item in live.follow(after):
            yield event_to_pb(op_id, seq, item, pause_budget_ms=budget)





def _busy_message(live: LiveOperation) -> str:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(live.record.created_ns / 1e9))
    return (f"vm: {live.vm.name} is busy: operation {live.id} has been running on it since "
            f"{since}; follow it with WatchOperation or retry when it is done")
