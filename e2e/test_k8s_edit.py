"""Editing a VMUpdate with `kubectl apply` starts a new rollout, as a Deployment does.

The GitOps flow: the same manifest, its target bumped and applied again. Generation 1 moves
web-01 (node-a) and web-02 (node-b) to the rig's second path of the sid QEMU; generation 2
to the first one; generation 3 edits the target back to generation 1's: the rollback.
Every generation updates both VMs once (their own operation ids), the guests keep running,
and status.history keeps the rollouts the edits superseded.
"""

from __future__ import annotations

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

NAME = "edited"
TIMEOUT = 240
VMS = ("web-01", "web-02")


def manifest(binary: str, version: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
        "metadata": {"name": NAME},
        "spec": {"selector": {"vmNames": ["web-*"]},
                 "target": {"binary": binary, "version": version},
                 "mode": "CprExec",
                 "strategy": {"maxParallel": 2, "maxParallelPerHost": 1}}})


async def rolled_out(kubectl: Kubectl, generation: int, operator: OperatorProcess) -> Any:
    def ready() -> Any:
        obj = kube.get(kubectl, "vmupdate", NAME)
        status = (obj or {}).get("status") or {}
        if (obj["metadata"]["generation"] == generation
                and status.get("observedGeneration") == generation
                and kube.condition(obj, "Ready").get("status") == "True"):
            return obj
        return None

    return await kube.wait_for(ready, TIMEOUT, f"generation {generation} to be rolled out",
                               describe=lambda: f"{kube.get(kubectl, 'vmupdate', NAME)}\n"
                                                f"{operator.log()[-6000:]}")


def check_generation(kubectl: Kubectl, obj: Any, generation: int, binary: str,
                     placement: Placement) -> None:
    rows = kube.rows(kubectl, obj)
    assert set(rows) == set(VMS)
    for name in VMS:
        row, vm = rows[name], placement.vms[name]
        assert row["phase"] == "Updated", row
        assert f"-g{generation}-" in row.get("operationId", ""), (row, obj["status"])
        assert row["mode"] == "CprExec" and row["pidBefore"] == row["pidAfter"] == vm.pid
        assert target_path(vm.pid) == binary
    assert obj["status"]["target"]["binary"] == binary
    assert obj["status"]["updated"] == 2


async def test_kubectl_apply_of_an_edited_target_rolls_out_and_back(
        vmupdates: Kubectl, three_vms: Placement, rig: Rig, fleet: Fleet,
        operator_process: OperatorProcess) -> None:
    kubectl = vmupdates
    assert rig.sid.alt_binary is not None
    first, second = rig.sid.alt_binary, rig.sid.binary
    version = rig.sid.version
    known = {op for journal in fleet.journals().values() for op in journal}
    mark = time.monotonic_ns()

    kube.apply(kubectl, manifest(first, version))
    obj = await rolled_out(kubectl, 1, operator_process)
    check_generation(kubectl, obj, 1, first, three_vms)
    assert obj["status"].get("history", []) == []

    kube.apply(kubectl, manifest(second, version))  # the edit, as a Git sync applies it
    obj = await rolled_out(kubectl, 2, operator_process)
    check_generation(kubectl, obj, 2, second, three_vms)
    [gen1] = obj["status"]["history"]
    assert gen1["generation"] == 1 and gen1["target"]["binary"] == first
    assert (gen1["phase"], gen1["updated"], gen1["failed"]) == ("Succeeded", 2, 0)
    assert gen1["startTime"] <= gen1["finishTime"] and gen1["pauseMaxMs"] >= 0

    kube.apply(kubectl, manifest(first, version))  # the rollback
    obj = await rolled_out(kubectl, 3, operator_process)
    check_generation(kubectl, obj, 3, first, three_vms)
    history = obj["status"]["history"]
    assert [(h["generation"], h["target"]["binary"]) for h in history] == [(1, first),
                                                                          (2, second)]
    # kubectl get shows the current rollout.
    columns = kubectl("get", "vmupdate", NAME, "--no-headers", timeout=30).stdout.split()
    assert columns[1:5] == ["Succeeded", "2", "2", "0"]

    # Each generation updated each VM exactly once; db-01 (not selected) never.
    ran = sorted(op for journal in fleet.journals().values() for op in journal
                 if op not in known)
    assert len(ran) == 6 and all(f"-g{g}-" in " ".join(ran) for g in (1, 2, 3)), ran
    for name in VMS:
        three_vms.vms[name].serial.assert_continuous(since=mark)
