"""What every CPR mode shares: the operation's context and progress, the new QEMU's process,
and the safety net (the keeper). QEMU's side of the migration is in `migration`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmupdate_agent import argv as qargv
from vmupdate_agent import fswatch, hostexec, procfs
from vmupdate_agent import guard as cpr_guard
from vmupdate_agent.models import CprMode, Outcome, Phase, ProgressEvent, Target, VMInfo
from vmupdate_agent.qmp import Event, QmpError, QmpSession, QmpTimeout

log = logging.getLogger(__name__)

ProgressSink = Callable[[ProgressEvent], Awaitable[None] | None]


class UpdateAborted(RuntimeError):
    """Refused or failed before the point of no return: the old QEMU runs on untouched."""


@dataclass(frozen=True)
class Timeouts:
    command: float = 10.0
    # The guest is stopped during these, so they are short: a new QEMU that has not answered
    # on QMP by then is treated as failed and the old one takes over again.
    # From `migrate` until the new QEMU answers on QMP (exec, or start of a new process).
    handover: float = 15.0
    # Until an incoming migration has loaded the state.
    load: float = 30.0
    # How long the guard waits for the commit before rolling back on its own (the agent
    # may have died mid-update; the new QEMU sits paused until then).
    guard_commit: float = 20.0


@dataclass(frozen=True)
class ModeResult:
    outcome: Outcome
    message: str
    pid_after: int | None
    version_after: str | None
    pause_ms: float | None
    # QEMU's own RESUME timestamp (wall clock, ns), when the agent saw it.
    resumed_ns: int | None = None
    session: QmpSession | None = None


@dataclass
class Operation:
    op_id: str
    vm: VMInfo
    target: Target
    mode: CprMode
    session: QmpSession
    workdir: str
    host: hostexec.HostContext
    timeouts: Timeouts
    guard_path: str | None
    guard_seize: bool = True  # cpr-exec: seize the QEMU rather than sit in its exec chain
    progress: ProgressSink | None = None
    phase_ms: dict[str, float] = field(default_factory=dict)
    _t_phase: float = field(default_factory=time.monotonic)
    _phase: str = "start"
    stop_event: Event | None = None

    _deferred: list[tuple[Phase, str, float, int]] = field(default_factory=list)

    async def emit(self, phase: Phase, message: str) -> None:
        """Report a phase now (after any deferred ones, in their order)."""
        deferred, self._deferred = self._deferred, []
        for event in deferred:
            await self._report(*event)
        await self._report(phase, message, time.monotonic(), time.time_ns())

    def defer(self, phase: Phase, message: str) -> None:
        """A phase reached inside the guest's pause: stamped now, reported with the next
        `emit`. Reporting journals the event at once (a file write in a worker thread),
        which inside the pause lengthened it by a millisecond or two."""
        self._deferred.append((phase, message, time.monotonic(), time.time_ns()))

    async def _report(self, phase: Phase, message: str, mono: float, wall_ns: int) -> None:
        self.phase_ms[self._phase] = round(self.phase_ms.get(self._phase, 0.0)
                                           + (mono - self._t_phase) * 1000, 3)
        self._phase, self._t_phase = phase.value, mono
        log.info("%s %s: %s", self.vm.name, phase.value, message)
        if self.progress is not None:
            stopped = self.stop_event.qemu_time_ns if self.stop_event else None
            res = self.progress(ProgressEvent(phase=phase, time_ns=wall_ns,
                                              message=message, guest_stopped_ns=stopped))
            if res is not None:
                await res

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def old_argv(self) -> qargv.QemuArgv:
        return qargv.canonical(qargv.parse(self.vm.argv), self.vm.qmp_path)

    def new_argv(self) -> qargv.QemuArgv:
        base = qargv.with_binary(self.old_argv(), self.target.binary)
        return qargv.appended(base, self.target.extra_args)


def pause_ms(stop: Event | None, resume: Event | None) -> float | None:
    """Guest pause from QEMU's own STOP and RESUME timestamps (same host clock)."""
    if stop is None or resume is None:
        return None
    return round((resume.qemu_time_ns - stop.qemu_time_ns) / 1e6, 3)


def failed_pause_ms(op: Operation) -> float | None:
    """How long a failed attempt kept the guest stopped: from QEMU's STOP to the RESUME
    that followed it on the old QEMU's monitor (None if it never stopped, or no RESUME was
    seen)."""
    events = op.session.events
    stop = op.stop_event or next((e for e in events if e.name == "STOP"), None)
    if stop is None:
        return None
    resumed = next((e for e in events if e.name == "RESUME"
                    and e.qemu_time_ns >= stop.qemu_time_ns), None)
    return pause_ms(stop, resumed)


async def poll_until(fn: Callable[[], Awaitable[Any]], *, timeout: float, what: str,
                     interval: float = 0.002) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.1f}s")
        await asyncio.sleep(interval)


def release_pidfile(op: Operation) -> None:
    """Let a new QEMU that starts beside the old one create the VM's -pidfile: QEMU locks it,
    and the old one's lock stays with the unlinked file. The old QEMU removes the path when
    it exits, so `rewrite_pidfile` writes it again for whichever QEMU runs the VM then."""
    for path in qargv.parse(op.vm.argv).values("pidfile"):
        with contextlib.suppress(OSError):
            procfs.in_root(op.vm.pid, path).unlink()


async def connect_new_qemu(qmp_path: str, marker: str, *, timeout: float,
                           command_timeout: float, log_path: str) -> QmpSession:
    """Connect to a QEMU the agent just started; fail at once if it exited instead (the
    guest is stopped while this waits)."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    # Woken as the socket appears rather than at the next poll (cpr-transfer's new QEMU
    # opens its monitor only once it has the descriptors, inside the pause).
    async with fswatch.FolderWatch(os.path.dirname(qmp_path) or ".") as appeared:
        while True:
            try:
                return await QmpSession.open(qmp_path, timeout=1.0,
                                             command_timeout=command_timeout)
            except QmpError as exc:
                last = exc
            if time.monotonic() - started > 0.5 and not pids_with_arg(marker):
                tail = _file_tail(log_path)
                raise QmpError("the new QEMU exited before answering on QMP"
                               + (f": {tail}" if tail else ""))
            if time.monotonic() > deadline:
                raise QmpError(f"the new QEMU did not answer on QMP within {timeout:.0f}s: "
                               f"{last}")
            await appeared.changed(0.002)


def _file_tail(path: str, limit: int = 600) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read().strip()[-limit:]
    except OSError:
        return ""


OLD_BINARY_COPY = "old-qemu"


async def binary_for_rollback(op: Operation) -> str:
    """A path (inside the VM's root) that runs the old QEMU's binary, for the way back.

    A package upgrade usually replaces the binary in place, and the VMs are then moved onto
    the new file under the same path: a rollback through that path would start the very
    QEMU that just failed. The running process still holds its binary (/proc/<pid>/exe), so
    when the file on disk is another one, a copy of the running one is kept in the
    operation's work folder (which the VM sees at the same path). Done before the guest is
    stopped: it costs no pause."""
    exe = f"/proc/{op.vm.pid}/exe"
    running = await asyncio.to_thread(os.stat, exe)
    try:
        on_disk = await asyncio.to_thread(os.stat, procfs.in_root(op.vm.pid, op.vm.binary))
        if (on_disk.st_dev, on_disk.st_ino) == (running.st_dev, running.st_ino):
            return op.vm.binary
    except OSError:
        pass
    copy = op.path(OLD_BINARY_COPY)
    await asyncio.to_thread(shutil.copyfile, exe, copy)
    os.chmod(copy, 0o755)
    log.info("%s: %s was replaced on disk; the old QEMU is kept as %s for a rollback",
             op.vm.name, op.vm.binary, copy)
    return copy


# The new QEMU of cpr-transfer and cpr-reboot listens here (in the operation's work folder)
# until the old QEMU is gone and the VM's own QMP path can be handed to it.
NEW_QMP = "qmp.sock"


def new_qmp_path(workdir: str) -> str:
    return os.path.join(workdir, NEW_QMP)


def hand_over_qmp(workdir: str, vm_qmp_path: str) -> None:
    """Once the old QEMU is gone (it removes its socket on exit): the VM's well-known QMP
    path becomes the new QEMU's. The modes and recovery both take this step."""
    os.replace(new_qmp_path(workdir), vm_qmp_path)


def rewrite_pidfile(op: Operation, pid: int) -> None:
    """Point the VM's -pidfile at its new process (the old QEMU deleted it on exit)."""
    write_pidfiles(op.vm.argv, pid)


def write_pidfiles(vm_argv: Sequence[str], pid: int) -> None:
    for path in qargv.parse(vm_argv).values("pidfile"):
        with contextlib.suppress(OSError):
            (procfs.in_root(pid, path)).write_text(f"{pid}\n")


def pids_with_arg(word: str) -> list[int]:
    """Processes with an argument that contains `word` (a path unique to one operation,
    e.g. inside `-qmp unix:PATH,server=on`)."""
    out = []
    for entry in procfs.PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pid = int(entry.name)
            if any(word in arg for arg in procfs.cmdline(pid)) and procfs.alive(pid):
                out.append(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


async def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while procfs.alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def kill_quietly(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; SIGKILL at once to a stopped process (it would
    hold a SIGTERM until continued)."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        if procfs.stat_state(pid) in ("T", "t"):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)
    if not await wait_gone(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        await wait_gone(pid, timeout)


# How long the old QEMU may take to answer `quit` once it holds nothing the guest needs
# (cpr-reboot waits for it with the guest stopped). A QEMU answers in milliseconds; one that
# does not is stopped or hung, and is killed rather than waited for.
QUIT_ANSWER_S = 1.0


async def retire_old_qemu(session: QmpSession, pid: int, timeout: float) -> None:
    """Quit the old QEMU of a cpr-transfer or cpr-reboot once its state is elsewhere (the new
    QEMU, or the saved state file). If it does not answer (SIGSTOPped, hung), SIGKILL it at
    once: SIGTERM would wait until it is continued, and nothing in it is needed any more."""
    hung = False
    try:
        await session.cmd("quit", timeout=min(timeout, QUIT_ANSWER_S))
    except QmpTimeout:
        hung = True
    except QmpError:
        pass  # the connection may drop before the answer
    await session.close()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        hung = hung or procfs.stat_state(pid) in ("T", "t")
    if hung:
        log.warning("the old QEMU (pid %d) does not answer `quit`: killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await wait_gone(pid, timeout)
    elif not await wait_gone(pid, timeout):
        await kill_quietly(pid)


def stderr_tail(pid: int, lines: int = 5) -> str:
    """The last lines QEMU wrote to its stderr, when that is a file (a VM's log)."""
    try:
        fd_path = f"/proc/{pid}/fd/2"
        if not stat.S_ISREG(os.stat(fd_path).st_mode):
            return ""
        with open(fd_path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode(errors="replace").strip().splitlines()
        # The guard logs to the same stderr; QEMU's own complaint is what a person needs.
        own = [line for line in text if not line.startswith("vmupdate-cpr-guard[")]
        return " | ".join(own[-lines:])
    except OSError:
        return ""


def agent_identity() -> tuple[int, int]:
    """This agent's (pid, start time): what the guard and the keeper watch."""
    pid = os.getpid()
    return pid, procfs.start_time(pid)


@contextlib.asynccontextmanager
async def kept(op: Operation, *, state: str | None = None) -> AsyncIterator[None]:
    """Run a cpr-transfer or cpr-reboot under a keeper: the guard binary started in the VM's
    host context (as the new QEMU is), which brings the guest back if this agent dies
    before the operation is over, and exits when told `done`. Entered before the guest is
    stopped; a keeper that does not start aborts the update (nothing was touched yet). The
    new QEMU must listen on the work folder's `NEW_QMP` until the handover."""
    if op.guard_path is None:
        yield
        return
    status, fifo = op.path("keeper.status"), op.path("keeper.fifo")
    cmd = cpr_guard.keeper_command(
        op.guard_path, status=status, fifo=fifo, agent=agent_identity(),
        old=(op.vm.pid, procfs.start_time(op.vm.pid)), vm_qmp=op.vm.qmp_path,
        workdir=op.workdir, state=state, log=op.path("keeper.log"))
    try:
        await hostexec.spawn_detached(op.host, op.vm.pid, cmd, log_path=op.path("keeper.log"))
        await poll_until(lambda: _keeper_phase(status), timeout=op.timeouts.command,
                         what="starting the keeper", interval=0.001)
    except (hostexec.HostExecError, TimeoutError, OSError) as exc:
        raise UpdateAborted(f"the keeper that resumes the guest if the agent dies did not "
                            f"start ({exc}): {_file_tail(op.path('keeper.log'))}") from exc
    phase = await _keeper_phase(status)
    if phase != cpr_guard.KEEPER_WATCHING:
        raise UpdateAborted(f"the keeper did not start: {phase}: "
                            f"{_file_tail(op.path('keeper.log'))}")
    try:
        yield
    finally:
        with contextlib.suppress(cpr_guard.GuardError, OSError):
            cpr_guard.send(fifo, "done")


async def _keeper_phase(status: str) -> str | None:
    try:
        data = cpr_guard.read_status(status)
    except (cpr_guard.GuardError, ValueError):
        return None
    return str(data.get("phase")) if data and data.get("phase") != "starting" else None
