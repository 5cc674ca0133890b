"""The local Kubernetes sandbox itself: a real apiserver that kubectl, RBAC, CEL and kopf use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2e.cluster.fixtures import ApplyCrds, Kubectl
from e2e.cluster.sandbox import BinariesMissing, Sandbox, versions

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]

WIDGET_CRD = textwrap.dedent(
    """\
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata:
      name: widgets.example.test
    spec:
      group: example.test
      scope: Namespaced
      names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
      versions:
        - name: v1
          served: true
          storage: true
          subresources: {status: {}}
          schema:
            openAPIV3Schema:
              type: object
              properties:
                spec:
                  type: object
                  properties:
                    size: {type: integer, minimum: 0}
                  x-kubernetes-validations:
                    - rule: "!has(self.size) || self.size <= 10"
                      message: "size must be at most 10"
                status:
                  type: object
                  x-kubernetes-preserve-unknown-fields: true
    """
)

KOPF_OPERATOR = textwrap.dedent(
    """\
    import kopf

    @kopf.on.startup()
    def configure(settings, **_):
        settings.watching.server_timeout = 30
        settings.posting.level = 100  # no Events: keep the test quiet

    @kopf.on.create("example.test", "v1", "widgets")
    def widget_created(spec, patch, **_):
        patch.status["doubled"] = spec.get("size", 0) * 2
    """
)


def wait_for(what: str, cond: Callable[[], object], timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        if result := cond():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name, check=True)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


@pytest.fixture(scope="module")
def widget_crd_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("crd") / "widgets.yaml"
    path.write_text(WIDGET_CRD)
    return path


def test_kubectl_and_server_versions_match(k8s_cluster: Sandbox, kubectl: Kubectl) -> None:
    res = kubectl("version", "-o", "json", check=True)
    info = json.loads(res.stdout)
    client, server = info["clientVersion"], info["serverVersion"]
    assert client["gitVersion"] == server["gitVersion"], info
    if not k8s_cluster.external:
        assert server["gitVersion"] == versions()["K8S_VERSION"]
        assert (server["major"], server["minor"]) == ("1", versions()["K8S_VERSION"].split(".")[1])
    helm = subprocess.run(
        [str(k8s_cluster.helm_path), "version", "--short"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert helm.stdout.startswith("v3."), helm.stdout


def test_crd_with_cel_rule_rejects_invalid_object(
    kubectl: Kubectl, apply_crds: ApplyCrds, namespace: str, widget_crd_file: Path
) -> None:
    assert apply_crds([widget_crd_file]) == ["widgets.example.test"]
    ok = "apiVersion: example.test/v1\nkind: Widget\nmetadata: {name: small}\nspec: {size: 3}\n"
    kubectl("apply", "-n", namespace, "-f", "-", input=ok, check=True)
    bad = ok.replace("small", "big").replace("size: 3", "size: 11")
    res = kubectl("apply", "-n", namespace, "-f", "-", input=bad)
    assert res.returncode != 0
    assert "size must be at most 10" in res.stderr, res.stderr
    # The OpenAPI schema (minimum) is enforced too.
    res = kubectl("apply", "-n", namespace, "-f", "-", input=bad.replace("size: 11", "size: -1"))
    assert res.returncode != 0 and "spec.size" in res.stderr, res.stderr


def test_rbac_for_a_minted_identity(k8s_cluster: Sandbox, kubectl: Kubectl, namespace: str) -> None:
    alice = k8s_cluster.client_kubeconfig("alice", ["vmupdate:testers"])
    as_alice = {"kubeconfig": alice}

    res = kubectl("get", "configmaps", "-n", namespace, **as_alice)
    assert res.returncode != 0 and "Forbidden" in res.stderr, res.stderr
    assert 'User "alice"' in res.stderr, res.stderr
    res = kubectl("auth", "can-i", "list", "configmaps", "-n", namespace, "--as=alice")
    assert (res.returncode, res.stdout.strip()) == (1, "no"), res

    kubectl(
        "create",
        "role",
        "cm-reader",
        "-n",
        namespace,
        "--verb=get,list,watch",
        "--resource=configmaps",
        check=True,
    )
    kubectl(
        "create",
        "rolebinding",
        "testers-read-cm",
        "-n",
        namespace,
        "--role=cm-reader",
        "--group=vmupdate:testers",
        check=True,
    )

    def can(verb: str) -> subprocess.CompletedProcess[str]:
        return kubectl("auth", "can-i", verb, "configmaps", "-n", namespace, **as_alice)

    wait_for("RBAC grant to reach the authorizer", lambda: can("list").returncode == 0)
    assert can("list").stdout.strip() == "yes"
    assert (can("delete").returncode, can("delete").stdout.strip()) == (1, "no")
    kubectl("get", "configmaps", "-n", namespace, check=True, **as_alice)
    res = kubectl("get", "configmaps", "-A", **as_alice)
    assert res.returncode != 0 and "Forbidden" in res.stderr, res.stderr
    whoami = json.loads(kubectl("auth", "whoami", "-o", "json", check=True, **as_alice).stdout)
    assert whoami["status"]["userInfo"]["username"] == "alice"
    assert "vmupdate:testers" in whoami["status"]["userInfo"]["groups"]


def test_controller_manager_reconciles(kubectl: Kubectl) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name, check=True)
    wait_for(  # serviceaccount controller
        "the default ServiceAccount",
        lambda: kubectl("get", "serviceaccount", "default", "-n", name).returncode == 0,
    )
    kubectl("create", "configmap", "c", "-n", name, check=True)
    kubectl("delete", "namespace", name, "--wait=false", check=True)
    wait_for(  # namespace controller empties and finalizes it
        "the namespace to be deleted",
        lambda: kubectl("get", "namespace", name).returncode != 0,
        timeout=60,
    )


def test_kopf_operator_runs_against_the_sandbox(
    k8s_cluster: Sandbox,
    kubectl: Kubectl,
    apply_crds: ApplyCrds,
    namespace: str,
    widget_crd_file: Path,
    tmp_path: Path,
) -> None:
    from kopf.testing import KopfRunner

    apply_crds([widget_crd_file])
    op = tmp_path / "widget_operator.py"
    op.write_text(KOPF_OPERATOR)
    assert os.environ["KUBECONFIG"] == str(k8s_cluster.kubeconfig)
    args = ["run", "--standalone", "--namespace", namespace, str(op)]
    with KopfRunner(args, timeout=60) as runner:
        kubectl(
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
            check=True,
            input="apiVersion: example.test/v1\nkind: Widget\nmetadata: {name: w1}\n"
            "spec: {size: 4}\n",
        )
        wait_for(
            "kopf to patch the status",
            lambda: (
                kubectl(
                    "get",
                    "widgets.example.test",
                    "w1",
                    "-n",
                    namespace,
                    "-o",
                    "jsonpath={.status.doubled}",
                ).stdout
                == "8"
            ),
            timeout=60,
        )
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output
    assert "widget_created" in runner.output and "succeeded" in runner.output, runner.output


def test_missing_binaries_fail_loudly(tmp_path: Path) -> None:
    with pytest.raises(BinariesMissing, match=r"e2e/cluster/build\.sh"):
        Sandbox.start(tmp_path / "sb", bin_dir=tmp_path / "no-such-bin")
    assert not (tmp_path / "sb" / "sandbox.json").exists()


def _gone(pids: list[int]) -> bool:
    def alive(pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"

    return not any(alive(p) for p in pids)


def test_start_and_stop_leave_no_process(tmp_path: Path) -> None:
    sb = Sandbox.start(tmp_path / "sb")
    try:
        assert len(sb.pids) == 3 and not _gone(sb.pids)
        res = sb.kubectl("get", "--raw", "/readyz", check=True)
        assert res.stdout == "ok"
        for name in ("etcd", "kube-apiserver", "kube-controller-manager"):
            assert (tmp_path / "sb" / "logs" / f"{name}.log").is_file()
    finally:
        sb.stop()
    assert _gone(sb.pids)
    sb.stop()  # idempotent


def test_cli_up_env_down(tmp_path: Path) -> None:
    workdir = tmp_path / "cli"
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}

    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "e2e.cluster", *a, "--dir", str(workdir)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    up = run("up", "--no-controller-manager")
    assert up.returncode == 0, up.stderr
    try:
        assert up.stdout.strip() == f"export KUBECONFIG={workdir / 'kubeconfig'}"
        sb = Sandbox.attach(workdir)  # the processes outlived the CLI
        assert len(sb.pids) == 2 and not _gone(sb.pids)
        assert sb.kubectl("get", "namespace", "default").returncode == 0
        out = run("env")
        assert out.returncode == 0 and f"export KUBECONFIG={workdir / 'kubeconfig'}" in out.stdout
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    assert _gone(sb.pids)
    assert run("down").returncode == 0  # nothing left: still fine
