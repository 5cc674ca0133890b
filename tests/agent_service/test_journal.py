"""The operation journal: atomic, exclusive, durable across a reopen, pruned by age."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from vmupdate_agent import workdirs
from vmupdate_agent.journal import Journal, JournalError, OperationRecord, OperationState
from vmupdate_agent.models import (
    Outcome,
    Phase,
    ProgressEvent,
    QemuFeatures,
    QemuVersion,
    RequestedMode,
    UpdateResult,
    VMInfo,
)
from vmupdate_agent.specs import TargetSpec, UpdateSpec

VM = VMInfo(qmp_path="/run/vms/a/qmp.sock", pid=1234, name="a", uuid="u-1", argv=("qemu",),
            root="/", binary="/usr/bin/qemu",
            features=QemuFeatures(version=QemuVersion(major=11, minor=1, micro=3),
                                  cpr_modes=()),
            runstate="running", machine_type="pc-q35-10.0", memory_backends=(),
            aux_ram_share=True)


def record(op_id: str = "op-1", **changes: object) -> OperationRecord:
    spec = UpdateSpec(operation_id=op_id, vm="a", target=TargetSpec(binary="/opt/q"),
                      mode=RequestedMode.AUTO)
    base = OperationRecord(operation_id=op_id, fingerprint=spec.fingerprint(), request=spec,
                           vm=VM, runtime_dir="/run/vmupdate", state=OperationState.RUNNING,
                           created_ns=1_000)
    return base.model_copy(update=changes)


def done(rec: OperationRecord, finished_ns: int) -> OperationRecord:
    result = UpdateResult(vm="a", outcome=Outcome.UPDATED, mode=None, message="ok",
                          pid_before=1234, pid_after=1234, version_before="11.1.3",
                          version_after="11.1.3")
    return rec.model_copy(update={"state": OperationState.DONE, "result": result,
                                  "finished_ns": finished_ns})


def test_round_trip_and_reopen(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    rec = record(events=(ProgressEvent(phase=Phase.ACCEPTED, time_ns=5, message="hi"),))
    journal.create(rec)
    assert journal.load("op-1") == rec
    finished = done(rec, 9_000)
    journal.save(finished)
    again = Journal(tmp_path)  # a restarted agent
    again.open()
    assert again.load("op-1") == finished
    assert again.records() == ([finished], [])
    assert again.load("op-2") is None
    assert rec.workdir == workdirs.workdir("/run/vmupdate", "op-1")
    assert oct((tmp_path / "operations" / "op-1.json").stat().st_mode & 0o777) == "0o600"


def test_create_is_exclusive_even_when_racing(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    wins: list[int] = []
    losses: list[int] = []
    barrier = threading.Barrier(8)

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            journal.create(record(fingerprint=f"f{i}"))
            wins.append(i)
        except FileExistsError:
            losses.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7
    loaded = journal.load("op-1")
    assert loaded is not None and loaded.fingerprint == f"f{wins[0]}"
    assert sorted(os.listdir(tmp_path / "operations")) == ["op-1.json"]  # no temp files


def test_a_crash_mid_write_leaves_the_previous_record(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    rec = record()
    journal.create(rec)
    # What a crash between writing and renaming leaves: a temporary file.
    stray = tmp_path / "operations" / ".op-1.json.999.abcd.tmp"
    stray.write_text('{"half": ')
    assert journal.load("op-1") == rec
    journal.open()  # start-up drops it
    assert not stray.exists()


def test_unreadable_records_are_reported_not_guessed(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    journal.create(record("good"))
    (tmp_path / "operations" / "bad.json").write_text("{not json")
    with pytest.raises(JournalError, match=r"bad\.json is not a valid operation record"):
        journal.load("bad")
    good, bad = journal.records()
    assert [r.operation_id for r in good] == ["good"]
    assert len(bad) == 1 and "bad.json" in bad[0]


def test_ids_cannot_escape_the_folder(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    for bad_id in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(JournalError, match="invalid operation id"):
            journal.load(bad_id)


def test_prune_keeps_running_and_recent_records(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    day = 86_400 * 10**9
    journal.create(done(record("old"), finished_ns=1 * day))
    journal.create(done(record("recent"), finished_ns=9 * day))
    journal.create(record("running"))
    removed = journal.prune(older_than_s=7 * 86_400, now_ns=10 * day)
    assert removed == ["old"]
    assert sorted(r.operation_id for r in journal.records()[0]) == ["recent", "running"]
