"""One operation per VM across processes: an flock on a per-VM file in the state dir.

The gRPC service and the CLI share the state dir (the journal) and this lock. Whoever runs an
operation on a VM (an update, a preflight, the recovery of an interrupted update) holds the
VM's lock for the whole of it. The kernel drops an flock when its holder dies, SIGKILL
included, so a lock never outlives its process: whoever takes it next finds the interrupted
operation still `running` in the journal and resolves it.

The lock file names its holder (operation, what it does, which program, pid, since when) so
that a refusal can say who holds the VM. Lock files are never removed (removing a lock file
that another process is about to lock would give two holders). Everything here is
non-blocking (`LOCK_NB`): a busy VM is refused at once, never waited for; callers run these
small file operations in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

LOCK_DIR = "locks"
BUSY_TRIES = 4


class Holder(BaseModel):
    """Who holds a VM: written into its lock file while held."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    operation_id: str  # "" for a preflight or a probe (they have no id)
    kind: str  # update, recovery, preflight, probe
    program: str  # e.g. "the agent service", "vmupdate-agent update"
    pid: int
    since_ns: int
    vm_name: str = ""
    vm_uuid: str = ""
    qmp_path: str = ""

    def matches(self, ref: str) -> bool:
        return ref in {v for v in (self.vm_name, self.vm_uuid, self.qmp_path) if v}

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since_ns / 1e9))
        what = f"operation {self.operation_id}" if self.operation_id else f"a {self.kind}"
        return (f"{what} ({self.kind} by {self.program}, pid {self.pid}) has been running on "
                f"it since {since}")


class VmBusy(Exception):
    """The VM's lock is held by someone else; `holder` is None when it did not say who."""

    def __init__(self, qmp_path: str, holder: Holder | None) -> None:
        who = holder.describe() if holder else "another process holds its lock"
        super().__init__(f"{qmp_path}: {who}")
        self.qmp_path = qmp_path
        self.holder = holder


class StateDirFull(OSError):
    """The VM's lock file cannot be written: its state dir has no room (an OSError, so the
    callers that report an unreachable VM keep working; the message says what to do)."""


def _full(exc: OSError, path: Path, state_dir: str | os.PathLike[str]) -> OSError:
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return exc
    return StateDirFull(f"cannot write the VM's lock file {path}: {exc.strerror}; the "
                        f"state_dir {state_dir} is full: free space there (or give it more "
                        "room) and retry")


def lock_path(state_dir: str | os.PathLike[str], qmp_path: str) -> Path:
    """The lock file of the VM at `qmp_path` (its well-known QMP socket, which an update
    keeps: cpr-transfer hands it to the new QEMU)."""
    key = hashlib.sha256(os.path.normpath(qmp_path).encode()).hexdigest()[:32]
    return Path(state_dir) / LOCK_DIR / f"{key}.lock"


class VmLock:
    """A held lock; `release()` (idempotent) or process death frees it."""

    def __init__(self, fd: int, path: Path, holder: Holder) -> None:
        self._fd: int | None = fd
        self.path = path
        self.holder = holder

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # a stale description never names a holder
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def try_acquire(state_dir: str | os.PathLike[str], qmp_path: str, holder: Holder) -> VmLock:
    """Take the VM's lock now or raise VmBusy naming its holder (never waits)."""
    path = lock_path(state_dir, qmp_path)
    try:
        fd = _open(path)
    except OSError as exc:
        raise _full(exc, path, state_dir) from exc
    try:
        for attempt in range(BUSY_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                found = read_holder(path)
                # No description: a holder about to write it, or a look by `holder_of`
                # (a shared lock of microseconds); look again before calling it busy.
                if found is not None or attempt == BUSY_TRIES - 1:
                    raise VmBusy(qmp_path, found) from None
                time.sleep(0.005)
    except BaseException:
        os.close(fd)
        raise
    try:
        data = holder.model_dump_json().encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except BaseException as exc:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if isinstance(exc, OSError):
            raise _full(exc, path, state_dir) from exc
        raise
    return VmLock(fd, path, holder)


def read_holder(path: Path) -> Holder | None:
    """The description the holder wrote (None: unreadable, or not written yet)."""
    for _ in range(3):  # a holder may be writing it right now
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if data:
            with contextlib.suppress(ValidationError):
                return Holder.model_validate_json(data)
        time.sleep(0.002)
    return None


def holder_of(state_dir: str | os.PathLike[str], qmp_path: str) -> tuple[bool, Holder | None]:
    """(held, its holder if it said) for the VM's lock: a hint, it may change right after."""
    path = lock_path(state_dir, qmp_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False, None  # never locked
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, read_holder(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


def held(state_dir: str | os.PathLike[str], qmp_paths: list[str]
         ) -> dict[str, Holder | None]:
    """The held ones among `qmp_paths`, with their holders where they said."""
    found: dict[str, Holder | None] = {}
    for p in qmp_paths:
        busy, holder = holder_of(state_dir, p)
        if busy:
            found[p] = holder
    return found
