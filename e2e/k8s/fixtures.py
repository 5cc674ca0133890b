"""pytest fixtures for the operator's end-to-end tests, imported once for all of e2e/ by
e2e/conftest.py (imported into each test module instead, every module would get its own
session fleet and operator).

Session-wide: the sandbox control plane with the CRDs and the peering object, two simulated
nodes (``node-a``, ``node-b``: an agent and a VMHost registrar each), the operator process.
Per test: VMs placed on the nodes (stopped at teardown) and VMUpdates (deleted before the
VMs are stopped, so no rollout acts on a VM being stopped). Nothing is skipped: a missing
rig or missing control-plane binaries make the tests error.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from e2e.cluster.fixtures import (  # noqa: F401  (fixtures)
    Kubectl,
    apply_and_wait_crds,
    k8s_cluster,
    kubectl,
)
from e2e.cluster.sandbox import Sandbox
from e2e.k8s import kube
from e2e.k8s.nodes import Fleet, make_fleet, wait_until
from e2e.k8s.operator_process import OperatorProcess
from e2e.k8s.pki import FleetPki, make_fleet_pki
from e2e.rig import Rig, TestVM, start_vm
from e2e.rig.fixtures import rig  # noqa: F401  (fixture)
from vmupdate_agent import guard, reaper

REPO = Path(__file__).resolve().parents[2]
NODES = ["node-a", "node-b"]
CRDS = sorted((REPO / "crds").glob("*.yaml"))
PEERING_CRD = REPO / "operator" / "manifests" / "kopf-peering-crd.yaml"
PEERING = REPO / "operator" / "manifests" / "kopf-peering.yaml"


@pytest.fixture(scope="session", autouse=True)
def e2e_subreaper() -> Iterator[None]:
    """The test process stands in for the host's init for the detached VMs (reaps them)."""
    reaper.become_subreaper()
    stop = reaper.OrphanReaper(interval=0.05, grace=0.5).start_thread()
    yield
    stop.set()


@pytest.fixture(scope="session")
def vmupdate_api(k8s_cluster: Sandbox) -> Sandbox:  # noqa: F811
    """The cluster with vmupdate's CRDs and the operator's peering object."""
    apply_and_wait_crds(k8s_cluster, [*CRDS, PEERING_CRD])
    k8s_cluster.kubectl("apply", "-f", str(PEERING), check=True)
    return k8s_cluster


@pytest.fixture(scope="session")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPki:
    return make_fleet_pki(tmp_path_factory.mktemp("fleet-pki"))


@pytest.fixture(scope="session")
def fleet(rig: Rig, vmupdate_api: Sandbox, fleet_pki: FleetPki,  # noqa: F811
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two simulated nodes, their agents serving and their VMHosts reporting."""
    workdir = tmp_path_factory.mktemp("fleet")
    guard_binary = guard.build(workdir / "guard")
    the_fleet = make_fleet(NODES, rig=rig, pki=fleet_pki, workdir=workdir,
                           guard_binary=guard_binary)
    try:
        for node in the_fleet.nodes.values():
            node.start()

        def reporting() -> bool:
            hosts = {h["metadata"]["name"]: h for h in kube.get(vmupdate_api.kubectl, "vmhosts")}
            return all((hosts.get(n) or {}).get("status", {}).get("heartbeatTime")
                       for n in NODES)

        try:
            wait_until(reporting, 90, "both VMHosts to report")
        except TimeoutError as exc:
            raise RuntimeError("\n".join([str(exc)] + [n.logs_tail() for n in
                                                       the_fleet.nodes.values()])) from exc
        yield the_fleet
    finally:
        problems = the_fleet.stop()
        assert not problems, problems


# The session's operator, while it runs: tests that must write a VMUpdate's status
# themselves (as the operator would) stop it for that time (see operator_stopped).
ACTIVE: list[OperatorProcess] = []
ACTIVE_PRIORITY = 1000


@contextlib.contextmanager
def operator_stopped() -> Iterator[None]:
    """No operator acts while inside (the session's one is stopped, then started again)."""
    running = [p for p in ACTIVE if p.alive]
    for process in running:
        process.stop()
    try:
        yield
    finally:
        for process in running:
            process.start()


@pytest.fixture(scope="session")
def operator_process(vmupdate_api: Sandbox, fleet_pki: FleetPki,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    # A fixed priority, so a test can start a standby replica below it.
    process = OperatorProcess(fleet_pki, tmp_path_factory.mktemp("operator-logs"),
                              priority=ACTIVE_PRIORITY)
    process.start()
    ACTIVE.append(process)
    try:
        yield process
    finally:
        ACTIVE.remove(process)
        process.stop()


@dataclass
class Placement:
    """VMs started on the simulated nodes for one test."""

    rig: Rig
    fleet: Fleet
    vms: dict[str, TestVM] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)  # VM name -> node

    async def start(self, node: str, name: str) -> TestVM:
        workdir = self.fleet.node(node).vm_dir / f"{name}-{secrets.token_hex(3)}"
        vm = await start_vm(self.rig, "sid", name=name, workdir=workdir, wait_ticking=True)
        self.vms[name] = vm
        self.hosts[name] = node
        return vm

    def listed(self, kubectl: Kubectl) -> bool:  # noqa: F811
        """Every VM of this placement (by uuid) is in its node's VMHost, and nothing else."""
        hosts = {h["metadata"]["name"]: h for h in kube.get(kubectl, "vmhosts")}
        for node in self.fleet.nodes:
            listed = {v.get("uuid") for v in
                      (hosts.get(node) or {}).get("status", {}).get("vms") or []}
            expected = {vm.uuid for name, vm in self.vms.items() if self.hosts[name] == node}
            if listed != expected:
                return False
        return True

    async def stop(self) -> None:
        for vm in self.vms.values():
            await vm.stop()
        self.vms.clear()


@pytest_asyncio.fixture
async def placement(rig: Rig, fleet: Fleet) -> AsyncIterator[Placement]:  # noqa: F811
    place = Placement(rig, fleet)
    try:
        yield place
    finally:
        await place.stop()


@pytest_asyncio.fixture
async def three_vms(placement: Placement, kubectl: Kubectl) -> Placement:  # noqa: F811
    """web-01 and db-01 on node-a, web-02 on node-b; listed in the VMHosts."""
    await asyncio.gather(*(placement.start(node, name) for node, name in (
        ("node-a", "web-01"), ("node-a", "db-01"), ("node-b", "web-02"))))
    await kube.wait_for(lambda: placement.listed(kubectl), 60, "the VMHosts to list the VMs")
    return placement


@pytest.fixture
def vmupdates(three_vms: Placement, kubectl: Kubectl,  # noqa: F811
              operator_process: OperatorProcess) -> Iterator[Kubectl]:
    """kubectl, with every VMUpdate deleted after the test (before its VMs are stopped)."""
    kube.delete_vmupdates(kubectl)
    yield kubectl
    if not operator_process.alive:
        operator_process.start()  # a test that killed it: the finalizers need it
    kube.delete_vmupdates(kubectl)
