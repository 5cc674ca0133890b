"""The update engine: discovery, preflight, one CPR mode, verification, the safety net.

One call per VM. The engine owns the VM's QMP connection for the whole operation and hands
back an `UpdateResult` whatever happens; on every path that fails before the point of no
return the old QEMU runs on, and the mode modules move that point as late as they can.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmupdate_agent import argv as qargv
from vmupdate_agent import (
    discovery,
    fswatch,
    gcpause,
    hostexec,
    modechoice,
    pathpolicy,
    preflight,
    procfs,
    target,
    workdirs,
)
from vmupdate_agent import guard as cpr_guard
from vmupdate_agent.config import ConfigError
from vmupdate_agent.models import (
    CheckResult,
    CprMode,
    Outcome,
    Phase,
    Preference,
    PreflightReport,
    ProgressEvent,
    RequestedMode,
    Target,
    UpdateResult,
    VMInfo,
)
from vmupdate_agent.modes import cpr_exec, cpr_reboot, cpr_transfer
from vmupdate_agent.modes.common import ModeResult, Operation, ProgressSink, failed_pause_ms

# Part of the engine's interface: an edge (the CLI) uses these, never the modes.
from vmupdate_agent.modes.common import Timeouts as Timeouts
from vmupdate_agent.modes.common import UpdateAborted as UpdateAborted
from vmupdate_agent.modes.migration import ensure_running
from vmupdate_agent.qmp import QmpError, QmpSession
from vmupdate_api import extra_args

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    allowed_dirs: tuple[str, ...]
    runtime_dir: str
    guard_path: str | None = None
    # cpr-exec: the guard seizes the QEMU (False: always in the exec chain); AgentConfig's
    # cpr_exec_guard.
    guard_seize: bool = True
    host: hostexec.HostContext = field(default_factory=hostexec.HostContext)
    timeouts: Timeouts = field(default_factory=Timeouts)


class RuntimeDirUnusable(ConfigError):
    """runtime_dir cannot serve updates (e.g. a noexec mount); the message says how to fix
    it. The agent refuses to start on it."""


def install_guard(runtime_dir: str, prebuilt: str | None = None) -> str:
    """Put the guard where QEMU can exec it (the runtime dir is shared with the VMs' root)."""
    problem = workdirs.noexec_problem(runtime_dir)
    if problem is not None:
        raise RuntimeDirUnusable(problem)
    bindir = Path(runtime_dir) / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    if prebuilt:
        dest = bindir / cpr_guard.GUARD_NAME
        tmp = bindir / f".{cpr_guard.GUARD_NAME}.tmp"
        shutil.copy2(prebuilt, tmp)
        os.replace(tmp, dest)
        return str(dest)
    return str(cpr_guard.ensure_built(bindir))


class Engine:
    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings

    # --- looking -------------------------------------------------------------------------

    async def assess(self, session: QmpSession, raw: discovery.RawFacts, vm: VMInfo,
                     tgt: Target, requested: RequestedMode, *, dry_run: bool = True,
                     run_path: str | None = None,
                     prefer: Preference = Preference.SAME_PID) -> PreflightReport:
        """`run_path`: the target's pinned copy, which the probes run instead of its path."""
        s = self.settings
        ctx = s.host
        runs = run_path or tgt.binary
        binary = await target.binary_facts(vm, tgt.binary, want_sha256=tgt.sha256 is not None,
                                           ctx=ctx, allowed_dirs=s.allowed_dirs,
                                           run_path=run_path)
        probe = None
        # Nothing the host's path rule refuses is ever run, not even to probe it.
        if (binary.executable and self._allowed(tgt.binary, binary.real_path)
                and not binary.policy_error):
            probe = await target.probe(vm, runs, runtime_dir=s.runtime_dir, ctx=ctx)
        host = self._host_facts(vm, raw)
        inputs = preflight.PreflightInputs(vm=vm, target=tgt, requested=requested, host=host,
                                           binary=binary, probe=probe,
                                           use_guard=s.guard_path is not None, prefer=prefer)
        mode, _ = modechoice.choose_mode(requested, vm.features,
                                        probe.features if probe else None, prefer)
        dry = None
        # Extra arguments outside the allowlist never reach a process, not even a dry run.
        if (dry_run and probe is not None and probe.ok and mode is not None
                and extra_args.is_allowed(tgt.extra_args)):
            new_argv = qargv.appended(
                qargv.with_binary(qargv.canonical(qargv.parse(vm.argv), vm.qmp_path), runs),
                tgt.extra_args)
            dry = await target.dry_run(vm, new_argv, runtime_dir=s.runtime_dir, ctx=ctx)
        inputs = preflight.PreflightInputs(**{**inputs.__dict__, "dry_run": dry})
        report = preflight.evaluate(inputs)
        noexec = self.runtime_dir_problem(vm)
        return report.model_copy(update={"checks": (*report.checks, CheckResult(
            name="runtime-dir-exec", passed=noexec is None, message=noexec or "ok"))})

    def runtime_dir_problem(self, vm: VMInfo) -> str | None:
        """Why the VM's QEMU could not run programs from runtime_dir (a noexec mount as its
        root sees it), or None."""
        rd = self.settings.runtime_dir
        return workdirs.noexec_problem(rd, seen_as=str(procfs.in_root(vm.pid, rd)))

    def _allowed(self, path: str, real_path: str) -> bool:
        dirs = self.settings.allowed_dirs
        return pathpolicy.outside_allowed(path, dirs, resolved=real_path or None) is None

    def _host_facts(self, vm: VMInfo, raw: discovery.RawFacts) -> preflight.HostFacts:
        s = self.settings
        try:
            st = os.statvfs(s.runtime_dir)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 0
        try:
            mine = os.stat(s.runtime_dir)
            theirs = os.stat(procfs.in_root(vm.pid, s.runtime_dir))
            shared = (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
        except OSError:
            shared = False
        guard = None
        if s.guard_path and procfs.in_root(vm.pid, s.guard_path).is_file():
            guard = s.guard_path
        return preflight.HostFacts(allowed_dirs=s.allowed_dirs, runtime_dir_free_bytes=free,
                                   runtime_dir_shared=shared, guard_path=guard,
                                   hotplugged=tuple(discovery.hotplugged_devices(raw)),
                                   unplugged=tuple(discovery.unplugged_devices(raw)))

    async def preflight(self, qmp_path: str, tgt: Target, requested: RequestedMode,
                        *, dry_run: bool = True,
                        prefer: Preference = Preference.SAME_PID) -> PreflightReport:
        async with await QmpSession.open(qmp_path, timeout=self.settings.timeouts.command,
                                         command_timeout=self.settings.timeouts.command
                                         ) as session:
            raw = await discovery.gather_raw(session)
            vm = discovery.build_vm_info(raw)
            return await self.assess(session, raw, vm, tgt, requested, dry_run=dry_run,
                                     prefer=prefer)

    # --- updating ------------------------------------------------------------------------

    async def update(self, qmp_path: str, tgt: Target, requested: RequestedMode, *,
                     op_id: str | None = None, skip_preflight: bool = False,
                     use_guard: bool = True, progress: ProgressSink | None = None,
                     prefer: Preference = Preference.SAME_PID) -> UpdateResult:
        s = self.settings
        op_id = op_id or uuid.uuid4().hex
        session = await QmpSession.open(qmp_path, timeout=s.timeouts.command,
                                        command_timeout=s.timeouts.command)
        raw = await discovery.gather_raw(session)
        vm = discovery.build_vm_info(raw)
        base: dict[str, Any] = {"vm": vm.name, "pid_before": vm.pid,
                "version_before": str(vm.features.version)}
        emit = _emitter(progress)
        await emit(Phase.ACCEPTED, f"operation {op_id} on {vm.name} (pid {vm.pid}, QEMU "
                   f"{vm.features.version})")
        report: PreflightReport | None = None
        # Checked where the VM sees it, before anything is copied there or run from it.
        problem = self.runtime_dir_problem(vm)
        if problem is not None:
            await session.close()
            msg = f"{problem}; nothing was changed"
            await emit(Phase.FAILED, msg)
            return UpdateResult(**base, outcome=Outcome.FAILED, mode=None, message=msg,
                                pid_after=vm.pid, version_after=str(vm.features.version))
        # The pin: from here on only the verified private copy of the target runs.
        try:
            pinned = await target.pin(vm, tgt.binary, sha256=tgt.sha256,
                                      allowed_dirs=s.allowed_dirs, runtime_dir=s.runtime_dir)
        except (target.PinRefused, OSError) as exc:
            await session.close()
            msg = f"{exc}; nothing was changed"
            await emit(Phase.FAILED, msg)
            return UpdateResult(**base, outcome=Outcome.FAILED, mode=None, message=msg,
                                pid_after=vm.pid, version_after=str(vm.features.version))
        run = tgt.model_copy(update={"binary": pinned.path})
        try:
            if skip_preflight:
                # Skipping the checks never skips the host's rule on where binaries come from.
                refused = pathpolicy.check(pathpolicy.root_of(vm.pid), tgt.binary,
                                           s.allowed_dirs)
                if refused is not None:
                    await session.close()
                    msg = f"{refused}; nothing was changed"
                    await emit(Phase.FAILED, msg)
                    return UpdateResult(**base, outcome=Outcome.FAILED, mode=None,
                                        message=msg, pid_after=vm.pid,
                                        version_after=str(vm.features.version))
                mode, why = await self._mode_without_preflight(vm, run, requested, prefer)
                await emit(Phase.PREFLIGHT, f"preflight skipped on request; {why}")
            else:
                report = await self.assess(session, raw, vm, tgt, requested,
                                           run_path=pinned.path, prefer=prefer)
                mode, why = report.mode, report.mode_reason
                if not report.passed:
                    failed = "; ".join(f"{c.name}: {c.message}" for c in report.failures())
                    await emit(Phase.FAILED, f"preflight failed: {failed}")
                    await session.close()
                    return UpdateResult(**base, outcome=Outcome.FAILED, mode=mode,
                                        mode_reason=why, message=f"preflight failed, nothing "
                                        f"was changed: {failed}", pid_after=vm.pid,
                                        version_after=str(vm.features.version),
                                        preflight=report)
                await emit(Phase.PREFLIGHT, f"all {len(report.checks)} checks passed; {why}")
            if mode is None:
                await session.close()
                return UpdateResult(**base, outcome=Outcome.FAILED, mode=None, mode_reason=why,
                                    message=why, pid_after=vm.pid,
                                    version_after=str(vm.features.version), preflight=report)
        except (QmpError, OSError, TimeoutError) as exc:
            await session.close()
            raise UpdateAborted(f"preflight could not complete: {exc}") from exc

        workdir = workdirs.workdir(s.runtime_dir, op_id)
        os.makedirs(workdir, exist_ok=True)
        hostexec.give_to_vm(workdir, vm.pid)  # the VM's QEMUs write and listen there
        # cpr-exec's guard; for cpr-transfer and cpr-reboot the same binary is the keeper.
        guard = s.guard_path if use_guard else None
        op = Operation(op_id=op_id, vm=vm, target=run, mode=mode, session=session,
                       workdir=workdir, host=s.host, timeouts=s.timeouts, guard_path=guard,
                       guard_seize=s.guard_seize, progress=progress)
        fswatch.prepare()  # the file waits of the pause use it; its set-up costs ms
        started = time.monotonic()
        try:
            result = await self._run_mode(op, use_guard=guard is not None)
        except UpdateAborted as exc:
            await op.emit(Phase.FAILED, str(exc))
            paused = failed_pause_ms(op)  # the guest may have stopped before the failure
            await session.close()
            return UpdateResult(**base, outcome=Outcome.FAILED, mode=mode, mode_reason=why,
                                message=str(exc), pid_after=vm.pid,
                                version_after=str(vm.features.version), pause_ms=paused,
                                phase_ms=op.phase_ms, preflight=report)
        except (QmpError, OSError, TimeoutError, hostexec.HostExecError) as exc:
            # Unexpected on a path the mode did not classify: make sure of the VM's state.
            note = ""
            if session.connected:
                note = await ensure_running(session, vm.runstate == "running")
            await op.emit(Phase.FAILED, f"{exc}; {note}")
            await session.close()
            return UpdateResult(**base, outcome=Outcome.FAILED, mode=mode, mode_reason=why,
                                message=f"{exc}; {note}", pid_after=vm.pid,
                                version_after=str(vm.features.version),
                                phase_ms=op.phase_ms, preflight=report)
        final = await self._verify(op, result)
        op.phase_ms["total"] = round((time.monotonic() - started) * 1000, 3)
        phase = {Outcome.UPDATED: Phase.FINISHED, Outcome.ROLLED_BACK: Phase.RECOVERED
                 }.get(final.outcome, Phase.FAILED)
        await op.emit(phase, final.message)
        return UpdateResult(**base, outcome=final.outcome, mode=mode, mode_reason=why,
                            message=final.message, pid_after=final.pid_after,
                            version_after=final.version_after, pause_ms=final.pause_ms,
                            paused_at_ns=op.stop_event.qemu_time_ns if op.stop_event else None,
                            resumed_at_ns=final.resumed_ns,
                            phase_ms=op.phase_ms, preflight=report)

    async def _mode_without_preflight(self, vm: VMInfo, tgt: Target, requested: RequestedMode,
                                      prefer: Preference) -> tuple[CprMode | None, str]:
        if requested != RequestedMode.AUTO:
            return CprMode(requested.value), f"{requested.value} was requested"
        probe = await target.probe(vm, tgt.binary, runtime_dir=self.settings.runtime_dir,
                                   ctx=self.settings.host)
        return modechoice.choose_mode(requested, vm.features, probe.features, prefer)

    async def _run_mode(self, op: Operation, *, use_guard: bool) -> ModeResult:
        with gcpause.held():  # no collection inside the guest's pause
            if op.mode == CprMode.CPR_EXEC:
                return await cpr_exec.run(op, use_guard=use_guard)
            if op.mode == CprMode.CPR_TRANSFER:
                return await cpr_transfer.run(op)
            return await cpr_reboot.run(op)

    async def _verify(self, op: Operation, result: ModeResult) -> ModeResult:
        session = result.session
        if session is None:
            return result
        try:
            try:
                st = await session.cmd("query-status")
            except QmpError as exc:
                if procfs.alive(session.peer_pid):
                    raise
                # Not a paused guest to save: the QEMU that ran it is gone.
                return ModeResult(outcome=Outcome.LOST, message=(
                    f"{result.message}; but then that QEMU (pid {session.peer_pid}) died "
                    f"({exc}) after the guest had run in it: the old QEMU's state is older "
                    "than the guest's memory, so nothing can be resumed safely; the VM must "
                    "be started again"), pid_after=None, version_after=None,
                    pause_ms=result.pause_ms)
            if st.get("status") != "running" and op.vm.runstate == "running":
                # Never leave a VM paused: this is the last place that can notice.
                await session.cmd("cont")
                st = await session.cmd("query-status")
            if st.get("status") != "running" and op.vm.runstate == "running":
                return ModeResult(outcome=Outcome.LOST if result.outcome != Outcome.UPDATED
                                  else Outcome.FAILED,
                                  message=f"{result.message}; but the VM is {st.get('status')}",
                                  pid_after=result.pid_after,
                                  version_after=result.version_after,
                                  pause_ms=result.pause_ms)
            if result.outcome == Outcome.UPDATED and op.mode == CprMode.CPR_EXEC \
                    and session.peer_pid != op.vm.pid:
                return ModeResult(outcome=Outcome.FAILED, message=f"{result.message}; but the "
                                  f"pid changed from {op.vm.pid} to {session.peer_pid}",
                                  pid_after=session.peer_pid,
                                  version_after=result.version_after,
                                  pause_ms=result.pause_ms)
            await op.emit(Phase.VERIFIED, f"QEMU {result.version_after} pid "
                          f"{session.peer_pid} {st.get('status')}")
            return result
        finally:
            await session.close()


def _emitter(progress: ProgressSink | None) -> Callable[[Phase, str], Awaitable[None]]:
    async def emit(phase: Phase, message: str) -> None:
        if progress is None:
            return
        res = progress(ProgressEvent(phase=phase, time_ns=time.time_ns(), message=message))
        if res is not None:
            await res

    return emit


async def find_vm(globs: list[str], ref: str, *, timeout: float = 10.0) -> VMInfo:
    """A VM by name, uuid or QMP socket path."""
    if ref.startswith("/") and os.path.exists(ref):
        info, _ = await discovery.discover(ref, timeout=timeout)
        return info
    rows = await discovery.inventory(globs, timeout=timeout)
    matches = [info for _, info, _ in rows if info is not None and ref in (info.name, info.uuid)]
    if not matches:
        known = ", ".join(sorted(i.name for _, i, _ in rows if i is not None)) or "none"
        raise LookupError(f"no VM named {ref!r} on this host (VMs found: {known})")
    if len(matches) > 1:
        raise LookupError(f"{len(matches)} VMs are named {ref!r}; use the uuid or socket")
    return matches[0]


def cleanup_workdirs(runtime_dir: str, keep_seconds: float = 7 * 86400) -> None:
    root = Path(workdirs.ops_root(runtime_dir))
    if not root.is_dir():
        return
    now = time.time()
    for d in root.iterdir():
        with contextlib.suppress(OSError):
            if now - d.stat().st_mtime > keep_seconds:
                shutil.rmtree(d)

