"""Reading QEMU processes from /proc. Small synchronous reads of procfs: they never block."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

PROC = Path("/proc")


def cmdline(pid: int) -> tuple[str, ...]:
    raw = (PROC / str(pid) / "cmdline").read_bytes()
    return tuple(part.decode("utf-8", "surrogateescape") for part in raw.split(b"\0")[:-1])


def root(pid: int) -> str:
    return os.readlink(PROC / str(pid) / "root")


def exe(pid: int) -> str:
    """The process's binary as a path inside its own root (what it would exec by that name)."""
    path = os.readlink(PROC / str(pid) / "exe")
    proc_root = root(pid)
    if proc_root != "/" and path.startswith(proc_root + "/"):
        path = path[len(proc_root):]
    return path.removesuffix(" (deleted)")


def in_root(pid: int, path: str) -> Path:
    """`path` as the process `pid` sees it (its root may be a chroot or another mount ns)."""
    return PROC / str(pid) / "root" / path.lstrip("/")


def alive(pid: int) -> bool:
    try:
        state = stat_state(pid)
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def stat_state(pid: int) -> str:
    text = (PROC / str(pid) / "stat").read_text()
    # comm may contain spaces and parentheses: the state follows the last ')'.
    return text[text.rindex(")") + 2]


def start_time(pid: int) -> int:
    """When the process started (clock ticks since boot): with the pid, who it is."""
    text = (PROC / str(pid) / "stat").read_text()
    return int(text[text.rindex(")") + 2:].split()[19])


def blocked_signals(pid: int) -> int:
    """The signal mask of the process's main thread (SigBlk: bit n-1 is signal n)."""
    with open(PROC / str(pid) / "status") as f:
        return int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)


#: SigBlk of a thread that blocks every signal (the kernel never blocks SIGKILL and SIGSTOP).
ALL_BLOCKED = ((1 << 64) - 1) & ~(1 << 8) & ~(1 << 18)


def parent(pid: int) -> int:
    text = (PROC / str(pid) / "stat").read_text()
    return int(text[text.rindex(")") + 2:].split()[1])


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in (PROC / str(pid) / "task").iterdir():
        try:
            out.extend(int(x) for x in (task / "children").read_text().split())
        except FileNotFoundError:
            continue
    return out


def tun_fds(pid: int) -> dict[str, int]:
    """ifname -> fd number for every tap/tun descriptor the process holds (from fdinfo)."""
    out: dict[str, int] = {}
    fdinfo = PROC / str(pid) / "fdinfo"
    for entry in fdinfo.iterdir():
        try:
            for line in entry.read_text().splitlines():
                if line.startswith("iff:"):
                    out.setdefault(line.split(":", 1)[1].strip(), int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


# /proc/net/unix's Flags column: the socket listens (__SO_ACCEPTCON).
_ACCEPTS = 0x10000


def unix_listening(pid: int, path: str) -> bool:
    """Whether a UNIX socket bound to `path` listens, in `pid`'s network namespace. Its file
    appears at bind(), a moment before listen(): a connect() in between is refused."""
    try:
        lines = (PROC / str(pid) / "net" / "unix").read_text().splitlines()[1:]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    for line in lines:
        # Num RefCount Protocol Flags Type St Inode [Path]; the path is last, spaces and all.
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & _ACCEPTS:
            return True
    return False


def peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


def zombies() -> list[tuple[int, int, str]]:
    """(pid, ppid, comm) of every zombie on the host."""
    out: list[tuple[int, int, str]] = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] == "Z":
            out.append((int(entry.name), int(fields[1]), comm))
    return out
