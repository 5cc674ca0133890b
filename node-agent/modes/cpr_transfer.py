"""cpr-transfer: a new QEMU process receives the descriptors over a UNIX socket.

The new QEMU is started first (in the VM's host context, detached, with -S) and blocks on the
cpr channel before it even opens its monitor, so the old one must be told to migrate before
anything waits on the new one. The old QEMU is quit only after the new one has loaded the
state; until the new one is resumed, the old one can be resumed instead (the guest has not
run elsewhere), which is the whole safety argument of this mode.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from vmupdate_agent import argv as qargv
from vmupdate_agent import hostexec
from vmupdate_agent.models import Outcome, Phase
from vmupdate_agent.modes.common import (
    ModeResult,
    NotResumed,
    Operation,
    UpdateAborted,
    connect_new_qemu,
    ensure_running,
    hand_over_qmp,
    kept,
    kill_quietly,
    new_qmp_path,
    pause_ms,
    pids_with_arg,
    release_pidfile,
    reset_capabilities,
    resume,
    retire_old_qemu,
    rewrite_pidfile,
    verify_version,
    wait_incoming_loaded,
    wait_outgoing_done,
)
from vmupdate_agent.qmp import QmpError


def new_command(op: Operation) -> tuple[list[str], str, str, str]:
    main_sock, cpr_sock = op.path("main.sock"), op.path("cpr.sock")
    new_qmp = new_qmp_path(op.workdir)
    new = qargv.replace_socket_path(op.new_argv(), op.vm.qmp_path, new_qmp)
    cpr_channel = {"channel-type": "cpr",
                   "addr": {"transport": "socket", "type": "unix", "path": cpr_sock}}
    argv = qargv.appended(new, ["-S", "-incoming", f"unix:{main_sock}",
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
        note = await ensure_running(s, was_running)
        log_tail = _tail(op.path("new-qemu.log"))
        return UpdateAborted(f"{why}{'; new QEMU said: ' + log_tail if log_tail else ''}; "
                             f"{note}")

    # The old QEMU connects to the cpr socket: it must exist first.
    deadline = time.monotonic() + op.timeouts.handover
    while not os.path.exists(cpr_sock):
        if time.monotonic() > deadline or (not pids_with_arg(new_qmp)
                                           and time.monotonic() > deadline - op.timeouts.handover
                                           + 0.5):
            raise await cleanup_new("the new QEMU did not open its cpr channel")
        await asyncio.sleep(0.002)

    await reset_capabilities(s)
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
        outgoing = await wait_outgoing_done(s, op.timeouts.load)
    except (QmpError, TimeoutError) as exc:
        raise await cleanup_new(f"the transfer failed: {exc}") from exc
    op.stop_event = next((e for e in s.events[mark:] if e.name == "STOP"), None)
    if outgoing.get("status") != "completed":
        raise await cleanup_new(f"the transfer {outgoing.get('status')}: "
                                f"{outgoing.get('error-desc', '')}")
    await op.emit(Phase.TRANSFERRED, "state and descriptors handed to the new QEMU")

    try:
        new = await connect_new_qemu(new_qmp, new_qmp, timeout=op.timeouts.handover,
                                     command_timeout=op.timeouts.command,
                                     log_path=op.path("new-qemu.log"))
    except QmpError as exc:
        raise await cleanup_new(f"the new QEMU did not answer on QMP: {exc}") from exc
    try:
        await wait_incoming_loaded(new, op.timeouts.load)
        version = await verify_version(new, op.target)
    except (QmpError, TimeoutError) as exc:
        await new.close()
        # The guest never ran in the new QEMU (-S): the old one may take over again.
        raise await cleanup_new(f"the new QEMU did not come up: {exc}") from exc

    try:
        resumed = await resume(new, op.timeouts.command)
    except NotResumed as exc:
        await new.close()
        # No RESUME came: the guest has not run in the new QEMU; the old one takes over.
        raise await cleanup_new(f"the new QEMU failed as the guest was being resumed in "
                                f"it: {exc}") from exc
    await op.emit(Phase.RESUMED, f"the guest runs in the new QEMU (pid {new.peer_pid})")
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




def _tail(path: str, limit: int = 600) -> str:
    try:
        return Path(path).read_text(errors="replace").strip()[-limit:]
    except OSError:
        return ""
