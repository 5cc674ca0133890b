"""The fleet benchmark's arithmetic: ideal time, metrics, audit log, /proc figures, table."""

from __future__ import annotations

import json
import math

import pytest

from bench import fleetcalc
from bench.fleet import FleetParams, vmupdate_manifest
from vmupdate_api.crd.vmupdate_spec import VMUpdateSpec


def test_ideal_is_canaries_then_waves() -> None:
    assert fleetcalc.ideal_ms(200, 1, 100.0) == 20_000.0
    assert fleetcalc.ideal_ms(200, 10, 100.0) == 2_000.0
    assert fleetcalc.ideal_ms(201, 10, 100.0) == 2_100.0
    assert fleetcalc.ideal_ms(200, 1000, 100.0) == 100.0
    assert fleetcalc.ideal_ms(10, 4, 100.0, canary=2) == 400.0
    assert fleetcalc.ideal_ms(1, 4, 100.0, canary=3) == 100.0
    assert fleetcalc.ideal_ms(0, 4, 100.0) == 0.0
    # 20 hosts x 10 VMs, one at a time per host: 10 waves however wide the rollout
    assert fleetcalc.ideal_ms(200, 100, 100.0, hosts=20, per_host=1) == 1_000.0
    assert fleetcalc.ideal_ms(200, 10, 100.0, hosts=20, per_host=1) == 2_000.0
    assert fleetcalc.ideal_ms(200, 100, 100.0, hosts=20, per_host=4) == 300.0
    assert fleetcalc.record_ideal_ms({"vms": 200, "parallel": 100, "per_vm_ms": 100.0,
                                      "hosts": 20, "per_host": 1}) == 1_000.0
    with pytest.raises(ValueError, match="parallel"):
        fleetcalc.ideal_ms(1, 0, 1.0)


METRICS = """# HELP etcd_mvcc_db_total_size_in_bytes Total size
# TYPE etcd_mvcc_db_total_size_in_bytes gauge
etcd_mvcc_db_total_size_in_bytes 634880
apiserver_request_total{code="200",resource="vmupdates",verb="PATCH"} 23
apiserver_request_total{code="201",resource="vmupdates",verb="POST"} 2
apiserver_request_total{code="200",resource="vmhosts",verb="PATCH"} 6
"""


def test_prometheus_sums_by_label() -> None:
    assert fleetcalc.prometheus_sum(METRICS, "etcd_mvcc_db_total_size_in_bytes") == 634880
    assert fleetcalc.prometheus_sum(METRICS, "apiserver_request_total") == 31
    assert fleetcalc.prometheus_sum(METRICS, "apiserver_request_total",
                                    resource="vmupdates") == 25
    assert fleetcalc.prometheus_sum(METRICS, "apiserver_request_total", verb="GET") == 0
    assert fleetcalc.prometheus_sum(METRICS, "missing") == 0


def _event(user: str, verb: str, stage: str = "ResponseComplete",
           obj: object = None) -> str:
    ev: dict[str, object] = {"stage": stage, "verb": verb, "user": {"username": user}}
    if obj is not None:
        ev["requestObject"] = obj
    return json.dumps(ev)


def test_audit_costs_per_user_counting_each_request_once() -> None:
    patch = {"status": {"phase": "Progressing"}}
    lines = [_event("op", "get"), _event("op", "patch", "ResponseStarted", patch),
             _event("op", "patch", obj=patch), _event("op", "create", obj={"a": 1}),
             _event("reg", "patch", obj={}), "", _event("op", "watch")]
    costs = fleetcalc.audit_costs(lines)
    op = costs["op"]
    assert (op.requests, op.writes) == (4, 2)
    assert op.write_bytes == len('{"status":{"phase":"Progressing"}}') + len('{"a":1}')
    assert op.by_verb == {"get": 1, "patch": 1, "create": 1, "watch": 1}
    assert costs["reg"].write_bytes == 2


def test_proc_figures() -> None:
    stat = "42 (vmupdate operator) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0"
    assert fleetcalc.cpu_seconds(stat, 100) == 3.0
    assert fleetcalc.peak_rss_mib("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t 1 kB\n") == 2.0
    with pytest.raises(ValueError, match="VmHWM"):
        fleetcalc.peak_rss_mib("Name:\tx\n")


def test_fleet_table_per_vm_costs() -> None:
    record = {"hosts": 20, "vms": 200, "parallel": 10, "phase": "Succeeded",
              "total_ms": 4000.0, "ideal_ms": 2000.0,
              "api": {"operator": {"requests": 400, "write_bytes": 204800}},
              "operator_cpu_s": 3.5, "operator_peak_rss_mib": 120.0,
              "etcd_db_bytes": 2 * 2**20, "vmupdate_bytes": 10240, "record_bytes_max": 5120,
              "load_at_start": [4.5, 3.0, 2.0]}
    row = fleetcalc.fleet_table([record]).splitlines()[2]
    assert row == ("| 20 × 10 | 10 | Succeeded | 4.00 | 2.00 | 2.00 | 2.00 | 1.00 | 3.50 "
                   "| 120.0 | 2.00 | 10.0 | 5.00 | — | — | — | 4.50 |")
    record.update(machine_busy=0.955, rollout_cpu_s={
        "operator": 3.2, "control_plane": 2.6, "simulated_hosts": 1.4})
    row = fleetcalc.fleet_table([record]).splitlines()[2]
    assert row.endswith("| 5.00 | — | 95.5 | 3 / 3 / 1 | 4.50 |")


def test_machine_busy_from_two_reads_of_proc_stat() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    before = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n"
    after = "cpu  250 0 100 900 50 0 0 0 10 0\ncpu0 1 2 3 4\n"
    # 300 ticks passed, 100 of them idle: two thirds busy (guest time is inside user).
    assert fleetcalc.machine_busy(before, after) == pytest.approx(2 / 3)
    assert math.isnan(fleetcalc.machine_busy(after, after))
    with pytest.raises(ValueError, match="aggregate"):
        fleetcalc.machine_busy("cpu0 1 2\n", after)


def test_fleet_plan_and_heartbeat() -> None:
    assert fleetcalc.parse_plan("1:10x5, 1000:1000x2") == [(1, 10, 5), (1000, 1000, 2)]
    for bad in ("", "10x5", "0:1x1", "1001:1x1", "1:0x1", "1:1x513", "a:1x1"):
        with pytest.raises(ValueError):
            fleetcalc.parse_plan(bad)
    assert fleetcalc.heartbeat_s(20) == 10.0 and fleetcalc.heartbeat_s(1000) == 200.0


def test_profile_top_counts_self_and_inclusive_samples() -> None:
    text = "main;loop;plan 6\nmain;loop;write 3\nmain;idle 1\nnot a sample line\n"
    top = fleetcalc.profile_top(text, n=2)
    assert top["self"] == [("plan", 0.6), ("write", 0.3)]
    assert top["inclusive"] == [("main", 1.0), ("loop", 0.9)]
    assert fleetcalc.profile_top("") == {"self": [], "inclusive": []}


def test_the_benchmarks_vmupdate_passes_the_crd_model() -> None:
    for parallel in (1, 10, 100, 1000):
        spec = vmupdate_manifest("fleet", FleetParams(hosts=2, vms_per_host=2,
                                                      parallel=parallel, per_host=4))["spec"]
        model = VMUpdateSpec.model_validate(spec)
        assert model.strategy.max_parallel == parallel
        assert model.strategy.max_parallel_per_host == min(4, parallel)
