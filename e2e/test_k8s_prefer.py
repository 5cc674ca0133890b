"""Auto follows the VMUpdate's `strategy.prefer`, through the real operator and API server.

Two VMs on sid's QEMU 11.1.3 (one per host), each moved by its own VMUpdate in mode Auto to
trixie-backports' own build of 11.1.3: both QEMUs support cpr-exec and cpr-transfer, so only
the preference decides. `ShortestPause` must give cpr-transfer (a new process), `SamePid`
cpr-exec (the same process); each guest runs on unharmed. (A named mode with `prefer` is
refused at admission: examples/invalid/prefer-with-named-mode.yaml, e2e/test_k8s_admission.)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import yaml

from e2e.cluster.fixtures import Kubectl
from e2e.k8s import kube
from e2e.k8s.nodes import Fleet
from e2e.k8s.operator_process import OperatorProcess
from e2e.rig import Rig
from e2e.rig.vm import runs
from e2e.test_k8s_modes import Vms, mode_vms, ready  # noqa: F401  (mode_vms: a fixture)

pytestmark = [pytest.mark.k8s, pytest.mark.qemu]


def manifest(name: str, vm: str, prefer: str, binary: str, version: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
        "metadata": {"name": name},
        "spec": {"selector": {"vmNames": [vm]}, "target": {"binary": binary, "version": version},
                 "mode": "Auto", "strategy": {"pauseBudgetMs": 600000, "prefer": prefer}}})


async def test_auto_follows_the_preference(kubectl: Kubectl, mode_vms: Vms,  # noqa: F811
                                           rig: Rig, fleet: Fleet,
                                           operator_process: OperatorProcess) -> None:
    short, same = await asyncio.gather(
        mode_vms.start("node-a", "short-01", "sid", "memfd"),
        mode_vms.start("node-b", "same-01", "sid", "memfd"))
    before = {vm.name: vm.pid for vm in (short, same)}
    await kube.wait_for(lambda: mode_vms.listed(kubectl), 60, "the VMHosts to list the VMs")
    # The inventory says both VMs could go either way: the preference is what decides.
    hosts = kube.get(kubectl, "vmhosts") or []
    listed = {v["name"]: v for h in hosts for v in (h.get("status") or {}).get("vms") or []}
    for name in ("short-01", "same-01"):
        assert {"CprExec", "CprTransfer"} <= set(listed[name]["cprModes"]), listed[name]
    mark = time.monotonic_ns()
    tb = rig.trixie_backports
    kube.apply(kubectl, manifest("prefer-short", "short-01", "ShortestPause", tb.binary,
                                 tb.version))
    kube.apply(kubectl, manifest("prefer-same", "same-01", "SamePid", tb.binary, tb.version))

    rows: dict[str, Any] = {}
    for name, vm in (("prefer-short", "short-01"), ("prefer-same", "same-01")):
        obj = await ready(kubectl, name, operator_process)
        assert obj["status"]["phase"] == "Succeeded"
        rows[vm] = kube.rows(kubectl, obj)[vm]

    r = rows["short-01"]
    assert (r["phase"], r["mode"], r["toVersion"]) == ("Updated", "CprTransfer", tb.version), r
    assert r["pidBefore"] == before["short-01"] and r["pidAfter"] == short.pid != r["pidBefore"]
    r = rows["same-01"]
    assert (r["phase"], r["mode"], r["toVersion"]) == ("Updated", "CprExec", tb.version), r
    assert r["pidBefore"] == r["pidAfter"] == same.pid == before["same-01"]
    for vm in (short, same):
        assert runs(vm.pid, tb)
        assert 0 < rows[vm.name]["pauseMs"] < 60000
        vm.serial.assert_continuous(since=mark)
        assert await vm.query_status() == "running"
        await vm.serial.wait_ticks(10, after=time.monotonic_ns(), timeout=30)

