"""The real rollout benchmark end to end at its smallest: real VMs on simulated hosts (real
agents), the real operator, API server and etcd, through `python -m bench`. Asserts what the
rollouts did and that every figure and guest check was taken, never how fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.rollout import RolloutParams, run_rollouts

pytestmark = [pytest.mark.k8s, pytest.mark.qemu]


def test_a_real_rollout_at_each_parallelism(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--out", str(out), "--only", "rollout", "--rollout-hosts", "2",
                 "--rollout-vms-per-host", "1", "--rollout-parallel", "1,2",
                 "--rollout-mem", "128"]) == 0
    doc = json.loads((out / "rollout.json").read_text())
    assert doc["benchmark"] == "rollout"
    assert doc["environment"]["accelerator"] in ("TCG", "KVM")
    assert set(doc["environment"]["qemu"]) == {"sid", "trixie-backports"}
    runs = doc["results"]
    assert [r["parallel"] for r in runs] == [1, 2]
    # Each run moved every VM to the other build, and back.
    assert [r["target"] for r in runs] == ["sid -> trixie-backports", "trixie-backports -> sid"]
    for r in runs:
        assert (r["phase"], r["updated"], r["vms"]) == ("Succeeded", 2, 2), r
        assert r["guests_ok"] == 2, r["guests"]
        assert {g["vm"] for g in r["guests"]} == {"host-1-vm0", "host-2-vm0"}
        assert r["agent_ms"]["n"] == 2 and r["pause_ms"]["n"] == 2
        assert r["total_ms"] > 0 and r["ideal_ms"] > 0
    assert (out / "rollout-vs-ideal.png").stat().st_size > 0
    table = (out / "rollout.md").read_text()
    assert table.count("| 2 × 1 |") == 2 and "| 2/2 |" in table


async def test_a_failed_rollout_is_recorded_and_ends_the_series(tmp_path: Path) -> None:
    """A target version the build does not have: preflight refuses the VM, the VMUpdate
    fails; the record says so, the guest is unharmed on its old build, and no later run
    starts from a state it does not have."""
    lines: list[str] = []
    doc = await run_rollouts(RolloutParams(hosts=1, vms_per_host=1, parallel=(1, 1),
                                           mem_mib=128, target_version="0.0.1"),
                             tmp_path / "work", lines.append)
    [run] = doc["results"]
    assert run["phase"] == "Failed" and run["updated"] == 0
    [guest] = run["guests"]
    assert guest["same_token"] and guest["continuous"] and guest["checksums_ok"]
    assert not guest["runs_target"] and not guest["ok"] and "does not run" in guest["problem"]
    assert run["guests_ok"] == 0
    assert any("remaining runs are not started" in line for line in lines)


def test_bad_sizes_are_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    for args, needle in ((["--rollout-hosts", "0"], "--rollout-hosts"),
                         (["--rollout-vms-per-host", "17"], "--rollout-vms-per-host"),
                         (["--rollout-mem", "32"], "--rollout-mem"),
                         (["--rollout-parallel", "0"], "--rollout-parallel")):
        with pytest.raises(SystemExit):
            main(["--out", "unused", "--only", "rollout", *args])
        assert needle in capsys.readouterr().err
