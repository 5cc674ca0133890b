"""The security boundary on the real API server: every bad target.extraArgs of the shared
table is refused at admission by the CRD's CEL rule (generated from vmupdate_api.extra_args),
and the allowed ones are admitted; a node's registrar (its pod-bound ServiceAccount token)
may write only its own VMHost (the chart's ValidatingAdmissionPolicy)."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e.cluster.sandbox import Sandbox, make_kubeconfig
from e2e.k8s.chart import find, template
from tests.extra_args_cases import BAD_EXTRA_ARGS, GOOD_EXTRA_ARGS

pytestmark = pytest.mark.k8s


def vmupdate(name: str, args: list[str]) -> str:
    return json.dumps({
        "apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
        "metadata": {"name": name},
        "spec": {"selector": {"vmNames": ["web-01"]}, "paused": True,
                 "target": {"binary": "/opt/qemu/bin/qemu-system-x86_64", "version": "11.1.3",
                            "extraArgs": args}}})


@pytest.mark.parametrize(("name", "args", "why"), BAD_EXTRA_ARGS,
                         ids=[c[0] for c in BAD_EXTRA_ARGS])
def test_bad_extra_args_are_refused_at_admission(name: str, args: list[str], why: str,
                                                 vmupdate_api: Sandbox) -> None:
    res = vmupdate_api.kubectl("create", "--dry-run=server", "-f", "-",
                               input=vmupdate(f"bad-{name}", args), timeout=30)
    assert res.returncode != 0, f"{name} ({why}) was admitted"
    assert "target.extraArgs may only hold these options" in res.stderr, res.stderr


@pytest.mark.parametrize("args", GOOD_EXTRA_ARGS, ids=str)
def test_allowed_extra_args_are_admitted(args: list[str], vmupdate_api: Sandbox) -> None:
    res = vmupdate_api.kubectl("create", "--dry-run=server", "-f", "-",
                               input=vmupdate("good-extra-args", args), timeout=30)
    assert res.returncode == 0, res.stderr


# --- node-scoped VMHost writes (the chart's ValidatingAdmissionPolicy) ---------------------

SEC_NS = "vmupdate-security"
RELEASE = "vmsec"


def vmhost(name: str, node: str | None = None) -> str:
    return json.dumps({"apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMHost",
                       "metadata": {"name": name}, "spec": {"nodeName": node or name}})


def status_patch(endpoint: str) -> str:
    return json.dumps({"status": {"endpoint": endpoint, "agentVersion": "0.1.0",
                                  "heartbeatTime": "2025-06-01T12:00:00Z"}})


@dataclass
class Registrars:
    sandbox: Sandbox
    node_a: str
    node_b: str
    a: Path  # kubeconfig: the registrar pod's token on node A
    b: Path
    unbound: Path  # a token of the same ServiceAccount, bound to no pod

    def as_(self, who: Path, *args: str, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        return self.sandbox.kubectl(*args, input=input, kubeconfig=who, timeout=30)

    def patch_status(self, who: Path, name: str, endpoint: str) -> str | None:
        """As the registrar does it (a merge patch of the status, no read): None when
        admitted, else the API server's message."""
        from kubernetes.client import ApiException, CustomObjectsApi

        with self.sandbox.api_client(who) as client:
            try:
                CustomObjectsApi(client).patch_cluster_custom_object_status(
                    "vmupdate.dev", "v1alpha1", "vmhosts", name, json.loads(status_patch(
                        endpoint)), _request_timeout=30)
            except ApiException as exc:
                return str(json.loads(exc.body).get("message", exc.body))
        return None


def _token_kubeconfig(sandbox: Sandbox, sa: str, path: Path, pod: str | None) -> Path:
    bound = ["--bound-object-kind", "Pod", "--bound-object-name", pod] if pod else []
    token = sandbox.kubectl("create", "token", sa, "-n", SEC_NS, "--duration", "10m", *bound,
                            check=True).stdout.strip()
    path.write_text(make_kubeconfig(sandbox.server, sandbox.ca_pem, f"{sa}-{pod}",
                                    token=token))
    return path


def _install(sandbox: Sandbox, tmp_path: Path, with_policy: bool) -> str:
    """The chart's registrar RBAC (and its admission policy): the agent's ServiceAccount."""
    objs = template(workdir=tmp_path, release=RELEASE, namespace=SEC_NS)
    sa = find(objs, "ServiceAccount", "-agent")
    wanted = [sa, find(objs, "ClusterRole", "-agent"), find(objs, "ClusterRoleBinding", "-agent")]
    if with_policy:
        wanted += [find(objs, "ValidatingAdmissionPolicy"),
                   find(objs, "ValidatingAdmissionPolicyBinding")]
    sandbox.kubectl("create", "namespace", SEC_NS)
    sandbox.kubectl("apply", "-f", "-", check=True,
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": wanted}))
    return str(sa["metadata"]["name"])


def _remove(sandbox: Sandbox, nodes: list[str]) -> None:
    for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy",
                 "clusterrolebinding", "clusterrole"):
        name = f"{RELEASE}-vmhost-node-restriction" if "admission" in kind else f"{RELEASE}-agent"
        sandbox.kubectl("delete", kind, name, "--ignore-not-found", "--wait=false")
    sandbox.kubectl("delete", "namespace", SEC_NS, "--ignore-not-found", "--wait=false")
    for node in nodes:
        sandbox.kubectl("delete", "vmhost", node, "--ignore-not-found", "--wait=false")
        sandbox.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false")


def registrars(sandbox: Sandbox, tmp_path: Path, with_policy: bool) -> Iterator[Registrars]:
    suffix = secrets.token_hex(3)
    node_a, node_b = f"sec-a-{suffix}", f"sec-b-{suffix}"
    try:
        sa = _install(sandbox, tmp_path, with_policy)
        for node, pod in ((node_a, "registrar-a"), (node_b, "registrar-b")):
            sandbox.kubectl("create", "-f", "-", check=True, input=json.dumps(
                {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))
            sandbox.kubectl("create", "-f", "-", check=True, input=json.dumps({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": SEC_NS},
                "spec": {"nodeName": node, "serviceAccountName": sa,
                         "automountServiceAccountToken": False,
                         "containers": [{"name": "registrar", "image": "vmupdate-test-none"}]}}))
        yield Registrars(
            sandbox, node_a, node_b,
            a=_token_kubeconfig(sandbox, sa, tmp_path / "a.kubeconfig", "registrar-a"),
            b=_token_kubeconfig(sandbox, sa, tmp_path / "b.kubeconfig", "registrar-b"),
            unbound=_token_kubeconfig(sandbox, sa, tmp_path / "unbound.kubeconfig", None))
    finally:
        _remove(sandbox, [node_a, node_b])


@pytest.fixture
def node_registrars(vmupdate_api: Sandbox, tmp_path: Path) -> Iterator[Registrars]:
    yield from registrars(vmupdate_api, tmp_path, with_policy=True)


def wait_for_policy(r: Registrars) -> None:
    """The policy is enforced once the API server's informer has it (eventually)."""
    deadline = time.monotonic() + 30
    probe = f"{r.node_b}"
    while time.monotonic() < deadline:
        res = r.as_(r.a, "create", "--dry-run=server", "-f", "-", input=vmhost(probe))
        if res.returncode != 0 and "may write only VMHost" in res.stderr:
            return
        time.sleep(0.2)
    raise AssertionError(f"the admission policy never took effect: {res.stderr}")


def test_a_nodes_registrar_writes_only_its_own_vmhost(node_registrars: Registrars) -> None:
    r = node_registrars
    wait_for_policy(r)
    a, b = r.node_a, r.node_b
    # Its own VMHost: created, and its status written.
    res = r.as_(r.a, "create", "-f", "-", input=vmhost(a))
    assert res.returncode == 0, res.stderr
    assert r.patch_status(r.a, a, "10.0.0.1:9443") is None
    # Node B's VMHost: neither created nor rewritten by node A.
    res = r.as_(r.a, "create", "-f", "-", input=vmhost(b))
    assert res.returncode != 0
    assert f"the registrar of node {a} may write only VMHost {a}, not VMHost {b}" in res.stderr
    res = r.as_(r.b, "create", "-f", "-", input=vmhost(b))
    assert res.returncode == 0, res.stderr
    refused = r.patch_status(r.a, b, "10.0.0.1:9443")
    assert refused is not None and f"may write only VMHost {a}, not VMHost {b}" in refused
    endpoint = r.sandbox.kubectl("get", "vmhost", b, "-o", "jsonpath={.status.endpoint}",
                                 check=True).stdout
    assert endpoint == ""  # untouched by node A
    assert r.patch_status(r.b, b, "10.0.0.2:9443") is None
    # A token of the same ServiceAccount bound to no pod names no node: refused.
    refused = r.patch_status(r.unbound, a, "10.0.0.9:9443")
    assert refused is not None and "credentials name no node" in refused, refused
