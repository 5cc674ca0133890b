"""kubectl helpers for the operator's end-to-end tests: read objects, wait on them, apply
the shipped examples."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster.fixtures import Kubectl

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def get(kubectl: Kubectl, kind: str, name: str | None = None) -> Any:
    """The object (or the list's items when ``name`` is None); None when it does not exist."""
    args = ["get", kind, "-o", "json"] + ([name] if name else [])
    res = kubectl(*args, timeout=30)
    if res.returncode != 0:
        if "NotFound" in res.stderr:
            return None
        raise RuntimeError(f"kubectl {' '.join(args)}: {res.stderr}")
    data = json.loads(res.stdout)
    return data if name else data["items"]


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


def rows(kubectl: Kubectl, obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The VMUpdate's per-VM records by VM name: those its VMUpdateHost objects hold (one
    per host, labelled with the VMUpdate's uid)."""
    uid = ((obj or {}).get("metadata") or {}).get("uid")
    if not uid:
        return {}
    res = kubectl("get", "vmupdatehosts", "-l", f"vmupdate.dev/vmupdate-uid={uid}", "-o",
                  "json", timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"kubectl get vmupdatehosts: {res.stderr}")
    return {name: row for item in json.loads(res.stdout)["items"]
            for name, row in ((item.get("status") or {}).get("vms") or {}).items()}


async def wait_for(probe: Callable[[], Any], timeout: float, what: str,
                   interval: float = 0.25, describe: Callable[[], str] | None = None) -> Any:
    """Poll ``probe`` (run in a thread) until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await asyncio.to_thread(probe)
        if last:
            return last
        if time.monotonic() > deadline:
            detail = describe() if describe else json.dumps(last, indent=1, default=str)[:4000]
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}:\n{detail}")
        await asyncio.sleep(interval)


def example(name: str, *, target_binary: str | None = None, target_version: str | None = None,
            ) -> tuple[str, dict[str, Any]]:
    """A shipped example as YAML to apply, with ``spec.target`` pointed elsewhere if asked
    (the test rig's QEMU is not where a real host's would be); returns (yaml, object)."""
    obj = yaml.safe_load((EXAMPLES / name).read_text())
    target = obj["spec"]["target"]
    if target_binary is not None:
        target["binary"] = target_binary
    if target_version is not None:
        target["version"] = target_version
    return yaml.safe_dump(obj), obj


def apply(kubectl: Kubectl, manifest: str) -> None:
    res = kubectl("apply", "-f", "-", input=manifest, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"kubectl apply failed: {res.stderr}")


def patch_spec(kubectl: Kubectl, name: str, spec: dict[str, Any]) -> None:
    res = kubectl("patch", "vmupdate", name, "--type", "merge", "-p",
                  json.dumps({"spec": spec}), timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"kubectl patch failed: {res.stderr}")


def events(kubectl: Kubectl, name: str) -> list[dict[str, Any]]:
    """Events about the VMUpdate ``name`` (cluster-scoped objects' events go to default)."""
    res = kubectl("get", "events", "-A", "--field-selector",
                  f"involvedObject.kind=VMUpdate,involvedObject.name={name}", "-o", "json",
                  timeout=30)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    return list(json.loads(res.stdout)["items"])


def delete_vmupdates(kubectl: Kubectl, timeout: float = 120) -> None:
    """Delete every VMUpdate and wait until they are gone (finalizers released)."""
    kubectl("delete", "vmupdates", "--all", "--wait=false", timeout=30)
    deadline = time.monotonic() + timeout
    while get(kubectl, "vmupdates"):
        if time.monotonic() > deadline:
            raise TimeoutError("VMUpdates still present after deletion: "
                               + ", ".join(o["metadata"]["name"]
                                           for o in get(kubectl, "vmupdates")))
        time.sleep(0.25)
