"""Wake when a file in a folder is written or replaced (Linux inotify), instead of polling.

For the waits inside a guest's pause that end when another process writes a file (the
cpr-exec guard's watcher acknowledging the commit): a poll adds up to its interval to the
pause, and an asyncio sleep of 1 ms lasts 1-2 ms (the loop's timer resolution). An inotify
descriptor in the event loop wakes the wait as the file lands.

One inotify instance per event loop, kept for the loop's life: creating one costs about
2 ms the first time, and closing one that has had watches can take 10-20 ms (the kernel
waits for a grace period), both too slow for a guest's pause; adding and removing a watch
takes microseconds. Call `prepare()` before the pause.

Callers re-read the file after each wake (an event says "something changed", never what)
and bound every wait. Without an inotify instance (the per-user limit, 128 by default, is
shared with every other program on the host) a watch degrades to a short poll.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
import weakref
from types import TracebackType

log = logging.getLogger(__name__)

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
# A file written in place (closed after writing) or replaced by a rename into the folder.
_MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

# Without inotify: how often a wait looks again.
FALLBACK_POLL_S = 0.001


class _Instance:
    """The loop's inotify descriptor, its watches by descriptor and their wake-ups."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.fd = self.lib.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeups: dict[int, list[asyncio.Event]] = {}
        if self.fd < 0:
            log.warning("no inotify instance (%s): guard waits poll every %.0f ms",
                        os.strerror(ctypes.get_errno()), FALLBACK_POLL_S * 1000)
            return
        loop.add_reader(self.fd, self._on_readable)
        # Closed with the loop's last reference (the loop's reader holds this object).
        weakref.finalize(self, os.close, self.fd)

    def add(self, folder: str, wakeup: asyncio.Event) -> int:
        if self.fd < 0:
            return -1
        wd = int(self.lib.inotify_add_watch(self.fd, os.fsencode(folder), _MASK))
        if wd < 0:
            log.debug("cannot watch %s (%s): polling", folder, os.strerror(ctypes.get_errno()))
            return -1
        self.wakeups.setdefault(wd, []).append(wakeup)
        return wd

    def remove(self, wd: int, wakeup: asyncio.Event) -> None:
        waiting = self.wakeups.get(wd, [])
        if wakeup in waiting:
            waiting.remove(wakeup)
        if not waiting:
            # The same folder watched twice shares one descriptor: removed with the last.
            self.wakeups.pop(wd, None)
            self.lib.inotify_rm_watch(self.fd, wd)

    def _on_readable(self) -> None:
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("inotify read failed: %s", exc)
                return
            at = 0
            while at + _EVENT.size <= len(buf):
                wd, _, _, size = _EVENT.unpack_from(buf, at)
                at += _EVENT.size + size
                for wakeup in self.wakeups.get(wd, ()):
                    wakeup.set()


_instances: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Instance] = (
    weakref.WeakKeyDictionary())


def prepare() -> None:
    """Create the running loop's instance now (before a pause) rather than at first use."""
    _instance()


def _instance() -> _Instance:
    loop = asyncio.get_running_loop()
    inst = _instances.get(loop)
    if inst is None:
        inst = _instances[loop] = _Instance(loop)
    return inst


class FolderWatch:
    """`async with FolderWatch(folder) as w: ... await w.changed(timeout)`.

    Enter it before the first look at the file, so that no change after that look is missed.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._wakeup = asyncio.Event()
        self._wd = -1
        self._inst: _Instance | None = None

    @property
    def active(self) -> bool:
        """False when the watch fell back to polling."""
        return self._wd >= 0

    async def __aenter__(self) -> FolderWatch:
        self._inst = _instance()
        self._wd = self._inst.add(self.folder, self._wakeup)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._inst is not None and self._wd >= 0:
            self._inst.remove(self._wd, self._wakeup)
        self._wd = -1

    async def changed(self, timeout: float) -> bool:
        """Until something in the folder was written or replaced since the last call (True),
        or `timeout` seconds (False). Polling: after FALLBACK_POLL_S at most."""
        if self._wd < 0:
            await asyncio.sleep(min(timeout, FALLBACK_POLL_S))
            return True
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._wakeup.clear()
        return True
