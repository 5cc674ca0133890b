"""Every CPR mode through the operator, between genuinely different QEMU builds, on two hosts.

The agents' runtime_dir is as long as they allow (e2e/k8s/nodes.py), far longer than the
default /run/vmupdate, and the operator's operation ids are its longest (uuids): every
socket of cpr-transfer and cpr-reboot must still fit (they did not, issue 8).

* ``to-11``, mode Auto: a VM on trixie's QEMU 10.0.13 (node-a) moves to sid's 11.1.3.
  10.0 has no cpr-exec, so Auto must choose cpr-transfer: a new process, a version change.
* ``exec-bpo``, mode CprExec: a VM on sid's 11.1.3 (node-b) moves to trixie-backports' own
  build of 11.1.3 in the same process.
* ``reboot``, mode CprReboot: a VM on trixie-backports' 11.1.3 with its RAM in a /dev/shm
  file (node-b) moves to sid's 11.1.3.

Each row must report what really happened: the mode, the pids before and after (as the
QEMU processes are), the versions, and a pause that QEMU measured.

And bookworm-backports' 10.0.2 (on the host) to trixie's 10.0.13 (in the sid root), asked of
the agent directly: the target is the rig's wrapper that enters the sid root, and a VMUpdate
would judge "runs the target" by the binary the VM runs afterwards, which is the build's own
path, not the wrapper's (see the operator's README, planning rule 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import yaml

from e2e.cluster.fixtures import Kubectl
from e2e.k8s import kube
from e2e.k8s.nodes import Fleet
from e2e.k8s.operator_process import OperatorProcess
from e2e.rig import Flavour, Rig, TestVM, start_vm
from e2e.rig.vm import Backend, runs
from vmupdate_agent import workdirs
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator.agent_client import AgentClient, ClientTls

pytestmark = [pytest.mark.k8s, pytest.mark.qemu]

TIMEOUT = 240


class Vms:
    def __init__(self, rig: Rig, fleet: Fleet) -> None:
        self.rig, self.fleet = rig, fleet
        self.vms: dict[str, TestVM] = {}

    async def start(self, node: str, name: str, flavour: Flavour, backend: Backend) -> TestVM:
        workdir = self.fleet.node(node).vm_dir / f"{name}-{secrets.token_hex(3)}"
        vm = await start_vm(self.rig, flavour, name=name, workdir=workdir, backend=backend,
                            wait_ticking=True)
        self.vms[name] = vm
        return vm

    def listed(self, kubectl: Kubectl) -> bool:
        hosts = kube.get(kubectl, "vmhosts") or []
        uuids = {v.get("uuid") for h in hosts for v in (h.get("status") or {}).get("vms") or []}
        return all(vm.uuid in uuids for vm in self.vms.values())


@pytest_asyncio.fixture
async def mode_vms(rig: Rig, fleet: Fleet, kubectl: Kubectl,
                   operator_process: OperatorProcess) -> AsyncIterator[Vms]:
    """Only these VMs (not the `vmupdates` fixture's three)."""
    kube.delete_vmupdates(kubectl)
    vms = Vms(rig, fleet)
    try:
        yield vms
    finally:
        kube.delete_vmupdates(kubectl)  # before the VMs go
        for vm in vms.vms.values():
            with contextlib.suppress(Exception):
                await vm.stop()


def manifest(name: str, vm: str, mode: str, binary: str, version: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
        "metadata": {"name": name},
        "spec": {"selector": {"vmNames": [vm]}, "target": {"binary": binary, "version": version},
                 "mode": mode, "strategy": {"pauseBudgetMs": 600000}}})


def in_root(rig: Rig, path: str) -> str:
    assert rig.sid.root is not None
    return f"{rig.sid.root}{path}"


async def ready(kubectl: Kubectl, name: str, operator: OperatorProcess) -> Any:
    def check() -> Any:
        obj = kube.get(kubectl, "vmupdate", name)
        return obj if kube.condition(obj, "Ready").get("status") == "True" else None

    return await kube.wait_for(check, TIMEOUT, f"VMUpdate {name} to be Ready",
                               describe=lambda: f"{kube.get(kubectl, 'vmupdate', name)}\n"
                                                f"{operator.log()[-6000:]}")


async def test_every_mode_between_different_builds(
        kubectl: Kubectl, mode_vms: Vms, rig: Rig, fleet: Fleet,
        operator_process: OperatorProcess) -> None:
    for node in fleet.nodes.values():
        assert len(str(node.runtime_dir)) == workdirs.MAX_RUNTIME_DIR > len("/run/vmupdate")
    old, ex, rb = await asyncio.gather(
        mode_vms.start("node-a", "old-01", "trixie", "memfd"),
        mode_vms.start("node-b", "exec-01", "sid", "memfd"),
        mode_vms.start("node-b", "reboot-01", "trixie-backports", "file"))
    before = {vm.name: vm.pid for vm in (old, ex, rb)}
    assert runs(old.pid, rig.trixie)
    await kube.wait_for(lambda: mode_vms.listed(kubectl), 60, "the VMHosts to list the VMs")
    mark = time.monotonic_ns()

    sid = rig.sid
    kube.apply(kubectl, manifest("to-11", "old-01", "Auto", sid.binary, sid.version))
    kube.apply(kubectl, manifest("exec-bpo", "exec-01", "CprExec",
                                 rig.trixie_backports.binary, rig.trixie_backports.version))
    kube.apply(kubectl, manifest("reboot", "reboot-01", "CprReboot", sid.binary, sid.version))

    rows = {}
    for name, vm in (("to-11", "old-01"), ("exec-bpo", "exec-01"), ("reboot", "reboot-01")):
        obj = await ready(kubectl, name, operator_process)
        rows[vm] = kube.rows(kubectl, obj)[vm]
        assert obj["status"]["phase"] == "Succeeded"
        assert obj["status"]["pauseMaxMs"] == rows[vm]["pauseMs"]

    # Auto on 10.0: cpr-transfer, a new process, a version change, between two builds.
    r = rows["old-01"]
    assert (r["phase"], r["mode"], r["fromVersion"], r["toVersion"]) == (
        "Updated", "CprTransfer", rig.trixie.version, sid.version), r
    assert r["pidBefore"] == before["old-01"] and r["pidAfter"] == old.pid != before["old-01"]
    assert runs(old.pid, sid)
    # cpr-exec between the two 11.1.3 builds: the same process runs the other file.
    r = rows["exec-01"]
    assert (r["phase"], r["mode"], r["fromVersion"], r["toVersion"]) == (
        "Updated", "CprExec", sid.version, rig.trixie_backports.version), r
    assert r["pidBefore"] == r["pidAfter"] == ex.pid == before["exec-01"]
    assert runs(ex.pid, rig.trixie_backports)
    # cpr-reboot on file-backed RAM: a new process on the same RAM file.
    r = rows["reboot-01"]
    assert (r["phase"], r["mode"], r["toVersion"]) == ("Updated", "CprReboot", sid.version), r
    assert r["pidBefore"] == before["reboot-01"] and r["pidAfter"] == rb.pid != before["reboot-01"]
    assert runs(rb.pid, sid)
    assert rb.mem_path is not None and rb.mem_path.exists()

    for name, vm in (("old-01", old), ("exec-01", ex), ("reboot-01", rb)):
        row = rows[name]
        assert row["operationId"].startswith("vmu-") and len(row["operationId"]) >= 83
        # The pause QEMU measured (STOP to RESUME): positive, and no shorter than the longest
        # silence of the guest's serial line seen from the host would allow it to be by much.
        gap = vm.serial.max_gap_ms(since=mark)
        assert 0 < row["pauseMs"] < 60000, row
        assert gap + 50 >= row["pauseMs"] * 0.5, (name, gap, row["pauseMs"])
        vm.serial.assert_continuous(since=mark)
        assert await vm.query_status() == "running"
        await vm.serial.wait_ticks(10, after=time.monotonic_ns(), timeout=30)
    # Every host's VMHost now lists each VM on its new build.
    def relisted() -> Any:
        hosts = kube.get(kubectl, "vmhosts") or []
        found = {v["name"]: v for h in hosts for v in (h.get("status") or {}).get("vms") or []}
        want = {"old-01": (sid.binary, sid.version),
                "exec-01": (rig.trixie_backports.binary, rig.trixie_backports.version),
                "reboot-01": (sid.binary, sid.version)}
        got = {n: (found.get(n, {}).get("binary"), found.get(n, {}).get("qemuVersion"))
               for n in want}
        return got == want or None

    await kube.wait_for(relisted, 60, "the VMHosts to list the VMs on their new builds")
    assert in_root(rig, sid.binary) != in_root(rig, rig.trixie_backports.binary)


async def test_host_qemu_10_0_2_to_trixie_10_0_13(mode_vms: Vms, rig: Rig, fleet: Fleet,
                                                  kubectl: Kubectl) -> None:
    vm = await mode_vms.start("node-a", "host-01", "backports", "memfd")
    before = vm.pid
    assert runs(before, rig.backports)
    await kube.wait_for(lambda: mode_vms.listed(kubectl), 60, "the VMHost to list the VM")
    mark = time.monotonic_ns()
    node = fleet.node("node-a")
    tls = ClientTls(ca_file=str(node.pki.ca_cert), cert_file=str(node.pki.operator.cert),
                    key_file=str(node.pki.operator.key))
    client = await AgentClient.connect(node.endpoint, tls)
    try:
        result = await client.update(pb.UpdateRequest(
            operation_id=f"vmu-host-to-trixie-{vm.uuid}", vm=vm.uuid, mode=pb.MODE_AUTO,
            target=pb.Target(binary=str(rig.trixie.wrapper),
                             expected_version=rig.trixie.version)), timeout=180)
    finally:
        await client.close()
    assert result.outcome == pb.OUTCOME_UPDATED, result.message
    assert result.mode == pb.MODE_CPR_TRANSFER
    assert (result.version_before, result.version_after) == (rig.backports.version,
                                                             rig.trixie.version)
    assert result.pid_before == before and result.pid_after == vm.pid != before
    assert 0 < result.pause_ms < 60000
    assert runs(vm.pid, rig.trixie)  # now in the sid root, trixie's build
    vm.serial.assert_continuous(since=mark)
    assert await vm.query_status() == "running"
