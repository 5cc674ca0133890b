"""The extraArgs allowlist as the agent's preflight and the CRD's Python twin apply it: every
bad case of the shared table is refused (naming the entry), every good one accepted, and the
CEL rule generated from the same table (its twin on the API server: e2e/test_k8s_security.py,
the gRPC layer: tests/agent_service/test_extra_args_grpc.py)."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError
from test_preflight import BASE, VmLoader, good_inputs

from tests.extra_args_cases import BAD_EXTRA_ARGS, GOOD_EXTRA_ARGS
from vmupdate_agent import preflight
from vmupdate_agent.models import RequestedMode, Target
from vmupdate_api import extra_args
from vmupdate_api.crd.vmupdate_spec import UpdateTarget
from vmupdate_api.crdgen import crds

IDS = [case[0] for case in BAD_EXTRA_ARGS]


@pytest.mark.parametrize(("name", "args", "why"), BAD_EXTRA_ARGS, ids=IDS)
def test_the_allowlist_refuses(name: str, args: list[str], why: str) -> None:
    problems = extra_args.problems(args, "target.extraArgs")
    assert problems, why
    assert all(p.startswith("target.extraArgs[") for p in problems), problems


@pytest.mark.parametrize(("name", "args", "why"), BAD_EXTRA_ARGS, ids=IDS)
def test_the_crd_model_refuses(name: str, args: list[str], why: str) -> None:
    with pytest.raises(ValidationError, match=re.escape("target.extraArgs may only hold")):
        UpdateTarget.model_validate({"binary": "/usr/bin/qemu-system-x86_64",
                                       "version": "11.1.3", "extraArgs": args})


@pytest.mark.parametrize(("name", "args", "why"), BAD_EXTRA_ARGS, ids=IDS)
def test_preflight_refuses_and_never_dry_runs(load_vm: VmLoader, name: str, args: list[str],
                                              why: str) -> None:
    good = good_inputs(load_vm(BASE), RequestedMode.CPR_EXEC)
    p = preflight.PreflightInputs(**{**good.__dict__, "dry_run": None,
                                     "target": Target(binary=good.target.binary,
                                                      extra_args=tuple(args))})
    report = preflight.evaluate(p)
    failed = {c.name: c.message for c in report.failures()}
    assert "target.extra_args[" in failed["target-extra-args"]
    assert failed["dry-run"].startswith("not run: the extra arguments are not allowed")
    assert not report.passed


@pytest.mark.parametrize("args", GOOD_EXTRA_ARGS, ids=str)
def test_allowed_arguments_pass_everywhere(load_vm: VmLoader, args: list[str]) -> None:
    assert extra_args.problems(args, "x") == []
    UpdateTarget.model_validate({"binary": "/usr/bin/qemu-system-x86_64",
                                   "version": "11.1.3", "extraArgs": args})
    good = good_inputs(load_vm(BASE), RequestedMode.CPR_EXEC)
    p = preflight.PreflightInputs(**{**good.__dict__, "target": Target(
        binary=good.target.binary, extra_args=tuple(args))})
    assert preflight.evaluate(p).passed


def test_every_allowed_option_has_a_reason_and_a_single_value() -> None:
    for option in extra_args.ALLOWED:
        assert option.name.startswith("-") and not option.name.startswith("--")
        assert len(option.reason) > 40
        assert option.value_pattern.startswith("^") and option.value_pattern.endswith("$")


def test_the_crd_carries_the_generated_rule() -> None:
    crd = next(c for c in crds().values() if c["spec"]["names"]["kind"] == "VMUpdate")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    target = schema["properties"]["spec"]["properties"]["target"]["properties"]["extraArgs"]
    assert target["maxItems"] == extra_args.MAX_EXTRA_ARGS
    assert {"rule": extra_args.cel_rule(), "message": extra_args.CEL_MESSAGE} in \
        target["x-kubernetes-validations"]
