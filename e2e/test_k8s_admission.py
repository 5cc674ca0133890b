"""Admission: the API server rejects every invalid example with the message its file expects
(`# expect: ...`), and applies the updates of examples/transitions/ as they expect (a spec,
spec.target included, may change after the rollout started: that is a new rollout)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from e2e.cluster.sandbox import Sandbox
from e2e.k8s.fixtures import operator_stopped

pytestmark = pytest.mark.k8s

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
INVALID = sorted((EXAMPLES / "invalid").glob("*.yaml"))
TRANSITIONS = sorted((EXAMPLES / "transitions").glob("*.yaml"))


def expectation(path: Path) -> str:
    [line] = [ln for ln in path.read_text().splitlines() if ln.startswith("# expect: ")]
    return line.removeprefix("# expect: ")


def test_there_are_enough_distinct_invalid_cases() -> None:
    assert len(INVALID) >= 15
    assert len({expectation(p) for p in INVALID}) == len(INVALID)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_rejected_with_its_message(path: Path, vmupdate_api: Sandbox
                                                       ) -> None:
    doc = yaml.safe_load(path.read_text())
    res = vmupdate_api.kubectl("apply", "-f", str(path), timeout=30)
    assert res.returncode != 0, f"{path.name} was accepted:\n{res.stdout}"
    assert expectation(path) in res.stderr, res.stderr
    kind = "vmhost" if doc["kind"] == "VMHost" else "vmupdate"
    gone = vmupdate_api.kubectl("get", kind, doc["metadata"]["name"], timeout=30)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


@pytest.mark.parametrize("path", TRANSITIONS, ids=lambda p: p.stem)
def test_transition_rule(path: Path, vmupdate_api: Sandbox) -> None:
    create, with_status, update = list(yaml.safe_load_all(path.read_text()))
    name = create["metadata"]["name"]
    kubectl = vmupdate_api.kubectl
    # The status is written here, as the operator would: no operator may overwrite it.
    with operator_stopped():
        try:
            kubectl("create", "-f", "-", input=yaml.safe_dump(create), check=True)
            kubectl("patch", "vmupdate", name, "--subresource=status", "--type=merge", "-p",
                    json.dumps({"status": with_status["status"]}), check=True)
            res = kubectl("apply", "-f", "-", input=yaml.safe_dump(update), timeout=30)
            expected = expectation(path)
            if expected == "accepted":
                assert res.returncode == 0, res.stderr
            else:
                assert res.returncode != 0, f"{path.name}: the update was accepted"
                assert expected in res.stderr, res.stderr
        finally:
            kubectl("delete", "vmupdate", name, "--wait=false", timeout=30)
            kubectl("patch", "vmupdate", name, "--type=merge", "-p",
                    '{"metadata":{"finalizers":null}}', timeout=30)
