"""Operations: the one way in for updates and preflights, from the gRPC service and the CLI.

Admission (admission.py: which VM, whether it is free, the per-VM locks), live operations,
journal writes and recovery at start. The edges are servicer.py and cli.py; the recovery
I/O is recovery_io.py.

- Requests arrive validated into specs (convert.py for gRPC, the CLI builds them); nothing
  is looked up, journaled or started for a request that fails validation.
- The binary a request names must lie under the host's allowed directories (pathpolicy's
  rule), checked on every Preflight and Update before the engine runs anything (also
  through symlinks inside the VM's root), whatever the engine's own checks say.
- One operation per VM at a time, across processes: whoever runs one (the service, a CLI)
  holds the VM's lock in the state dir (vmlock.py) for all of it; a VM another operation
  holds is refused naming it. An operation id names one update forever: the same id again
  follows the journaled operation instead of starting a second one.
- An operation that was running when its process died is resolved at start-up (of the
  service, or of the CLI, as soon as the VM's lock is free: its holder is gone): the VM is found
  at its QMP socket, the guard's status says how far cpr-exec got, and the VM is finished,
  rolled back or resumed — never left paused — and the outcome journaled
  (`recovery.decide_recovery` holds the decisions, `recovery_io.resolve` the I/O).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from vmupdate_agent import recovery_io, vmlock
from vmupdate_agent.admission import Refused as Refused
from vmupdate_agent.admission import VmAccess
from vmupdate_agent.config import AgentConfig
from vmupdate_agent.convert import (
    event_to_pb,
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

# Waiting for other admissions (each probes VMs with its own deadlines).
ADMISSION_WAIT_S = 120.0
# How often a recovery looks whether the process that ran the operation let go of its VM.
RECOVERY_LOCK_POLL_S = 0.5
SERVICE = "the agent service"
# Phases after which the engine may have changed the VM.
TOUCHING_PHASES = frozenset({Phase.STOPPING, Phase.SAVED, Phase.EXECED, Phase.TRANSFERRED,
                             Phase.RESUMED, Phase.VERIFIED})


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


# --- operations -----------------------------------------------------------------------------


OperationBody = Callable[[LiveOperation], Awaitable[None]]


class Operations:
    """Admission, running, recovery and following of this agent's operations."""

    def __init__(self, config: AgentConfig, journal: Journal, settings: EngineSettings, *,
                 program: str = SERVICE) -> None:
        self.config = config
        self.journal = journal
        self.settings = settings
        # Who this process is, in the VM locks it holds (refusals elsewhere name it).
        self.program = program
        self._live: dict[str, LiveOperation] = {}
        self._locks: dict[str, vmlock.VmLock] = {}  # operation id -> its VM's lock
        self._admission = asyncio.Lock()
        self._accepting = True
        self.vms = VmAccess(config, settings, program, self._live)

    # --- life cycle -------------------------------------------------------------------------

    async def start(self, *, wait_for_owners: bool = True) -> list[LiveOperation]:
        """Open the journal and resolve the operations a dead process left running.

        A running operation whose VM lock is held belongs to a live process (another CLI,
        or the service): with `wait_for_owners` it is resolved if that process dies (or
        found done when it lets go), else left to it. Returns the operations taken up."""
        await asyncio.to_thread(self.journal.open)
        removed = await asyncio.to_thread(self.journal.prune)
        if removed:
            log.info("pruned %d old operation records", len(removed))
        records, bad = await asyncio.to_thread(self.journal.records)
        for message in bad:
            log.error("journal: %s", message)
        taken = []
        for record in records:
            if record.state == OperationState.RUNNING:
                live = LiveOperation(record, self.journal)
                self._launch(live, functools.partial(self._recover, wait=wait_for_owners))
                taken.append(live)
        return taken

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

    async def list_vms(self) -> pb.ListVMsResponse:
        return await self.vms.list_vms()

    # --- preflight --------------------------------------------------------------------------

    async def preflight(self, spec: PreflightSpec, *, dry_run: bool = True) -> PreflightReport:
        self.vms.check_binary(spec.target.binary, None)
        vm, lock = await self.vms.admit(spec.vm, "preflight")
        try:
            self.vms.check_binary(spec.target.binary, vm)
            engine = Engine(self.settings)
            async with self.vms.holding(vm.qmp_path, "run the preflight"):
                try:
                    return await engine.preflight(vm.qmp_path, spec.target.to_target(),
                                                  spec.mode, dry_run=dry_run,
                                                  prefer=spec.prefer)
                except (QmpError, OSError) as exc:
                    raise Refused(grpc.StatusCode.UNAVAILABLE,
                                  f"preflight of {vm.name} could not complete: {exc}") from exc
        finally:
            lock.release()

    # --- updates ----------------------------------------------------------------------------

    async def submit(self, spec: UpdateSpec, *, skip_preflight: bool = False) -> str:
        """Accept an Update (or recognise a repeated one); return the operation id to follow.

        `skip_preflight`: the CLI's option (the gRPC API has none); not part of the request's
        identity."""
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
            self.vms.check_binary(spec.target.binary, None)
            vm, lock = await self.vms.admit(spec.vm, "update", spec.operation_id)
            try:
                self.vms.check_binary(spec.target.binary, vm)
                record = OperationRecord(
                    operation_id=spec.operation_id, fingerprint=spec.fingerprint(),
                    request=spec, vm=vm, runtime_dir=self.settings.runtime_dir,
                    state=OperationState.RUNNING, created_ns=time.time_ns())
                try:
                    await asyncio.to_thread(self.journal.create, record)
                except FileExistsError:
                    raise Refused(grpc.StatusCode.ABORTED, f"operation_id: "
                                  f"{spec.operation_id} was journaled concurrently; retry "
                                  "to follow it") from None
                except JournalError as exc:
                    raise Refused(grpc.StatusCode.UNAVAILABLE,
                                  f"cannot journal the operation: {exc}") from exc
            except BaseException:
                lock.release()
                raise
            self._locks[spec.operation_id] = lock
            self._launch(LiveOperation(record, self.journal),
                         functools.partial(self._run, skip_preflight=skip_preflight))
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
            # Followers that come later read the journal. The VM stays locked until then.
            if live.result is not None:
                self._live.pop(live.id, None)
                lock = self._locks.pop(live.id, None)
                if lock is not None:
                    lock.release()

    async def _run(self, live: LiveOperation, *, skip_preflight: bool = False) -> None:
        spec, vm = live.record.request, live.vm
        settings = dataclasses.replace(self.settings,
                                       timeouts=timeouts_for(spec, self.settings.timeouts))
        try:
            async with self.vms.holding(vm.qmp_path, "start the update"):
                result = await self._update(live, Engine(settings), skip_preflight)
        except Refused as exc:
            live.note(Phase.FAILED, exc.message)
            result = unchanged_result(vm, f"not started: {exc.message}")
        await live.finish(result, resolved_after_restart=False)

    async def _update(self, live: LiveOperation, engine: Engine, skip_preflight: bool
                      ) -> UpdateResult:
        spec, vm = live.record.request, live.vm
        try:
            return await engine.update(vm.qmp_path, spec.target.to_target(), spec.mode,
                                       op_id=live.id, progress=live.add,
                                       skip_preflight=skip_preflight, prefer=spec.prefer)
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

    async def _recover(self, live: LiveOperation, *, wait: bool) -> None:
        lock = await self._lock_for_recovery(live, wait)
        if lock is None:
            self._live.pop(live.id, None)  # a live process runs it: not ours
            return
        self._locks[live.id] = lock
        try:
            now = await asyncio.to_thread(self.journal.load, live.id)
        except JournalError as exc:
            log.error("operation %s: %s; resolving it from the VM", live.id, exc)
            now = None
        if now is not None and now.state == OperationState.DONE:
            live.adopt(now)  # its process finished it while we waited
            return
        log.warning("operation %s on %s was running when its process stopped; resolving it",
                    live.id, live.vm.name)
        while True:
            with contextlib.suppress(Refused):  # the monitor stayed in use: wait again
                async with self.vms.holding(live.vm.qmp_path, "resolve the operation"):
                    result = await self._resolve(live)
                break
        await live.finish(result, resolved_after_restart=True)

    async def _lock_for_recovery(self, live: LiveOperation, wait: bool
                                 ) -> vmlock.VmLock | None:
        """The VM's lock once its holder (the process running the operation) is gone."""
        said = False
        while True:
            try:
                return await self.vms.flock(live.vm.qmp_path, "recovery", live.id, live.vm)
            except vmlock.VmBusy as exc:
                if not wait:
                    log.info("operation %s: left to its process: %s", live.id, exc)
                    return None
                if not said:
                    log.warning("operation %s is journaled as running and its VM is locked "
                                "(%s); resolving it when that lets go", live.id, exc)
                    said = True
            await asyncio.sleep(RECOVERY_LOCK_POLL_S)

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

    async def follow_items(self, op_id: str, after: int
                           ) -> AsyncIterator[tuple[int, ProgressEvent | UpdateResult]]:
        """(sequence, event or result) of an operation after `after`, live until the result."""
        live = self._live.get(op_id)
        if live is None:
            record = await self.get(op_id)
            live = self._live.get(op_id)
            if live is None:
                items: list[ProgressEvent | UpdateResult] = list(record.events)
                if record.result is None:
                    raise Refused(grpc.StatusCode.UNAVAILABLE,
                                  f"operation {op_id} is journaled as running but this agent "
                                  f"does not run it ({self._owner(record)}); retry later")
                items.append(record.result)
                for seq, item in enumerate(items[after:], start=after + 1):
                    yield seq, item
                return
        async for seq, item in live.follow(after):
            yield seq, item

    def _owner(self, record: OperationRecord) -> str:
        busy, holder = vmlock.holder_of(self.config.state_dir, record.vm.qmp_path)
        if holder is not None:
            return holder.describe()
        return "another process holds its VM" if busy else \
            "no process holds its VM: the next start resolves it"

    async def follow(self, op_id: str, after: int) -> AsyncIterator[pb.OperationEvent]:
        live = self._live.get(op_id)
        record = live.record if live is not None else await self.get(op_id)
        budget = record.request.pause_budget_ms
        async for seq, item in self.follow_items(op_id, after):
            yield event_to_pb(op_id, seq, item, pause_budget_ms=budget)
