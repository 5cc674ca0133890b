"""The Helm chart on a real kube-apiserver: `helm install`, the objects it makes, and the
identities it makes proven sufficient and minimal by the real programs.

The sandbox has no kubelet, so no pod runs. Instead the chart's own pod templates, as
installed, are started here as processes (e2e/k8s/chart.py): the operator Deployment's
container and the agent DaemonSet's registrar sidecar, each with its Secret volumes filled from
the installed Secrets and a kubeconfig holding its service account's token (TokenRequest API),
as a pod would get it. Their API traffic goes through a recording proxy, which shows every
request with the identity that made it:

* sufficient: the operator converges a VMUpdate on the fleet's VMs and releases its finalizer,
  the registrar registers its node's VMHost (also after the VMHost was deleted), and the
  API server refused none of their requests;
* minimal: every permission the chart grants was used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
import yarl
from aiohttp import web

from e2e.cluster.fixtures import Kubectl
from e2e.cluster.sandbox import ManagedProcess, Sandbox, free_port, make_kubeconfig
from e2e.k8s import kube
from e2e.k8s.chart import CHART, LocalPod, helm, rules, values_args
from e2e.k8s.fixtures import Placement, operator_stopped
from e2e.k8s.nodes import HEARTBEAT_S, QEMU_HOST_LABEL, Fleet
from e2e.k8s.operator_process import HOST_STALE_AFTER_S, PEERING_LIFETIME_S
from e2e.k8s.pki import FleetPki
from e2e.rig import Rig
from e2e.test_k8s_operator import assert_all_updated, ready, target
from vmupdate_agent.config import load as load_agent_config

pytestmark = [pytest.mark.k8s, pytest.mark.qemu]

RELEASE = "vmupdate-e2e"
NAMESPACE = "vmupdate-chart-e2e"
# Not the session's "vmupdate" peering (kubectl-applied by the fixtures; Helm will not adopt
# an object it did not create).
PEERING = "vmupdate-chart-e2e"
NODE = "node-a"
VMUPDATE = "chart-two-hosts"
ROLLOUT_TIMEOUT = 180
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "host",
                        "content-length", "content-encoding", "accept-encoding"})

Permission = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)


# --- a recording proxy -----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    who: str
    method: str
    path: str
    query: str
    status: int

    def permission(self) -> tuple[Permission, str, str] | None:
        """(permission, namespace, name) for a resource request; None for discovery."""
        parts = [p for p in self.path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) > 2:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) > 3:
            group, rest = parts[1], parts[3:]
        else:
            return None
        namespace = ""
        if rest[0] == "namespaces" and len(rest) > 2:
            namespace, rest = rest[1], rest[2:]
        resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
        name = rest[1] if len(rest) > 1 else ""
        query = urllib.parse.parse_qs(self.query)
        verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update",
                "PATCH": "patch", "DELETE": "delete" if name else "deletecollection"
                }[self.method]
        if self.method == "GET" and query.get("watch", [""])[0] in ("true", "1"):
            verb = "watch"
        return (group, resource, verb), namespace, name


@dataclass
class RecordingProxy:
    """Plain HTTP on loopback in front of the API server's HTTPS, in its own thread; records
    every request with the identity of its bearer token. Watches are streamed through."""

    upstream: str
    ca_pem: bytes
    identities: dict[str, str] = field(default_factory=dict)  # token -> who
    port: int = field(default_factory=free_port)
    requests: list[Request] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="api-proxy",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(30)

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(30)
        self._loop = None

    def of(self, who: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.who == who]

    async def _serve(self) -> None:
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), auto_decompress=False)
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A client that goes away cancels its handler (and so the upstream watch), and the
        # shutdown does not wait out watches.
        self._runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True,
                                     shutdown_timeout=2.0, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        who = self.identities.get(token, "unknown")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        # Uncompressed from upstream: the response's content-encoding is not passed on, and
        # the API server gzips large lists (e.g. with cert-manager's CRDs installed).
        headers["Accept-Encoding"] = "identity"
        body = await request.read()
        url = yarl.URL(self.upstream + request.raw_path, encoded=True)
        async with self._session.request(request.method, url, headers=headers,
                                         data=body or None, allow_redirects=False) as upstream:
            with self._lock:
                self.requests.append(Request(who, request.method, request.path,
                                             request.query_string, upstream.status))
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            return response


@pytest.fixture
def api_proxy(k8s_cluster: Sandbox) -> Iterator[RecordingProxy]:
    proxy = RecordingProxy(k8s_cluster.server, k8s_cluster.ca_pem)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


# --- the release -----------------------------------------------------------------------------


def get_json(kubectl: Kubectl, *args: str) -> Any:
    res = kubectl("get", *args, "-o", "json", timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def create_tls_secret(kubectl: Kubectl, name: str, cert: Path, key: Path, ca: Path,
                      namespace: str = NAMESPACE) -> None:
    res = kubectl("-n", namespace, "create", "secret", "generic", name,
                  "--type=kubernetes.io/tls", f"--from-file=tls.crt={cert}",
                  f"--from-file=tls.key={key}", f"--from-file=ca.crt={ca}", timeout=30)
    assert res.returncode == 0, res.stderr


def secrets_of(kubectl: Kubectl, namespace: str = NAMESPACE) -> dict[str, dict[str, bytes]]:
    """The namespace's Secrets as the kubelet would mount them (decoded)."""
    items = get_json(kubectl, "-n", namespace, "secrets")["items"]
    return {s["metadata"]["name"]: {k: base64.b64decode(v) for k, v in
                                    (s.get("data") or {}).items()} for s in items}


def token_kubeconfig(kubectl: Kubectl, proxy: RecordingProxy, service_account: str,
                     folder: Path, *, node: str | None = None,
                     namespace: str = NAMESPACE) -> Path:
    """A kubeconfig for the service account (a TokenRequest token), through the proxy. With
    `node`: bound to a pod of that service account on that node, as the kubelet's projected
    token of a DaemonSet pod is (the chart's VMHost admission policy reads the node from it)."""
    bound: list[str] = []
    if node is not None:
        pod = f"{service_account}-on-{node}"
        for manifest in (
                {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}},
                {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": pod, "namespace": namespace},
                 "spec": {"nodeName": node, "serviceAccountName": service_account,
                          "automountServiceAccountToken": False,
                          # No kubelet: never evicted from the NotReady node.
                          "tolerations": [{"operator": "Exists"}],
                          "containers": [{"name": "c", "image": "vmupdate-test-none"}]}}):
            made = kubectl("create", "-f", "-", input=json.dumps(manifest), timeout=30)
            assert made.returncode == 0 or "AlreadyExists" in made.stderr, made.stderr
        bound = ["--bound-object-kind", "Pod", "--bound-object-name", pod]
    res = kubectl("-n", namespace, "create", "token", service_account, "--duration=2h",
                  *bound, timeout=30)
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    proxy.identities[token] = service_account
    path = folder / f"{service_account}-{node or 'unbound'}.kubeconfig"
    path.write_text(make_kubeconfig(proxy.url, b"", f"system:serviceaccount:{namespace}:"
                                    f"{service_account}", token=token))
    return path


def granted(kubectl: Kubectl, *roles: tuple[str, ...]) -> set[Permission]:
    out: set[Permission] = set()
    for role in roles:
        for group, resource, verb, _name in rules(get_json(kubectl, *role)):
            out.add((group, resource, verb))
    return out


def used(requests: list[Request]) -> set[Permission]:
    out = set()
    for r in requests:
        perm = r.permission()
        if perm is not None and r.status != 403:
            out.add(perm[0])
    return out


def heartbeat(kubectl: Kubectl, node: str) -> tuple[str, datetime] | None:
    host = kube.get(kubectl, "vmhost", node)
    beat = ((host or {}).get("status") or {}).get("heartbeatTime")
    if not beat:
        return None
    return host["metadata"]["uid"], datetime.fromisoformat(beat.replace("Z", "+00:00"))


async def converge_and_delete(kubectl: Kubectl, placement: Placement, rig: Rig,
                              operator: ManagedProcess) -> float:
    """The two-hosts example's rollout under ``operator``, then its deletion (the finalizer
    released by the same operator); returns the seconds to Ready."""
    pids = {name: vm.pid for name, vm in placement.vms.items()}
    # The shipped example under its own name: its Events (kept after the object) must not
    # count for the operator tests' "two-hosts".
    _, example = kube.example("vmupdate-two-hosts.yaml", **target(rig))
    example["metadata"]["name"] = VMUPDATE
    t0 = time.monotonic()
    kube.apply(kubectl, yaml.safe_dump(example))
    obj = await kube.wait_for(
        lambda: ready(kubectl, VMUPDATE), ROLLOUT_TIMEOUT,
        f"VMUpdate {VMUPDATE} to be Ready under the chart's operator",
        describe=lambda: f"{kube.get(kubectl, 'vmupdate', VMUPDATE)}\n{operator.tail(80)}")
    seconds = time.monotonic() - t0
    assert obj["status"]["phase"] == "Succeeded"
    assert_all_updated(kubectl, obj, placement, rig, pids)
    # It holds the release's peering, and posted its events where the Role allows.
    peers = (kube.get(kubectl, "clusterkopfpeering", PEERING) or {}).get("status")
    assert peers, "the chart's operator never joined its peering"
    reasons = [e["reason"] for e in kube.events(kubectl, VMUPDATE)]
    assert "RolloutComplete" in reasons, reasons
    # Deleting waits for this operator to release its finalizer.
    await asyncio.to_thread(kube.delete_vmupdates, kubectl, 60)
    return seconds


async def test_chart_installs_and_its_service_accounts_are_sufficient_and_minimal(
        vmupdates: Kubectl, three_vms: Placement, rig: Rig, fleet: Fleet,
        fleet_pki: FleetPki, k8s_cluster: Sandbox, api_proxy: RecordingProxy,
        tmp_path: Path) -> None:
    kubectl = vmupdates
    node = fleet.node(NODE)
    # The image's console scripts are this virtualenv's.
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    metrics_port, health_port = free_port(), free_port()
    values = {
        # Pre-made Secrets (the fleet's certificates), one serving certificate for every agent.
        "certificates": {"agentServing": "secret", "create": "none"},
        "agentServerName": "localhost",  # the fleet's agents' certificates carry it
        "operator": {
            "peering": {"name": PEERING, "lifetimeSeconds": PEERING_LIFETIME_S},
            "metrics": {"port": metrics_port}, "healthPort": health_port,
            "hostStaleAfterSeconds": HOST_STALE_AFTER_S, "resyncSeconds": 3,
        },
        "agent": {"config": {
            "socket_globs": [str(node.vm_dir / "*" / "qmp.sock")],
            "allowed_binary_dirs": ["/opt/qemu/bin"],
            "state_dir": "/var/lib/vmupdate", "runtime_dir": "/run/vmupdate",
            # The registrar dials 127.0.0.1:<port>: node-a's agent's.
            "listen_address": f"0.0.0.0:{node.port}",
            "client_roles": {"operator": ["vmupdate-operator"],
                             "registrar": ["vmupdate-registrar"]}}},
        "registrar": {"intervalSeconds": HEARTBEAT_S,
                      "labels": {QEMU_HOST_LABEL: "true", "e2e.vmupdate.dev/node": NODE}},
    }
    processes: list[ManagedProcess] = []
    admin = str(k8s_cluster.kubeconfig)
    try:
        # A bad agent configuration is refused before anything is created, naming the field.
        bad = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                   "--create-namespace", "--set", "agent.config.timeouts.load_s=0",
                   kubeconfig=admin)
        assert bad.returncode != 0 and "/agent/config/timeouts/load_s" in bad.stderr, bad
        assert helm("status", RELEASE, "--namespace", NAMESPACE,
                    kubeconfig=admin).returncode != 0
        t0 = time.monotonic()
        install = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                       "--create-namespace", *values_args(values, tmp_path), kubeconfig=admin)
        assert install.returncode == 0, install.stderr
        assert "vmupdate-operator-tls" in install.stdout  # NOTES
        installed_s = time.monotonic() - t0

        # --- what the release made
        release = f"app.kubernetes.io/instance={RELEASE}"
        names = {(o["kind"], o["metadata"]["name"]) for o in get_json(
            kubectl, "-n", NAMESPACE, "serviceaccounts,configmaps,deployments,daemonsets,"
            "services", "-l", release)["items"]}
        assert names == {("ServiceAccount", f"{RELEASE}-operator"),
                         ("ServiceAccount", f"{RELEASE}-agent"),
                         ("ConfigMap", f"{RELEASE}-agent"),
                         ("Deployment", f"{RELEASE}-operator"),
                         ("DaemonSet", f"{RELEASE}-agent"),
                         ("Service", f"{RELEASE}-operator-metrics")}
        for kind in ("clusterrole", "clusterrolebinding"):
            for suffix in ("operator", "agent"):
                get_json(kubectl, kind, f"{RELEASE}-{suffix}")
        get_json(kubectl, "-n", "default", "role,rolebinding", f"{RELEASE}-operator-events")
        get_json(kubectl, "clusterkopfpeering", PEERING)
        get_json(kubectl, "crd", "clusterkopfpeerings.kopf.dev")
        # The controller manager made the Deployment's pods (Pending: no kubelet).
        pods = await kube.wait_for(lambda: [p for p in get_json(
            kubectl, "-n", NAMESPACE, "pods", "-l", "app.kubernetes.io/component=operator"
        )["items"] if p["spec"]["serviceAccountName"] == f"{RELEASE}-operator"], 60,
            "the operator's pods")
        assert len(pods) == 2

        # --- the pods' Secrets and identities
        for name, pair in (("vmupdate-operator-tls", fleet_pki.operator),
                           ("vmupdate-registrar-tls", fleet_pki.registrar),
                           ("vmupdate-agent-tls", fleet_pki.agent(NODE))):
            create_tls_secret(kubectl, name, pair.cert, pair.key, fleet_pki.ca_cert)
        secrets = secrets_of(kubectl)
        operator_sa, agent_sa = f"{RELEASE}-operator", f"{RELEASE}-agent"
        operator_kubeconfig = token_kubeconfig(kubectl, api_proxy, operator_sa, tmp_path)
        agent_kubeconfig = token_kubeconfig(kubectl, api_proxy, agent_sa, tmp_path, node=NODE)

        # --- the registrar sidecar of node-a's agent pod, instead of the fleet's registrar
        daemonset = get_json(kubectl, "-n", NAMESPACE, "daemonset", f"{RELEASE}-agent")
        agent_pod = LocalPod(daemonset["spec"]["template"]["spec"], tmp_path / "agent-pod",
                             secrets=secrets,
                             fields={"spec.nodeName": NODE, "status.podIP": "127.0.0.1"})
        # The installed ConfigMap, through the init container's own command, is a
        # configuration the agent loads, with this node's name.
        configmap = get_json(kubectl, "-n", NAMESPACE, "configmap", f"{RELEASE}-agent")
        agent_pod.config_maps = {configmap["metadata"]["name"]: configmap["data"]}
        built = agent_pod.run("config")
        assert built.returncode == 0, built.stderr
        agent_args = agent_pod.container("agent")["args"]
        config = load_agent_config(agent_pod.local_path(
            "agent", agent_args[agent_args.index("--config") + 1]))
        assert config.node_name == NODE and config.listen_address == f"0.0.0.0:{node.port}"
        registrar_argv = agent_pod.argv("registrar", skip_volumes=["kube-api-access"])
        assert f"--endpoint={node.endpoint}" in registrar_argv
        node.stop_registrar()
        registrar = ManagedProcess(
            "chart-registrar", registrar_argv, tmp_path / "logs" / "registrar.log",
            env={"KUBECONFIG": str(agent_kubeconfig), "PATH": search_path})
        started = datetime.now(UTC)
        registrar.start(die_with_parent=True)
        processes.append(registrar)

        def mine() -> Any:
            beat = heartbeat(kubectl, NODE)
            return beat if beat and beat[1] > started else None

        first = await kube.wait_for(mine, 60, "the chart's registrar to report node-a",
                                    describe=registrar.tail)
        # Deleted, the VMHost comes back at the next heartbeat: created by this identity.
        assert kubectl("delete", "vmhost", NODE, timeout=30).returncode == 0
        again = await kube.wait_for(
            lambda: (b := heartbeat(kubectl, NODE)) and b[0] != first[0] and b, 60,
            "the chart's registrar to create node-a's VMHost again", describe=registrar.tail)
        assert again
        host = kube.get(kubectl, "vmhost", NODE)
        assert host["status"]["endpoint"] == node.endpoint
        assert host["metadata"]["labels"][QEMU_HOST_LABEL] == "true"
        await kube.wait_for(lambda: three_vms.listed(kubectl), 60, "node-a's VMs listed")

        # --- the operator Deployment's container, instead of the session's operator
        deployment = get_json(kubectl, "-n", NAMESPACE, "deployment", f"{RELEASE}-operator")
        operator_pod = LocalPod(deployment["spec"]["template"]["spec"],
                                tmp_path / "operator-pod", secrets=secrets)
        with operator_stopped():
            operator = ManagedProcess(
                "chart-operator", operator_pod.argv("operator"),
                tmp_path / "logs" / "operator.log",
                env={"KUBECONFIG": str(operator_kubeconfig), "PATH": search_path})
            operator.start(die_with_parent=True)
            processes.append(operator)
            try:
                converge_s = await converge_and_delete(kubectl, three_vms, rig, operator)
            finally:
                operator.stop(30)  # before the session's operator comes back
        registrar.stop(10)
        node.start_registrar()

        # --- sufficient and minimal
        operator_requests, registrar_requests = api_proxy.of(operator_sa), api_proxy.of(agent_sa)
        assert not api_proxy.of("unknown")
        for who, requests in ((operator_sa, operator_requests),
                              (agent_sa, registrar_requests)):
            refused = [r for r in requests if r.status in (401, 403)]
            assert not refused, f"{who} was refused: {refused}"
        assert used(operator_requests) == granted(
            kubectl, ("clusterrole", f"{RELEASE}-operator"),
            ("-n", "default", "role", f"{RELEASE}-operator-events"))
        assert used(registrar_requests) == granted(kubectl, ("clusterrole", f"{RELEASE}-agent"))
        # Events went to the namespace of the Role; the keep-alives to the release's peering.
        perms = [(r.permission(), r.status) for r in operator_requests]
        assert {p[1] for p, _ in perms if p and p[0] == ("", "events", "create")} == {"default"}
        assert {p[2] for p, _ in perms if p and p[0][1:] == ("clusterkopfpeerings", "patch")
                } == {PEERING}
        # The registrar created the VMHost (201) and, before that, found it there (409).
        creates = [s for p, s in ((r.permission(), r.status) for r in registrar_requests)
                   if p and p[0] == ("vmupdate.dev", "vmhosts", "create")]
        assert 201 in creates and 409 in creates, creates
        print(f"\nchart e2e: helm install {installed_s:.1f}s, converge {converge_s:.1f}s, "
              f"operator requests {len(operator_requests)}, registrar requests "
              f"{len(registrar_requests)}")
        for who, requests in ((operator_sa, operator_requests), (agent_sa, registrar_requests)):
            print(f"  {who}: " + ", ".join(
                f"{g or 'core'}/{res} {verb}" for g, res, verb in sorted(used(requests))))
    finally:
        for process in processes:
            with contextlib.suppress(Exception):
                process.stop(30)
        if node.registrar is None or node.registrar.exited() is not None:
            node.start_registrar()
        uninstall = helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait",
                         "--timeout=60s", kubeconfig=admin)
        kubectl("delete", "namespace", NAMESPACE, "--wait=false", timeout=30)
    assert uninstall.returncode == 0, uninstall.stderr
    for kind, name in (("clusterrole", f"{RELEASE}-operator"), ("clusterrole", f"{RELEASE}-agent"),
                       ("clusterrolebinding", f"{RELEASE}-operator"),
                       ("clusterkopfpeering", PEERING)):
        assert kube.get(kubectl, kind, name) is None, f"{kind}/{name} left after uninstall"


# Per-node agent certificates (the chart's default): e2e/test_k8s_chart_certificates.py.
