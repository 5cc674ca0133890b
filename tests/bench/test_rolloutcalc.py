"""The real rollout benchmark's pure parts: its plan, the record of a run, the table."""

from __future__ import annotations

import itertools
import math

import pytest

from bench.rolloutcalc import (
    MAX_PER_HOST,
    GuestCheck,
    per_host_limit,
    rollout_table,
    run_record,
    targets_in_turn,
)


@pytest.mark.parametrize(("parallel", "hosts", "expected"), [
    (1, 3, 1), (3, 3, 1), (4, 3, 2), (6, 3, 2), (7, 3, 3), (2, 1, 2), (1000, 1, MAX_PER_HOST),
    (5, 10, 1)])
def test_per_host_limit(parallel: int, hosts: int, expected: int) -> None:
    assert per_host_limit(parallel, hosts) == expected
    assert per_host_limit(parallel, hosts) <= parallel


@pytest.mark.parametrize(("parallel", "hosts"), [(0, 3), (3, 0), (-1, 1)])
def test_per_host_limit_refuses_nonsense(parallel: int, hosts: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        per_host_limit(parallel, hosts)


def test_each_run_moves_every_vm_to_the_other_build() -> None:
    assert targets_in_turn(("a", "b"), 3) == [("a", "b"), ("b", "a"), ("a", "b")]
    assert targets_in_turn(("a", "b"), 0) == []
    turns = targets_in_turn(("a", "b"), 5)
    for before, after in itertools.pairwise(turns):
        assert after[0] == before[1]  # a run starts where the previous one left the VMs


def good(vm: str) -> GuestCheck:
    return GuestCheck(vm=vm, host="h", same_token=True, continuous=True, checksums_ok=True,
                      runs_target=True)


@pytest.mark.parametrize("broken", ["same_token", "continuous", "checksums_ok", "runs_target"])
def test_a_guest_is_ok_only_if_every_check_is(broken: str) -> None:
    assert good("v").ok
    assert not GuestCheck(**{**vars(good("v")), broken: False}).ok


def test_run_record_ideal_and_counts() -> None:
    guests = [good(f"v{i}") for i in range(11)] + [
        GuestCheck(vm="bad", host="h", same_token=False, continuous=True, checksums_ok=True,
                   runs_target=True, problem="rebooted")]
    r = run_record(hosts=3, vms_per_host=4, parallel=6, phase="Succeeded", total_ms=9000.0,
                   agent_ms=[1000.0, 2000.0, 3000.0], pauses_ms=[50.0, 60.0],
                   guests=guests, target="sid -> trixie-backports")
    # 12 VMs, 6 at a time, 2 per host: 2 waves of the median VM (2 s).
    assert (r["vms"], r["per_host"], r["ideal_ms"]) == (12, 2, 4000.0)
    assert r["agent_ms"]["median"] == 2000.0 and r["pause_ms"]["max"] == 60.0
    assert r["guests_ok"] == 11
    assert [g["vm"] for g in r["guests"] if not g["ok"]] == ["bad"]
    # One at a time: 12 waves; a host's 4 VMs at 1 per host never fewer than 4.
    assert run_record(hosts=3, vms_per_host=4, parallel=1, phase="Succeeded", total_ms=1.0,
                      agent_ms=[1.0], pauses_ms=[], guests=[], target="")["ideal_ms"] == 12.0
    assert run_record(hosts=3, vms_per_host=4, parallel=3, phase="Succeeded", total_ms=1.0,
                      agent_ms=[1.0], pauses_ms=[], guests=[], target="")["ideal_ms"] == 4.0


def test_no_agent_time_no_ideal() -> None:
    r = run_record(hosts=1, vms_per_host=1, parallel=1, phase="Failed", total_ms=5.0,
                   agent_ms=[], pauses_ms=[], guests=[], target="")
    assert math.isnan(r["ideal_ms"])
    table = rollout_table([r])
    assert "| 1 × 1 | 1 | 1 | Failed |" in table and "—" in table


def test_table_has_one_row_per_run() -> None:
    runs = [run_record(hosts=3, vms_per_host=4, parallel=p, phase="Succeeded",
                       total_ms=30000.0, agent_ms=[1500.0], pauses_ms=[80.0],
                       guests=[good("v")] * 12, target="a -> b") for p in (1, 3, 6)]
    lines = rollout_table(runs).strip().splitlines()
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| 3 × 4 | 1 | 1 | Succeeded | 30.0 | 18.0 | 1.67 |")
    assert lines[4].startswith("| 3 × 4 | 6 | 2 | Succeeded | 30.0 | 3.00 | 10.0 |")
    assert all(line.endswith("| 12/12 |") for line in lines[2:])
