"""Per-node agent certificates on the real API server, with the chart's RBAC
(``certificates.agentServing=csr``): node A's agent (its pod-bound ServiceAccount token)
gets a certificate for node A, signed by the operator (its own ServiceAccount token); a
request from node A for node B's name, and one from a token bound to no pod, are denied
with the reason, and no certificate is written on them."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from e2e.cluster.sandbox import CertificateAuthority, Sandbox, make_kubeconfig
from e2e.k8s.chart import find, template
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
        for name in a.csrs:
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
