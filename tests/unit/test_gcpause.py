"""The collector is held off while any mode runs, and comes back as it was found."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from vmupdate_agent import gcpause


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_held_turns_the_collector_off_and_back_on() -> None:
    gc.enable()
    with gcpause.held():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_overlapping_holders_share_it_until_the_last_one_leaves() -> None:
    gc.enable()
    first, second = gcpause.held(), gcpause.held()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not gc.isenabled()  # the second operation is still in its pause
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_an_exception_still_gives_the_collector_back() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), gcpause.held():
        raise RuntimeError("the mode failed")
    assert gc.isenabled()


def test_a_collector_found_off_stays_off() -> None:
    gc.disable()
    with gcpause.held():
        assert not gc.isenabled()
    assert not gc.isenabled()
