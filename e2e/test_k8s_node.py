"""A real node in the sandbox cluster (e2e/node): containerd + runc, the CNI bridge, kubelet,
kube-proxy and kube-scheduler, in a network namespace of its own.

* the node registers and becomes Ready (kubelet on this cgroup v1 machine, failCgroupV1: false);
* a pod of the project's image is scheduled, gets an address from the pod network, and reaches
  the API server through the ``kubernetes`` Service with in-cluster config, authenticated as
  its ServiceAccount.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from e2e.cluster.sandbox import Sandbox, versions
from e2e.node.node import POD_CIDR, Node
from e2e.test_k8s_node_image import build_image

pytestmark = pytest.mark.k8s


@pytest.fixture(scope="module")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, Node, str]]:
    archive, image = build_image()
    # A cluster of its own: its scheduler and node must not run other tests' Pending pods.
    sandbox = Sandbox.start(tmp_path_factory.mktemp("node-k8s"))
    try:
        node = Node.start(sandbox, tmp_path_factory.mktemp("node"))
        try:
            node.import_image(archive)
            yield sandbox, node, image
        finally:
            node.stop()
    finally:
        sandbox.stop()


def get(sandbox: Sandbox, *args: str) -> Any:
    return json.loads(sandbox.kubectl("get", *args, "-o", "json", check=True).stdout)


def wait_pod_done(sandbox: Sandbox, ns: str, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        pod = get(sandbox, "pod", "-n", ns, name)
        if pod["status"].get("phase") in ("Succeeded", "Failed"):
            return dict(pod)
        assert time.monotonic() < deadline, f"pod {ns}/{name} not done: {pod['status']}"
        time.sleep(0.5)


def test_node_is_ready(real_node: tuple[Sandbox, Node, str]) -> None:
    sandbox, node, _ = real_node
    obj = get(sandbox, "node", node.name)
    ready = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
    assert ready["Ready"] == "True"
    info = obj["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert info["kubeletVersion"] == versions()["K8S_VERSION"]


IN_CLUSTER = """
import json, os
from kubernetes import client, config
config.load_incluster_config()
review = client.AuthenticationV1Api().create_self_subject_review(
    {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
result = {"host": os.environ["KUBERNETES_SERVICE_HOST"],
          "user": review.status.user_info.username}
open("/dev/termination-log", "w").write(json.dumps(result))
"""


def test_pod_gets_an_address_and_reaches_the_api_in_cluster(
        real_node: tuple[Sandbox, Node, str]) -> None:
    sandbox, node, image = real_node
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "in-cluster", "namespace": "default"},
           "spec": {"restartPolicy": "Never",
                    "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never",
                                    "command": ["python", "-c", IN_CLUSTER],
                                    "terminationMessagePolicy": "FallbackToLogsOnError"}]}}
    sandbox.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod), check=True)
    done = wait_pod_done(sandbox, "default", "in-cluster", 120)
    status = done["status"]
    assert done["spec"]["nodeName"] == node.name
    assert ipaddress.ip_address(status["podIP"]) in ipaddress.ip_network(POD_CIDR)
    term = status["containerStatuses"][0]["state"]["terminated"]
    assert status["phase"] == "Succeeded", term.get("message")
    result = json.loads(term["message"])
    service_ip = get(sandbox, "service", "-n", "default", "kubernetes")["spec"]["clusterIP"]
    assert result == {"host": service_ip,
                      "user": "system:serviceaccount:default:default"}
