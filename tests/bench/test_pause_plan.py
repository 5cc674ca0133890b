"""The pause benchmark's plan against the host's RAM: a size the host cannot hold is refused
by name before anything starts. And the hand-made sequence's wait, which makes it stop the
guest as long after the previous update as the agent does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.pause import (
    DEFAULT_LEAD_MS,
    GUEST_TOUCHED_MIB,
    HEADROOM_MIB,
    Case,
    available_mib,
    hand_wait_ms,
    plan_cases,
    ram_needed_mib,
    room_problem,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("method", "copies"), [("plain", 2), ("cpr-exec", 1),
                                                ("cpr-transfer", 1), ("cpr-reboot", 1)])
def test_ram_needed(method: str, copies: int) -> None:
    case = Case(method, "file", 8192)  # type: ignore[arg-type]
    assert ram_needed_mib(case) == copies * 8192 + HEADROOM_MIB


def test_every_full_size_fits_a_24_gib_host_but_not_a_busy_one() -> None:
    cases = plan_cases(["cpr-exec", "cpr-transfer", "cpr-reboot", "plain"], ["memfd", "file"],
                       [256, 1024, 4096, 8192])
    assert all(room_problem(c, 20 * 1024) is None for c in cases)
    refused = [c for c in cases if room_problem(c, 12 * 1024) is not None]
    assert {(c.method, c.mem_mib) for c in refused} == {("plain", 8192)}
    msg = room_problem(Case("plain", "memfd", 8192), 12 * 1024)
    assert msg is not None
    assert "plain/memfd/8192M needs about 17408 MiB" in msg
    assert "12288 MiB are available" in msg and "--sizes" in msg


def test_available_mib() -> None:
    text = "MemTotal:       24683520 kB\nMemFree: 1 kB\nMemAvailable:   20971520 kB\n"
    assert available_mib(text) == 20480
    with pytest.raises(ValueError, match="MemAvailable"):
        available_mib("MemTotal: 1 kB\n")


def test_the_guest_touches_what_its_program_says() -> None:
    """GUEST_TOUCHED_MIB is the rig guest's checked buffer, as its source defines it."""
    source = (REPO / "e2e" / "rig" / "guest" / "ticker.c").read_text()
    m = re.search(r"#define BUF_BYTES \((\d+)UL << 20\)", source)
    assert m is not None, "ticker.c no longer defines BUF_BYTES as (N << 20)"
    assert int(m.group(1)) == GUEST_TOUCHED_MIB


def test_the_hand_made_sequence_waits_as_long_as_the_agent_leads() -> None:
    assert hand_wait_ms([]) == DEFAULT_LEAD_MS
    assert hand_wait_ms([210.0]) == 210.0
    assert hand_wait_ms([180.0, 400.0, 220.0]) == 220.0  # a slow launch does not lead
    assert hand_wait_ms([200.0, 240.0]) == 220.0
