"""The chart with per-node agent certificates (certificates.agentServing=csr, the default) on a
real kube-apiserver, converging a VMUpdate on real QEMU, with each source of its CA and client
certificates:

* ``create: none``: pre-made Secrets (the fleet's CA);
* ``create: certManager``: cert-manager's own controller (e2e/cluster/build-cert-manager.sh,
  run out-of-cluster against the sandbox, its CRDs from its module) issues the CA and the
  operator's and registrar's client certificates the chart's Issuers and Certificates ask for.

(``create: selfSigned``, helm's generated CA, is e2e/test_k8s_agent_certificates.py's.)

No kubelet runs here: as in e2e/test_k8s_chart.py, the pods' containers are started as
processes from the installed templates (e2e/k8s/chart.py): the operator Deployment's
container, and for each node the certificate sidecar and the registrar of the agent
DaemonSet, with tokens bound to a pod on that node. Each node's agent is the fleet's agent
process, serving what the sidecar wrote (written over the files its TLS loads; it reloads
them at the next handshake) and trusting the chart's client CA (appended to its client CA
file for the test; restored after).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from e2e.cluster.fixtures import Kubectl, apply_and_wait_crds
from e2e.cluster.sandbox import ManagedProcess, Sandbox, free_port
from e2e.k8s import kube
from e2e.k8s.chart import CHART, LocalPod, helm, values_args
from e2e.k8s.fixtures import Placement, operator_stopped
from e2e.k8s.nodes import HEARTBEAT_S, QEMU_HOST_LABEL, Fleet
from e2e.k8s.operator_process import HOST_STALE_AFTER_S, PEERING_LIFETIME_S
from e2e.k8s.pki import OPERATOR_IDENTITY, REGISTRAR_IDENTITY, FleetPki
from e2e.rig import Rig
from e2e.test_k8s_chart import (  # noqa: F401  (api_proxy: a fixture)
    NODE,
    PEERING,
    RELEASE,
    RecordingProxy,
    api_proxy,
    converge_and_delete,
    create_tls_secret,
    get_json,
    granted,
    heartbeat,
    secrets_of,
    token_kubeconfig,
    used,
)

pytestmark = [pytest.mark.k8s, pytest.mark.qemu]

TOP = Path(__file__).resolve().parents[1]
CSR_NAMESPACE = "vmupdate-chart-csr-e2e"
CM_NAMESPACE = "vmupdate-chart-cm-e2e"
SIGNER = "vmupdate.dev/agent-serving"

Prepare = Callable[[str], Awaitable[None]]


def _search_path() -> str:
    # The image's console scripts are this virtualenv's.
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


async def converge_on_per_node_certificates(
        kubectl: Kubectl, three_vms: Placement, rig: Rig, fleet: Fleet, fleet_pki: FleetPki,
        k8s_cluster: Sandbox, proxy: RecordingProxy, tmp_path: Path, *, namespace: str,
        certificates: dict[str, Any], prepare: Prepare) -> dict[str, dict[str, bytes]]:
    """`helm install` in csr mode with ``certificates``; ``prepare(namespace)`` makes the
    Secrets the pods need exist (or waits until they do); then each node's certificate
    sidecar gets its node's certificate from the chart's operator container, the node's agent
    serves it, the chart's registrars check it against their node's name, and the chart's
    operator converges the two-hosts VMUpdate, checking each agent against the node it meant.
    No request of the chart's identities is refused, every CSR permission granted is used.
    Returns the namespace's Secrets as the pods saw them."""
    ns, search_path = namespace, _search_path()
    port_a = fleet.node(NODE).port
    values = {
        "certificates": {"agentServing": "csr", "caSecret": "vmupdate-ca",
                         "agentTtlSeconds": 3600, **certificates},
        "operator": {"replicas": 1,
                     "peering": {"name": PEERING, "lifetimeSeconds": PEERING_LIFETIME_S},
                     "metrics": {"port": free_port()}, "healthPort": free_port(),
                     "hostStaleAfterSeconds": HOST_STALE_AFTER_S, "resyncSeconds": 3},
        "agent": {"config": {
            "socket_globs": ["/run/vms/*/qmp.sock"], "allowed_binary_dirs": ["/opt/qemu/bin"],
            "listen_address": f"0.0.0.0:{port_a}",
            "client_roles": {"operator": [OPERATOR_IDENTITY],
                             "registrar": [REGISTRAR_IDENTITY]}}},
        "registrar": {"intervalSeconds": HEARTBEAT_S, "labels": {QEMU_HOST_LABEL: "true"}},
    }
    admin = str(k8s_cluster.kubeconfig)
    processes: list[ManagedProcess] = []
    saved: dict[Path, bytes] = {}
    stopped_registrars = []
    try:
        install = helm("install", RELEASE, str(CHART), "--namespace", ns, "--create-namespace",
                       *values_args(values, tmp_path), kubeconfig=admin)
        assert install.returncode == 0, install.stderr
        await prepare(ns)
        secrets = secrets_of(kubectl, ns)
        # The agents trust the chart's client CA (the registrar Secret's ca.crt, which the
        # DaemonSet mounts as the agents' client CA) besides the fleet's own.
        chart_ca = secrets["vmupdate-registrar-tls"]["ca.crt"]
        fleet_ca = fleet_pki.ca_cert.read_bytes()
        if chart_ca != fleet_ca:
            saved[fleet_pki.ca_cert] = fleet_ca
            fleet_pki.ca_cert.write_bytes(fleet_ca + chart_ca)
        operator_sa, agent_sa = f"{RELEASE}-operator", f"{RELEASE}-agent"
        operator_kc = token_kubeconfig(kubectl, proxy, operator_sa, tmp_path, namespace=ns)
        deployment = get_json(kubectl, "-n", ns, "deployment", f"{RELEASE}-operator")
        daemonset = get_json(kubectl, "-n", ns, "daemonset", f"{RELEASE}-agent")
        operator_pod = LocalPod(deployment["spec"]["template"]["spec"],
                                tmp_path / "operator-pod", secrets=secrets)
        operator_argv = operator_pod.argv("operator")
        assert "--agent-server-name={node}" in operator_argv
        with operator_stopped():
            operator = ManagedProcess(
                "chart-operator", operator_argv, tmp_path / "logs" / "operator.log",
                env={"KUBECONFIG": str(operator_kc), "PATH": search_path})
            operator.start(die_with_parent=True)
            processes.append(operator)
            for n in fleet.nodes.values():
                agent_kc = token_kubeconfig(kubectl, proxy, agent_sa, tmp_path,
                                            node=n.name, namespace=ns)
                pod = LocalPod(daemonset["spec"]["template"]["spec"],
                               tmp_path / f"agent-pod-{n.name}", secrets=secrets,
                               fields={"spec.nodeName": n.name, "status.podIP": "127.0.0.1"})
                sidecar = ManagedProcess(
                    f"chart-certificate-{n.name}",
                    pod.argv("certificate", skip_volumes=["kube-api-access"]),
                    tmp_path / "logs" / f"certificate-{n.name}.log",
                    env={"KUBECONFIG": str(agent_kc), "PATH": search_path})
                sidecar.start(die_with_parent=True)
                processes.append(sidecar)
                issued = pod.local_path("certificate", "/etc/vmupdate/tls/tls.crt")
                await kube.wait_for(lambda p=issued: p.exists() and p.stat().st_size, 90,
                                    f"{n.name}'s certificate",
                                    describe=lambda s=sidecar: s.tail(30) + operator.tail(30))
                cert = x509.load_pem_x509_certificate(issued.read_bytes())
                assert cert.subject.rfc4514_string() == f"CN={n.name}"
                cert.verify_directly_issued_by(x509.load_pem_x509_certificate(
                    secrets["vmupdate-ca"]["tls.crt"]))
                # The node's agent serves it: written over the files its TLS loads.
                serving = fleet_pki.agent(n.name)
                for path in (serving.key, serving.cert):
                    saved.setdefault(path, path.read_bytes())
                serving.key.write_bytes(issued.with_name("tls.key").read_bytes())
                serving.cert.write_bytes(issued.read_bytes())
                # The chart's registrar for this node, instead of the fleet's.
                argv = [a.replace(f"127.0.0.1:{port_a}", n.endpoint)
                        for a in pod.argv("registrar", skip_volumes=["kube-api-access"])]
                assert f"--server-name={n.name}" in argv
                n.stop_registrar()
                stopped_registrars.append(n)
                registrar = ManagedProcess(
                    f"chart-registrar-{n.name}", argv,
                    tmp_path / "logs" / f"registrar-{n.name}.log",
                    env={"KUBECONFIG": str(agent_kc), "PATH": search_path})
                registrar.start(die_with_parent=True)
                processes.append(registrar)
            started = datetime.now(UTC)
            for n in fleet.nodes.values():
                await kube.wait_for(
                    lambda n=n: (b := heartbeat(kubectl, n.name)) and b[1] > started, 60,
                    f"the chart's registrar to report {n.name} over its per-node certificate",
                    describe=lambda: "\n".join(p.tail(15) for p in processes))
            await kube.wait_for(lambda: three_vms.listed(kubectl), 60, "the VMs listed")
            converge_s = await converge_and_delete(kubectl, three_vms, rig, operator)
            operator.stop(30)
        approved = [c for c in get_json(kubectl, "csr")["items"]
                    if c["spec"]["signerName"] == SIGNER and c["status"].get("certificate")]
        assert {c["spec"]["extra"]["authentication.kubernetes.io/node-name"][0]
                for c in approved} >= set(fleet.nodes)
        for who in (operator_sa, agent_sa):
            refused = [r for r in proxy.of(who) if r.status in (401, 403)]
            assert not refused, f"{who} was refused: {refused}"
        # Every CSR permission granted was used (signers' approve/sign are checked by the API
        # server on the approval and status updates, which succeeded above).
        csr_granted = {p for p in granted(kubectl, ("clusterrole", f"{RELEASE}-operator"))
                       if p[0] == "certificates.k8s.io" and p[1] != "signers"}
        assert csr_granted <= used(proxy.of(operator_sa)), csr_granted
        assert {p for p in granted(kubectl, ("clusterrole", f"{RELEASE}-agent"))
                if p[0] == "certificates.k8s.io"} <= used(proxy.of(agent_sa))
        print(f"\nchart csr e2e ({certificates}): converge {converge_s:.1f}s with per-node "
              "certificates")
        return secrets
    finally:
        for process in processes:
            with contextlib.suppress(Exception):
                process.stop(30)
        for path, content in saved.items():  # the fleet's own certificates and CA back
            path.write_bytes(content)
        for n in stopped_registrars:
            if n.registrar is None or n.registrar.exited() is not None:
                n.start_registrar()
        helm("uninstall", RELEASE, "--namespace", ns, "--wait", "--timeout=60s",
             kubeconfig=admin)
        kubectl("delete", "namespace", ns, "--wait=false", timeout=30)
        for c in get_json(kubectl, "csr")["items"]:
            if c["spec"]["signerName"] == SIGNER:
                kubectl("delete", "csr", c["metadata"]["name"], "--wait=false", timeout=30)


# --- create: none (pre-made Secrets) ---------------------------------------------------------


async def test_chart_with_per_node_certificates_converges(
        vmupdates: Kubectl, three_vms: Placement, rig: Rig, fleet: Fleet,
        fleet_pki: FleetPki, k8s_cluster: Sandbox, api_proxy: RecordingProxy,  # noqa: F811
        tmp_path: Path) -> None:
    """The CA and the client certificates are pre-made Secrets (certificates.create=none):
    the fleet's, whose clients the agents already trust."""
    kubectl = vmupdates

    async def premade(ns: str) -> None:
        ca_key = tmp_path / "ca.key"
        ca_key.write_bytes(fleet_pki._ca.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        for name, cert, key in (
                ("vmupdate-operator-tls", fleet_pki.operator.cert, fleet_pki.operator.key),
                ("vmupdate-registrar-tls", fleet_pki.registrar.cert, fleet_pki.registrar.key),
                ("vmupdate-ca", fleet_pki.ca_cert, ca_key)):
            create_tls_secret(kubectl, name, cert, key, fleet_pki.ca_cert, namespace=ns)

    await converge_on_per_node_certificates(
        kubectl, three_vms, rig, fleet, fleet_pki, k8s_cluster, api_proxy, tmp_path,
        namespace=CSR_NAMESPACE, certificates={"create": "none"}, prepare=premade)


# --- create: certManager (a real cert-manager controller) -------------------------------------


def build_cert_manager() -> Path:
    """cert-manager's controller and CRDs, built (or found cached) by the script; a failed
    build fails the test with the script's output."""
    res = subprocess.run([str(TOP / "e2e/cluster/build-cert-manager.sh")], capture_output=True,
                         text=True, timeout=3600, check=False)
    assert res.returncode == 0, f"e2e/cluster/build-cert-manager.sh failed:\n{res.stderr[-4000:]}"
    out = subprocess.run([str(TOP / "e2e/cluster/build-cert-manager.sh"), "--print-dir"],
                         capture_output=True, text=True, timeout=60, check=True)
    return Path(out.stdout.strip())


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def _pem_cert(data: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data)


async def test_chart_with_cert_manager_converges(
        vmupdates: Kubectl, three_vms: Placement, rig: Rig, fleet: Fleet,
        fleet_pki: FleetPki, k8s_cluster: Sandbox, api_proxy: RecordingProxy,  # noqa: F811
        tmp_path: Path) -> None:
    """certificates.create=certManager on a cluster where cert-manager runs: its controller
    issues the CA (SelfSigned Issuer, isCA Certificate) and, from the CA Issuer, the
    operator's and registrar's client certificates; its approver approves every
    CertificateRequest; the operator signs the agents' certificates with that CA, and the
    chart converges."""
    kubectl = vmupdates
    cm_dir = build_cert_manager()
    crds = sorted((cm_dir / "crds").glob("*.yaml"))
    apply_and_wait_crds(k8s_cluster, crds)
    controller = ManagedProcess(
        "cert-manager", [str(cm_dir / "bin" / "cert-manager-controller"),
                         f"--kubeconfig={k8s_cluster.kubeconfig}", f"--namespace={CM_NAMESPACE}"],
        tmp_path / "logs" / "cert-manager.log")
    issued: dict[str, Any] = {}

    async def cert_manager_issues(ns: str) -> None:
        certificates = {f"{RELEASE}-{who}" for who in ("ca", "operator", "registrar")}

        def ready() -> list[dict[str, Any]] | None:
            items = get_json(kubectl, "-n", ns, "certificates.cert-manager.io")["items"]
            done = [c for c in items
                    if _conditions(c).get("Ready", {}).get("status") == "True"]
            return items if {c["metadata"]["name"] for c in done} == certificates else None

        t0 = time.monotonic()
        issued["certificates"] = await kube.wait_for(
            ready, 120, "cert-manager to issue the chart's Certificates",
            describe=lambda: json.dumps(
                get_json(kubectl, "-n", ns, "certificates.cert-manager.io,"
                         "certificaterequests.cert-manager.io,issuers.cert-manager.io"),
                indent=1)[:6000] + "\n" + controller.tail(40))
        issued["seconds"] = time.monotonic() - t0
        issued["requests"] = get_json(kubectl, "-n", ns,
                                      "certificaterequests.cert-manager.io")["items"]
        issued["issuers"] = get_json(kubectl, "-n", ns, "issuers.cert-manager.io")["items"]
        issued["secrets"] = {s["metadata"]["name"]: s["metadata"].get("annotations") or {}
                             for s in get_json(kubectl, "-n", ns, "secrets")["items"]}

    try:
        controller.start(die_with_parent=True)
        secrets = await converge_on_per_node_certificates(
            kubectl, three_vms, rig, fleet, fleet_pki, k8s_cluster, api_proxy, tmp_path,
            namespace=CM_NAMESPACE, certificates={"create": "certManager"},
            prepare=cert_manager_issues)
    finally:
        controller.stop(30)
        for crd in crds:
            kubectl("delete", "-f", str(crd), "--wait=false", "--ignore-not-found", timeout=60)

    # Both Issuers Ready; every CertificateRequest approved (by cert-manager's approver) and
    # issued.
    assert {i["metadata"]["name"]: _conditions(i).get("Ready", {}).get("status")
            for i in issued["issuers"]} == {f"{RELEASE}-selfsigned": "True",
                                             f"{RELEASE}-ca": "True"}
    assert len(issued["requests"]) >= 3
    for request in issued["requests"]:
        conds = _conditions(request)
        assert conds["Approved"]["status"] == "True" and conds["Ready"]["status"] == "True", conds
    # The Secrets are cert-manager's (written for the chart's Certificates), not the chart's.
    for name, certificate in (("vmupdate-ca", "ca"), ("vmupdate-operator-tls", "operator"),
                              ("vmupdate-registrar-tls", "registrar")):
        annotations = issued["secrets"][name]
        assert annotations.get("cert-manager.io/certificate-name") == f"{RELEASE}-{certificate}"
    ca = _pem_cert(secrets["vmupdate-ca"]["tls.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    ca.verify_directly_issued_by(ca)  # self-signed
    assert ca.subject.rfc4514_string() == f"CN={RELEASE}-ca"
    for name, identity in (("vmupdate-operator-tls", OPERATOR_IDENTITY),
                           ("vmupdate-registrar-tls", REGISTRAR_IDENTITY)):
        assert secrets[name]["ca.crt"] == secrets["vmupdate-ca"]["tls.crt"]
        cert = _pem_cert(secrets[name]["tls.crt"])
        cert.verify_directly_issued_by(ca)
        assert cert.subject.rfc4514_string() == f"CN={identity}"
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usages) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    print(f"cert-manager issued the chart's 3 certificates in {issued['seconds']:.1f}s")
