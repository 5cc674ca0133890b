"""Per-node agent certificates on the real API server, with the chart's RBAC
(``certificates.agentServing=csr``): node A's agent (its pod-bound ServiceAccount token)
gets a certificate for node A, signed by the operator (its own ServiceAccount token); a
request from node A for node B's name, and one from a token bound to no pod, are denied
with the reason, and no certificate is written on them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from e2e.cluster.sandbox import (
    CertificateAuthority,
    ManagedProcess,
    Sandbox,
    free_port,
    make_kubeconfig,
)
from e2e.k8s.chart import CHART, find, template
from vmupdate_agent import certificate
from vmupdate_api.signer import SIGNER_NAME
from vmupdate_operator.csr_signer import SigningCA, review

pytestmark = pytest.mark.k8s

RELEASE = "vmcsr"


@dataclass
class Actors:
    sandbox: Sandbox
    node_a: str
    node_b: str
    agent_a: Path  # kubeconfigs
    unbound: Path
    operator: Path
    agent_user: str
    namespace: str
    csrs: list[str]


def _token(sandbox: Sandbox, ns: str, sa: str, path: Path, pod: str | None) -> Path:
    bound = ["--bound-object-kind", "Pod", "--bound-object-name", pod] if pod else []
    token = sandbox.kubectl("create", "token", sa, "-n", ns, "--duration", "10m", *bound,
                            check=True).stdout.strip()
    path.write_text(make_kubeconfig(sandbox.server, sandbox.ca_pem, f"{sa}-{pod}",
                                    token=token))
    return path


@pytest.fixture
def actors(vmupdate_api: Sandbox, tmp_path: Path) -> Iterator[Actors]:
    sandbox = vmupdate_api
    suffix = secrets.token_hex(3)
    node_a, node_b = f"csr-a-{suffix}", f"csr-b-{suffix}"
    ns = f"vmupdate-csr-{suffix}"  # a namespace per test: the last one may still be going
    objs = template({"certificates": {"agentServing": "csr"}}, workdir=tmp_path,
                    release=RELEASE, namespace=ns)
    wanted = [find(objs, kind, who) for kind in ("ServiceAccount", "ClusterRole",
                                                     "ClusterRoleBinding")
              for who in ("-agent", "-operator")]
    agent_sa = find(objs, "ServiceAccount", "-agent")["metadata"]["name"]
    operator_sa = find(objs, "ServiceAccount", "-operator")["metadata"]["name"]
    a = Actors(sandbox, node_a, node_b, tmp_path / "a", tmp_path / "u", tmp_path / "op",
               f"system:serviceaccount:{ns}:{agent_sa}", ns, [])
    try:
        sandbox.kubectl("create", "namespace", ns)
        sandbox.kubectl("apply", "-f", "-", check=True, input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": wanted}))
        sandbox.kubectl("create", "-f", "-", check=True, input=json.dumps(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_a}}))
        sandbox.kubectl("create", "-f", "-", check=True, input=json.dumps({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-a", "namespace": ns},
            "spec": {"nodeName": node_a, "serviceAccountName": agent_sa,
                     "automountServiceAccountToken": False,
                     "containers": [{"name": "agent", "image": "vmupdate-test-none"}]}}))
        _token(sandbox, ns, agent_sa, a.agent_a, "agent-a")
        _token(sandbox, ns, agent_sa, a.unbound, None)
        _token(sandbox, ns, operator_sa, a.operator, None)
        yield a
    finally:
        listed = json.loads(sandbox.kubectl("get", "csr", "-o", "json").stdout or '{"items":[]}')
        ours = {c["metadata"]["name"] for c in listed["items"] if suffix in c["metadata"]["name"]}
        for name in {*a.csrs, *ours}:
            sandbox.kubectl("delete", "csr", name, "--ignore-not-found", "--wait=false")
        for kind in ("clusterrolebinding", "clusterrole"):
            for who in ("agent", "operator"):
                sandbox.kubectl("delete", kind, f"{RELEASE}-{who}", "--ignore-not-found",
                                "--wait=false")
        sandbox.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false")
        sandbox.kubectl("delete", "node", node_a, "--ignore-not-found", "--wait=false")


async def _client(kubeconfig: Path) -> Any:
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig),
                                  client_configuration=configuration)
    return client.ApiClient(configuration)


async def _operator_once(api: Any, agent_user: str, ca: SigningCA) -> list[tuple[str, Any]]:
    """What the operator's CSR handler does, for every request of our signer."""
    from kubernetes_asyncio import client

    listing = await client.CertificatesV1Api(api).list_certificate_signing_request()
    out = []
    for item in api.sanitize_for_serialization(listing)["items"]:
        if item["spec"].get("signerName") == SIGNER_NAME:
            out.append((item["metadata"]["name"], await review(api, item, agent_user, ca)))
    return out


def _signing_ca() -> tuple[CertificateAuthority, SigningCA]:
    ca = CertificateAuthority.create("vmupdate-csr-test-ca")
    key = ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    return ca, SigningCA.from_pem(ca.cert_pem, key)


async def _operator_until(done: asyncio.Future[Any], a: Actors, ca: SigningCA) -> None:
    api = await _client(a.operator)
    try:
        while not done.done():
            for name, _ in await _operator_once(api, a.agent_user, ca):
                if name not in a.csrs:
                    a.csrs.append(name)
            await asyncio.sleep(0.2)
    finally:
        await api.close()


def test_a_nodes_agent_gets_a_certificate_for_its_own_node(actors: Actors,
                                                          tmp_path: Path) -> None:
    a = actors
    ca, signing = _signing_ca()

    async def run() -> tuple[bytes, Any]:
        api = await _client(a.agent_a)
        try:
            task = asyncio.ensure_future(certificate.request_certificate(
                api, a.node_a, ttl_s=3600, timeout=60, poll_s=0.2))
            await asyncio.wait_for(_operator_until(task, a, signing), 90)
            return await task
        finally:
            await api.close()

    cert_pem, key = asyncio.run(run())
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.rfc4514_string() == f"CN={a.node_a}"
    assert cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [a.node_a]
    certificate.write_pair(tmp_path / "tls", cert_pem, key)
    assert (tmp_path / "tls" / "tls.crt").read_bytes() == cert_pem
    [approved] = [n for n in a.csrs if n.startswith(f"vmupdate-agent-{a.node_a}-")]
    conditions = json.loads(a.sandbox.kubectl("get", "csr", approved, "-o",
                                              "jsonpath={.status.conditions}",
                                              check=True).stdout)
    assert [c["type"] for c in conditions] == ["Approved"]
    assert f"the agent of node {a.node_a} asked for its own name" in conditions[0]["message"]


def _create_csr(a: Actors, who: Path, name: str, request_for: str) -> None:
    manifest = certificate.csr_object(name, certificate.csr_pem(certificate.make_key(),
                                                                request_for), 3600)
    res = a.sandbox.kubectl("create", "-f", "-", input=json.dumps(manifest), kubeconfig=who,
                            timeout=30)
    assert res.returncode == 0, res.stderr
    a.csrs.append(name)


def test_a_request_for_another_nodes_name_is_denied(actors: Actors) -> None:
    a = actors
    _, signing = _signing_ca()
    other = f"vmupdate-test-other-{secrets.token_hex(3)}"
    unbound = f"vmupdate-test-unbound-{secrets.token_hex(3)}"
    _create_csr(a, a.agent_a, other, a.node_b)  # node A's token, node B's name
    _create_csr(a, a.unbound, unbound, a.node_a)  # a token bound to no pod

    async def run() -> dict[str, Any]:
        api = await _client(a.operator)
        try:
            return dict(await _operator_once(api, a.agent_user, signing))
        finally:
            await api.close()

    decisions = asyncio.run(run())
    assert not decisions[other].approve and not decisions[unbound].approve
    for name, why in ((other, f"node {a.node_a}'s agent asked for a certificate for "
                              f"CN='{a.node_b}'"),
                      (unbound, "the requester's token names no node")):
        obj = json.loads(a.sandbox.kubectl("get", "csr", name, "-o", "json",
                                           check=True).stdout)
        [cond] = obj["status"]["conditions"]
        assert cond["type"] == "Denied" and why in cond["message"], cond
        assert not obj["status"].get("certificate")
        with pytest.raises(certificate.CertificateError, match="denied"):
            certificate.outcome(obj)
    # Settled requests are left alone on the next pass.
    assert all(d is None for d in asyncio.run(run()).values())


# --- the chart, installed: its CA, its operator container, its certificate sidecar -----------


def _wait(probe: Any, timeout: float, what: str, describe: Any) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s:\n{describe()}")
        time.sleep(0.3)


def test_helm_install_issues_each_node_its_own_certificate(vmupdate_api: Sandbox,
                                                           tmp_path: Path) -> None:
    """`helm install` with certificates.agentServing=csr and create=selfSigned: the chart's
    generated CA and client certificates; the Deployment's operator container (as a process,
    with its ServiceAccount's token) signs what node A's certificate sidecar (the DaemonSet's
    own command line, with a token bound to a pod on node A) asks for; a sidecar of node A
    asking for node B's name is denied. No kubelet runs here: the containers are processes
    (e2e/k8s/chart.py)."""
    from e2e.k8s.chart import LocalPod, helm, values_args
    from e2e.k8s.fixtures import operator_stopped
    from vmupdate_agent.config import TlsConfig
    from vmupdate_agent.tls import CertificateFiles

    sandbox = vmupdate_api
    suffix = secrets.token_hex(3)
    release, ns = f"vmupdate-csr-{suffix}", f"vmupdate-csr-e2e-{suffix}"  # fullname: release
    node_a, node_b = f"csr-node-a-{suffix}", f"csr-node-b-{suffix}"
    admin = str(sandbox.kubeconfig)
    values = {"certificates": {"agentServing": "csr", "create": "selfSigned",
                               "caSecret": "vmupdate-ca", "agentTtlSeconds": 3600},
              "operator": {"replicas": 1, "peering": {"name": release, "create": True},
                           "metrics": {"port": free_port()}, "healthPort": free_port()}}
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    processes: list[ManagedProcess] = []
    try:
        res = helm("install", release, str(CHART), "--namespace", ns, "--create-namespace",
                   *values_args(values, tmp_path), kubeconfig=admin)
        assert res.returncode == 0, res.stderr
        assert "kubectl get csr" in res.stdout and "made by the chart (selfSigned)" in (
            res.stdout), res.stdout  # NOTES
        items = json.loads(sandbox.kubectl("-n", ns, "get", "secrets", "-o", "json",
                                           check=True).stdout)["items"]
        secrets_ = {s["metadata"]["name"]: {k: base64.b64decode(v) for k, v in
                                            (s.get("data") or {}).items()} for s in items}
        ca_cert = x509.load_pem_x509_certificate(secrets_["vmupdate-ca"]["tls.crt"])
        agent_sa, operator_sa = f"{release}-agent", f"{release}-operator"
        sandbox.kubectl("create", "-f", "-", check=True, input=json.dumps(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_a}}))
        sandbox.kubectl("create", "-f", "-", check=True, input=json.dumps({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-a", "namespace": ns},
            "spec": {"nodeName": node_a, "serviceAccountName": agent_sa,
                     "automountServiceAccountToken": False,
                     "tolerations": [{"operator": "Exists"}],
                     "containers": [{"name": "agent", "image": "vmupdate-test-none"}]}}))
        agent_kc = _token(sandbox, ns, agent_sa, tmp_path / "agent.kubeconfig", "agent-a")
        operator_kc = _token(sandbox, ns, operator_sa, tmp_path / "op.kubeconfig", None)

        deployment = json.loads(sandbox.kubectl("-n", ns, "get", "deployment",
                                                f"{release}-operator", "-o", "json",
                                                check=True).stdout)
        daemonset = json.loads(sandbox.kubectl("-n", ns, "get", "daemonset",
                                               f"{release}-agent", "-o", "json",
                                               check=True).stdout)
        operator_pod = LocalPod(deployment["spec"]["template"]["spec"], tmp_path / "op-pod",
                                secrets=secrets_)
        agent_pod = LocalPod(daemonset["spec"]["template"]["spec"], tmp_path / "agent-pod",
                             secrets=secrets_, fields={"spec.nodeName": node_a})
        with operator_stopped():
            operator = ManagedProcess("chart-operator", operator_pod.argv("operator"),
                                      tmp_path / "logs" / "operator.log",
                                      env={"KUBECONFIG": str(operator_kc),
                                           "PATH": search_path})
            operator.start(die_with_parent=True)
            processes.append(operator)
            sidecar_argv = agent_pod.argv("certificate", skip_volumes=["kube-api-access"])
            sidecar = ManagedProcess("chart-certificate", sidecar_argv,
                                     tmp_path / "logs" / "certificate.log",
                                     env={"KUBECONFIG": str(agent_kc), "PATH": search_path})
            sidecar.start(die_with_parent=True)
            processes.append(sidecar)
            cert_path = agent_pod.local_path("certificate", "/etc/vmupdate/tls/tls.crt")
            _wait(lambda: cert_path.exists() and cert_path.stat().st_size, 90,
                  "node A's sidecar got no certificate",
                  lambda: f"{sidecar.tail(40)}\n{operator.tail(40)}")
            # Node A's token asking for node B's name: denied by the running operator.
            liar_dir = tmp_path / "liar"
            liar = ManagedProcess(
                "liar-certificate", [*[a for a in sidecar_argv if not a.startswith(
                    ("--node-name=", "--dir="))], f"--node-name={node_b}", f"--dir={liar_dir}"],
                tmp_path / "logs" / "liar.log",
                env={"KUBECONFIG": str(agent_kc), "PATH": search_path})
            liar.start(die_with_parent=True)
            processes.append(liar)

            def denied() -> Any:
                out = json.loads(sandbox.kubectl("get", "csr", "-o", "json",
                                                 check=True).stdout)["items"]
                return [c for c in out if c["metadata"]["name"].startswith(
                    f"vmupdate-agent-{node_b}-") and any(
                    x["type"] == "Denied" for x in (c.get("status") or {}).get(
                        "conditions") or [])]

            [refused] = _wait(denied, 60, "node B's name was not denied",
                              lambda: f"{liar.tail(20)}\n{operator.tail(40)}")
            assert f"node {node_a}'s agent asked for a certificate for CN='{node_b}'" in (
                refused["status"]["conditions"][0]["message"])
            assert not refused["status"].get("certificate")
            assert not (liar_dir / "tls.crt").exists()
            operator.stop(30)
        # What node A's agent serves: its own name, from the chart's CA; the agent's TLS
        # loads it with the client CA the chart mounts (the CA of the chart's operator and
        # registrar certificates).
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        assert cert.subject.rfc4514_string() == f"CN={node_a}"
        client_ca = agent_pod.local_path("agent", "/etc/vmupdate/client-ca/ca.crt")
        files = CertificateFiles(TlsConfig(cert_file=str(cert_path),
                                           key_file=str(cert_path.with_name("tls.key")),
                                           client_ca_file=str(client_ca)))
        files.read()
        for who in ("vmupdate-operator-tls", "vmupdate-registrar-tls"):
            x509.load_pem_x509_certificate(secrets_[who]["tls.crt"]).verify_directly_issued_by(
                x509.load_pem_x509_certificate(client_ca.read_bytes()))
            # And gRPC's TLS builds both chains: the chart's client certificate, checking the
            # agent's against node A's name, completes a mutual-TLS handshake with it.
            assert asyncio.run(_grpc_handshake(files, secrets_[who], node_a)), who
    finally:
        for p in processes:
            with contextlib.suppress(Exception):
                p.stop(30)
        helm("uninstall", release, "--namespace", ns, "--wait", "--timeout=60s",
             kubeconfig=admin)
        for name in json.loads(sandbox.kubectl("get", "csr", "-o", "json").stdout or
                               '{"items": []}')["items"]:
            if suffix in name["metadata"]["name"]:
                sandbox.kubectl("delete", "csr", name["metadata"]["name"], "--wait=false")
        sandbox.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false")
        sandbox.kubectl("delete", "node", node_a, "--ignore-not-found", "--wait=false")


async def _grpc_handshake(files: Any, client: dict[str, bytes], server_name: str) -> bool:
    """A gRPC server with the agent's TLS files, a client with ``client`` (tls.crt, tls.key,
    ca.crt): True when the mutual-TLS handshake completes (the channel gets ready)."""
    import grpc
    import grpc.aio

    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", files.server_credentials())
    await server.start()
    credentials = grpc.ssl_channel_credentials(root_certificates=client["ca.crt"],
                                               private_key=client["tls.key"],
                                               certificate_chain=client["tls.crt"])
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials,
                                      options=[("grpc.ssl_target_name_override", server_name)])
    try:
        await asyncio.wait_for(channel.channel_ready(), 10)
        return True
    except TimeoutError:
        return False
    finally:
        await channel.close()
        await server.stop(None)


def test_unsigned_request_times_out_and_renewal_replaces_a_due_certificate(
        actors: Actors, tmp_path: Path) -> None:
    """No signer running: the agent's request fails after its timeout, naming the CSR. A
    certificate past two thirds of its life is replaced by a new key and certificate; a fresh
    one is kept (no request made)."""
    import datetime as dt

    from vmupdate_operator.csr_signer import issue

    a = actors
    _, signing = _signing_ca()

    async def unsigned() -> None:
        api = await _client(a.agent_a)
        try:
            with pytest.raises(certificate.CertificateError, match="was not signed within 2 s"):
                await certificate.request_certificate(api, a.node_a, ttl_s=3600, timeout=2,
                                                      poll_s=0.2)
        finally:
            await api.close()

    asyncio.run(unsigned())
    folder = tmp_path / "tls"
    old_key = certificate.make_key()
    now = dt.datetime.now(dt.UTC)
    request = base64.b64encode(certificate.csr_pem(old_key, a.node_a)).decode()
    due = issue(signing, {"request": request, "expirationSeconds": 3600}, a.node_a,
                now - dt.timedelta(minutes=50))  # 55 of its 65 minutes gone
    certificate.write_pair(folder, due, old_key)

    def mine() -> set[str]:
        out = json.loads(a.sandbox.kubectl("get", "csr", "-o", "json", check=True).stdout)
        return {c["metadata"]["name"] for c in out["items"]
                if c["metadata"]["name"].startswith(f"vmupdate-agent-{a.node_a}-")}

    async def keep(expect_new: bool) -> None:
        api = await _client(a.agent_a)
        stop = asyncio.Event()
        before = (folder / "tls.crt").read_bytes()
        task = asyncio.ensure_future(certificate.keep_certificate(
            a.node_a, folder, stop, ttl_s=3600, timeout=60, api=api))
        try:
            if expect_new:
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                op = asyncio.ensure_future(_operator_until(done, a, signing))
                for _ in range(300):
                    if (folder / "tls.crt").read_bytes() != before:
                        break
                    await asyncio.sleep(0.2)
                done.set_result(None)
                await op
            else:
                await asyncio.sleep(2)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await api.close()

    asked = mine()
    asyncio.run(keep(expect_new=True))
    renewed = (folder / "tls.crt").read_bytes()
    assert renewed != due
    certificate.certificate_for(renewed, _load_key(folder / "tls.key"), a.node_a)
    assert _load_key(folder / "tls.key").private_numbers() != old_key.private_numbers()
    asked_after_renewal = mine()
    assert len(asked_after_renewal - asked) == 1
    # Fresh now: kept as it is, nothing asked.
    asyncio.run(keep(expect_new=False))
    assert (folder / "tls.crt").read_bytes() == renewed and mine() == asked_after_renewal


def _load_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)
