"""The VMUpdateHost writer against a real API server: create, patch, the failed label, a
wrong guess about existence, a refused record, deletion by the VMUpdate's uid."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio import config as kconfig

from e2e.cluster.fixtures import apply_and_wait_crds, k8s_cluster  # noqa: F401 (fixture)
from e2e.cluster.sandbox import Sandbox
from vmupdate_api.crd.vmupdate import VMPhase, VMRolloutStatus
from vmupdate_operator import records
from vmupdate_operator.kube import RecordWrite, StatusWriteError, VMUpdateHostWriter

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]
UID = "5f0c6a3e-1b2d-4c5e-8f90-a1b2c3d4e5f6"


@pytest.fixture
async def writer(k8s_cluster: Sandbox) -> AsyncIterator[VMUpdateHostWriter]:  # noqa: F811
    apply_and_wait_crds(k8s_cluster, [REPO / "crds" / "vmupdate.dev_vmupdatehosts.yaml"])
    api = await kconfig.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))
    try:
        yield VMUpdateHostWriter(api)
    finally:
        await api.close()


def get(sandbox: Sandbox, *args: str) -> Any:
    res = sandbox.kubectl("get", "vmupdatehosts", *args, "-o", "json", timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def write(host: str, before: dict[str, VMRolloutStatus], after: dict[str, VMRolloutStatus],
          *, exists: bool, create: bool = True) -> RecordWrite:
    patch = records.record_patch("fleet", UID, host, before, after)
    assert patch is not None
    return RecordWrite(name=records.record_name("fleet", UID, host),
                       body=records.new_record("fleet", UID, host, after), patch=patch,
                       exists=exists, create=create)


def row(name: str, phase: VMPhase, message: str | None = None) -> VMRolloutStatus:
    return VMRolloutStatus(host="node-a", name=name, phase=phase, message=message)


async def test_records_are_created_patched_found_and_deleted(
        writer: VMUpdateHostWriter, k8s_cluster: Sandbox) -> None:  # noqa: F811
    sandbox = k8s_cluster
    pending = {"x": row("x", VMPhase.PENDING), "y": row("y", VMPhase.PENDING)}
    name = records.record_name("fleet", UID, "node-a")
    # Thought to exist, but missing: created.
    await writer.write(write("node-a", {}, pending, exists=True))
    obj = get(sandbox)["items"][0]
    assert obj["metadata"]["name"] == name and set(obj["status"]["vms"]) == {"x", "y"}
    assert obj["metadata"]["ownerReferences"][0]["uid"] == UID
    # Thought missing, but there: patched; only x is sent, y stays.
    failed = {**pending, "x": row("x", VMPhase.FAILED, "agent: sha256 mismatch")}
    await writer.write(write("node-a", {}, failed, exists=False))
    obj = get(sandbox, name)
    assert obj["status"]["vms"]["x"]["phase"] == "Failed" and "y" in obj["status"]["vms"]
    assert obj["status"]["failures"] == "x: agent: sha256 mismatch"
    # Found by the label of the VMUpdate and the failed label, or by field.
    assert [i["metadata"]["name"] for i in get(
        sandbox, "-l", "vmupdate.dev/vmupdate=fleet,vmupdate.dev/failed=true")["items"]] == [name]
    assert len(get(sandbox, "--field-selector", "spec.vmUpdate=fleet")["items"]) == 1
    # Fixed: the failed label goes.
    fixed = {**failed, "x": row("x", VMPhase.UPDATED)}
    await writer.write(write("node-a", failed, fixed, exists=True))
    assert get(sandbox, "-l", "vmupdate.dev/failed=true")["items"] == []
    # A deleted VMUpdate's record is not made again.
    await writer.write(write("node-b", {}, {"z": row("z", VMPhase.UPDATED).model_copy(
        update={"host": "node-b"})}, exists=True, create=False))
    assert len(get(sandbox)["items"]) == 1
    # What the schema refuses is an error naming the object; nothing changes.
    bad = write("node-a", fixed, fixed | {"w": row("w", VMPhase.PENDING)}, exists=True)
    bad.patch["status"]["vms"]["w"]["pidBefore"] = -1
    with pytest.raises(StatusWriteError, match=name):
        await writer.write(bad)
    assert "w" not in get(sandbox, name)["status"]["vms"]
    # Deleted with the VMUpdate, by its uid.
    await writer.delete_all(UID)
    assert get(sandbox)["items"] == []


async def test_an_unreachable_api_server_is_a_write_error() -> None:
    api = kclient.ApiClient(kclient.Configuration(host="https://127.0.0.1:9"))
    try:
        with pytest.raises(StatusWriteError, match="VMUpdateHost"):
            await VMUpdateHostWriter(api, timeout=2).write(
                write("node-a", {}, {"x": row("x", VMPhase.PENDING)}, exists=False))
        with pytest.raises(StatusWriteError, match=UID):
            await VMUpdateHostWriter(api, timeout=2).delete_all(UID)
    finally:
        await api.close()
