"""SerialMonitor on a hand-written log (no QEMU)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from e2e.rig import SerialMonitor


async def test_follows_appends_and_judges_continuity(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    mon = SerialMonitor(log).start()
    try:
        with open(log, "a") as f:
            f.write("noise\nBOOT 00000000000000aa 33554432\n")
            for i in range(5):
                f.write(f"TICK {i} 00000000000000aa ok {(i + 1) * 131072}\n")
            f.flush()
            await mon.wait_ticks(5, timeout=5)
            mark = time.monotonic_ns()
            f.write("TICK 5 00000000000000aa ok 786432\nTICK 6 00000000000000")
            f.flush()
            await mon.wait_ticks(1, after=mark, timeout=5)
            f.write("aa ok 917504\n")
            f.flush()
            await mon.wait_ticks(2, after=mark, timeout=5)
        assert mon.token == "00000000000000aa"
        assert [t.counter for t in mon.ticks] == list(range(7))
        mon.assert_continuous()
        assert mon.max_gap_ms(since=mark) >= 0

        with open(log, "a") as f:
            f.write("TICK 9 00000000000000aa BAD 1048576\n")
            f.write("BOOT 00000000000000bb 33554432\nTICK 0 00000000000000bb ok 131072\n")
        await mon.wait_ticks(9, timeout=5)
        with pytest.raises(AssertionError) as e:
            mon.assert_continuous()
        msg = str(e.value)
        assert "counter jumped 6 -> 9" in msg
        assert "token changed" in msg and "BAD from counter 9" in msg and "2 BOOT lines" in msg
    finally:
        mon.stop()
    assert not mon.running
