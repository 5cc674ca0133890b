"""THE rule on where a target QEMU may come from. Every caller asks here: the agent's
configuration (which directories may be allowed), the gRPC service before it accepts a
request, the target probes before they run anything, the engine when preflight is skipped,
and preflight's check ``target-allowed-directory``.

A target binary may be run only when
- its path, as given, lies under one of the host's allowed directories (lexically);
- its path with every symlink resolved *inside the VM's root* (``/proc/<pid>/root``: a
  chrooted or containerised QEMU sees its own files, and an absolute symlink must not lead
  out of it) lies under one of them too;
- neither the file nor any directory from the VM's ``/`` down to it is group- or
  world-writable: anyone who can write one of them could swap the binary a root process is
  about to run;
and an allowed directory may not be ``/`` itself (that allows every absolute path).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

MAX_LINKS = 40
# Private copies of verified targets (vmupdate_agent.target.pin) live in
# <runtime_dir>/vmupdate-pinned/<sha256>/<the target's path>.
PIN_DIR = "vmupdate-pinned"
_PINNED = re.compile(r"/" + PIN_DIR + r"/[0-9a-f]{64}(/.+)$")


def origin(path: str) -> str:
    """The target path a pinned private copy was made from (any other path unchanged): a VM
    running a pinned copy is reported as running the target it was asked for."""
    m = _PINNED.search(path)
    return m.group(1) if m else path


def allowed_dir_problem(directory: str) -> str | None:
    """Why `directory` may not be an allowed directory (configuration), or None."""
    if not directory.startswith("/"):
        return f"must be an absolute path, got {directory!r}"
    if ".." in directory.split("/"):
        return f"must not contain '..', got {directory!r}"
    if not [p for p in directory.split("/") if p not in ("", ".")]:
        return ("'/' would allow every binary on the host; name the directories the new "
                "QEMU builds are installed in (e.g. /opt/qemu/bin)")
    return None


def lexically_under(path: str, dirs: Sequence[str]) -> bool:
    """Whether `path` (absolute, no '..') lies in one of `dirs` (never when a dir is '/')."""
    if not path.startswith("/") or ".." in path.split("/"):
        return False
    norm = os.path.normpath(path)
    for d in dirs:
        if allowed_dir_problem(d) is not None:
            continue
        base = os.path.normpath(d)
        if norm == base or norm.startswith(base + "/"):
            return True
    return False


def outside_allowed(binary: str, dirs: Sequence[str], *, resolved: str | None = None
                    ) -> str | None:
    """Why `binary` lies outside `dirs` (as given, or `resolved`: its real path), or None."""
    where = ", ".join(dirs) or "none"
    fix = "; install it there or extend allowed_binary_dirs in the agent's configuration"
    if not lexically_under(binary, dirs):
        return (f"target.binary: {binary} is outside the directories this host allows "
                f"({where}){fix}")
    if resolved is not None and not lexically_under(resolved, dirs):
        return (f"target.binary: {binary} resolves to {resolved}, outside the directories "
                f"this host allows ({where}){fix}")
    return None


def writable_problem(path: str, mode: int) -> str | None:
    """Why a file or directory with `mode` may not lead to a binary root runs, or None."""
    if not mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    kind = "directory" if stat.S_ISDIR(mode) else "file"
    who = " and ".join(w for w, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH))
                       if mode & bit)
    return (f"target.binary: the {kind} {path} is writable by {who} "
            f"({stat.filemode(mode)}), so the binary could be swapped; "
            f"chmod go-w {path}")


def root_of(pid: int) -> Path:
    """The VM process's root as the agent reaches it."""
    return Path("/proc") / str(pid) / "root"


def resolve_in_root(root: Path, path: str, *, max_links: int = MAX_LINKS) -> str:
    """`path` with every symlink resolved as a process whose root is `root` would see it."""
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        seen = root.joinpath(*done, part)
        if seen.is_symlink():
            links += 1
            if links > max_links:
                raise OSError(f"too many symlinks resolving {path}")
            link = os.readlink(seen)
            if link.startswith("/"):
                done = []
            parts = [p for p in link.split("/") if p] + parts
            continue
        done.append(part)
    return "/" + "/".join(done)


def chain_modes(root: Path, resolved: str) -> list[tuple[str, int]]:
    """(path, lstat mode) of the VM's '/', every directory down to `resolved`, and it."""
    parts = [p for p in resolved.split("/") if p]
    out = [("/", os.stat(root).st_mode)]  # followed: /proc/<pid>/root is a link
    for i in range(1, len(parts) + 1):
        out.append(("/" + "/".join(parts[:i]), os.lstat(root.joinpath(*parts[:i])).st_mode))
    return out


def check(root: Path | None, binary: str, dirs: Sequence[str]) -> str | None:
    """The whole rule for `binary`; `root` is the VM's root (None: the lexical part only,
    before the VM is known). A message naming the field and the fix, or None."""
    why = outside_allowed(binary, dirs)
    if why is not None or root is None:
        return why
    try:
        resolved = resolve_in_root(root, binary)
    except OSError as exc:
        return f"target.binary: cannot resolve {binary} in the VM's root: {exc}"
    why = outside_allowed(binary, dirs, resolved=resolved)
    if why is not None:
        return why
    try:
        chain = chain_modes(root, resolved)
    except FileNotFoundError:
        return None  # a missing target is preflight's to report (target-exists)
    except OSError as exc:
        return f"target.binary: cannot inspect {resolved} in the VM's root: {exc}"
    for path, mode in chain:
        why = writable_problem(path, mode)
        if why is not None:
            return why
    return None
