"""pytest fixtures for tests against a real Kubernetes API.

Use them from a conftest.py::

    from e2e.cluster.fixtures import apply_crds, k8s_cluster, kubectl  # noqa: F401

* ``k8s_cluster`` (session): a :class:`~e2e.cluster.sandbox.Sandbox`: ``$KUBECONFIG``'s
  cluster when that is set, otherwise a sandbox started once per session (etcd +
  kube-apiserver + kube-controller-manager from e2e/cluster/build.sh). While the session runs,
  ``KUBECONFIG`` points at it, so kubernetes/kopf clients in the test process find it.
  Missing binaries raise :class:`~e2e.cluster.sandbox.BinariesMissing`: the test errors, it is
  never skipped.
* ``kubectl(*args, input=None, timeout=60, check=False, kubeconfig=None)``: runs kubectl
  against the cluster and returns the ``CompletedProcess`` (text).
* ``apply_crds(paths, timeout=60)``: applies YAML files (server-side) and waits until every
  CustomResourceDefinition in them is Established and its resources can be listed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster.sandbox import Sandbox, SandboxError

Kubectl = Callable[..., subprocess.CompletedProcess[str]]
ApplyCrds = Callable[..., list[str]]


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    workdir = tmp_path_factory.mktemp("k8s-sandbox")
    sandbox = Sandbox.from_env(workdir)
    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(sandbox.kubeconfig)
    try:
        yield sandbox
    finally:
        if saved is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved
        sandbox.stop()


@pytest.fixture
def kubectl(k8s_cluster: Sandbox) -> Kubectl:
    return k8s_cluster.kubectl


def _crds_in(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    crds = []
    for path in paths:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                crds.append(doc)
    return crds


def apply_and_wait_crds(
    sandbox: Sandbox, paths: Iterable[str | os.PathLike[str]], timeout: float = 60.0
) -> list[str]:
    """Apply ``paths``; wait for their CRDs to be Established and servable. Returns CRD names."""
    paths = [Path(p) for p in paths]
    args = ["apply", "--server-side", "--force-conflicts", "--field-manager=vmupdate-tests"]
    for p in paths:
        args += ["-f", str(p)]
    sandbox.kubectl(*args, timeout=timeout, check=True)
    crds = _crds_in(paths)
    names = [c["metadata"]["name"] for c in crds]
    if names:
        sandbox.kubectl(
            "wait",
            "--for=condition=Established",
            f"--timeout={int(timeout)}s",
            *(f"crd/{n}" for n in names),
            timeout=timeout + 10,
            check=True,
        )
    deadline = time.monotonic() + timeout
    for crd in crds:
        spec = crd["spec"]
        group, plural = spec["group"], spec["names"]["plural"]
        for version in (v["name"] for v in spec["versions"] if v.get("served", True)):
            url = f"/apis/{group}/{version}/{plural}?limit=1"
            while True:
                # Right after Established the first list can still answer 429 "storage is
                # (re)initializing" or 404 until the handler is installed: retry.
                res = sandbox.kubectl("get", "--raw", url, timeout=30)
                if res.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise SandboxError(f"{group}/{version} {plural} not servable: {res.stderr}")
                time.sleep(0.2)
    return names


@pytest.fixture
def apply_crds(k8s_cluster: Sandbox) -> ApplyCrds:
    def apply(paths: Iterable[str | os.PathLike[str]], timeout: float = 60.0) -> list[str]:
        return apply_and_wait_crds(k8s_cluster, paths, timeout)

    return apply
