"""Operations: admission, per-VM locks, live operations, journal writes and recovery at start.

Over 450 lines: admission with its per-VM locks and live operations, and the recovery loop
(the I/O around `recovery.decide_recovery`) still share this module; moving the recovery I/O
beside recovery.py is the next step. The gRPC edge is servicer.py.

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
  (`recovery.decide_recovery` holds the decisions, `Operations._resolve` the I/O).
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

from vmupdate_agent import discovery, pathpolicy, preflight, procfs
from vmupdate_agent import guard as cpr_guard
from vmupdate_agent.config import AgentConfig
from vmupdate_agent.convert import (
    event_to_pb,
    phase_durations,
    vm_to_pb,
)
from vmupdate_agent.engine import Engine, EngineSettings
from vmupdate_agent.journal import Journal, JournalError, OperationRecord, OperationState
from vmupdate_agent.models import (
    Outcome,
    Phase,
    PreflightReport,
    ProgressEvent,
    UpdateResult,
    VMInfo,
)
from vmupdate_agent.modes import cpr_reboot
from vmupdate_agent.modes.common import (
    Timeouts,
    UpdateAborted,
    kill_quietly,
    pids_with_arg,
    write_pidfiles,
)
from vmupdate_agent.qmp import QmpError, QmpSession
from vmupdate_agent.recovery import (
    Action,
    Expected,
    QemuFacts,
    RecoveryFacts,
    RecoveryStep,
    decide_recovery,
    infer_mode,
    pause_bounds,
)
from vmupdate_agent.specs import PreflightSpec, UpdateSpec
from vmupdate_api.gen import agent_v1_pb2 as pb

log = logging.getLogger(__name__)

# Followers of an operation re-check its state at least this often.
FOLLOW_POLL_S = 10.0
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


async def ask_qemu(path: str, *, timeout: float) -> tuple[QemuFacts | None, str]:
    try:
        async with await QmpSession.open(path, timeout=timeout,
                                         command_timeout=timeout) as session:
            status = await session.cmd("query-status")
            migration = await session.cmd("query-migrate")
            version = await session.cmd("query-version")
            q = version["qemu"]
            return QemuFacts(pid=session.peer_pid, runstate=str(status.get("status")),
                             migration=str(migration.get("status", "none")),
                             version=f"{q['major']}.{q['minor']}.{q['micro']}",
                             package=str(version.get("package", "")).strip()), ""
    except (QmpError, OSError, KeyError) as exc:
        return None, str(exc)


async def cont_vm(path: str, *, timeout: float) -> None:
    async with await QmpSession.open(path, timeout=timeout, command_timeout=timeout) as session:
        await session.cmd("cont")


# --- operations -----------------------------------------------------------------------------


class LiveOperation:
    """An operation running in this process: its events, its followers, its journal record.

    An event is shown to followers only once it is in the journal file. Its sequence number
    is its position there, so a client that saw event N finds N again after an agent
    restart and reattaches after it without gaps. These writes skip fsync (a killed process
    does not lose the page cache; the accepted record and the result are fsynced) and run
    in a worker thread, so the engine's progress callback never waits for them.
    """

    def __init__(self, record: OperationRecord, journal: Journal) -> None:
        self.record = record
        self.events: list[ProgressEvent] = list(record.events)  # journaled: followers see these
        self.result: UpdateResult | None = None
        self.task: asyncio.Task[None] | None = None
        self._journal = journal
        self._changed = asyncio.Event()
        self._pending: list[ProgressEvent] = []
        self._writer: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.record.operation_id

    @property
    def vm(self) -> VMInfo:
        return self.record.vm

    def add(self, event: ProgressEvent) -> None:
        """The engine's progress sink: never blocks (it is called inside the guest pause)."""
        self._pending.append(event)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name=f"journal:{self.id}")

    def note(self, phase: Phase, message: str) -> None:
        log.info("operation %s on %s: %s: %s", self.id, self.vm.name, phase.value, message)
        self.add(ProgressEvent(phase=phase, time_ns=time.time_ns(), message=message))

    def snapshot(self) -> OperationRecord:
        return self.record.model_copy(update={"events": tuple(self.events)})

    async def _write(self) -> None:
        while self._pending:
            batch = list(self._pending)
            record = self.record.model_copy(update={"events": (*self.events, *batch)})
            try:
                await asyncio.to_thread(self._journal.save, record, durable=False)
            except JournalError as exc:
                # Followers still see the events; a restart may then renumber them.
                log.error("operation %s: events not journaled: %s", self.id, exc)
            self.events.extend(batch)
            del self._pending[:len(batch)]
            self._wake()

    async def finish(self, result: UpdateResult, *, resolved_after_restart: bool) -> None:
        """Journal the result durably, then tell the followers."""
        while self._writer is not None and not self._writer.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), 30)
        # One definition of phase durations for every operation: from the event times.
        result = result.model_copy(update={"phase_ms": phase_durations(self.events)})
        record = self.snapshot().model_copy(update={
            "state": OperationState.DONE, "result": result, "finished_ns": time.time_ns(),
            "resolved_after_restart": resolved_after_restart})
        try:
            await asyncio.to_thread(self._journal.save, record)
        except JournalError as exc:
            # The followers still learn the result; after a restart the operation is
            # resolved again from the VM itself.
            log.error("operation %s: result not journaled: %s", self.id, exc)
        self.record = record
        self.result = result
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int) -> AsyncIterator[tuple[int, ProgressEvent | UpdateResult]]:
        """(sequence, item) after `after`: the events so far, then live ones, then the result."""
        sent = after
        while True:
            changed = self._changed
            while sent < len(self.events):
                sent += 1
                yield sent, self.events[sent - 1]
            if self.result is not None:
                if sent == len(self.events):
                    yield sent + 1, self.result
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), FOLLOW_POLL_S)


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
                return await engine.preflight(vm.qmp_path, spec.target.to_target(), spec.mode)
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
                                       op_id=live.id, progress=live.add)
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

    async def _recover(self, live: LiveOperation) -> None:
        while True:
            with contextlib.suppress(Refused):  # the monitor stayed in use: wait again
                async with self._holding(live.vm.qmp_path, "resolve the operation"):
                    result = await self._resolve(live)
                break
        await live.finish(result, resolved_after_restart=True)

    async def _resolve(self, live: LiveOperation) -> UpdateResult:
        """Bring the VM of an interrupted operation to a running state and say what it is."""
        rec = live.record
        timeouts = timeouts_for(rec.request, self.settings.timeouts)
        expected = Expected(pid_before=rec.vm.pid, version_before=str(rec.vm.features.version),
                            was_running=rec.vm.runstate == "running",
                            expected_version=rec.request.target.expected_version or None)
        budget = timeouts.handover + timeouts.load + timeouts.guard_commit + timeouts.command
        deadline = time.monotonic() + budget
        # Past the deadline decisions stop waiting; past this, failing actions stop retrying.
        give_up_s = budget + 3 * timeouts.command + 10
        hard_stop = deadline - budget + give_up_s
        watcher_gone = False
        last = ""
        resumed: list[int] = []
        while True:
            facts = await self._recovery_facts(rec, watcher_gone, timeouts.command)
            now = time.monotonic()
            step = decide_recovery(facts, expected, final=now >= deadline)
            if step.action == Action.DONE or now >= hard_stop:
                if step.action != Action.DONE:
                    step = RecoveryStep(Action.DONE, f"gave up after {give_up_s:.0f}s: "
                                        f"{step.message}; last error: {last}", Outcome.LOST)
                return self._resolved_result(live, facts, step, resumed)
            if step.action == Action.WAIT:
                await asyncio.sleep(0.05)
                continue
            live.note(_ACTION_PHASES[step.action], step.message)
            try:
                watcher_gone = await self._act(step.action, rec, facts, timeouts, resumed
                                               ) or watcher_gone
            except (QmpError, OSError, cpr_guard.GuardError) as exc:
                last = f"{step.action}: {exc}"
                log.warning("operation %s: %s", rec.operation_id, last)
                await asyncio.sleep(0.2)

    async def _recovery_facts(self, rec: OperationRecord, watcher_gone: bool,
                              timeout: float) -> RecoveryFacts:
        status: dict[str, object] = {}
        guard_error = ""
        try:
            status = cpr_guard.read_status(os.path.join(rec.workdir, "guard.status")) or {}
        except (cpr_guard.GuardError, ValueError) as exc:
            guard_error = str(exc)
        vm, vm_error = await ask_qemu(rec.vm.qmp_path, timeout=min(timeout, 3.0))
        target_sock = os.path.join(rec.workdir, "qmp.sock")
        target_pids: tuple[int, ...] = ()
        target = None
        if os.path.exists(target_sock):
            target_pids = tuple(await asyncio.to_thread(pids_with_arg, target_sock))
            if target_pids:
                target, _ = await ask_qemu(target_sock, timeout=min(timeout, 3.0))
        qemu_pid = status.get("qemu_pid")
        try:
            files = frozenset(os.listdir(rec.workdir))
        except OSError:
            files = frozenset()
        state = os.path.join(rec.workdir, cpr_reboot.STATE_FILE)
        keeper: dict[str, object] = {}
        with contextlib.suppress(cpr_guard.GuardError, ValueError):
            keeper = cpr_guard.read_status(os.path.join(rec.workdir, "keeper.status")) or {}
        keeper_pid = keeper.get("keeper_pid")
        acting = (keeper.get("phase") == cpr_guard.KEEPER_ACTING and isinstance(keeper_pid, int)
                  and procfs.alive(keeper_pid))
        back = [v for v in (keeper.get("t_resumed_ns"), status.get("t_resumed_ns"),
                            status.get("t_rollback_ns")) if isinstance(v, int)]
        return RecoveryFacts(
            keeper_acting=acting, resumed_ns=back[0] if back else None,
            guard_started_ns=t if isinstance(t := status.get("t_guard_ns"), int) else None,
            mode=infer_mode(rec.request.mode, files), old_alive=procfs.alive(rec.vm.pid),
            saved_state=state if cpr_reboot.STATE_FILE in files else "",
            guard_phase=str(status["phase"]) if "phase" in status else None,
            guard_qemu_pid=qemu_pid if isinstance(qemu_pid, int) else None,
            guard_reason=str(status.get("reason") or ""),
            guard_error=str(status.get("error") or guard_error), watcher_gone=watcher_gone,
            vm=vm, vm_error=vm_error, transfer_target_pids=target_pids,
            transfer_target=target)

    async def _act(self, action: Action, rec: OperationRecord, facts: RecoveryFacts,
                   timeouts: Timeouts, resumed: list[int]) -> bool:
        """Carry out one step; True when it found the guard's watcher gone."""
        fifo = os.path.join(rec.workdir, "guard.commit")
        if action in (Action.COMMIT, Action.ABORT):
            try:
                cpr_guard.send(fifo, action.value)
            except cpr_guard.WatcherGone:
                return True
            if action == Action.COMMIT:
                await _wait_guard(os.path.join(rec.workdir, "guard.status"),
                                  cpr_guard.FINAL_PHASES, timeout=5.0)
        elif action == Action.CONT:
            await cont_vm(rec.vm.qmp_path, timeout=timeouts.command)
            resumed.append(time.time_ns())
        elif action == Action.KILL_TRANSFER_TARGET:
            for pid in facts.transfer_target_pids:
                await kill_quietly(pid, timeout=timeouts.command)
        elif action == Action.ADOPT_TRANSFER_TARGET:
            await self._adopt_transfer_target(rec, facts, timeouts)
        elif action == Action.LOAD_SAVED_STATE:
            await self._load_saved_state(rec, facts, timeouts)
        return False

    async def _load_saved_state(self, rec: OperationRecord, facts: RecoveryFacts,
                                timeouts: Timeouts) -> None:
        # As the engine does once the old QEMU is gone: the VM's socket path is the new one's.
        temp = os.path.join(rec.workdir, "qmp.sock")
        if facts.transfer_target_pids and os.path.exists(temp):
            os.replace(temp, rec.vm.qmp_path)
        async with await QmpSession.open(rec.vm.qmp_path, timeout=timeouts.command,
                                         command_timeout=timeouts.command) as s:
            await cpr_reboot.load_saved_state(s, f"file:{facts.saved_state}", timeouts.load)
            write_pidfiles(rec.vm.argv, s.peer_pid)

    async def _adopt_transfer_target(self, rec: OperationRecord, facts: RecoveryFacts,
                                     timeouts: Timeouts) -> None:
        old = rec.vm.pid
        if procfs.alive(old):
            with contextlib.suppress(QmpError, OSError):
                async with await QmpSession.open(rec.vm.qmp_path, timeout=timeouts.command,
                                                 command_timeout=timeouts.command) as s:
                    if s.peer_pid == old:
                        with contextlib.suppress(QmpError):
                            await s.cmd("quit")
            await kill_quietly(old, timeout=timeouts.command)
        # As the engine does once the old QEMU is gone: the VM's socket path is the new one's.
        os.replace(os.path.join(rec.workdir, "qmp.sock"), rec.vm.qmp_path)
        if facts.transfer_target is not None:
            write_pidfiles(rec.vm.argv, facts.transfer_target.pid)

    def _resolved_result(self, live: LiveOperation, facts: RecoveryFacts, step: RecoveryStep,
                         resumed: list[int]) -> UpdateResult:
        rec = live.record
        assert step.outcome is not None
        phase = {Outcome.UPDATED: Phase.FINISHED, Outcome.ROLLED_BACK: Phase.RECOVERED
                 }.get(step.outcome, Phase.FAILED)
        live.note(phase, step.message)
        try:
            files = frozenset(os.listdir(rec.workdir))
        except OSError:
            files = frozenset()
        vm = facts.vm
        stopped, back = pause_bounds(live.events, facts, resumed)
        return UpdateResult(
            vm=rec.vm.name, outcome=step.outcome, mode=infer_mode(rec.request.mode, files),
            mode_reason="found after the operation was interrupted", message=step.message,
            pid_before=rec.vm.pid, pid_after=vm.pid if vm else None,
            version_before=str(rec.vm.features.version), version_after=vm.version if vm else None,
            paused_at_ns=stopped, resumed_at_ns=back,
            pause_ms=round((back - stopped) / 1e6, 3) if stopped and back else None)

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


_ACTION_PHASES = {
    Action.COMMIT: Phase.SAVED, Action.ABORT: Phase.RECOVERED, Action.CONT: Phase.RESUMED,
    Action.KILL_TRANSFER_TARGET: Phase.RECOVERED, Action.ADOPT_TRANSFER_TARGET:
        Phase.TRANSFERRED, Action.LOAD_SAVED_STATE: Phase.TRANSFERRED,
}


def _busy_message(live: LiveOperation) -> str:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(live.record.created_ns / 1e9))
    return (f"vm: {live.vm.name} is busy: operation {live.id} has been running on it since "
            f"{since}; follow it with WatchOperation or retry when it is done")


async def _wait_guard(path: str, phases: frozenset[str], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = cpr_guard.read_status(path)
        if status is not None and status.get("phase") in phases:
            return
        await asyncio.sleep(0.005)
