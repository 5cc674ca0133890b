"""Small tmpfs mounts for fault tests (the tests run as root): a full state dir, a noexec
runtime dir. Every mount is undone by the context manager, deepest first."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


class Mounts:
    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, where: Path, options: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "tmpfs", "-o", options, "vmupdate-fault", str(where))
        self.points.append(where)
        return where

    def bind(self, source: Path, where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        _run("mount", "--bind", str(source), str(where))
        self.points.append(where)
        return where

    @staticmethod
    def remount(where: Path, options: str) -> None:
        # A bind mount's own flags (noexec) change with "bind,remount".
        _run("mount", "-o", f"remount,bind,{options}", str(where))

    def close(self) -> None:
        for where in reversed(self.points):
            with contextlib.suppress(RuntimeError):
                _run("umount", str(where))
            if os.path.ismount(where):
                _run("umount", "-l", str(where))
            with contextlib.suppress(OSError):
                where.rmdir()
        self.points.clear()


@contextlib.contextmanager
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    try:
        yield m
    finally:
        m.close()


def fill(directory: Path) -> Path:
    """Write a file in `directory` until its filesystem is full; return that file."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler
