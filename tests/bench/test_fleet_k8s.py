"""The fleet benchmark end to end at its smallest: simulated agents, the real operator, a
real API server and etcd. Asserts what the rollout did and that every figure was taken,
never how fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fleet import FleetParams, run_fleet
from bench.simagent import Replay

pytestmark = pytest.mark.k8s

FAST = Replay().scaled(0.2)


async def test_a_fleet_rollout_converges_and_is_measured(tmp_path: Path) -> None:
    record = await run_fleet(FleetParams(hosts=2, vms_per_host=3, parallel=2, replay=FAST,
                                         timeout_s=300, heartbeat_s=3), tmp_path / "ok")
    assert (record["phase"], record["updated"], record["failed"]) == ("Succeeded", 6, 0)
    assert record["ideal_ms"] == pytest.approx(3 * sum(ms for _, ms in FAST.phases))
    assert record["total_ms"] > 0
    operator = record["api"]["operator"]
    assert operator["requests"] > 0 and operator["write_bytes"] > 0
    assert operator["by_verb"].get("patch", 0) > 0
    assert record["api"]["registrars"]["writes"] >= 2  # one VMHost each, at least
    assert record["operator_cpu_s"] > 0 and record["operator_peak_rss_mib"] > 0
    assert record["etcd_db_bytes"] > 0 and record["vmupdate_bytes"] > 0
    assert "failure_to_halt_ms" not in record
    assert record["records"] == 2 and record["record_bytes_max"] > 0  # a VMUpdateHost per host


async def test_an_injected_failure_halts_the_rollout(tmp_path: Path) -> None:
    record = await run_fleet(FleetParams(hosts=2, vms_per_host=3, parallel=1, replay=FAST,
                                         fail_every=1, timeout_s=300, heartbeat_s=3),
                             tmp_path / "fail")
    assert record["phase"] == "Failed"
    assert (record["updated"], record["failed"]) == (0, 1)  # the first VM failed: halt
    assert record["failure_to_halt_ms"] > 0
