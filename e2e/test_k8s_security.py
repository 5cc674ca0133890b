"""The security boundary on the real API server: every bad target.extraArgs of the shared
table is refused at admission by the CRD's CEL rule (generated from vmupdate_api.extra_args),
and the allowed ones are admitted."""

from __future__ import annotations

import json

import pytest

from e2e.cluster.sandbox import Sandbox
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
