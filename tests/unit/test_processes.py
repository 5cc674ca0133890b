"""Finding an operation's processes by a path in their arguments (real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmupdate_agent.modes.common import pids_with_arg
from vmupdate_agent.server import stop_leftover_probes


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A process whose argument embeds a unique path, as QEMU's `-qmp unix:PATH,...` does."""
    sock = tmp_path / "ops" / "op-1" / "qmp.sock"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-qmp",
                             f"unix:{sock},server=on,wait=off"])
    yield proc, sock
    proc.kill()
    proc.wait()


def test_pids_with_arg_finds_a_path_inside_an_argument(
        sleeper: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = sleeper
    assert pids_with_arg(str(sock)) == [proc.pid]
    assert pids_with_arg(str(sock.parent / "other.sock")) == []
    proc.kill()
    proc.wait()
    assert pids_with_arg(str(sock)) == []


async def test_leftover_probes_of_a_dead_agent_are_stopped(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    probe = await asyncio.create_subprocess_exec(
        *sleep, "-qmp", f"unix:{runtime}/probe-1234/qmp.sock,server=on,wait=off")
    bystander = await asyncio.create_subprocess_exec(*sleep, f"{runtime}/ops/op-1/qmp.sock")
    try:
        await stop_leftover_probes(str(runtime))
        assert await asyncio.wait_for(probe.wait(), 5) == -15  # SIGTERM
        assert bystander.returncode is None
    finally:
        for p in (probe, bystander):
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await asyncio.wait_for(p.wait(), 5)


@pytest.mark.parametrize("name", ["cpr.sock", "with space.sock"])
def test_unix_listening_only_once_the_socket_listens(tmp_path: Path, name: str) -> None:
    """A socket's file appears at bind(); only listen() makes it accept. Between the two a
    connect is refused, which is what the wait before cpr-transfer's migrate must not miss."""
    import os
    import socket

    from vmupdate_agent import procfs

    path = str(tmp_path / name)
    me = os.getpid()
    assert not procfs.unix_listening(me, path)  # nothing there
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        assert os.path.exists(path)
        assert not procfs.unix_listening(me, path)  # bound, not listening
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client, \
                pytest.raises(ConnectionRefusedError):
            client.connect(path)
        sock.listen(1)
        assert procfs.unix_listening(me, path)
        assert not procfs.unix_listening(me, path + ".other")
    assert not procfs.unix_listening(2**22 + 7, path)  # no such process
