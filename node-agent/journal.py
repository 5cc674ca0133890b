"""The operation journal: one JSON file per update, on the host, written atomically.

It is what makes Update idempotent and restart-safe: an operation is journaled before the
engine touches the VM, its events while it runs, and its result before any client is told.
An agent that restarts reads the operations still marked running and resolves them.

Every write goes to a temporary file that is renamed over the record, so a crash leaves the
old record or the new one, never half of one. The accepted record and the result are
fsynced (file and folder); updates with intermediate events are not (see `save`). A new
record is linked into place instead of renamed, which fails if the id is already there:
two requests with one id cannot both create it. The methods do blocking file I/O; the
service calls them in a worker thread.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from vmupdate_agent import workdirs
from vmupdate_agent.models import ProgressEvent, UpdateResult, VMInfo
from vmupdate_agent.specs import OPERATION_ID, UpdateSpec

log = logging.getLogger(__name__)

# Done operations are kept this long, so a retried request finds its result (the engine's
# per-operation work folders are kept as long).
RETENTION_S = 7 * 86400
# A temporary record older than this is a crash's leftover even if its pid runs again.
STALE_TMP_S = 60.0


class JournalError(RuntimeError):
    """A record could not be read or written; the message names the file."""


class OperationState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"


class OperationRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    operation_id: str
    # sha256 of the accepted request: the same id with another request is refused.
    fingerprint: str
    request: UpdateSpec
    # The VM as found when the operation was accepted (identity, pid, argv, version).
    vm: VMInfo
    # The engine's work folder is workdirs.workdir(runtime_dir, operation_id) (guard status
    # and FIFO).
    runtime_dir: str
    state: OperationState
    created_ns: int
    finished_ns: int | None = None
    events: tuple[ProgressEvent, ...] = ()
    result: UpdateResult | None = None
    # The agent restarted while the operation ran; the outcome was found afterwards.
    resolved_after_restart: bool = False

    @property
    def workdir(self) -> str:
        return workdirs.workdir(self.runtime_dir, self.operation_id)


class Journal:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir) / "operations"

    def open(self) -> None:
        """Create the folder and drop temporary files a crash may have left: not those of a
        live process (the service and the CLI share the journal) unless they are old."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        now = time.time()
        for tmp in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if _writer_alive(tmp.name) and now - tmp.stat().st_mtime < STALE_TMP_S:
                    continue
                tmp.unlink()

    def path(self, operation_id: str) -> Path:
        # Callers validate ids at the API edge; checked again because the id names a file.
        if not OPERATION_ID.fullmatch(operation_id):
            raise JournalError(f"invalid operation id {operation_id!r}")
        return self.dir / f"{operation_id}.json"

    def create(self, record: OperationRecord) -> None:
        """Journal a new operation; FileExistsError if its id is already journaled."""
        self._write(self.path(record.operation_id), record, exclusive=True)

    def save(self, record: OperationRecord, *, durable: bool = True) -> None:
        """Replace the record. `durable=False` skips the fsyncs: the new record survives the
        agent's death but maybe not the host's (for intermediate events)."""
        self._write(self.path(record.operation_id), record, exclusive=False, durable=durable)

    def load(self, operation_id: str) -> OperationRecord | None:
        path = self.path(operation_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise JournalError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            return OperationRecord.model_validate_json(data)
        except ValidationError as exc:
            raise JournalError(f"{path} is not a valid operation record: "
                               f"{exc.error_count()} problem(s), first: "
                               f"{exc.errors()[0]['msg']}") from exc

    def records(self) -> tuple[list[OperationRecord], list[str]]:
        """Every readable record, and one message per unreadable file."""
        good: list[OperationRecord] = []
        bad: list[str] = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = self.load(path.stem)
            except JournalError as exc:
                bad.append(str(exc))
                continue
            if record is not None:
                good.append(record)
        return good, bad

    def prune(self, *, older_than_s: float = RETENTION_S, now_ns: int | None = None
              ) -> list[str]:
        """Delete done records finished longer ago than `older_than_s`; return their ids."""
        now = time.time_ns() if now_ns is None else now_ns
        removed = []
        for record in self.records()[0]:
            finished = record.finished_ns
            if record.state == OperationState.DONE and finished is not None \
                    and now - finished > older_than_s * 1e9:
                with contextlib.suppress(FileNotFoundError):
                    self.path(record.operation_id).unlink()
                removed.append(record.operation_id)
        if removed:
            _fsync_dir(self.dir)
        return removed

    def _write(self, path: Path, record: OperationRecord, *, exclusive: bool,
               durable: bool = True) -> None:
        data = record.model_dump_json(indent=1).encode()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                os.link(tmp, path)  # fails with FileExistsError if the id is taken
            else:
                os.replace(tmp, path)
            if durable:
                _fsync_dir(path.parent)
        except FileExistsError:
            raise
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise JournalError(f"cannot write {path}: {exc.strerror}" + (
                f"; the state_dir {path.parent.parent} is full: free space there (or give "
                f"it more room) and retry" if full else "")) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _writer_alive(name: str) -> bool:
    """Whether the process that writes the temporary file `name` still runs (its pid is in
    the name: `.<id>.json.<pid>.<hex>.tmp`)."""
    parts = name.split(".")
    if len(parts) < 4 or not parts[-3].isdigit():
        return False
    pid = int(parts[-3])
    if pid == os.getpid():
        return False  # nothing of ours is being written while we open the journal
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
