"""The journal shared by the service and the CLI: a process opening it never removes the
temporary file another live process is writing, only a dead one's (or an old one)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from vmupdate_agent.journal import STALE_TMP_S, Journal


def test_open_keeps_a_live_writers_temporary_file_and_drops_a_dead_ones(tmp_path: Path
                                                                       ) -> None:
    journal = Journal(tmp_path)
    journal.open()
    ops = tmp_path / "operations"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        writing = ops / f".op-1.json.{live.pid}.abcd1234.tmp"
        leftover = ops / f".op-2.json.{dead.pid}.abcd1234.tmp"
        old = ops / f".op-3.json.{live.pid}.ffff0000.tmp"
        odd = ops / ".op-4.json.tmp"
        for f in (writing, leftover, old, odd):
            f.write_text('{"half": ')
        past = time.time() - STALE_TMP_S - 5
        os.utime(old, (past, past))
        journal.open()
        assert writing.exists()
        assert not leftover.exists() and not old.exists() and not odd.exists()
    finally:
        live.kill()
        live.wait()
    journal.open()
    assert sorted(os.listdir(ops)) == []
