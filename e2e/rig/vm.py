"""Start rig VMs the way a host runs them: detached, in their own session, never our children.

``start_vm`` launches QEMU through ``setsid -f`` (the launcher forks, the QEMU child calls
setsid() and execs the wrapper, which execs QEMU in the same pid; the launcher exits at once
and is reaped by us).  QEMU is thus reparented to the host's init / nearest subreaper, like
a VM started by libvirt or a node agent.  Its pid comes from ``launch.pid`` (written by the
launcher right before exec) and, later, from the QMP socket's SO_PEERCRED (the pid that
listens on it), which follows the VM through a cpr-transfer or a guard's rollback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
import shlex
import signal
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qemu.qmp import QMPClient

from .config import Flavour, QemuInfo, Rig
from .serial import SerialMonitor

Backend = Literal["memfd", "file"]

SUN_PATH_MAX = 107


class VMError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------
# processes


def proc_state(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, comm) of ``pid`` from /proc, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    lp, rp = data.find("("), data.rfind(")")
    comm = data[lp + 1 : rp]
    rest = data[rp + 2 :].split()
    return rest[0], int(rest[1]), comm


def target_path(pid: int) -> str:
    """The binary a VM runs, as its inventory reports it: the agent runs a pinned private
    copy of the target it hashed, reported as the target's path."""
    from vmupdate_agent import pathpolicy, procfs  # the agent's own reading of both

    return pathpolicy.origin(procfs.exe(pid))


def running_build(pid: int) -> tuple[str, str]:
    """`target_path` and the sha256 of the file the process really runs: the path alone no
    longer says which build runs."""
    digest = hashlib.sha256()
    with open(f"/proc/{pid}/exe", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return target_path(pid), digest.hexdigest()


def runs(pid: int, qemu: QemuInfo) -> bool:
    """Whether `pid` runs exactly this build of the rig's (its path and its content)."""
    return running_build(pid) == (qemu.binary, qemu.sha256)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    st = proc_state(pid)
    return st is not None and st[0] not in ("Z", "X")


def zombies() -> list[tuple[int, int, str]]:
    """Every zombie process on the host: (pid, ppid, comm)."""
    out: list[tuple[int, int, str]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = proc_state(int(name))
        if st is not None and st[0] == "Z":
            out.append((int(name), st[1], st[2]))
    return out


def qmp_peer_pid(path: str | os.PathLike[str]) -> int | None:
    """Pid of the process listening on the unix socket ``path`` (SO_PEERCRED), or None.

    Only connects (non-blocking) and closes: works even while another client holds the QMP
    monitor, because the credentials are the listener's, set at listen() time.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        s.connect(os.fspath(path))
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _uid, _gid = struct.unpack("3i", creds)
        return pid if pid > 0 else None
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.ENOTSOCK):
            return None
        raise
    finally:
        s.close()


async def wait_gone(pid: int, timeout: float) -> None:
    """Wait until ``pid`` no longer exists (exited *and* reaped by its parent).

    A zombie that is our own child is reaped here; any other zombie is left to its parent
    (the host's init reaps orphans within a couple of seconds here).
    """
    deadline = time.monotonic() + timeout
    while True:
        st = proc_state(pid)
        if st is None:
            return
        if st[0] == "Z" and st[1] == os.getpid():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: never blocks)
            continue
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"process {pid} ({st[2]}) still present after {timeout:.1f}s: state {st[0]}, "
                f"parent {st[1]}"
            )
        await asyncio.sleep(0.01)


async def wait_exit(pid: int, pidfd: int | None, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to exit (a zombie counts); True if it did.

    With a pidfd, wakes up when the pidfd becomes readable; otherwise polls /proc.
    """
    if not pid_alive(pid):
        return True
    loop = asyncio.get_running_loop()
    if pidfd is None:
        deadline = loop.time() + timeout
        while pid_alive(pid) and loop.time() < deadline:  # noqa: ASYNC110 (no pidfd)
            await asyncio.sleep(0.01)
        return not pid_alive(pid)
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)
    try:
        if pid_alive(pid):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exited.wait(), timeout)
    finally:
        loop.remove_reader(pidfd)
    return not pid_alive(pid)


def _kill(pid: int, pidfd: int | None, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)


# --------------------------------------------------------------------------------------
# the VM


@dataclass
class TestVM:
    """One running rig VM.  Build it with :func:`start_vm`."""

    __test__ = False  # not a pytest test class

    rig: Rig
    flavour: Flavour
    name: str
    workdir: Path
    argv: list[str]
    """Full command line; ``argv[0]`` is the wrapper that was started."""
    uuid: str
    mem_mib: int
    machine: str
    backend: Backend
    mem_path: Path | None
    """memory-backend-file path (backend 'file'), removed by stop()."""
    serial: SerialMonitor
    _pid: int = 0
    _stopped: bool = field(default=False, repr=False)
    _qmp_path: Path | None = field(default=None, repr=False)

    @property
    def args(self) -> list[str]:
        """The VM's argv after argv[0] (what a cpr-exec command repeats)."""
        return self.argv[1:]

    @property
    def qmp_path(self) -> Path:
        """The VM's QMP socket: ``workdir/qmp.sock`` unless :meth:`follow` moved it."""
        return self._qmp_path if self._qmp_path is not None else self.workdir / "qmp.sock"

    @property
    def serial_path(self) -> Path:
        return self.workdir / "serial.log"

    @property
    def pidfile(self) -> Path:
        """The pid the VM was started with (written before exec; no -pidfile is passed,
        because a cpr-transfer target repeating the argv could not lock the same file)."""
        return self.workdir / "launch.pid"

    @property
    def log_path(self) -> Path:
        """QEMU's stdout + stderr."""
        return self.workdir / "qemu.log"

    @property
    def pid(self) -> int:
        """The VM's pid.  The last pid seen while that process is alive; once it is gone
        (after a cpr-transfer's quit or a guard's rollback), whoever listens on the QMP
        socket now (SO_PEERCRED); the last pid seen if nobody listens right now.

        It does not touch the QMP socket while the known pid lives: QEMU's monitor has a
        listen backlog of one, which a probe must not take from a real client.
        Use :meth:`refresh_pid` to ask the socket unconditionally.
        """
        if not pid_alive(self._pid):
            peer = qmp_peer_pid(self.qmp_path)
            if peer is not None:
                self._pid = peer
        return self._pid

    async def follow(self, qmp_path: str | os.PathLike[str], timeout: float = 10.0) -> int:
        """The VM now answers at ``qmp_path`` (e.g. the new QEMU of a cpr-transfer): track
        that socket from now on and return the pid listening there."""
        self._qmp_path = Path(qmp_path)
        return await self.refresh_pid(timeout)

    @property
    def token(self) -> str | None:
        return self.serial.token

    def qemu_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def refresh_pid(self, timeout: float = 5.0) -> int:
        """Wait until something listens on the QMP socket and return its pid."""
        deadline = time.monotonic() + timeout
        while True:
            peer = qmp_peer_pid(self.qmp_path)
            if peer is not None:
                self._pid = peer
                return peer
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name}: nobody listens on {self.qmp_path}")
            await asyncio.sleep(0.002)

    @contextlib.asynccontextmanager
    async def qmp(self, timeout: float = 10.0) -> AsyncIterator[QMPClient]:
        """A connected QMP client (retries until the socket answers, up to ``timeout`` s)."""
        client = await connect_qmp(self.qmp_path, timeout=timeout, name=self.name)
        try:
            yield client
        finally:
            await asyncio.wait_for(client.disconnect(), 5)

    async def query_status(self, timeout: float = 10.0) -> str:
        async with self.qmp(timeout) as q:
            res = await asyncio.wait_for(q.execute("query-status"), timeout)
        assert isinstance(res, dict)
        return str(res["status"])

    async def wait_ticking(self, timeout: float = 60.0, count: int = 3) -> str:
        """Wait until the guest has booted and printed ``count`` TICK lines; return token."""
        await self.serial.wait_for(
            lambda: len(self.serial.ticks) >= count or not pid_alive(self._pid),
            timeout=timeout,
            what=f"{self.name} to tick",
        )
        if len(self.serial.ticks) < count:
            raise VMError(f"{self.name}: QEMU {self._pid} exited before the guest ticked; "
                          f"log: {self.qemu_log()[-2000:]}")
        token = self.serial.token
        assert token is not None
        return token

    async def stop(self, timeout: float = 20.0) -> None:
        """Quit QEMU over QMP (SIGKILL if that fails), wait for the process to disappear,
        stop the serial monitor and remove a file memory backend.  Idempotent."""
        if self._stopped:
            return
        errors: list[str] = []
        try:
            pid = self.pid
            pidfd: int | None = None
            if pid_alive(pid):
                try:
                    pidfd = os.pidfd_open(pid)
                except ProcessLookupError:
                    pidfd = None
            try:
                if pid_alive(pid):
                    try:
                        client = await connect_qmp(self.qmp_path, timeout=3.0, name=self.name)
                        try:
                            with contextlib.suppress(Exception):
                                await asyncio.wait_for(client.execute("quit"), 3.0)
                        finally:
                            with contextlib.suppress(Exception):
                                await asyncio.wait_for(client.disconnect(), 3.0)
                    except Exception as e:  # no QMP: fall back to a signal
                        errors.append(f"QMP quit failed: {e!r}")
                    await wait_exit(pid, pidfd, min(5.0, timeout / 2))
                    if pid_alive(pid):
                        errors.append("QEMU did not exit after quit: SIGKILL")
                        _kill(pid, pidfd, signal.SIGKILL)
                await wait_gone(pid, timeout)
            finally:
                if pidfd is not None:
                    os.close(pidfd)
        finally:
            self._stopped = True
            with contextlib.suppress(RuntimeError):
                self.serial.stop()
            if self.mem_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.mem_path.unlink()
        # Errors that did not keep us from stopping are not fatal; they are kept for debug.
        if errors:
            (self.workdir / "stop.log").write_text("\n".join(errors) + "\n")

    async def kill(self, timeout: float = 20.0) -> None:
        """SIGKILL the VM (no QMP) and wait until it is gone; then clean up like stop()."""
        pid = self.pid
        _kill(pid, None, signal.SIGKILL)
        await wait_gone(pid, timeout)
        await self.stop(timeout)


async def connect_qmp(path: str | os.PathLike[str], *, timeout: float = 10.0,
                      name: str | None = None) -> QMPClient:
    """Connect a QMPClient to ``path``, retrying (every 5 ms) until ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        client = QMPClient(name)
        remaining = deadline - time.monotonic()
        try:
            await asyncio.wait_for(client.connect(os.fspath(path)), max(0.05, remaining))
            return client
        except Exception as e:  # connection refused, no such file, greeting timeout...
            last = e
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 1.0)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"QMP at {path} did not answer within {timeout:.1f}s: {last!r}")
        await asyncio.sleep(0.005)


def build_argv(
    rig: Rig,
    flavour: Flavour,
    *,
    name: str,
    workdir: Path,
    vm_uuid: str,
    mem_mib: int,
    machine: str,
    backend: Backend,
    mem_path: Path | None,
    extra_args: Sequence[str] = (),
    netdev_tap_ifname: str | None = None,
    append: str | None = None,
    initrd: Path | None = None,
) -> list[str]:
    q = rig.qemu(flavour)
    if backend == "memfd":
        mem = f"memory-backend-memfd,id=ram0,size={mem_mib}M,share=on"
    elif backend == "file":
        assert mem_path is not None
        mem = f"memory-backend-file,id=ram0,size={mem_mib}M,mem-path={mem_path},share=on"
    else:
        raise ValueError(f"unknown memory backend {backend!r}")
    argv = [
        str(q.wrapper),
        "-machine", f"{machine},memory-backend=ram0,aux-ram-share=on",
        "-object", mem,
        "-m", f"{mem_mib}M",
        "-accel", "tcg",
        "-nodefaults",
        "-display", "none",
        "-no-user-config",
        "-kernel", str(rig.kernel),
        "-initrd", str(initrd if initrd is not None else rig.initrd),
        "-append", append if append is not None else rig.kernel_append,
        "-chardev", f"file,id=ser0,path={workdir / 'serial.log'},append=on",
        "-serial", "chardev:ser0",
        "-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off",
        "-name", name,
        "-uuid", vm_uuid,
    ]
    if netdev_tap_ifname is not None:
        argv += [
            "-netdev", f"tap,id=net0,ifname={netdev_tap_ifname},script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=net0",
        ]
    argv += list(extra_args)
    return argv


async def launch_detached(argv: Sequence[str], *, cwd: Path, log_path: Path,
                          timeout: float = 10.0) -> None:
    """Run ``argv`` in a new session, not as our child (``setsid -f``); stdout/stderr to
    ``log_path``, stdin from /dev/null.  Returns once the launcher has exited (reaped).

    A ``sh -c 'echo $$ >cwd/launch.pid; exec "$@"'`` in between records the pid before
    exec (the pid QEMU will have, since the wrappers exec too).
    """
    with open(log_path, "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            "setsid", "-f", "/bin/sh", "-c", 'echo $$ >"$0"; exec "$@"',
            str(cwd / "launch.pid"), *argv,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            cwd=cwd, close_fds=True,
        )
    try:
        rc = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 5)
        raise
    if rc != 0:
        raise VMError(f"setsid -f {shlex.join(argv[:1])} ... exited {rc}")


async def start_vm(
    rig: Rig,
    flavour: Flavour,
    *,
    name: str,
    workdir: str | os.PathLike[str] | None = None,
    mem_mib: int = 256,
    machine: str = "pc-q35-10.0",
    backend: Backend = "memfd",
    extra_args: Sequence[str] = (),
    netdev_tap_ifname: str | None = None,
    append: str | None = None,
    initrd: Path | None = None,
    start_timeout: float = 30.0,
    wait_ticking: bool = False,
    boot_timeout: float = 90.0,
) -> TestVM:
    """Start a rig VM detached and return once its QMP socket answers (pid known).

    ``workdir`` must be a fresh (absent or empty) folder under ``rig.vms_dir`` (so the sid
    QEMU, chrooted, sees it at the same path); by default ``vms_dir/<name>-<random>``.
    With ``wait_ticking=True`` also wait until the guest ticks.  ``initrd`` replaces the
    guest's initramfs (e.g. ``rig.disk_initrd``, the guest with a disk I/O load).
    """
    if not name or "/" in name or "," in name:
        raise ValueError(f"bad VM name {name!r}")
    if workdir is None:
        wd = rig.vms_dir / f"{name}-{secrets.token_hex(4)}"
    else:
        wd = Path(workdir).absolute()
    try:
        wd.relative_to(rig.share)
    except ValueError:
        raise ValueError(f"workdir {wd} is not under the rig share {rig.share}") from None
    wd.mkdir(parents=True, exist_ok=True)
    if any(wd.iterdir()):
        raise ValueError(f"workdir {wd} is not empty")
    if len(os.fsencode(wd / "qmp.sock")) > SUN_PATH_MAX:
        raise ValueError(f"{wd / 'qmp.sock'} is too long for a unix socket path")
    mem_path = None
    if backend == "file":
        mem_path = Path("/dev/shm") / f"vmupdate-rig-{name}-{secrets.token_hex(6)}"
    vm_uuid = str(uuid.uuid4())
    argv = build_argv(
        rig, flavour, name=name, workdir=wd, vm_uuid=vm_uuid, mem_mib=mem_mib,
        machine=machine, backend=backend, mem_path=mem_path, extra_args=extra_args,
        netdev_tap_ifname=netdev_tap_ifname, append=append, initrd=initrd,
    )
    (wd / "cmdline").write_text(shlex.join(argv) + "\n")
    serial = SerialMonitor(wd / "serial.log").start()
    vm = TestVM(rig=rig, flavour=flavour, name=name, workdir=wd, argv=argv, uuid=vm_uuid,
                mem_mib=mem_mib, machine=machine, backend=backend, mem_path=mem_path,
                serial=serial)
    try:
        await launch_detached(argv, cwd=wd, log_path=wd / "qemu.log")
        await _wait_started(vm, start_timeout)
        if wait_ticking:
            await vm.wait_ticking(boot_timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            await _cleanup_failed_start(vm)
        raise
    return vm


async def _wait_started(vm: TestVM, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    launched: int | None = None
    while True:
        if launched is None:
            with contextlib.suppress(FileNotFoundError, ValueError):
                launched = int(vm.pidfile.read_text().strip() or "x")
                vm._pid = launched
        peer = qmp_peer_pid(vm.qmp_path)
        if peer is not None:
            if launched is not None and peer != launched:
                raise VMError(f"{vm.name}: launched pid {launched} but QMP socket is {peer}")
            vm._pid = peer
            return
        if launched is not None and not pid_alive(launched):
            raise VMError(f"{vm.name}: QEMU {launched} exited during start-up; "
                          f"log: {vm.qemu_log()[-2000:]}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{vm.name}: QMP socket {vm.qmp_path} not up after {timeout}s; "
                               f"log: {vm.qemu_log()[-2000:]}")
        await asyncio.sleep(0.005)


async def _cleanup_failed_start(vm: TestVM) -> None:
    pid = vm._pid
    if pid and pid_alive(pid):
        _kill(pid, None, signal.SIGKILL)
        await wait_gone(pid, 10)
    vm._stopped = True
    vm.serial.stop()
    if vm.mem_path is not None:
        with contextlib.suppress(FileNotFoundError):
            vm.mem_path.unlink()


@contextlib.asynccontextmanager
async def running_vm(rig: Rig, flavour: Flavour, **kwargs: Any) -> AsyncIterator[TestVM]:
    """``async with running_vm(rig, "sid", name="x") as vm:`` — stopped on exit."""
    vm = await start_vm(rig, flavour, **kwargs)
    try:
        yield vm
    finally:
        await vm.stop()
