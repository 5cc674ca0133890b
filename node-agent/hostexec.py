"""Running programs in a VM's host context.

The agent may live in a container while the VMs live in the host's namespaces, cgroups and
supervisor (or in a chroot). Anything it runs on a VM's behalf — the new binary's `-version`,
probes, dry runs, and the new QEMU of cpr-transfer and cpr-reboot — must run where the VM
runs, so the command is wrapped in a configured prefix. The default enters the VM process's
mount namespace and root with nsenter; on systemd hosts a `systemd-run --scope` prefix puts
the new QEMU into the VM's own unit. cpr-exec needs none of this: QEMU execs itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_PREFIX = ("nsenter", "--target", "{pid}", "--mount", "--root", "--wd", "--")
# Long-lived QEMUs are started in their own session and not as the agent's children, as a
# host's VM launcher would; the agent (a child subreaper) reaps them if they are orphaned.
DEFAULT_DETACH = ("setsid", "--fork")


@dataclass(frozen=True)
class HostContext:
    prefix: tuple[str, ...] = DEFAULT_PREFIX
    detach: tuple[str, ...] = DEFAULT_DETACH
    env: dict[str, str] = field(default_factory=dict)

    def wrap(self, pid: int, argv: Sequence[str]) -> list[str]:
        words = [w.replace("{pid}", str(pid)) for w in self.prefix]
        return [*words, *argv]

    def pin(self, pid: int) -> PinnedContext:
        """Hold the VM's root and mount namespace open, to start processes there after the
        VM's own process has exited (cpr-reboot's way back)."""
        root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY)
        mnt_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
        return PinnedContext(self, pid, root_fd, mnt_fd)


class PinnedContext:
    def __init__(self, ctx: HostContext, pid: int, root_fd: int, mnt_fd: int) -> None:
        self.ctx, self.pid, self.root_fd, self.mnt_fd = ctx, pid, root_fd, mnt_fd

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.root_fd, self.mnt_fd)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        if self.ctx.prefix != DEFAULT_PREFIX:
            return self.ctx.wrap(self.pid, argv)
        return ["nsenter", f"--mount=/proc/self/fd/{self.mnt_fd}",
                f"--root=/proc/self/fd/{self.root_fd}", f"--wd=/proc/self/fd/{self.root_fd}",
                "--", *argv]

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


class HostExecError(RuntimeError):
    pass


async def run(argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None
              ) -> Completed:
    """Run to completion with a deadline; on timeout the process group is killed and reaped."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise HostExecError(f"{argv[0]} did not finish within {timeout:.0f}s") from exc
    return Completed(proc.returncode or 0, out.decode(errors="replace"),
                     err.decode(errors="replace"))


class Spawned:
    """A process the agent started and waits for (probes, dry runs)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exited(self) -> bool:
        return self.proc.returncode is not None

    async def stderr_text(self) -> str:
        assert self.proc.stderr is not None
        with contextlib.suppress(TimeoutError):
            data = await asyncio.wait_for(self.proc.stderr.read(65536), 1.0)
            return data.decode(errors="replace").strip()
        return ""

    async def stop(self, timeout: float = 5.0) -> int:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        return self.proc.returncode or 0


async def spawn(argv: Sequence[str]) -> Spawned:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    return Spawned(proc)


async def spawn_detached(ctx: HostContext | PinnedContext, vm_pid: int, argv: Sequence[str], *,
                         log_path: str, timeout: float = 10.0) -> None:
    """Start a long-lived process (a new QEMU) detached from the agent.

    Its stdout/stderr go to `log_path` so a failure to start can be reported. The detaching
    helper itself exits at once and is reaped here; the pid of the started process is learnt
    afterwards from its QMP socket.
    """
    if isinstance(ctx, PinnedContext):
        cmd, pass_fds, base = [*ctx.ctx.detach, *ctx.wrap(argv)], ctx.fds, ctx.ctx
    else:
        cmd, pass_fds, base = [*ctx.detach, *ctx.wrap(vm_pid, argv)], (), ctx
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, pass_fds=pass_fds,
            start_new_session=True, env={**os.environ, **base.env})
    finally:
        os.close(fd)
    try:
        rc = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise HostExecError(f"launcher {cmd[0]} did not return within {timeout:.0f}s") from exc
    if rc != 0:
        raise HostExecError(f"launcher {' '.join(cmd[:3])}... exited {rc}")
