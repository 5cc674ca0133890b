"""Running programs in a VM's host context.

The agent may live in a container while the VMs live in the host's namespaces, cgroups and
supervisor (or in a chroot). Anything it runs on a VM's behalf — the new binary's `-version`,
probes, dry runs, and the new QEMU of cpr-transfer and cpr-reboot — must run where the VM
runs, so the command is wrapped in a configured prefix. The default enters the VM process's
mount namespace and root with nsenter; on systemd hosts a `systemd-run --scope` prefix puts
the new QEMU into the VM's own unit. cpr-exec needs none of this: QEMU execs itself.

And with the VM's credentials: an update must not raise a VM's privileges. Whatever runs on
a VM's behalf gets the VM process's uid, gid, supplementary groups and no_new_privs (read from
/proc/<pid>/status; applied with setpriv inside the VM's root, after nsenter, which needs
root); a new QEMU, and the keeper that outlives the agent, also join the VM process's
cgroups (/proc/<pid>/cgroup) before they start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field


class HostExecError(RuntimeError):
    pass


DEFAULT_PREFIX = ("nsenter", "--target", "{pid}", "--mount", "--root", "--wd", "--")
SETPRIV_PATHS = ("/usr/bin/setpriv", "/bin/setpriv")
CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class Credentials:
    """Who a process runs as, and where (its cgroup per hierarchy)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    no_new_privs: bool = False
    cgroups: tuple[tuple[str, str], ...] = ()  # (hierarchy id:controllers, path)

    @property
    def privileged(self) -> bool:
        """Root without no_new_privs: nothing to drop."""
        return self.uid == 0 and self.gid == 0 and not self.no_new_privs


def parse_status(text: str) -> tuple[int, int, tuple[int, ...], bool]:
    """(effective uid, effective gid, supplementary groups, no_new_privs) from
    /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    uid = int(fields["Uid"].split()[1])
    gid = int(fields["Gid"].split()[1])
    groups = tuple(int(g) for g in fields.get("Groups", "").split())
    nnp = fields.get("NoNewPrivs", "0").strip() == "1"
    return uid, gid, groups, nnp


def parse_cgroup(text: str) -> tuple[tuple[str, str], ...]:
    """(id:controllers, path) per line of /proc/<pid>/cgroup (v1 and v2 alike)."""
    out = []
    for line in text.splitlines():
        ident, controllers, path = line.split(":", 2)
        out.append((f"{ident}:{controllers}", path))
    return tuple(out)


def credentials_of(pid: int | str) -> Credentials:
    proc = f"/proc/{pid}"
    with open(f"{proc}/status") as f:
        uid, gid, groups, nnp = parse_status(f.read())
    with open(f"{proc}/cgroup") as f:
        cgroups = parse_cgroup(f.read())
    return Credentials(uid, gid, groups, nnp, cgroups)


def privilege_words(c: Credentials) -> list[str]:
    """The setpriv stage that gives a command `c`'s credentials (none for root)."""
    if c.privileged:
        return []
    groups = ",".join(str(g) for g in c.groups)
    return ["setpriv", f"--reuid={c.uid}", f"--regid={c.gid}",
            f"--groups={groups}" if groups else "--clear-groups",
            *(["--nnp"] if c.no_new_privs else []), "--"]


def cgroup_files(vm: Credentials, mine: Credentials, root: str = CGROUP_ROOT) -> list[str]:
    """The cgroup.procs files a process of the agent must join to be where the VM is: each
    hierarchy in which the VM's cgroup differs from the agent's own."""
    own = dict(mine.cgroups)
    v2 = os.path.exists(os.path.join(root, "cgroup.controllers"))
    out = []
    for hierarchy, path in vm.cgroups:
        if own.get(hierarchy) == path:
            continue
        if ".." in path.split("/"):
            raise HostExecError(
                f"the VM's cgroup {path} lies outside the agent's cgroup namespace: run the "
                "agent in the host's cgroup namespace, or the new QEMU would not be placed "
                "where the VM is")
        controllers = hierarchy.split(":", 1)[1]
        if not controllers:
            if not v2:
                continue
            mount = root
        else:
            mount = os.path.join(root, controllers.removeprefix("name="))
        procs = os.path.join(mount, path.lstrip("/"), "cgroup.procs")
        if os.path.exists(procs):
            out.append(procs)
    return out


def cgroup_words(files: Sequence[str]) -> list[str]:
    """A shell stage that moves itself into `files` (cgroup.procs), then execs the rest."""
    if not files:
        return []
    script = ('n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; '
              'n=$((n-1)); done; exec "$@"')
    return ["/bin/sh", "-c", script, "vmupdate-cgroup", str(len(files)), *files]


def give_to_vm(path: str, vm_pid: int) -> None:
    """Make `path` (a work folder) the VM's user's, when the VM does not run as root."""
    creds = credentials_of(vm_pid)
    if not creds.privileged:
        os.chown(path, creds.uid, creds.gid)


def _check_setpriv(pid: int, creds: Credentials) -> None:
    if creds.privileged:
        return
    root = f"/proc/{pid}/root"
    if not any(os.path.exists(root + p) for p in SETPRIV_PATHS):
        raise HostExecError(
            f"the VM runs as uid {creds.uid}, gid {creds.gid}, and setpriv (util-linux) is "
            "not in its root: install it there, or the new QEMU would run with more "
            "privileges than the VM")
# Long-lived QEMUs are started in their own session and not as the agent's children, as a
# host's VM launcher would; the agent (a child subreaper) reaps them if they are orphaned.
DEFAULT_DETACH = ("setsid", "--fork")


@dataclass(frozen=True)
class HostContext:
    prefix: tuple[str, ...] = DEFAULT_PREFIX
    detach: tuple[str, ...] = DEFAULT_DETACH
    env: dict[str, str] = field(default_factory=dict)

    def wrap(self, pid: int, argv: Sequence[str], creds: Credentials | None = None
             ) -> list[str]:
        """`argv` in the VM's context and with its credentials (read now, unless given)."""
        creds = creds or credentials_of(pid)
        _check_setpriv(pid, creds)
        words = [w.replace("{pid}", str(pid)) for w in self.prefix]
        return [*words, *privilege_words(creds), *argv]

    def pin(self, pid: int) -> PinnedContext:
        """Hold the VM's root and mount namespace open, and remember its credentials, to
        start processes there after the VM's own process has exited (cpr-reboot)."""
        creds = credentials_of(pid)
        _check_setpriv(pid, creds)
        cgroup_files(creds, credentials_of("self"))  # refuses now, while the VM still runs
        root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY)
        mnt_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
        return PinnedContext(self, pid, root_fd, mnt_fd, creds)


class PinnedContext:
    def __init__(self, ctx: HostContext, pid: int, root_fd: int, mnt_fd: int,
                 creds: Credentials) -> None:
        self.ctx, self.pid, self.root_fd, self.mnt_fd = ctx, pid, root_fd, mnt_fd
        self.creds = creds

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.root_fd, self.mnt_fd)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        if self.ctx.prefix != DEFAULT_PREFIX:
            words = [w.replace("{pid}", str(self.pid)) for w in self.ctx.prefix]
            return [*words, *privilege_words(self.creds), *argv]
        return ["nsenter", f"--mount=/proc/self/fd/{self.mnt_fd}",
                f"--root=/proc/self/fd/{self.root_fd}", f"--wd=/proc/self/fd/{self.root_fd}",
                "--", *privilege_words(self.creds), *argv]

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


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
    """Start a long-lived process (a new QEMU, the keeper) detached from the agent, in the
    VM's cgroups.

    Its stdout/stderr go to `log_path` so a failure to start can be reported. The detaching
    helper itself exits at once and is reaped here; the pid of the started process is learnt
    afterwards from its QMP socket.
    """
    if isinstance(ctx, PinnedContext):
        creds = ctx.creds
        cmd, pass_fds, base = [*ctx.ctx.detach, *ctx.wrap(argv)], ctx.fds, ctx.ctx
    else:
        creds = credentials_of(vm_pid)
        cmd, pass_fds, base = [*ctx.detach, *ctx.wrap(vm_pid, argv, creds)], (), ctx
    # The new QEMU (and the keeper) live where the VM lived, not in the agent's cgroup (which
    # a restarted pod takes down): the VM's cgroups, joined before anything starts.
    cmd = [*cgroup_words(cgroup_files(creds, credentials_of("self"))), *cmd]
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
