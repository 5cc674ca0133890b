"""cpr-reboot: save the state to a file, quit, start the new QEMU, load.

Guest RAM stays in a file on /dev/shm (x-ignore-shared), so only device state is written.
Between the quit and the new QEMU's load no QEMU runs the VM: if the new one cannot come up,
the agent starts the old binary on the same state file and RAM, so the VM is never lost.
"""

from __future__ import annotations

import contextlib
import logging

from vmupdate_agent import argv as qargv
from vmupdate_agent import hostexec
from vmupdate_agent.models import Outcome, Phase, Target
from vmupdate_agent.modes.common import (
    ModeResult,
    Operation,
    UpdateAborted,
    binary_for_rollback,
    connect_new_qemu,
    hand_over_qmp,
    kept,
    kill_quietly,
    new_qmp_path,
    pause_ms,
    pids_with_arg,
    release_pidfile,
    retire_old_qemu,
    rewrite_pidfile,
)
from vmupdate_agent.modes.migration import (
    NotResumed,
    ensure_running,
    resume,
    version_asked,
    wait_incoming_loaded,
    wait_outgoing_ended,
)
from vmupdate_agent.qmp import QmpError, QmpSession

log = logging.getLogger(__name__)

# x-ignore-shared: guest RAM stays in its shared file, only device state is saved; events:
# the save's end is waited on, not polled (see set_migration_events).
_CAPS = [{"capability": "x-ignore-shared", "state": True},
         {"capability": "events", "state": True}]
# In the operation's work folder; found there again by an agent restarted mid-operation.
STATE_FILE = "state"


async def run(op: Operation) -> ModeResult:
    async with kept(op, state=op.path(STATE_FILE)):
        return await _run(op)


async def _run(op: Operation) -> ModeResult:
    s = op.session
    was_running = op.vm.runstate == "running"
    state_uri = f"file:{op.path(STATE_FILE)}"
    old_binary = await binary_for_rollback(op)
    await s.cmd("migrate-set-parameters", {"mode": "cpr-reboot"})
    await s.cmd("migrate-set-capabilities", {"capabilities": _CAPS})
    mark = s.mark()
    await op.emit(Phase.STOPPING, f"saving device state to {state_uri}")
    try:
        await s.cmd("migrate", {"uri": state_uri})
        outgoing = await wait_outgoing_ended(s, since=mark, timeout=op.timeouts.load)
    except (QmpError, TimeoutError) as exc:
        note = await _stay_in_old(s, was_running)
        raise UpdateAborted(f"saving the state failed: {exc}; {note}") from exc
    op.stop_event = next((e for e in s.events[mark:] if e.name == "STOP"), None)
    if outgoing.get("status") != "completed":
        note = await _stay_in_old(s, was_running)
        raise UpdateAborted(f"saving the state {outgoing.get('status')}: "
                            f"{outgoing.get('error-desc', '')}; {note}")
    await op.emit(Phase.SAVED, "state saved; starting the new QEMU beside the stopped one")
    old_pid = op.vm.pid
    pinned = op.host.pin(old_pid)
    try:
        return await _handover(op, s, pinned, state_uri, was_running, old_binary)
    finally:
        pinned.close()


async def _handover(op: Operation, s: QmpSession, pinned: hostexec.PinnedContext,
                    state_uri: str, was_running: bool, old_binary: str) -> ModeResult:
    # The new QEMU starts while the old one still exists (stopped), on a socket of its own:
    # if it cannot start, the old one simply resumes.
    temp_qmp = new_qmp_path(op.workdir)
    new_argv = qargv.replace_socket_path(op.new_argv(), op.vm.qmp_path, temp_qmp)
    release_pidfile(op)
    try:
        session = await _start(op, pinned, new_argv, temp_qmp)
    except (QmpError, hostexec.HostExecError) as exc:
        rewrite_pidfile(op, op.vm.pid)
        note = await _stay_in_old(s, was_running)
        raise UpdateAborted(f"the new QEMU did not start: {exc}; {note}") from exc
    await retire_old_qemu(s, op.vm.pid, op.timeouts.command)
    # Past this point no QEMU runs the VM: the way back is the old binary on the saved state.
    hand_over_qmp(op.workdir, op.vm.qmp_path)
    try:
        version = await _load(op, session, op.target, state_uri)
    except (QmpError, TimeoutError) as exc:
        await session.close()
        await _kill_started(op)
        return await _restart_old(op, pinned, state_uri, str(exc), old_binary)
    # Inside the pause: reported with the next event (see Operation.defer).
    op.defer(Phase.TRANSFERRED, f"the new QEMU (pid {session.peer_pid}) loaded the "
             "saved state (paused)")
    try:
        resumed = await resume(session, op.timeouts.command)
    except NotResumed as exc:
        # The guest has not run in the new QEMU: the saved state is still the guest's, and
        # the old binary starts on it.
        await session.close()
        await _kill_started(op)
        return await _restart_old(op, pinned, state_uri, f"it failed as the guest was "
                                  f"being resumed in it: {exc}", old_binary)
    await op.emit(Phase.RESUMED, f"the guest runs in the new QEMU (pid {session.peer_pid})")
    await _leave_after_resume(op, session)
    rewrite_pidfile(op, session.peer_pid)
    return ModeResult(outcome=Outcome.UPDATED,
                      message=f"restarted on QEMU {version} in pid {session.peer_pid}",
                      pid_after=session.peer_pid, version_after=version,
                      pause_ms=pause_ms(op.stop_event, resumed),
                      resumed_ns=resumed.qemu_time_ns, session=session)


async def _restart_old(op: Operation, pinned: hostexec.PinnedContext, state_uri: str,
                       why: str, old_binary: str) -> ModeResult:
    old_argv = qargv.with_binary(op.old_argv(), old_binary)
    old_target = Target(binary=old_binary, expected_version=str(op.vm.features.version))
    try:
        session = await _start(op, pinned, old_argv, op.vm.qmp_path)
        version = await _load(op, session, old_target, state_uri)
    except (QmpError, TimeoutError, hostexec.HostExecError) as exc:
        return ModeResult(outcome=Outcome.LOST,
                          message=f"the new QEMU failed ({why}) and so did restarting the old "
                                  f"one ({exc})", pid_after=None, version_after=None,
                          pause_ms=None)
    resumed = await resume(session, op.timeouts.command)
    await _leave_after_resume(op, session)
    rewrite_pidfile(op, session.peer_pid)
    await op.emit(Phase.RECOVERED, f"the new QEMU failed; QEMU {version} restarted on the "
                  "saved state")
    return ModeResult(outcome=Outcome.ROLLED_BACK,
                      message=f"rolled back: the new QEMU failed ({why}); the VM runs QEMU "
                              f"{version} again in pid {session.peer_pid}",
                      pid_after=session.peer_pid, version_after=version,
                      pause_ms=pause_ms(op.stop_event, resumed),
                      resumed_ns=resumed.qemu_time_ns, session=session)


async def _start(op: Operation, pinned: hostexec.PinnedContext, argv: qargv.QemuArgv,
                 qmp_path: str) -> QmpSession:
    cmd = qargv.appended(argv, ["-S", "-incoming", "defer"]).render()
    await hostexec.spawn_detached(pinned, op.vm.pid, cmd, log_path=op.path("new-qemu.log"))
    try:
        return await connect_new_qemu(qmp_path, qmp_path, timeout=op.timeouts.handover,
                                      command_timeout=op.timeouts.command,
                                      log_path=op.path("new-qemu.log"))
    except QmpError:
        await _kill_started(op)
        raise


async def _load(op: Operation, session: QmpSession, target: Target, state_uri: str) -> str:
    async with version_asked(session, target) as version_query:
        await load_saved_state(session, state_uri, op.timeouts.load)
    return await version_query


async def load_saved_state(session: QmpSession, state_uri: str, timeout: float) -> None:
    """Load a cpr-reboot's saved state into a QEMU started with `-incoming defer` (left
    paused: -S). Then `leave_cpr_reboot`."""
    await session.cmd("migrate-set-parameters", {"mode": "cpr-reboot"})
    await session.cmd("migrate-set-capabilities", {"capabilities": _CAPS})
    await session.cmd("migrate-incoming", {"uri": state_uri})
    await wait_incoming_loaded(session, timeout, events=True)  # _CAPS has events


async def leave_cpr_reboot(session: QmpSession) -> None:
    """Back to an ordinary QEMU: a later cpr-transfer or cpr-exec must not send with
    x-ignore-shared (its receiver would refuse the stream)."""
    await session.cmd("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": False},
        {"capability": "events", "state": False}]})
    await session.cmd("migrate-set-parameters", {"mode": "normal"})


async def _stay_in_old(session: QmpSession, was_running: bool) -> str:
    """The update failed before the old QEMU was quit: it keeps the VM, back to an ordinary
    QEMU (best effort: the next update resets what matters anyway) and running."""
    with contextlib.suppress(QmpError):
        await leave_cpr_reboot(session)
    return await ensure_running(session, was_running)


async def _leave_after_resume(op: Operation, session: QmpSession) -> None:
    # After the resume, not before: the guest runs either way; a failure here only leaves
    # the parameters set, which every mode's next update sets again (reset_capabilities).
    try:
        await leave_cpr_reboot(session)
    except QmpError as exc:
        log.warning("%s: could not reset the migration parameters after the resume: %s",
                    op.vm.name, exc)


async def _kill_started(op: Operation) -> None:
    for pid in pids_with_arg(op.path("new-qemu.log")) + pids_with_arg(new_qmp_path(op.workdir)):
        if pid != op.vm.pid:
            await kill_quietly(pid)
