"""Where an operation's files live, and how long `runtime_dir` may be so its sockets fit.

A UNIX socket path holds at most 107 bytes (``sun_path`` is 108 with the terminating NUL).
Operation ids are up to 128 characters, so an id cannot name the work folder: an id of the
operator's (``vmu-<uid>-g<gen>-<vm uuid>-a<n>``, 83 characters) under ``/run/vmupdate/ops/``
already made ``cpr.sock`` 110 bytes long, and cpr-transfer/cpr-reboot could not start.

Each operation's folder is therefore ``<runtime_dir>/ops/<16 hex digits>``: the start of the
sha256 of the id, the same every time it is computed (recovery finds the folder from the id
in the journal, which keeps the full id). The longest socket the agent creates is then
``<runtime_dir>/ops/<16>/main.sock``; :data:`MAX_RUNTIME_DIR` is the longest `runtime_dir`
for which every socket path fits, and the agent's configuration refuses a longer one.
"""

from __future__ import annotations

import hashlib
import os

# Bytes of a UNIX socket path, without the terminating NUL.
MAX_SOCKET_PATH = 107
OPS = "ops"
FOLDER_CHARS = 16
# Every socket the engine creates in an operation's folder (modes/cpr_transfer, cpr_reboot).
WORKDIR_SOCKETS = ("main.sock", "cpr.sock", "qmp.sock")
# Sockets created directly in runtime_dir (target.probe / target.dry_run: 8 hex digits).
RUNTIME_SOCKETS = ("probe-00000000.sock", "dry-run-00000000.sock")


def folder_name(operation_id: str) -> str:
    """The short, stable name of the work folder of ``operation_id``."""
    return hashlib.sha256(operation_id.encode()).hexdigest()[:FOLDER_CHARS]


def ops_root(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, OPS)


def workdir(runtime_dir: str, operation_id: str) -> str:
    """``<runtime_dir>/ops/<folder_name(id)>``."""
    return os.path.join(ops_root(runtime_dir), folder_name(operation_id))


def _longest_suffix() -> int:
    in_workdir = len(f"/{OPS}/") + FOLDER_CHARS + 1 + max(len(s) for s in WORKDIR_SOCKETS)
    in_runtime = 1 + max(len(s) for s in RUNTIME_SOCKETS)
    return max(in_workdir, in_runtime)


MAX_RUNTIME_DIR = MAX_SOCKET_PATH - _longest_suffix()


class RuntimeDirTooLong(ValueError):
    pass


def check_runtime_dir(runtime_dir: str) -> str:
    """``runtime_dir`` if every socket under it fits; else RuntimeDirTooLong."""
    size = len(runtime_dir.encode())
    if size > MAX_RUNTIME_DIR:
        raise RuntimeDirTooLong(
            f"runtime_dir: {runtime_dir!r} is {size} bytes long; at most {MAX_RUNTIME_DIR} "
            f"are allowed, so that the UNIX sockets of an update (e.g. "
            f"<runtime_dir>/{OPS}/<{FOLDER_CHARS} hex>/{WORKDIR_SOCKETS[0]}) fit in "
            f"{MAX_SOCKET_PATH} bytes; choose a shorter folder such as /run/vmupdate")
    return runtime_dir


def noexec_problem(runtime_dir: str, seen_as: str | None = None) -> str | None:
    """Why programs cannot run from ``runtime_dir`` (a ``noexec`` mount), or None.

    QEMU execs the guard from it (cpr-exec) and every update runs the pinned private copy of
    its target from it: on a ``noexec`` mount both fail with EACCES, cpr-exec's in the middle
    of the update. ``seen_as``: the path under which to look (the runtime dir as a VM's
    root sees it, ``/proc/<pid>/root/...``); the message still names ``runtime_dir``.
    """
    try:
        flags = os.statvfs(seen_as or runtime_dir).f_flag
    except OSError as exc:
        return f"runtime_dir: cannot inspect {runtime_dir}: {exc.strerror}"
    if flags & os.ST_NOEXEC:
        where = "" if seen_as is None else " as the VM's QEMU sees it"
        return (f"runtime_dir: {runtime_dir} is on a noexec mount{where}; QEMU must execute "
                f"the guard and the pinned copy of the target from there. Mount it without "
                f"noexec (e.g. mount -o remount,exec <its mount point>) or set runtime_dir to "
                f"a folder on an exec mount (a tmpfs shared with the VMs' root)")
    return None
