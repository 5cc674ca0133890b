"""The fleet benchmark: simulated agents (`bench.simagent`, one VMHost each, kept current by
the real registrar code), the real operator as a process, a real API server and etcd (the
sandbox of `e2e.cluster`), one VMUpdate for the whole fleet.

Reported per run: time to Succeeded (or to the halt) against the ideal; the operator's API
requests and request bytes per VM (from the API server's audit log, by client identity);
the operator's CPU time and peak RSS; etcd's database size; the VMUpdate's own size; with
injected failures, the time from the first failure to the halt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client as kclient
from kubernetes_asyncio import config as kconfig

from e2e.cluster.fixtures import apply_and_wait_crds
from e2e.cluster.sandbox import ManagedProcess, Sandbox
from e2e.k8s.operator_process import OperatorProcess
from e2e.k8s.pki import OPERATOR_IDENTITY, make_fleet_pki
from vmupdate_agent.config import TlsConfig
from vmupdate_agent.registration import RegistrationSettings, run_registration
from vmupdate_api.gen import agent_v1_pb2 as pb

from . import fleetcalc
from .simagent import Failures, Replay, SimAgent, make_vms, serve

REPO = Path(__file__).resolve().parent.parent
TARGET = "/opt/qemu-11.1.3/bin/qemu-system-x86_64"
REGISTRAR = "vmupdate-bench-registrar"
LABEL = "vmupdate.dev/bench-fleet"
AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Request
  users: ["{OPERATOR_IDENTITY}", "{REGISTRAR}"]
- level: None
"""


@dataclass(frozen=True)
class FleetParams:
    hosts: int
    vms_per_host: int
    parallel: int
    per_host: int = 1
    fail_every: int = 0
    """every n-th VM of each host fails (0: none); the VMUpdate halts on the first"""
    replay: Replay = field(default_factory=Replay)
    timeout_s: float = 1800.0
    heartbeat_s: float = 10.0
    profile: bool = False
    """sample the operator with py-spy (its collapsed stacks: operator-profile.txt)"""


def vmupdate_manifest(name: str, p: FleetParams) -> dict[str, Any]:
    return {"apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
            "metadata": {"name": name},
            "spec": {"selector": {"hostSelector": {"matchLabels": {LABEL: "true"}}},
                     "target": {"binary": TARGET, "version": "11.1.3"}, "mode": "CprExec",
                     "strategy": {"maxParallel": p.parallel,
                                  "maxParallelPerHost": min(p.per_host, p.parallel),
                                  "pauseBudgetMs": 10_000, "failurePolicy": "Halt"}}}


def _etcd_db_bytes(sandbox: Sandbox) -> float:
    etcd = next(proc for proc in sandbox.processes if proc.name == "etcd")
    url = next(a.split("=", 1)[1] for a in etcd.argv if a.startswith("--listen-client-urls="))
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return fleetcalc.prometheus_sum(text, "etcd_mvcc_db_total_size_in_bytes")


def _records(sandbox: Sandbox) -> list[dict[str, Any]]:
    res = sandbox.kubectl("get", "vmupdatehosts", "-o", "json", timeout=120)
    if res.returncode != 0:  # an operator of before VMUpdateHosts (a comparison run)
        return []
    items: list[dict[str, Any]] = json.loads(res.stdout)["items"]
    return items


def _get(sandbox: Sandbox, name: str) -> dict[str, Any]:
    res = sandbox.kubectl("get", "vmupdate", name, "-o", "json", check=True, timeout=60)
    obj: dict[str, Any] = json.loads(res.stdout)
    return obj


@dataclass(frozen=True)
class _CpuNow:
    machine: str  # /proc/stat
    operator: float
    control_plane: float
    simulated_hosts: float


def _cpu_now(operator_pid: int, control_plane_pids: list[int]) -> _CpuNow:
    tck = os.sysconf("SC_CLK_TCK")

    def of(pid: int) -> float:
        try:
            return fleetcalc.cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), tck)
        except OSError:
            return 0.0
    own = os.times()
    return _CpuNow(machine=Path("/proc/stat").read_text(), operator=of(operator_pid),
                   control_plane=sum(of(pid) for pid in control_plane_pids),
                   simulated_hosts=own.user + own.system)


async def _wait_done(sandbox: Sandbox, name: str, timeout: float) -> tuple[dict[str, Any], int]:
    """Poll (admin, not audited) until the rollout is Succeeded or Failed; (object, when)."""
    deadline = time.monotonic() + timeout
    while True:
        obj = await asyncio.to_thread(_get, sandbox, name)
        status = obj.get("status") or {}
        if (status.get("phase") in ("Succeeded", "Failed")
                and status.get("observedGeneration") == obj["metadata"]["generation"]):
            return obj, time.time_ns()
        if time.monotonic() > deadline:
            raise TimeoutError(f"VMUpdate {name} not done after {timeout:.0f}s: {status}")
        await asyncio.sleep(0.5)


async def _wait_hosts(sandbox: Sandbox, p: FleetParams, timeout: float = 300) -> None:
    want = p.hosts * p.vms_per_host
    deadline = time.monotonic() + timeout
    while True:
        res = await asyncio.to_thread(sandbox.kubectl, "get", "vmhosts", "-o", "json",
                                      check=True, timeout=60)
        items = json.loads(res.stdout)["items"]
        listed = sum(len((i.get("status") or {}).get("vms") or []) for i in items)
        if len(items) == p.hosts and listed == want:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(items)}/{p.hosts} VMHosts, {listed}/{want} VMs listed")
        await asyncio.sleep(1)


async def run_fleet(p: FleetParams, workdir: Path) -> dict[str, Any]:
    """One rollout of a fresh fleet on a fresh control plane; the record of it."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    load_at_start = list(os.getloadavg())
    (workdir / "audit-policy.yaml").write_text(AUDIT_POLICY)
    audit_log = workdir / "audit.log"
    sandbox = await asyncio.to_thread(
        Sandbox.start, workdir / "k8s", controller_manager=False, extra_apiserver_args=[
            f"--audit-policy-file={workdir / 'audit-policy.yaml'}",
            f"--audit-log-path={audit_log}", "--audit-log-maxsize=0"])
    stop = asyncio.Event()
    servers, tasks = [], []
    operator: ManagedProcess | None = None
    spy: asyncio.subprocess.Process | None = None
    api: kclient.ApiClient | None = None
    try:
        crds = [*sorted((REPO / "crds").glob("*.yaml")),
                REPO / "operator" / "manifests" / "kopf-peering-crd.yaml"]
        await asyncio.to_thread(apply_and_wait_crds, sandbox, crds)
        sandbox.kubectl("apply", "-f", str(REPO / "operator" / "manifests" / "kopf-peering.yaml"),
                        check=True)
        pki = make_fleet_pki(workdir / "pki")
        registrar_kc = sandbox.client_kubeconfig(REGISTRAR, ["system:masters"])
        operator_kc = sandbox.client_kubeconfig(OPERATOR_IDENTITY, ["system:masters"])
        api = await kconfig.new_client_from_config(config_file=str(registrar_kc))
        agents = []
        for h in range(p.hosts):
            node = f"sim-{h:04d}"
            agent = SimAgent(node, make_vms(node, p.vms_per_host, binary="/usr/bin/qemu-old",
                                            version=(10, 0, 2)),
                             replay=p.replay, failures=Failures(every=p.fail_every))
            pair = pki.agent(node)
            server, port = await serve(agent, TlsConfig(
                cert_file=str(pair.cert), key_file=str(pair.key),
                client_ca_file=str(pki.ca_cert)), [OPERATOR_IDENTITY])
            servers.append(server)
            agents.append(agent)
            settings = RegistrationSettings(node_name=node, endpoint=f"127.0.0.1:{port}",
                                            agent_version="sim", interval_s=p.heartbeat_s,
                                            labels={LABEL: "true"})

            async def listing(a: SimAgent = agent) -> pb.ListVMsResponse:
                return await a.ListVMs(pb.ListVMsRequest(), None)
            tasks.append(asyncio.create_task(run_registration(settings, listing, stop=stop,
                                                              api=api)))
        await _wait_hosts(sandbox, p)
        proc = OperatorProcess(pki, workdir / "logs")
        # A host is stale after three missed heartbeats (the flag given last wins).
        argv = [*proc.argv(), "--host-stale-after", str(3 * p.heartbeat_s)]
        operator = ManagedProcess("operator", argv, workdir / "logs" / "operator.log",
                                  env={"KUBECONFIG": str(operator_kc)})
        operator.start(die_with_parent=True)
        if p.profile:
            spy = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                str(operator.pid), "--rate", "50", "--format", "raw", "--nonblocking",
                "-o", str(workdir / "operator-profile.txt"),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        etcd_before = await asyncio.to_thread(_etcd_db_bytes, sandbox)
        name = "fleet"
        cpu_before = await asyncio.to_thread(_cpu_now, operator.pid, sandbox.pids)
        created = time.time_ns()
        sandbox.kubectl("apply", "-f", "-", input=json.dumps(vmupdate_manifest(name, p)),
                        check=True)
        obj, done_ns = await _wait_done(sandbox, name, p.timeout_s)
        cpu_after = await asyncio.to_thread(_cpu_now, operator.pid, sandbox.pids)
        stat = Path(f"/proc/{operator.pid}/stat").read_text()
        status_text = Path(f"/proc/{operator.pid}/status").read_text()
        etcd_after = await asyncio.to_thread(_etcd_db_bytes, sandbox)
        host_records = await asyncio.to_thread(_records, sandbox)
    finally:
        stop.set()
        for t in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, 30)
        if operator is not None:
            await asyncio.to_thread(operator.stop, 30)
        if spy is not None:  # it writes its profile when the operator exits
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(spy.wait(), 60)
            if spy.returncode is None:
                spy.kill()
                await spy.wait()
        for server in servers:
            await server.stop(0)
        if api is not None:
            await api.close()
        await asyncio.to_thread(sandbox.stop)
    with open(audit_log) as f:
        costs = fleetcalc.audit_costs(f)
    per_vm_ms = sum(ms for _, ms in p.replay.phases)
    failed_at = min((t for a in agents for t in a.failed_at_ns), default=None)
    status = obj.get("status") or {}
    record: dict[str, Any] = {
        "hosts": p.hosts, "vms": p.hosts * p.vms_per_host, "parallel": p.parallel,
        "per_host": p.per_host, "fail_every": p.fail_every, "phase": status.get("phase"),
        "updated": status.get("updated"), "failed": status.get("failed"),
        "total_ms": (done_ns - created) / 1e6,
        "per_vm_ms": per_vm_ms,
        "api": {"operator": vars(costs.get(OPERATOR_IDENTITY, fleetcalc.ApiCost())),
                "registrars": vars(costs.get(REGISTRAR, fleetcalc.ApiCost()))},
        "operator_cpu_s": fleetcalc.cpu_seconds(stat, os.sysconf("SC_CLK_TCK")),
        "operator_peak_rss_mib": fleetcalc.peak_rss_mib(status_text),
        # Where the machine's CPUs went between the apply and the end: on these 2 CPUs the
        # operator, the API server with etcd, and the simulated hosts (this process) share.
        "machine_busy": fleetcalc.machine_busy(cpu_before.machine, cpu_after.machine),
        "rollout_cpu_s": {k: round(getattr(cpu_after, k) - getattr(cpu_before, k), 2)
                          for k in ("operator", "control_plane", "simulated_hosts")},
        "etcd_db_bytes": etcd_after, "etcd_db_bytes_before": etcd_before,
        "vmupdate_bytes": len(json.dumps(obj, separators=(",", ":"))),
        "records": len(host_records),
        "record_bytes_max": max((len(json.dumps(r, separators=(",", ":")))
                                 for r in host_records), default=0),
        "load_at_start": load_at_start, "load_at_end": list(os.getloadavg()),
    }
    profile = workdir / "operator-profile.txt"
    if p.profile and profile.exists():
        record["profile_top"] = fleetcalc.profile_top(profile.read_text())
    record["ideal_ms"] = fleetcalc.record_ideal_ms(record)
    if failed_at is not None:
        record["failure_to_halt_ms"] = (done_ns - failed_at) / 1e6
    return record

