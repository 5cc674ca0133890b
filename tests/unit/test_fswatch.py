"""The folder watch that ends the agent's file waits inside a guest's pause (inotify)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from vmupdate_agent import fswatch


def replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_a_rename_into_the_folder_wakes_the_wait(tmp_path: Path) -> None:
    async with fswatch.FolderWatch(str(tmp_path)) as watch:
        assert watch.active
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, replace, tmp_path / "status", "committed")
        started = loop.time()
        assert await watch.changed(10.0)
        # Woken by the event, not by the (ten-second) timeout.
        assert loop.time() - started < 5.0
        assert (tmp_path / "status").read_text() == "committed"


async def test_nothing_happening_is_a_timeout(tmp_path: Path) -> None:
    async with fswatch.FolderWatch(str(tmp_path)) as watch:
        assert not await watch.changed(0.05)


async def test_a_change_before_the_wait_is_not_missed(tmp_path: Path) -> None:
    async with fswatch.FolderWatch(str(tmp_path)) as watch:
        replace(tmp_path / "status", "x")
        await asyncio.sleep(0.01)  # the loop reads the event
        assert await watch.changed(0.0 + 5.0)
        # And it is consumed: the next wait waits.
        assert not await watch.changed(0.05)


async def test_the_same_folder_watched_twice(tmp_path: Path) -> None:
    async with fswatch.FolderWatch(str(tmp_path)) as first:
        async with fswatch.FolderWatch(str(tmp_path)) as second:
            replace(tmp_path / "a", "1")
            assert await first.changed(5.0) and await second.changed(5.0)
        # The inner one gone, the outer still wakes.
        replace(tmp_path / "b", "2")
        assert await first.changed(5.0)


async def test_a_missing_folder_falls_back_to_polling(tmp_path: Path) -> None:
    async with fswatch.FolderWatch(str(tmp_path / "absent")) as watch:
        assert not watch.active
        # A poll: back at once, so the caller looks again.
        assert await watch.changed(10.0)


async def test_other_folders_do_not_wake_a_watch(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "other").mkdir()
    async with fswatch.FolderWatch(str(tmp_path / "mine")) as mine, \
            fswatch.FolderWatch(str(tmp_path / "other")) as other:
        replace(tmp_path / "other" / "f", "1")
        assert await other.changed(5.0)
        assert not await mine.changed(0.05)


@pytest.mark.parametrize("name", ["written", "renamed"])
async def test_written_in_place_or_renamed(tmp_path: Path, name: str) -> None:
    async with fswatch.FolderWatch(str(tmp_path)) as watch:
        if name == "written":
            (tmp_path / "f").write_text("1")
        else:
            replace(tmp_path / "f", "1")
        assert await watch.changed(5.0)
