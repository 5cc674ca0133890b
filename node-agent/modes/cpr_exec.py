"""cpr-exec: QEMU saves its device state and execs the new binary in the same pid.

With the guard (the default) the point of no return moves past the new QEMU's start: a
watcher holds the preserved descriptors while the new QEMU starts with -S; the agent
reconnects, waits for the state to be loaded, verifies, commits the guard and only then
resumes the guest (without waiting for the commit to be taken: before any rollback the
watcher stops the QEMU and reads the commit FIFO to its end). If the new QEMU dies before
the commit, the watcher execs the old binary on the same descriptors and state: the VM comes
back in the watcher's pid and the agent adopts it.

The watcher comes one of two ways. Seized: the guard, started before the migrate, traces the
QEMU (ptrace) and takes the descriptors at its exec of the new QEMU; the pause holds one
exec, as a hand-made cpr-exec's does. In the exec chain, where the kernel refuses the seize:
QEMU execs the guard, which forks the watcher and execs the new QEMU; a second exec inside
the pause (2-4 ms here), but the watcher is forked from QEMU itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, cast

from vmupdate_agent import argv as qargv
from vmupdate_agent import faultpoints, fswatch, hostexec, procfs
from vmupdate_agent import guard as cpr_guard
from vmupdate_agent.models import Outcome, Phase
from vmupdate_agent.modes.common import (
    ModeResult,
    Operation,
    UpdateAborted,
    agent_identity,
    binary_for_rollback,
    pause_ms,
    stderr_tail,
)
from vmupdate_agent.modes.migration import (
    NotResumed,
    ensure_running,
    reset_capabilities,
    resume,
    version_asked,
    wait_incoming_loaded,
)
from vmupdate_agent.qmp import QmpError, QmpSession, QmpSilent, QmpTimeout

log = logging.getLogger(__name__)


def state_uri_of(op: Operation) -> str:
    return f"file:{op.path('state')}"


def new_command(op: Operation) -> list[str]:
    """The new QEMU's argv: -S, so that the guest cannot run in it before the commit."""
    return qargv.appended(op.new_argv(), [*qargv.INCOMING_EVENTS, "-S", "-incoming",
                                          state_uri_of(op)]).render()


def rollback_command(op: Operation, old_binary: str) -> list[str]:
    """What the watcher runs when the new QEMU fails: exactly the old QEMU, on the state. The
    binary it runs (not argv[0], which may be a wrapper; see binary_for_rollback), its argv,
    and taps adopted by descriptor (fd=N), because a tap opened by name is still held and
    would be busy."""
    old = qargv.taps_by_fd(qargv.with_binary(op.old_argv(), old_binary),
                           procfs.tun_fds(op.vm.pid))
    return qargv.appended(old, ["-incoming", state_uri_of(op)]).render()


def guard_command(op: Operation, old_binary: str, sigmask: int) -> list[str]:
    """The guard's command line for this update, in the exec chain (`cpr_guard.seize_command`
    makes the seizer of it)."""
    assert op.guard_path is not None
    return cpr_guard.guard_command(
        op.guard_path, status=op.path("guard.status"), commit=op.path("guard.commit"),
        old_argv=rollback_command(op, old_binary), new_argv=new_command(op),
        commit_timeout=op.timeouts.guard_commit, log=op.path("guard.log"),
        agent=agent_identity(), qmp=op.vm.qmp_path, sigmask=sigmask)


def build_commands(op: Operation, *, use_guard: bool, old_binary: str, sigmask: int
                   ) -> tuple[list[str], str]:
    """The cpr-exec-command with the guard in the exec chain (or none), and the state URI."""
    cmd = guard_command(op, old_binary, sigmask) if use_guard else new_command(op)
    return cmd, state_uri_of(op)


async def main_thread_sigmask(pid: int) -> int:
    """The signal mask of QEMU's main thread, for the programs the guard execs. QEMU blocks
    every signal for a moment while it starts a thread: such a reading is taken again."""
    mask = procfs.blocked_signals(pid)
    for _ in range(50):
        if mask != procfs.ALL_BLOCKED:
            break
        await asyncio.sleep(0.002)
        mask = procfs.blocked_signals(pid)
    return mask


async def seize(op: Operation, old_binary: str, sigmask: int) -> bool:
    """Start the guard as a seizer of the VM's QEMU (outside the pause, in the VM's host
    context, as the keeper of the other modes): QEMU then execs the new QEMU directly and the
    pause holds one exec, not two. False when the kernel refuses the seize (Yama's
    ptrace_scope, another tracer) or the seizer does not start: the guard then goes in the
    exec chain, as the watcher the seizer would have become."""
    cmd = cpr_guard.seize_command(guard_command(op, old_binary, sigmask),
                                  qemu=(op.vm.pid, procfs.start_time(op.vm.pid)))
    try:
        await hostexec.spawn_detached(op.host, op.vm.pid, cmd, log_path=op.path("guard.log"))
        status = await _guard_wait(op, _SEIZE_OUTCOMES, timeout=op.timeouts.command)
    except (hostexec.HostExecError, OSError) as exc:
        status = {"phase": cpr_guard.PHASE_SEIZE_FAILED, "error": str(exc)}
    if status.get("phase") == cpr_guard.PHASE_SEIZED:
        return True
    if status.get("phase") == "unknown":
        # Not started in time: it may still start and seize; an update now would race it.
        raise UpdateAborted(f"the guard did not start within {op.timeouts.command:g}s: "
                            f"{status.get('error')}")
    log.info("cpr-exec of pid %d: the guard cannot seize the QEMU (%s); it goes in the exec "
             "chain instead", op.vm.pid, status.get("error"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(op.path("guard.status"))
    return False


_SEIZE_OUTCOMES = frozenset({cpr_guard.PHASE_SEIZED, cpr_guard.PHASE_SEIZE_FAILED,
                             cpr_guard.PHASE_RELEASED})


async def run(op: Operation, *, use_guard: bool) -> ModeResult:
    s = op.session
    was_running = op.vm.runstate == "running"
    old_binary = await binary_for_rollback(op) if use_guard else op.vm.binary
    sigmask = await main_thread_sigmask(op.vm.pid) if use_guard else 0
    seized = use_guard and op.guard_seize and await seize(op, old_binary, sigmask)
    cmd, state_uri = build_commands(op, use_guard=use_guard and not seized,
                                    old_binary=old_binary, sigmask=sigmask)
    chain = ("the guard, then " if use_guard and not seized else "")
    try:
        await reset_capabilities(s)
        await s.cmd("migrate-set-parameters", {"mode": "cpr-exec", "cpr-exec-command": cmd})
    except BaseException:
        if seized:
            await _guard_send(op, "done")  # no migrate was sent: let the QEMU go
        raise
    mark = s.mark()
    await op.emit(Phase.STOPPING, f"saving state to {state_uri} and exec'ing {chain}"
                  f"{op.target.binary}" + (" (the guard traces the exec)" if seized else ""))
    try:
        await s.cmd("migrate", {"uri": state_uri})
    except QmpError as exc:
        if seized:
            await _guard_send(op, "done")
        note = await ensure_running(s, was_running)
        raise UpdateAborted(f"QEMU refused the migration: {exc}; {note}") from exc

    # Either the exec happens (our connection drops) or QEMU reports the migration failed
    # (e.g. the binary could not be exec'd) and resumes the guest itself.
    failed = asyncio.create_task(s.wait_event(
        "MIGRATION", since=mark, timeout=op.timeouts.handover,
        predicate=lambda e: e.data.get("status") in ("failed", "cancelled")))
    dropped = asyncio.create_task(s.wait_disconnected(op.timeouts.handover))
    try:
        done, _ = await asyncio.wait({failed, dropped}, return_when=asyncio.FIRST_COMPLETED,
                                     timeout=op.timeouts.handover)
    finally:
        for t in (failed, dropped):
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
    op.stop_event = next((e for e in s.events[mark:] if e.name == "STOP"), None)
    if not done:
        note = await ensure_running(s, was_running)
        raise UpdateAborted(f"QEMU neither exec'd nor failed within {op.timeouts.handover}s; "
                            f"{note}")
    if failed in done and s.connected:
        if seized:
            await _guard_send(op, "done")  # QEMU resumed the guest itself: no exec comes
        info = await s.cmd("query-migrate")
        note = await ensure_running(s, was_running)
        raise UpdateAborted(f"cpr-exec failed inside QEMU before the exec: "
                            f"{info.get('error-desc', info.get('status'))}; {note}")
    await s.close()
    # Reported (and journaled) now, inside the pause, unlike the later ones: it carries the
    # guest's STOP time, which a restarted agent needs to report the pause of an update whose
    # agent died here; it is written while the new QEMU starts, which takes tens of ms.
    await op.emit(Phase.EXECED, "QEMU exec'd; waiting for the new QEMU to load the state")
    faultpoints.reached("cpr-exec:execed")
    return await _after_exec(op, use_guard=use_guard)


async def _after_exec(op: Operation, *, use_guard: bool) -> ModeResult:
    deadline = time.monotonic() + op.timeouts.handover + op.timeouts.load
    last_error = ""
    while time.monotonic() < deadline:
        status = cpr_guard.read_status(op.path("guard.status")) if use_guard else None
        if status and status.get("phase") == cpr_guard.PHASE_ROLLBACK_FAILED:
            return _lost(op, f"the guard could not bring the old QEMU back: "
                             f"{status.get('error')}")
        try:
            session = await QmpSession.open_retrying(
                op.vm.qmp_path, timeout=max(0.1, deadline - time.monotonic()),
                command_timeout=op.timeouts.command,
                silence_timeout=op.timeouts.command if use_guard else None)
        except QmpSilent as exc:
            # Hung before the guest ran in it: the watcher kills it and rolls back now
            # rather than after its commit timeout; reconnect to the old QEMU.
            last_error = str(exc)
            await _guard_send(op, "abort")
            continue
        except QmpTimeout as exc:
            last_error = str(exc)
            break
        try:
            if session.peer_pid == op.vm.pid and not _rolled_back_in_place(op, use_guard):
                return await _finish_new(op, session, use_guard=use_guard)
            return await _adopt_rollback(op, session)
        except QmpError as exc:
            # The new QEMU died while loading: the guard's watcher takes over; reconnect.
            # Or it stopped answering: the same, once the watcher is told to abort.
            last_error = str(exc)
            await session.close()
            if not use_guard:
                break
            if isinstance(exc, QmpTimeout):
                await _guard_send(op, "abort")
            await asyncio.sleep(0.005)
    if use_guard:
        status = cpr_guard.read_status(op.path("guard.status")) or {}
        return _lost(op, f"no QEMU answered after the exec ({last_error}); guard status: "
                         f"{status.get('phase')} {status.get('error', '')}")
    return _lost(op, f"the new QEMU did not come up and no guard was used: {last_error}")


def _rolled_back_in_place(op: Operation, use_guard: bool) -> bool:
    # When the guard cannot start its watcher it execs the old QEMU in the same pid.
    if not use_guard:
        return False
    status = cpr_guard.read_status(op.path("guard.status")) or {}
    return bool(status.get("phase") == cpr_guard.PHASE_ROLLED_BACK
                and status.get("qemu_pid") == op.vm.pid)


async def _finish_new(op: Operation, session: QmpSession, *, use_guard: bool) -> ModeResult:
    async with version_asked(session, op.target) as version_query:
        await wait_incoming_loaded(session, op.timeouts.load, events=True)
    try:
        version = await version_query
    except QmpError as exc:
        if use_guard:
            # Not the QEMU we meant: the guest has not run in it, so rolling back is safe.
            await session.close()
            await _guard_send(op, "abort")
            return await _after_exec_abort(op, str(exc))
        raise
    unguarded = ""
    if use_guard:
        # Not waited for: before any rollback the watcher stops the QEMU and reads its FIFO
        # to the end, so this commit wins over a rollback decided after it, and a rollback
        # decided before it kills the QEMU before the `cont` below is acted on.
        try:
            cpr_guard.send(op.path("guard.commit"), "commit")
        except cpr_guard.WatcherGone:
            status = cpr_guard.read_status(op.path("guard.status")) or {}
            if status.get("phase") not in (cpr_guard.PHASE_WATCHING,
                                           cpr_guard.PHASE_COMMITTED):
                await session.close()
                return await _after_exec_abort(op, f"the guard did not take the commit: "
                                                   f"{status.get('phase')}")
            # The watcher died without rolling back (it unlinks its FIFO only once it has
            # said so): nothing can roll back any more, and this QEMU is loaded and checked.
            unguarded = ("; the guard's watcher was gone before the commit, so the guest "
                         "was resumed without it")
            log.warning("cpr-exec of pid %d: the guard's watcher is gone (status %s); "
                        "resuming the guest in the new QEMU without it", op.vm.pid,
                        status.get("phase"))
    op.defer(Phase.SAVED, "the new QEMU loaded the state"
             + (" and the guard was sent the commit" if use_guard and not unguarded else ""))
    if use_guard:
        faultpoints.reached("cpr-exec:committed")
    try:
        resumed = await resume(session, op.timeouts.command)
    except NotResumed as exc:
        if not use_guard:
            raise
        # No RESUME: the new QEMU died or hung before the guest ran in it, so the guard
        # may still put the old QEMU back (it kills the new one first).
        await session.close()
        await _guard_send(op, "abort")
        return await _after_exec_abort(op, f"the new QEMU failed as the guest was being "
                                           f"resumed in it ({exc})")
    if use_guard:
        await _guard_send(op, "resumed")  # the watcher may exit now
    await op.emit(Phase.RESUMED, "the guest runs in the new QEMU")
    return ModeResult(outcome=Outcome.UPDATED,
                      message=f"updated in place to QEMU {version}{unguarded}",
                      pid_after=session.peer_pid, version_after=version,
                      pause_ms=pause_ms(op.stop_event, resumed),
                      resumed_ns=resumed.qemu_time_ns, session=session)


async def _after_exec_abort(op: Operation, why: str) -> ModeResult:
    result = await _after_exec(op, use_guard=True)
    if result.outcome == Outcome.ROLLED_BACK:
        return ModeResult(outcome=Outcome.ROLLED_BACK, message=f"{why}; {result.message}",
                          pid_after=result.pid_after, version_after=result.version_after,
                          pause_ms=result.pause_ms, session=result.session)
    return result


async def _adopt_rollback(op: Operation, session: QmpSession) -> ModeResult:
    status = await _guard_wait(op, frozenset({cpr_guard.PHASE_ROLLED_BACK,
                                              cpr_guard.PHASE_ROLLBACK_FAILED}), timeout=5.0)
    if status.get("phase") != cpr_guard.PHASE_ROLLED_BACK:
        return _lost(op, f"guard: {status.get('error')}")
    await wait_incoming_loaded(session, op.timeouts.load)
    st = await session.cmd("query-status")
    if st.get("status") != "running":
        await session.cmd("cont")
    ver = await session.cmd("query-version")
    q = ver["qemu"]
    version = f"{q['major']}.{q['minor']}.{q['micro']}"
    exit_info = cast(dict[str, Any], status.get("new_exit") or {})
    why = (f"exit code {exit_info['code']}" if "code" in exit_info else
           f"signal {exit_info['signal']}" if "signal" in exit_info else
           status.get("reason") or "unknown")
    tail = stderr_tail(session.peer_pid)
    # The rolled-back QEMU resumes on its own (no -S: it must never wait for an agent that
    # may be gone), so its RESUME is not seen here; the pause is bounded by now.
    bound = None
    if op.stop_event is not None:
        bound = round((time.time_ns() - op.stop_event.qemu_time_ns) / 1e6, 3)
    await op.emit(Phase.RECOVERED, f"the new QEMU failed ({why}); the guard restarted QEMU "
                  f"{version} on the preserved state in pid {session.peer_pid}")
    return ModeResult(
        outcome=Outcome.ROLLED_BACK,
        message=(f"rolled back: the new QEMU exited before the guest ran in it ({why})"
                 + (f": {tail}" if tail else "")
                 + f"; the VM runs QEMU {version} again, now in pid {session.peer_pid}"),
        pid_after=session.peer_pid, version_after=version, pause_ms=bound, session=session)


async def _guard_send(op: Operation, message: str) -> None:
    with contextlib.suppress(cpr_guard.WatcherGone):
        cpr_guard.send(op.path("guard.commit"), message)


async def _guard_wait(op: Operation, phases: frozenset[str], timeout: float) -> dict[str, object]:
    """Until the guard's status is in `phases`: woken as the watcher replaces the file (it
    is the last wait before the resume, with the guest stopped), re-read at least every
    50 ms anyway."""
    deadline = time.monotonic() + timeout
    async with fswatch.FolderWatch(op.workdir) as watch:
        while True:
            status = cpr_guard.read_status(op.path("guard.status"))
            if status is not None and status.get("phase") in phases:
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return status or {"phase": "unknown", "error": "no status file"}
            await watch.changed(min(remaining, 0.05))


def _lost(op: Operation, message: str) -> ModeResult:
    return ModeResult(outcome=Outcome.LOST, message=message, pid_after=None,
                      version_after=None, pause_ms=None)
