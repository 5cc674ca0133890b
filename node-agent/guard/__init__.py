"""The cpr-exec guard: build it, and speak its protocol (README.md next to this file).

The guard is a small static C program that QEMU execs as ``cpr-exec-command``. It starts a
watcher, then execs the new QEMU in the same pid; if the new QEMU dies (or is not committed
in time) the watcher execs the old QEMU with the old argv, so the VM comes back.

This module only wraps the build and the file protocol (command line, status file, commit
FIFO); the agent decides when to use them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GUARD_NAME = "vmupdate-cpr-guard"
SOURCE = Path(__file__).with_name("vmupdate-cpr-guard.c")
# Keep in sync with build.sh (a test checks).
CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11")

#: Phases written to the status file.
PHASE_WATCHING = "watching"
PHASE_COMMITTED = "committed"
PHASE_ROLLING_BACK = "rolling-back"  # transient: new QEMU being killed (timeout/abort)
PHASE_ROLLED_BACK = "rolled-back"  # old QEMU exec'd; it runs in status["qemu_pid"]
PHASE_ROLLBACK_FAILED = "rollback-failed"
FINAL_PHASES = frozenset({PHASE_COMMITTED, PHASE_ROLLED_BACK, PHASE_ROLLBACK_FAILED})
#: Phases of a seizer (`seize_command`) before the exec; after it, the watcher's above.
PHASE_SEIZED = "seized"  # it traces the QEMU and waits for its exec
PHASE_SEIZE_FAILED = "seize-failed"  # the kernel refused (or bad options): nothing touched
PHASE_RELEASED = "released"  # it let the QEMU go without an exec to watch (`reason` says why)


class GuardError(RuntimeError):
    """The guard could not be built, checked or reached."""


class WatcherGone(GuardError):
    """Nobody reads the commit FIFO: the watcher has exited or was never started."""


def source_digest() -> str:
    """SHA-256 of the guard source; the built binary prints it for ``--version``."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def build(outdir: str | os.PathLike[str], *, cc: str | None = None) -> Path:
    """Compile the guard into ``outdir/vmupdate-cpr-guard`` (atomically replaced)."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    compiler = cc or os.environ.get("CC") or "gcc"
    if shutil.which(compiler) is None:
        raise GuardError(f"C compiler {compiler!r} not found")
    fd, tmp = tempfile.mkstemp(prefix=f".{GUARD_NAME}.", dir=out)
    os.close(fd)
    try:
        cmd = [compiler, *CFLAGS, f'-DGUARD_VERSION="{source_digest()}"', "-o", tmp, str(SOURCE)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise GuardError(f"building the guard failed:\n{res.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out / GUARD_NAME)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out / GUARD_NAME


def built_version(guard: str | os.PathLike[str]) -> str | None:
    try:
        res = subprocess.run([os.fspath(guard), "--version"], capture_output=True, text=True,
                             timeout=10, check=False)
    except OSError:
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def ensure_built(outdir: str | os.PathLike[str], *, cc: str | None = None) -> Path:
    """Return ``outdir/vmupdate-cpr-guard``, rebuilding it unless it matches the source."""
    guard = Path(outdir) / GUARD_NAME
    if built_version(guard) == source_digest():
        return guard
    return build(outdir, cc=cc)


def guard_command(
    guard: str | os.PathLike[str],
    *,
    status: str | os.PathLike[str],
    commit: str | os.PathLike[str],
    old_argv: Sequence[str],
    new_argv: Sequence[str],
    commit_timeout: float = 30.0,
    log: str | os.PathLike[str] | None = None,
    agent: tuple[int, int] | None = None,
    qmp: str | None = None,
    sigmask: int | None = None,
) -> list[str]:
    """The ``cpr-exec-command`` list: guard, options, ``--``, old argv, ``--``, new argv.

    ``old_argv`` is the full rollback command (old binary, the VM's argv, and its
    ``-incoming``); ``new_argv`` likewise for the new QEMU (add ``-S`` so the guest cannot run
    before commit). ``--old-argc`` makes the split unambiguous even if an argument is ``--``.
    ``agent``: (pid, start time) of the agent: the watcher rolls back as soon as it is gone
    before the commit, and resumes the guest at ``qmp`` if it is gone after the commit.
    ``sigmask``: the QEMU main thread's signal mask, which every program the guard execs
    starts with (QEMU may exec from a thread that blocks every signal).
    """
    for name, argv in (("old", old_argv), ("new", new_argv)):
        if not argv or not os.path.isabs(argv[0]):
            raise GuardError(f"{name} argv must start with an absolute binary path")
        if "-incoming" not in argv[1:] and "--incoming" not in argv[1:]:
            raise GuardError(f"{name} argv has no -incoming")
    cmd = [os.fspath(guard), "--status", os.fspath(status), "--commit", os.fspath(commit),
           "--commit-timeout", f"{commit_timeout:g}"]
    if log is not None:
        cmd += ["--log", os.fspath(log)]
    cmd += _agent_options(agent)
    if qmp is not None:
        cmd += ["--qmp", qmp]
    if sigmask is not None:
        if not 0 <= sigmask < 1 << 64:
            raise GuardError(f"sigmask {sigmask:#x} is not a 64-bit signal mask")
        cmd += ["--sigmask", f"{sigmask:016x}"]
    cmd += ["--old-argc", str(len(old_argv)), "--", *old_argv, "--", *new_argv]
    return cmd


def seize_command(command: Sequence[str], *, qemu: tuple[int, int]) -> list[str]:
    """`command` (a `guard_command`) as a seizer of the QEMU `qemu` (pid, start time), started
    before the migrate: the ``cpr-exec-command`` is then its new argv itself, and the seizer
    becomes the watcher at the exec (it only takes an exec whose command line has the new
    argv's -incoming URI)."""
    return [command[0], "--seize", "--old-pid", str(qemu[0]), "--old-start", str(qemu[1]),
            *command[1:]]


def _agent_options(agent: tuple[int, int] | None) -> list[str]:
    if agent is None:
        return []
    return ["--agent-pid", str(agent[0]), "--agent-start", str(agent[1])]


#: Phases of the keeper's status file (cpr-transfer, cpr-reboot).
KEEPER_WATCHING = "watching"
KEEPER_DONE = "done"  # the agent finished the operation; the keeper exited
KEEPER_ACTING = "acting"  # the agent died; the keeper is bringing the guest back
KEEPER_KEPT = "kept"  # the guest runs again (`action` says where)
KEEPER_FAILED = "failed"


def keeper_command(
    guard: str | os.PathLike[str],
    *,
    status: str | os.PathLike[str],
    fifo: str | os.PathLike[str],
    agent: tuple[int, int],
    old: tuple[int, int],
    vm_qmp: str,
    workdir: str,
    state: str | None = None,
    log: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The guard as the keeper of a cpr-transfer or cpr-reboot (README.md): started in the
    VM's host context before the guest stops; if the agent dies before it says ``done``,
    the keeper brings the guest back on its own. ``old``: the old QEMU's (pid, start time);
    ``workdir``: the operation's folder, where the new QEMU listens on ``qmp.sock``;
    ``state``: cpr-reboot's saved state file."""
    cmd = [os.fspath(guard), "--keep", "--status", os.fspath(status), "--commit",
           os.fspath(fifo), *_agent_options(agent), "--old-pid", str(old[0]),
           "--old-start", str(old[1]), "--vm-qmp", vm_qmp, "--workdir", workdir]
    if state is not None:
        cmd += ["--state", state]
    if log is not None:
        cmd += ["--log", os.fspath(log)]
    return cmd


def check(command: Sequence[str], *, chroot: str | None = None) -> None:
    """Run the guard with ``--check`` on a full guard command (validates, execs nothing)."""
    argv = [command[0], "--check", *command[1:]]
    if chroot:
        argv = ["chroot", chroot, *argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        raise GuardError(res.stderr.strip() or f"guard --check exited {res.returncode}")


def read_status(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The status record, or None if there is none (yet). Writes are atomic renames."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise GuardError(f"status file {path} does not hold an object")
    return data


def send(fifo: str | os.PathLike[str], message: str) -> None:
    """Write one message (``commit``, ``abort``, ``resumed``; ``done`` to a keeper) to the
    watcher's FIFO.

    Raises WatcherGone if there is no FIFO or no reader (the watcher is not running).
    """
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENOENT):
            raise WatcherGone(f"no watcher reads {fifo}") from e
        raise
    try:
        os.write(fd, (message + "\n").encode())
    finally:
        os.close(fd)


def wait_status(
    path: str | os.PathLike[str],
    phases: frozenset[str] = FINAL_PHASES,
    *,
    timeout: float = 10.0,
    interval: float = 0.001,
) -> dict[str, Any]:
    """Poll the status file until its phase is one of ``phases``."""
    deadline = time.monotonic() + timeout
    while True:
        st = read_status(path)
        if st is not None and st.get("phase") in phases:
            return st
        if time.monotonic() >= deadline:
            raise GuardError(f"status {path} not in {sorted(phases)} after {timeout}s: {st}")
        time.sleep(interval)


def commit(fifo: str | os.PathLike[str], status: str | os.PathLike[str],
           *, timeout: float = 5.0) -> dict[str, Any]:
    """Commit and wait until the watcher has taken it (status ``committed``), for tools
    and tests that want to see it. The agent does not wait: it ``cont``s right after
    ``send(fifo, "commit")``, because before any rollback the watcher stops the QEMU and reads
    the FIFO to its end (README.md, "Commit signal").
    """
    send(fifo, "commit")
    st = wait_status(status, timeout=timeout)
    if st.get("phase") != PHASE_COMMITTED:
        raise GuardError(f"commit not acknowledged: {st}")
    return st


def abort(fifo: str | os.PathLike[str], status: str | os.PathLike[str],
          *, timeout: float = 30.0) -> dict[str, Any]:
    """Ask the watcher to kill the (paused, uncommitted) new QEMU and roll back."""
    send(fifo, "abort")
    return wait_status(status, timeout=timeout)
