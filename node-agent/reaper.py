"""The agent as a child subreaper.

cpr-exec's guard double-forks a watcher and cpr-transfer/cpr-reboot start QEMUs detached;
when such a process is orphaned it is re-parented to the nearest subreaper. Without one it
lands on PID 1, and not every PID 1 reaps (a container's might not): a dead VM process would
then stay a zombie forever, the bug the older out-of-tree cpr-exec had. So the agent marks
itself a subreaper and reaps every adopted child it did not start itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import threading
import time

from vmupdate_agent import procfs

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class OrphanReaper:
    """Reaps dead children that nobody in this process waits for.

    Children started through asyncio/subprocess are waited for by their own watchers, which
    reap them at once. A zombie that is still unreaped a grace period after it was first seen
    is nobody's: an adopted orphan. Only those are reaped, so the two never race for the same
    exit status; pids registered with `own` are never touched.
    """

    def __init__(self, interval: float = 0.05, grace: float = 0.5) -> None:
        self._interval = interval
        self._grace = grace
        self._seen: dict[int, float] = {}
        self._own: set[int] = set()
        self._lock = threading.Lock()
        self.reaped: list[tuple[int, int]] = []

    def own(self, pid: int) -> None:
        """Mark a child as waited for elsewhere (e.g. an asyncio subprocess)."""
        with self._lock:
            self._own.add(pid)

    def disown(self, pid: int) -> None:
        with self._lock:
            self._own.discard(pid)

    def reap_once(self) -> list[int]:
        done: list[int] = []
        now = time.monotonic()
        try:
            kids = procfs.children(os.getpid())
        except FileNotFoundError:
            return done
        self._seen = {pid: t for pid, t in self._seen.items() if pid in kids}
        for pid in kids:
            with self._lock:
                if pid in self._own:
                    continue
            try:
                if procfs.stat_state(pid) != "Z":
                    continue
                first = self._seen.setdefault(pid, now)
                if now - first < self._grace:
                    continue
                got, status = os.waitpid(pid, os.WNOHANG)
            except (ChildProcessError, FileNotFoundError, ProcessLookupError):
                continue
            if got:
                self.reaped.append((got, status))
                done.append(got)
                log.debug("reaped adopted child %d (status %d)", got, status)
        return done

    async def run(self) -> None:
        while True:
            self.reap_once()
            await asyncio.sleep(self._interval)

    def start_thread(self) -> threading.Event:
        """Run in a daemon thread (for processes without a long-lived event loop)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self._interval):
                with contextlib.suppress(Exception):
                    self.reap_once()

        threading.Thread(target=loop, name="orphan-reaper", daemon=True).start()
        return stop
