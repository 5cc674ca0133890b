"""Fixtures shared by every test folder: the QEMU rig, a subreaper, the zombie check."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from e2e.rig.fixtures import rig, vm_factory  # noqa: F401  (fixtures)
from vmupdate_agent import procfs, reaper

_QEMU_WORDS = ("qemu", "vmupdate", "nsenter", "setsid")


@pytest.fixture(scope="session", autouse=True)
def orphan_reaper() -> Iterator[reaper.OrphanReaper]:
    """The test process stands in for the host's init: the VMs it starts detached, and the
    processes the agent starts, are re-parented to it when orphaned, and reaped."""
    reaper.become_subreaper()
    r = reaper.OrphanReaper(interval=0.02, grace=0.2)
    stop = r.start_thread()
    yield r
    stop.set()


def related_zombies() -> list[tuple[int, int, str]]:
    return [z for z in procfs.zombies() if any(w in z[2].lower() for w in _QEMU_WORDS)]


@pytest.fixture(autouse=True)
def no_zombies_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that starts processes must leave no zombie behind (reaped within 3 s)."""
    yield
    if request.node.get_closest_marker("qemu") is None:
        return
    deadline = time.monotonic() + 3.0
    while (left := related_zombies()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"zombie processes left behind: {left}"
