"""The README's examples do what their comments say, on real VMs through the operator.

examples/vmupdate-dryrun.yaml and examples/vmupdate.yaml select the VMs that run QEMU 10.0.x
on the labelled hosts, for QEMU 11.1.3. Here web-01 and db-01 (node-a) and web-02 (node-b)
run trixie's QEMU 10.0.13; spec.target is pointed at the rig's sid 11.1.3 (and the dry run's
placeholder checksum dropped); everything else is applied as written.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import yaml

from e2e.cluster.fixtures import Kubectl
from e2e.k8s import kube
from e2e.k8s.nodes import Fleet
from e2e.k8s.operator_process import OperatorProcess
from e2e.rig import Rig, TestVM, start_vm
from e2e.rig.vm import runs

pytestmark = [pytest.mark.k8s, pytest.mark.qemu]

TIMEOUT = 300
PLACES = (("node-a", "web-01"), ("node-a", "db-01"), ("node-b", "web-02"))


@pytest_asyncio.fixture
async def vms_on_10_0(rig: Rig, fleet: Fleet, kubectl: Kubectl,
                      operator_process: OperatorProcess) -> AsyncIterator[dict[str, TestVM]]:
    """Not the `vmupdates` fixture: it starts sid VMs of these names."""
    vmupdates = kubectl
    kube.delete_vmupdates(kubectl)
    vms: dict[str, TestVM] = {}
    try:
        for node, name in PLACES:
            workdir = fleet.node(node).vm_dir / f"{name}-{secrets.token_hex(3)}"
            vms[name] = await start_vm(rig, "trixie", name=name, workdir=workdir,
                                       wait_ticking=True)

        def listed() -> bool:
            hosts = kube.get(vmupdates, "vmhosts") or []
            uuids = {v.get("uuid") for h in hosts
                     for v in (h.get("status") or {}).get("vms") or []}
            return all(vm.uuid in uuids for vm in vms.values())

        await kube.wait_for(listed, 60, "the VMHosts to list the VMs")
        yield vms
    finally:
        kube.delete_vmupdates(vmupdates)
        for vm in vms.values():
            with contextlib.suppress(Exception):
                await vm.stop()


def example(name: str, rig: Rig) -> tuple[str, dict[str, Any]]:
    _, obj = kube.example(name, target_binary=rig.sid.binary, target_version=rig.sid.version)
    obj["spec"]["target"].pop("sha256", None)
    return yaml.safe_dump(obj), obj


async def settled(kubectl: Kubectl, name: str, phase: str, operator: OperatorProcess) -> Any:
    def check() -> Any:
        obj = kube.get(kubectl, "vmupdate", name)
        return obj if ((obj or {}).get("status") or {}).get("phase") == phase else None

    return await kube.wait_for(check, TIMEOUT, f"VMUpdate {name} to be {phase}",
                               describe=lambda: f"{kube.get(kubectl, 'vmupdate', name)}\n"
                                                f"{operator.log()[-6000:]}")


async def test_the_rollout_examples_do_what_their_comments_say(
        kubectl: Kubectl, vms_on_10_0: dict[str, TestVM], rig: Rig,
        operator_process: OperatorProcess) -> None:
    vms = vms_on_10_0
    pids = {name: vm.pid for name, vm in vms.items()}

    # The dry run: every 10.0 VM could move (by cpr-transfer); nothing changes.
    manifest, obj = example("vmupdate-dryrun.yaml", rig)
    kube.apply(kubectl, manifest)
    dry = await settled(kubectl, obj["metadata"]["name"], "DryRunComplete", operator_process)
    rows = kube.rows(kubectl, dry)
    assert set(rows) == set(vms)
    for row in rows.values():
        assert row["phase"] == "DryRunPassed" and row["mode"] == "CprTransfer", row
    assert {n: vm.pid for n, vm in vms.items()} == pids

    # The rollout: Auto on QEMU 10.0 means cpr-transfer; canary first, alone.
    manifest, obj = example("vmupdate.yaml", rig)
    kube.apply(kubectl, manifest)
    done = await settled(kubectl, obj["metadata"]["name"], "Succeeded", operator_process)
    rows = kube.rows(kubectl, done)
    assert set(rows) == set(vms)
    for name, row in rows.items():
        vm = vms[name]
        assert (row["phase"], row["mode"], row["fromVersion"], row["toVersion"]) == (
            "Updated", "CprTransfer", rig.trixie.version, rig.sid.version), row
        assert row["pidBefore"] == pids[name] and row["pidAfter"] == vm.pid != pids[name]
        assert runs(vm.pid, rig.sid)
        assert row["pauseMs"] <= obj["spec"]["strategy"]["pauseBudgetMs"]
        vm.serial.assert_continuous()
    canary = rows["db-01"]  # the first in (host, name) order
    assert canary["finishedAt"] <= min(rows["web-01"]["startedAt"], rows["web-02"]["startedAt"])
