"""A small real rollout: real VMs on a few simulated hosts, one VMUpdate at each parallelism,
through the real operator, agents, API server and etcd.

Each host is what a node runs (e2e/k8s/nodes.py): the agent (`vmupdate-agent serve`) and its
VMHost registrar, with its own name, certificate, journal and VM folder, on this machine.
Every host gets the same number of rig VMs (TCG, memfd RAM). Each run is one VMUpdate
(mode Auto, default preference: cpr-exec) that moves every VM to the other of two builds of
QEMU 11.1.3 (sid's and trixie-backports'), so every run updates every VM for real.

Per run: the time from `kubectl apply` to the VMUpdate's Succeeded (polled every 0.2 s),
against the ideal (each VM's update as its agent timed it, median, times the fewest waves
the parallelism allows); and every guest checked: the same boot token, its counter without a
hole, its RAM checksums good, and its QEMU process running the target build.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from e2e.cluster.fixtures import apply_and_wait_crds
from e2e.cluster.sandbox import Sandbox
from e2e.k8s.nodes import QEMU_HOST_LABEL, Fleet, SimulatedNode, make_fleet
from e2e.k8s.operator_process import OperatorProcess
from e2e.k8s.pki import make_fleet_pki
from e2e.rig import Rig, TestVM, load_rig, start_vm
from e2e.rig.config import Flavour
from e2e.rig.vm import runs
from vmupdate_agent import guard

from . import records
from .rolloutcalc import GuestCheck, per_host_limit, run_record, targets_in_turn

REPO = Path(__file__).resolve().parent.parent
FLAVOURS: tuple[Flavour, Flavour] = ("sid", "trixie-backports")
BOOTING_AT_ONCE = 3  # TCG boots on a 2-CPU machine: a few at a time


@dataclass(frozen=True)
class RolloutParams:
    hosts: int = 3
    vms_per_host: int = 4
    parallel: tuple[int, ...] = (1, 3, 6)
    mem_mib: int = 256
    timeout_s: float = 1800.0
    target_version: str | None = None
    """spec.target.version to ask for instead of the target build's own (a test of the
    benchmark's failure path: preflight refuses every VM, the rollout fails)."""


def manifest(name: str, binary: str, version: str, parallel: int, hosts: int) -> dict[str, Any]:
    return {"apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
            "metadata": {"name": name},
            "spec": {"selector": {"hostSelector": {"matchLabels": {QEMU_HOST_LABEL: "true"}}},
                     "target": {"binary": binary, "version": version}, "mode": "Auto",
                     "strategy": {"maxParallel": parallel,
                                  "maxParallelPerHost": per_host_limit(parallel, hosts),
                                  "pauseBudgetMs": 600000, "failurePolicy": "Halt"}}}


def _kubectl_json(sandbox: Sandbox, *args: str) -> Any:
    res = sandbox.kubectl(*args, "-o", "json", check=True, timeout=60)
    return json.loads(res.stdout)


async def _wait(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.2
                ) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(probe)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def _listed_on(sandbox: Sandbox, vms: list[TestVM], binary: str) -> bool:
    """Every VM listed by its host's VMHost as running `binary`."""
    hosts = _kubectl_json(sandbox, "get", "vmhosts")["items"]
    found = {v.get("uuid"): v.get("binary") for h in hosts
             for v in (h.get("status") or {}).get("vms") or []}
    return all(found.get(vm.uuid) == binary for vm in vms)


def _done(sandbox: Sandbox, name: str) -> dict[str, Any] | None:
    obj = cast(dict[str, Any], _kubectl_json(sandbox, "get", "vmupdate", name))
    status = obj.get("status") or {}
    if (status.get("phase") in ("Succeeded", "Failed")
            and status.get("observedGeneration") == obj["metadata"]["generation"]):
        return obj
    return None


async def _start_vms(rig: Rig, fleet: Fleet, p: RolloutParams, flavour: Flavour
                     ) -> list[tuple[str, TestVM]]:
    gate = asyncio.Semaphore(BOOTING_AT_ONCE)

    async def one(node: SimulatedNode, i: int) -> tuple[str, TestVM]:
        async with gate:
            name = f"{node.name}-vm{i}"
            vm = await start_vm(rig, flavour, name=name, workdir=node.vm_dir / name,
                                mem_mib=p.mem_mib, backend="memfd", wait_ticking=True,
                                boot_timeout=600)
            return node.name, vm

    tasks = [asyncio.create_task(one(node, i)) for node in fleet.nodes.values()
             for i in range(p.vms_per_host)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                _, vm = await t
                await vm.stop()
        raise


def _agent_times(fleet: Fleet, since_ns: int) -> tuple[list[float], list[float]]:
    """(each update's time accepted -> finished, each pause), ms, from the agents' journals
    for the operations accepted since `since_ns`."""
    took, pauses = [], []
    for records_ in fleet.journals().values():
        for rec in records_.values():
            created, finished = rec.get("created_ns"), rec.get("finished_ns")
            if not isinstance(created, int) or created < since_ns:
                continue
            if isinstance(finished, int):
                took.append((finished - created) / 1e6)
            result = rec.get("result")
            if isinstance(result, dict) and isinstance(result.get("pause_ms"), float | int):
                pauses.append(float(result["pause_ms"]))
    return took, pauses


async def _check_guest(host: str, vm: TestVM, token: str | None, mark: int, rig: Rig,
                       target: Flavour) -> GuestCheck:
    problem = ""
    try:
        await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=60)
    except TimeoutError as exc:
        problem = f"no ticks after the rollout: {exc}"
    continuous = checksums_ok = True
    try:
        vm.serial.assert_continuous(since=mark)
    except AssertionError as exc:
        continuous = False
        problem = problem or str(exc)[:500]
    window = vm.serial.window(since=mark)
    checksums_ok = bool(window) and all(t.ok for t in window)
    same_token = token is not None and vm.token == token
    on_target = runs(vm.pid, rig.qemu(target))
    if not on_target:
        problem = problem or f"pid {vm.pid} does not run {target}"
    return GuestCheck(vm=vm.name, host=host, same_token=same_token, continuous=continuous,
                      checksums_ok=checksums_ok, runs_target=on_target, problem=problem)


async def _one_run(sandbox: Sandbox, fleet: Fleet, rig: Rig, vms: list[tuple[str, TestVM]],
                   p: RolloutParams, i: int, parallel: int, src: Flavour, dst: Flavour,
                   log: Callable[[str], None]) -> dict[str, Any]:
    only_vms = [vm for _, vm in vms]
    # The operator decides from the VMHosts: they must show every VM on the build it runs.
    await _wait(lambda: _listed_on(sandbox, only_vms, rig.qemu(src).binary), 120,
                f"the VMHosts to list every VM on {src}")
    sandbox.kubectl("delete", "vmupdates", "--all", "--wait=false", check=True)
    tokens = {vm.name: vm.token for vm in only_vms}
    mark, since = time.monotonic_ns(), time.time_ns()
    name = f"rollout-{i + 1}"
    q = rig.qemu(dst)
    doc = manifest(name, q.binary, p.target_version or q.version, parallel, p.hosts)
    created = time.time_ns()
    sandbox.kubectl("apply", "-f", "-", input=json.dumps(doc), check=True)
    obj = await _wait(lambda: _done(sandbox, name), p.timeout_s, f"VMUpdate {name} to finish")
    total_ms = (time.time_ns() - created) / 1e6
    guests = [await _check_guest(host, vm, tokens[vm.name], mark, rig, dst) for host, vm in vms]
    took, pauses = _agent_times(fleet, since)
    record = run_record(hosts=p.hosts, vms_per_host=p.vms_per_host, parallel=parallel,
                        phase=obj["status"].get("phase"), total_ms=total_ms, agent_ms=took,
                        pauses_ms=pauses, guests=guests, target=f"{src} -> {dst}")
    record["updated"] = obj["status"].get("updated")
    log(f"rollout parallel {parallel}: {record['phase']} in {total_ms / 1000:.1f} s "
        f"(ideal {record['ideal_ms'] / 1000:.1f} s), guests ok {record['guests_ok']}/"
        f"{record['vms']}")
    return record


async def run_rollouts(p: RolloutParams, workdir: Path, log: Callable[[str], None]
                       ) -> dict[str, Any]:
    """Every parallelism of `p`, in turn, on one fleet of real VMs; the benchmark's record."""
    rig = load_rig()
    started = records.now()
    env: dict[str, Any] = {"machine": records.machine(),
                           "qemu": {f: rig.qemu(f).version_line for f in FLAVOURS}}
    workdir.mkdir(parents=True, exist_ok=True)
    sandbox = await asyncio.to_thread(Sandbox.start, workdir / "k8s", controller_manager=False)
    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(sandbox.kubeconfig)  # the registrars' and operator's
    fleet: Fleet | None = None
    operator: OperatorProcess | None = None
    vms: list[tuple[str, TestVM]] = []
    results = []
    try:
        crds = [*sorted((REPO / "crds").glob("*.yaml")),
                REPO / "operator" / "manifests" / "kopf-peering-crd.yaml"]
        await asyncio.to_thread(apply_and_wait_crds, sandbox, crds)
        sandbox.kubectl("apply", "-f", str(REPO / "operator" / "manifests" / "kopf-peering.yaml"),
                        check=True)
        pki = make_fleet_pki(workdir / "pki")
        guard_binary = guard.build(workdir / "guard")
        fleet = make_fleet([f"host-{h + 1}" for h in range(p.hosts)], rig=rig, pki=pki,
                           workdir=workdir / "fleet", guard_binary=guard_binary)
        for node in fleet.nodes.values():
            node.start()
        vms = await _start_vms(rig, fleet, p, FLAVOURS[0])
        env["accelerator"] = await _accelerator(vms[0][1])
        operator = OperatorProcess(pki, workdir / "logs")
        operator.start()
        for i, (parallel, (src, dst)) in enumerate(zip(
                p.parallel, targets_in_turn(FLAVOURS, len(p.parallel)), strict=True)):
            record = await _one_run(sandbox, fleet, rig, vms, p, i, parallel,
                                    cast(Flavour, src), cast(Flavour, dst), log)
            results.append(record)
            if record["phase"] != "Succeeded":
                # The VMs are not all on the build the next run starts from: stop here.
                log(f"rollout parallel {parallel} did not succeed; the remaining runs are "
                    "not started")
                break
    finally:
        if operator is not None:
            operator.stop()
        with contextlib.suppress(Exception):
            sandbox.kubectl("delete", "vmupdates", "--all", "--wait=false", timeout=30)
        for _, vm in vms:
            with contextlib.suppress(Exception):
                await vm.stop()
        if fleet is not None:
            fleet.stop()
        await asyncio.to_thread(sandbox.stop)
        if saved is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved
    env["machine_at_end"] = records.machine()
    params = {"hosts": p.hosts, "vms_per_host": p.vms_per_host, "parallel": list(p.parallel),
              "mem_mib": p.mem_mib, "flavours": list(FLAVOURS)}
    return records.document("rollout", params, env, results, started=started,
                            finished=records.now())


async def _accelerator(vm: TestVM) -> str:
    async with vm.qmp() as q:
        answer = await q.execute("query-kvm")
    assert isinstance(answer, dict)
    return records.accelerator(answer)
