"""cpr-transfer: a new QEMU process receives the descriptors over a UNIX socket.

The new QEMU is started first (in the VM's host context, detached, with -S) and blocks on the
cpr channel before it even opens its monitor, so the old one must be told to migrate before
anything waits on the new one. The old QEMU is quit only after the new one has loaded the
state; until the new one is resumed, the old one can be resumed instead (the guest has not
run elsewhere), which is the whole safety argument of this mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path

from vmupdate_agent import argv as qargv
from vmupdate_agent import faultpoints, hostexec, procfs
from vmupdate_agent.models import Outcome, Phase
from vmupdate_agent.modes.common import (
    ModeResult,
    Operation,
    UpdateAborted,
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
    reset_capabilities,
    resume,
    set_migration_events,
    version_asked,
    wait_incoming_loaded,
    wait_outgoing_ended,
)
from vmupdate_agent.qmp import QmpError, QmpSession

log = logging.getLogger(__name__)


def new_command(op: Operation) -> tuple[list[str], str, str, str]:
    main_sock, cpr_sock = op.path("main.sock"), op.path("cpr.sock")
    new_qmp = new_qmp_path(op.workdir)
    new = qargv.replace_socket_path(op.new_argv(), op.vm.qmp_path, new_qmp)
    cpr_channel = {"channel-type": "cpr",
                   "addr": {"transport": "socket", "type": "unix", "path": cpr_sock}}
    argv = qargv.appended(new, [*qargv.INCOMING_EVENTS, "-S", "-incoming", f"unix:{main_sock}",
                                "-incoming", json.dumps(cpr_channel, separators=(",", ":"))])
    return argv.render(), main_sock, cpr_sock, new_qmp


async def run(op: Operation) -> ModeResult:
    async with kept(op):
        return await _run(op)


async def _run(op: Operation) -> ModeResult:
    s = op.session
    was_running = op.vm.runstate == "running"
    argv, main_sock, cpr_sock, new_qmp = new_command(op)
    await op.emit(Phase.STOPPING, f"starting {op.target.binary} beside the VM")
    release_pidfile(op)
    await hostexec.spawn_detached(op.host, op.vm.pid, argv, log_path=op.path("new-qemu.log"))

    async def cleanup_new(why: str) -> UpdateAborted:
        for pid in pids_with_arg(new_qmp):
            await kill_quietly(pid)
        rewrite_pidfile(op, op.vm.pid)
        with contextlib.suppress(QmpError):
            await set_migration_events(s, False)
        note = await ensure_running(s, was_running)
        log_tail = _tail(op.path("new-qemu.log"))
        return UpdateAborted(f"{why}{'; new QEMU said: ' + log_tail if log_tail else ''}; "
                             f"{note}")

    # The old QEMU connects to the cpr socket when told to migrate: the new QEMU must listen
    # on it by then. Its file appears at bind(), a moment before listen(); a migrate in
    # between is refused ("Connection refused") and fails the update.
    deadline = time.monotonic() + op.timeouts.handover
    started = scanned = time.monotonic()
    new_pids: list[int] = []
    while True:
        now = time.monotonic()
        # Whose socket it is: a scan of every process, so every 50 ms (and as soon as the
        # file is there), not at every look; no such process after 0.5 s: it has exited.
        if now - scanned > 0.05 or (not new_pids and os.path.exists(cpr_sock)):
            new_pids, scanned = pids_with_arg(new_qmp), now
            if not new_pids and now - started > 0.5:
                raise await cleanup_new("the new QEMU exited before it opened its cpr channel")
        if any(procfs.unix_listening(pid, cpr_sock) for pid in new_pids):
            break
        if now > deadline:
            raise await cleanup_new("the new QEMU did not open its cpr channel")
        await asyncio.sleep(0.002)

    await reset_capabilities(s)
    await set_migration_events(s, True)
    await s.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
    mark = s.mark()
    channels = [
        {"channel-type": "main", "addr": {"transport": "socket", "type": "unix",
                                          "path": main_sock}},
        {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix",
                                         "path": cpr_sock}},
    ]
    try:
        await s.cmd("migrate", {"channels": channels})
    except QmpError as exc:
        raise await cleanup_new(f"the transfer failed: {exc}") from exc
    # The guest is stopped from here. The new QEMU is connected to, checked and waited for
    # while the old one finishes sending, and resumed as soon as it holds the whole state:
    # the old one's own "completed" is read after the resume (both ends of one stream).
    arriving = asyncio.create_task(_connect_and_check(op, new_qmp))
    outgoing = asyncio.create_task(wait_outgoing_ended(s, since=mark, timeout=op.timeouts.load))
    try:
        await asyncio.wait({arriving, outgoing}, return_when=asyncio.FIRST_COMPLETED)
        op.stop_event = next((e for e in s.events[mark:] if e.name == "STOP"), None)
        if outgoing.done() and (outgoing.exception() is not None
                                or outgoing.result().get("status") != "completed"):
            await _drop(arriving)
            failure = outgoing.exception()
            raise await cleanup_new(f"the transfer failed: {failure}" if failure is not None else
                                    f"the transfer {outgoing.result().get('status')}: "
                                    f"{outgoing.result().get('error-desc', '')}")
        try:
            new, version = await arriving
        except (QmpError, TimeoutError) as exc:
            # The guest never ran in the new QEMU (-S): the old one may take over again, once
            # its side of the stream has ended (the new one is killed first, which ends it).
            for pid in pids_with_arg(new_qmp):
                await kill_quietly(pid)
            with contextlib.suppress(BaseException):
                await outgoing
            raise await cleanup_new(f"the new QEMU did not come up: {exc}") from exc
        op.defer(Phase.TRANSFERRED, "state and descriptors handed to the new QEMU")
        faultpoints.reached("cpr-transfer:transferred")

        try:
            resumed = await resume(new, op.timeouts.command)
        except NotResumed as exc:
            await new.close()
            # No RESUME came: the guest has not run in the new QEMU; the old one takes over.
            raise await cleanup_new(f"the new QEMU failed as the guest was being resumed in "
                                    f"it: {exc}") from exc
        # Seen long before (the old QEMU stops before it sends); read again in case its event
        # was still in the connection's buffer at the first look.
        op.stop_event = op.stop_event or next(
            (e for e in s.events[mark:] if e.name == "STOP"), None)
        await op.emit(Phase.RESUMED, f"the guest runs in the new QEMU (pid {new.peer_pid})")
        faultpoints.reached("cpr-transfer:resumed")
        try:
            sent = await outgoing
        except (QmpError, TimeoutError) as exc:
            sent = {"status": f"unknown ({exc})"}
        if sent.get("status") != "completed":
            # The new QEMU had loaded the whole state, so the guest runs there; the old one is
            # retired as always.
            log.warning("%s: the old QEMU reports the transfer %s after the new one loaded it",
                        op.vm.name, sent.get("status"))
        old_pid = op.vm.pid
        await retire_old_qemu(s, old_pid, op.timeouts.command)
        # The old QEMU removes its socket when it exits; only now can the VM's well-known QMP
        # path be handed to the new one, and the pidfile (which the old one deleted) rewritten.
        hand_over_qmp(op.workdir, op.vm.qmp_path)
        rewrite_pidfile(op, new.peer_pid)
        return ModeResult(outcome=Outcome.UPDATED,
                          message=f"transferred to QEMU {version} in pid {new.peer_pid}",
                          pid_after=new.peer_pid, version_after=version,
                          pause_ms=pause_ms(op.stop_event, resumed),
                          resumed_ns=resumed.qemu_time_ns, session=new)
    finally:
        if not outgoing.done():
            outgoing.cancel()
        with contextlib.suppress(BaseException):
            await outgoing


async def _connect_and_check(op: Operation, new_qmp: str) -> tuple[QmpSession, str]:
    """The new QEMU's session once it answers, is the target's version and has loaded the
    state (paused, -S); closed again on any failure."""
    new = await connect_new_qemu(new_qmp, new_qmp, timeout=op.timeouts.handover,
                                 command_timeout=op.timeouts.command,
                                 log_path=op.path("new-qemu.log"))
    try:
        async with version_asked(new, op.target) as version_query:
            await wait_incoming_loaded(new, op.timeouts.load, events=True)
        version = await version_query
    except BaseException:
        await new.close()
        raise
    return new, version


async def _drop(task: asyncio.Task[tuple[QmpSession, str]]) -> None:
    """Stop connecting to the new QEMU; close its session if it was already open."""
    task.cancel()
    with contextlib.suppress(BaseException):
        new, _ = await task
        await new.close()


def _tail(path: str, limit: int = 600) -> str:
    try:
        return Path(path).read_text(errors="replace").strip()[-limit:]
    except OSError:
        return ""
