"""VMHost objects read into inventories, and when a host counts as unavailable."""

from __future__ import annotations

from datetime import timedelta

from tests.operator.builders import T0, host
from vmupdate_operator.inventory import HostInventory, seen_after, unavailable_reason

BODY = {
    "metadata": {"name": "node-a", "labels": {"vmupdate.dev/qemu-host": "true"}},
    "spec": {"nodeName": "node-a"},
    "status": {"endpoint": "10.0.0.11:9443", "heartbeatTime": "2025-06-01T12:00:00Z",
               "vms": [{"name": "web-01", "qemuVersion": "10.0.2", "binary": "/usr/bin/q",
                        "pid": 42, "ready": True}]},
}


def test_from_body() -> None:
    inv = HostInventory.from_body(BODY)
    assert (inv.name, dict(inv.labels), inv.endpoint, inv.heartbeat) == (
        "node-a", {"vmupdate.dev/qemu-host": "true"}, "10.0.0.11:9443", T0)
    vm = inv.vm("web-01")
    assert vm is not None and vm.pid == 42 and inv.vm("nope") is None
    assert inv.problem is None


def test_a_host_without_status_has_not_reported() -> None:
    inv = HostInventory.from_body({"metadata": {"name": "node-b"}})
    assert inv.vms == () and "has not reported yet" in (unavailable_reason(inv, T0) or "")


def test_a_status_that_does_not_validate_makes_the_host_unavailable() -> None:
    body = {**BODY, "status": {"vms": [{"pid": -1}]}}
    inv = HostInventory.from_body(body)
    assert inv.problem is not None and inv.vms == ()
    assert "does not validate" in (unavailable_reason(inv, T0) or "")


def test_staleness() -> None:
    inv = host("a", heartbeat=T0)
    assert unavailable_reason(inv, T0 + timedelta(seconds=60)) is None
    why = unavailable_reason(inv, T0 + timedelta(seconds=61))
    assert why == ("host a unavailable: no agent heartbeat since 2025-06-01T12:00:00Z "
                   "(stale after 60s); check the vmupdate agent on that node")
    assert unavailable_reason(inv, T0 + timedelta(seconds=20), timedelta(seconds=10))


def test_no_endpoint() -> None:
    assert "endpoint" in (unavailable_reason(host("a", endpoint=None), T0) or "")


def test_seen_after() -> None:
    inv = host("a", heartbeat=T0)
    assert seen_after(inv, None) and seen_after(inv, T0 - timedelta(seconds=1))
    assert not seen_after(inv, T0) and not seen_after(host("a", heartbeat=None), None)
