"""Two VMUpdates whose selectors overlap, through the real operator and API server.

Both select web-01, each with another target: ``overlap-a`` the rig's second path to the
sid QEMU, ``overlap-b`` the path web-01 runs now. Without one owner per VM the two moved
the VM back and forth without end. Now the older one owns it: web-01 is updated once, and
``overlap-b`` shows the row Blocked, naming its owner, with Degraded=OverlappingVMUpdate,
for as long as both exist (watched here for two minutes). When the owner is deleted, the
other one takes the VM over (a new intent) and is Ready.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import yaml

from e2e.cluster.fixtures import Kubectl
from e2e.k8s import kube
from e2e.k8s.fixtures import Placement
from e2e.k8s.nodes import Fleet
from e2e.k8s.operator_process import OperatorProcess
from e2e.rig import Rig
from e2e.rig.vm import target_path

pytestmark = [pytest.mark.k8s, pytest.mark.qemu]

OBSERVE_S = 120
TIMEOUT = 180


def manifest(name: str, binary: str, version: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
        "metadata": {"name": name},
        "spec": {"selector": {"vmNames": ["web-01"]},
                 "target": {"binary": binary, "version": version},
                 "mode": "CprExec"}})


def new_operations(fleet: Fleet, known: set[str]) -> list[str]:
    return sorted(op for journal in fleet.journals().values() for op in journal
                  if op not in known)


async def test_two_overlapping_vmupdates_update_a_vm_once(
        vmupdates: Kubectl, three_vms: Placement, rig: Rig, fleet: Fleet,
        operator_process: OperatorProcess) -> None:
    kubectl = vmupdates
    assert rig.sid.alt_binary is not None
    web01 = three_vms.vms["web-01"]
    known = {op for journal in fleet.journals().values() for op in journal}
    mark = time.monotonic_ns()
    assert target_path(web01.pid) == rig.sid.binary

    kube.apply(kubectl, manifest("overlap-a", rig.sid.alt_binary, rig.sid.version))
    await asyncio.sleep(1.5)  # a later creationTimestamp (the names order them too)
    kube.apply(kubectl, manifest("overlap-b", rig.sid.binary, rig.sid.version))

    def a_done() -> Any:
        obj = kube.get(kubectl, "vmupdate", "overlap-a")
        row = kube.rows(kubectl, obj).get("web-01")
        return obj if row and row["phase"] == "Updated" and row.get("operationId") else None

    await kube.wait_for(a_done, TIMEOUT, "overlap-a to update web-01",
                        describe=lambda: operator_process.log()[-6000:])

    # Watch both objects and the VM for two minutes: no second update, ever.
    exes: set[str] = set()
    b_phases: set[str] = set()
    deadline = time.monotonic() + OBSERVE_S
    while time.monotonic() < deadline:
        exes.add(target_path(web01.pid))
        b_row = kube.rows(kubectl, kube.get(kubectl, "vmupdate", "overlap-b")).get("web-01")
        if b_row:
            b_phases.add(b_row["phase"])
        assert len(new_operations(fleet, known)) == 1, new_operations(fleet, known)
        await asyncio.sleep(2)
    assert exes == {rig.sid.alt_binary}
    assert "Preflight" not in b_phases and "Updating" not in b_phases, b_phases

    a = kube.get(kubectl, "vmupdate", "overlap-a")
    b = kube.get(kubectl, "vmupdate", "overlap-b")
    ops = new_operations(fleet, known)
    assert ops == [kube.rows(kubectl, a)["web-01"]["operationId"]]
    assert kube.condition(a, "Ready")["status"] == "True"
    assert kube.condition(a, "Degraded")["status"] == "False"
    b_row = kube.rows(kubectl, b)["web-01"]
    assert b_row["phase"] == "Blocked", b_row
    assert "VMUpdate overlap-a" in b_row["message"] and rig.sid.alt_binary in b_row["message"]
    assert "operationId" not in b_row
    degraded = kube.condition(b, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "OverlappingVMUpdate")
    assert "overlap-a" in degraded["message"]
    assert kube.condition(b, "Ready")["status"] == "False"
    assert b["status"]["phase"] == "Degraded" and b["status"]["blocked"] == 1
    web01.serial.assert_continuous(since=mark)

    # The owner goes: the other VMUpdate now owns web-01 and moves it to its own target.
    kubectl("delete", "vmupdate", "overlap-a", "--wait=true", timeout=120)

    def b_ready() -> Any:
        obj = kube.get(kubectl, "vmupdate", "overlap-b")
        return obj if kube.condition(obj, "Ready").get("status") == "True" else None

    b = await kube.wait_for(b_ready, TIMEOUT, "overlap-b to take web-01 over",
                            describe=lambda: operator_process.log()[-6000:])
    row = kube.rows(kubectl, b)["web-01"]
    assert row["phase"] == "Updated" and row["operationId"].startswith("vmu-")
    assert kube.condition(b, "Degraded")["status"] == "False"
    assert target_path(web01.pid) == rig.sid.binary
    assert len(new_operations(fleet, known)) == 2
    web01.serial.assert_continuous(since=mark)
