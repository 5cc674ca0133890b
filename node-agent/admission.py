"""Admission: which VM a request names, whether it is free, and who may use it now.

- A VM's QMP monitor serves one client at a time: within this process an asyncio lock per
  socket (`holding`) orders probes, preflights and updates.
- Across processes (the service and the CLI share the state dir) the VM's lock file
  (vmlock.py): an operation holds it for all of its run, a probe for the probe. A VM that
  another process runs an operation on is refused, naming that operation, its program and
  its pid; it is never probed meanwhile (its monitor belongs to that operation).
- The binary a request names must lie under the host's allowed directories (pathpolicy's
  rule, `check_binary`), checked before the engine runs anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

import grpc

from vmupdate_agent import discovery, pathpolicy, preflight, procfs, vmlock
from vmupdate_agent.config import AgentConfig
from vmupdate_agent.convert import vm_to_pb
from vmupdate_agent.engine import EngineSettings
from vmupdate_agent.live import LiveOperation
from vmupdate_agent.models import Readiness, VMInfo
from vmupdate_agent.qmp import QmpError
from vmupdate_api.gen import agent_v1_pb2 as pb

# Waiting for another user of a VM's QMP monitor (a probe, a preflight) to finish.
SOCKET_WAIT_S = 60.0
PROBE = "probe"
# Holders worth waiting for rather than refusing (as for a busy monitor): they only look.
WAITED_FOR = frozenset({PROBE, "preflight"})


class Refused(Exception):
    """A request the agent will not serve, with the gRPC status to say so."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def vm_matches(vm: VMInfo, ref: str) -> bool:
    return ref in (vm.name, vm.uuid, vm.qmp_path)


class VmAccess:
    """Finding, probing and locking VMs for this process's operations (`live`: those that
    run here, by id; the operations own that table)."""

    def __init__(self, config: AgentConfig, settings: EngineSettings, program: str,
                 live: dict[str, LiveOperation]) -> None:
        self.config = config
        self.settings = settings
        self.program = program
        self._live = live
        self._sockets: dict[str, asyncio.Lock] = {}
        # VM uuid -> QMP socket, from the last probes: an update by uuid probes one VM. Names
        # are not cached: they need not be unique, and a request by name must see them all.
        self._known: dict[str, str] = {}
        # QMP socket -> the VM's facts from its last good probe: a VM whose monitor does not
        # answer for a moment (another client on it, an operation ending) is listed as not
        # ready, not left out: left out, the operator takes it for gone and skips it.
        self._last_seen: dict[str, VMInfo] = {}

    def _socket(self, path: str) -> asyncio.Lock:
        return self._sockets.setdefault(path, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def holding(self, path: str, what: str) -> AsyncIterator[None]:
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

    async def flock(self, path: str, kind: str, op_id: str = "", vm: VMInfo | None = None
                     ) -> vmlock.VmLock:
        """The VM's cross-process lock; waits while a probe or a preflight holds it (for up
        to SOCKET_WAIT_S), VmBusy at once for an operation."""
        return await take(self.config.state_dir, path, kind, self.program, op_id, vm)

    async def probe(self, path: str, *, locked: bool = False
                     ) -> tuple[VMInfo, discovery.RawFacts]:
        """Discovery of one VM; VmBusy if another operation runs on it (`locked`: this
        caller holds the VM's lock already). The VM's lock is always taken before its
        monitor (`holding`), never while holding it: a waiter never blocks the holder."""
        lock = None if locked else await self.flock(path, PROBE)
        try:
            async with self.holding(path, "probe the VM"):
                info, raw = await discovery.discover(path,
                                                     timeout=self.settings.timeouts.command)
        finally:
            if lock is not None:
                lock.release()
        if info.uuid:
            self._known[info.uuid] = path
        self._last_seen[path] = info
        return info, raw

    async def admit(self, ref: str, kind: str, op_id: str = ""
                     ) -> tuple[VMInfo, vmlock.VmLock]:
        """The VM `ref` names, idle, with its lock taken for `kind`, and its facts read again
        under the lock (another process may have just changed it)."""
        found = await self.resolve_vm(ref)
        try:
            lock = await self.flock(found.qmp_path, kind, op_id, found)
        except vmlock.VmBusy as exc:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          busy_elsewhere(found.name, exc)) from None
        try:
            vm, _ = await self.probe(found.qmp_path, locked=True)
        except (QmpError, OSError, KeyError, ValueError) as exc:
            lock.release()
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          f"vm: {found.name} stopped answering on {found.qmp_path}: {exc}"
                          ) from exc
        except BaseException:
            lock.release()
            raise
        return vm, lock

    def _busy_with(self, ref: str) -> LiveOperation | None:
        for live in self._live.values():
            if live.result is None and vm_matches(live.vm, ref):
                return live
        return None

    def busy_paths(self) -> dict[str, LiveOperation]:
        return {live.vm.qmp_path: live for live in self._live.values() if live.result is None}

    async def _sockets_found(self) -> list[str]:
        return await asyncio.to_thread(discovery.find_sockets, self.config.socket_globs)

    async def resolve_vm(self, ref: str) -> VMInfo:
        """The VM a request names (name, uuid or QMP socket), probed now; it must be idle."""
        if ref.startswith("/"):
            ref = os.path.normpath(ref)
        busy = self._busy_with(ref)
        if busy is not None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, busy_message(busy))
        sockets = await self._sockets_found()
        if ref.startswith("/"):
            if ref not in sockets:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"vm: {ref} is not the QMP socket of a "
                              "VM this agent manages (see ListVMs)")
            return await self.find(ref, [ref])
        cached = self._known.get(ref)
        if cached in sockets:
            with contextlib.suppress(Refused):
                return await self.find(ref, [cached])
            self._known.pop(ref, None)  # renamed or gone since: look at every VM
        return await self.find(ref, sockets)

    async def find(self, ref: str, candidates: list[str]) -> VMInfo:
        busy_paths = self.busy_paths()
        candidates = [c for c in candidates if c not in busy_paths]
        probed = await asyncio.gather(*(self.probe(c) for c in candidates),
                                      return_exceptions=True)
        for p in probed:
            # No room for the VMs' lock files: nothing can be taken on any VM; say why.
            full = p if isinstance(p, vmlock.StateDirFull) else (
                p.__cause__ if isinstance(p, BaseException) else None)
            if isinstance(full, vmlock.StateDirFull):
                raise Refused(grpc.StatusCode.UNAVAILABLE, str(full))
        for path, p in zip(candidates, probed, strict=True):
            # Another process runs an operation on a VM it could be: that one, say so.
            if isinstance(p, vmlock.VmBusy) and (
                    path == ref or (p.holder is not None and p.holder.matches(ref))):
                name = p.holder.vm_name if p.holder and p.holder.vm_name else ref
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, busy_elsewhere(name, p))
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
        busy = self.busy_paths()
        answer = pb.ListVMsResponse()
        for gone in self._last_seen.keys() - set(sockets):
            del self._last_seen[gone]

        async def one(path: str) -> pb.VM | pb.UnreachableSocket:
            try:
                info, raw = await self.probe(path)
            except vmlock.VmBusy as exc:
                return self._unanswered(path, f"busy: {exc}",
                                        exc.holder.operation_id if exc.holder else "")
            except (QmpError, OSError, KeyError, ValueError, Refused) as exc:
                # ValueError: argv.ArgvError, a command line the agent cannot parse.
                return self._unanswered(path, str(exc))
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

    def _unanswered(self, path: str, error: str, operation_id: str = ""
                    ) -> pb.VM | pb.UnreachableSocket:
        """A socket whose probe failed (`operation_id`: the operation of another process that
        holds the VM): the VM last seen behind it, not ready, while its QEMU still runs and
        listens there; else an unreachable socket."""
        last = self._last_seen.get(path)
        if last is None or not (procfs.alive(last.pid) and procfs.unix_listening(last.pid, path)):
            self._last_seen.pop(path, None)
            return pb.UnreachableSocket(qmp_path=path, error=error)
        why = f"its QMP monitor did not answer just now ({error}); it is listed as last seen"
        return vm_to_pb(last, Readiness(ready=False, modes=(), reasons=(why,)),
                        busy_operation_id=operation_id)

    def check_binary(self, binary: str, vm: VMInfo | None) -> None:
        root = procfs.PROC / str(vm.pid) / "root" if vm is not None else None
        why = pathpolicy.check(root, binary, self.settings.allowed_dirs)
        if why is not None:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, why)


async def take(state_dir: str, path: str, kind: str, program: str, op_id: str = "",
               vm: VMInfo | None = None) -> vmlock.VmLock:
    """The VM's cross-process lock for `kind`, named after this process (`program`): waits
    while a probe or a preflight holds it (for up to SOCKET_WAIT_S), VmBusy at once for an
    operation."""
    holder = vmlock.Holder(operation_id=op_id, kind=kind, program=program, pid=os.getpid(),
                           since_ns=time.time_ns(), vm_name=vm.name if vm else "",
                           vm_uuid=vm.uuid if vm else "", qmp_path=path)
    deadline = time.monotonic() + SOCKET_WAIT_S
    while True:
        try:
            return await _acquire(state_dir, path, holder)
        except vmlock.StateDirFull as exc:
            raise Refused(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        except vmlock.VmBusy as exc:
            short = exc.holder is None or exc.holder.kind in WAITED_FOR
            if not short or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.02)


async def _acquire(state_dir: str, path: str, holder: vmlock.Holder) -> vmlock.VmLock:
    """vmlock.try_acquire in a worker thread; a caller cancelled meanwhile does not leave
    the lock held (the thread's lock, if it got one, is released when it returns)."""
    attempt = asyncio.ensure_future(asyncio.to_thread(vmlock.try_acquire, state_dir, path,
                                                      holder))
    try:
        return await asyncio.shield(attempt)
    except asyncio.CancelledError:
        attempt.add_done_callback(_release_result)
        raise


def _release_result(attempt: asyncio.Future[vmlock.VmLock]) -> None:
    if not attempt.cancelled() and attempt.exception() is None:
        attempt.result().release()


def busy_elsewhere(name: str, exc: vmlock.VmBusy) -> str:
    who = exc.holder.describe() if exc.holder else "another process holds its lock"
    return f"vm: {name} is busy: {who}; retry when it is done"


def busy_message(live: LiveOperation) -> str:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(live.record.created_ns / 1e9))
    return (f"vm: {live.vm.name} is busy: operation {live.id} has been running on it since "
            f"{since}; follow it with WatchOperation or retry when it is done")
