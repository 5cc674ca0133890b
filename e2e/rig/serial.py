"""Tail a guest's serial log and judge its continuity from the host side.

The rig guest (``guest/ticker.c``) prints ``TICK <counter> <token> <ok|BAD> <bytes>`` every
10 ms of guest time.  A helper process reads the log about every millisecond and stamps
each complete line with the host's ``time.monotonic_ns()`` on arrival, so a pause of the VM
shows up as a gap between consecutive lines (the guest's own clocks do not see the pause).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tick:
    t_ns: int
    """Host monotonic time (``time.monotonic_ns()``) at which the line was read."""
    counter: int
    token: str
    ok: bool
    verified: int
    """Bytes of guest RAM verified so far (grows by one slice per tick)."""


@dataclass(frozen=True)
class Line:
    t_ns: int
    text: str


def parse_tick(t_ns: int, text: str) -> Tick | None:
    parts = text.split()
    if len(parts) != 5 or parts[0] != "TICK" or parts[3] not in ("ok", "BAD"):
        return None
    try:
        return Tick(t_ns, int(parts[1]), parts[2], parts[3] == "ok", int(parts[4]))
    except ValueError:
        return None


class SerialMonitor:
    """Follows one serial log file in a daemon thread (poll period ``poll_s``, ~1 ms)."""

    def __init__(self, path: str | os.PathLike[str], *, poll_s: float = 0.001) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._ticks: list[Tick] = []
        self._lines: list[Line] = []
        self._boots: list[Line] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> SerialMonitor:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"serial:{self.path.parent.name}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread (reads what is left first).  Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"serial monitor thread for {self.path} did not stop")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._follow()
        except BaseException as e:  # recorded, re-raised to readers via check()
            self._error = e

    def _follow(self) -> None:
        # The stamps are taken by a separate process (stamper.py); see there for why.
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("stamper.py")), str(self.path),
             str(self.poll_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        assert proc.stdout is not None
        try:
            fd = proc.stdout.fileno()
            pending = b""
            while True:
                ready, _, _ = select.select([fd], [], [], 0.05)
                if not ready:
                    if self._stop.is_set():
                        return
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    stamp, _, text = raw.partition(b" ")
                    self._add(int(stamp), [text])
        finally:
            proc.kill()
            proc.wait(5)
            proc.stdout.close()
            if proc.stdin is not None:
                proc.stdin.close()

    def _add(self, now: int, raw_lines: list[bytes]) -> None:
        with self._lock:
            for raw in raw_lines:
                text = raw.decode("utf-8", "replace").strip("\r\x00 ")
                if not text:
                    continue
                self._lines.append(Line(now, text))
                tick = parse_tick(now, text)
                if tick is not None:
                    self._ticks.append(tick)
                elif text.startswith("BOOT "):
                    self._boots.append(Line(now, text))

    def check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"serial monitor for {self.path} failed") from self._error

    # -- reading -----------------------------------------------------------------------
    @property
    def ticks(self) -> list[Tick]:
        with self._lock:
            return list(self._ticks)

    @property
    def lines(self) -> list[Line]:
        """Every non-empty line of the log (TICK lines included)."""
        with self._lock:
            return list(self._lines)

    @property
    def boots(self) -> list[Line]:
        """``BOOT <token> <bytes>`` lines: more than one means the guest rebooted."""
        with self._lock:
            return list(self._boots)

    def last_tick(self) -> Tick | None:
        with self._lock:
            return self._ticks[-1] if self._ticks else None

    @property
    def token(self) -> str | None:
        """The token of the first TICK line seen (None before the guest ticks)."""
        with self._lock:
            return self._ticks[0].token if self._ticks else None

    def window(self, since: int | None = None, until: int | None = None) -> list[Tick]:
        """Ticks read at host times ``since <= t_ns <= until`` (ns, monotonic)."""
        return [
            t for t in self.ticks
            if (since is None or t.t_ns >= since) and (until is None or t.t_ns <= until)
        ]

    def max_gap_ms(self, since: int | None = None, until: int | None = None) -> float:
        """Largest host-side gap between consecutive TICK lines, in ms.

        The window is the ticks read in ``[since, until]`` plus the last tick read before
        ``since`` (so a blackout that began just before ``since`` is counted whole).
        Raises ValueError when the window holds fewer than two ticks.
        """
        ticks = self.ticks
        sel = [
            i for i, t in enumerate(ticks)
            if (since is None or t.t_ns >= since) and (until is None or t.t_ns <= until)
        ]
        if sel and sel[0] > 0 and since is not None:
            sel.insert(0, sel[0] - 1)
        if len(sel) < 2:
            raise ValueError(
                f"{self.path}: fewer than two TICK lines in the window (have {len(sel)})"
            )
        gaps = (ticks[b].t_ns - ticks[a].t_ns for a, b in itertools.pairwise(sel))
        return max(gaps) / 1e6

    def assert_continuous(self, since: int | None = None, until: int | None = None) -> None:
        """Assert the guest neither rebooted nor lost memory in the window.

        Every counter is the previous + 1, one token throughout, every checksum ok, at most
        one BOOT line overall.  Raises AssertionError naming the first offending lines.
        """
        self.check()
        ticks = self.window(since, until)
        if not ticks:
            raise AssertionError(f"{self.path}: no TICK line in the window")
        problems: list[str] = []
        token = ticks[0].token
        for prev, cur in itertools.pairwise(ticks):
            if cur.token != prev.token:
                problems.append(
                    f"token changed {prev.token} -> {cur.token} between counter "
                    f"{prev.counter} and {cur.counter} (guest rebooted?)"
                )
            elif cur.counter != prev.counter + 1:
                problems.append(
                    f"counter jumped {prev.counter} -> {cur.counter} "
                    f"(host gap {(cur.t_ns - prev.t_ns) / 1e6:.1f} ms)"
                )
            if len(problems) >= 5:
                break
        bad = [t for t in ticks if not t.ok]
        if bad:
            problems.append(
                f"RAM checksum BAD from counter {bad[0].counter} ({len(bad)} BAD lines)"
            )
        if len({t.token for t in ticks}) > 1:
            problems.append(f"tokens seen: {sorted({t.token for t in ticks})}")
        boots = self.boots
        if len(boots) > 1:
            problems.append(f"{len(boots)} BOOT lines: {[b.text for b in boots]}")
        if problems:
            raise AssertionError(
                f"{self.path}: guest not continuous over {len(ticks)} ticks "
                f"(counter {ticks[0].counter}..{ticks[-1].counter}, token {token}): "
                + "; ".join(problems)
            )

    # -- waiting -----------------------------------------------------------------------
    async def wait_for(
        self, pred: Callable[[], bool], *, timeout: float, what: str, period: float = 0.005
    ) -> None:
        """Poll ``pred`` until true; TimeoutError (naming ``what``) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not pred():
            self.check()
            if time.monotonic() >= deadline:
                last = self.lines[-3:]
                raise TimeoutError(
                    f"{self.path}: timed out after {timeout:.1f}s waiting for {what}; "
                    f"last lines: {[ln.text for ln in last]}"
                )
            await asyncio.sleep(period)

    async def wait_ticks(self, count: int = 1, *, after: int | None = None,
                         timeout: float = 10.0) -> Tick:
        """Wait for ``count`` TICK lines read after host time ``after`` (ns); return the last."""

        def enough() -> bool:
            return len(self.window(after)) >= count

        await self.wait_for(enough, timeout=timeout, what=f"{count} TICK line(s)")
        return self.window(after)[count - 1]
