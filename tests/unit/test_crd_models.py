"""The pydantic models of the CRDs: examples, Python twins of the admission rules, helpers.

Over 450 lines: the examples and every admission rule's Python twin, case by case.
"""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from vmupdate_api.crd.conditions import (
    CONDITION_TYPES,
    VMHOST_CONDITION_TYPES,
    Condition,
    ConditionStatus,
    ConditionUpdate,
    Reason,
    condition,
    find_condition,
)
from vmupdate_api.crd.constants import API_VERSION, GROUP, VERSION
from vmupdate_api.crd.rules import (
    CONDITION_REASON_RE,
    HOST_NAME_RULE,
    NODE_NAME_RULE,
    QEMU_VERSION_SELECTOR_RULE,
    SHA256_RULE,
    TARGET_VERSION_RULE,
    VM_NAME_RULE,
    cel_string,
)
from vmupdate_api.crd.vmhost import HostVM, VMHost, VMHostStatus
from vmupdate_api.crd.vmupdate import VMPhase, VMRolloutStatus, VMUpdate, VMUpdateStatus
from vmupdate_api.crd.vmupdate_spec import (
    CprMode,
    Preference,
    RolloutStrategy,
    UpdateMode,
    UpdateTarget,
    VMSelector,
    VMUpdateSpec,
)
from vmupdate_api.crd.vmupdatehost import VMUpdateHostStatus

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
KINDS: dict[str, type[BaseModel]] = {"VMUpdate": VMUpdate, "VMHost": VMHost}
T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)


def load(path: Path) -> BaseModel:
    doc = yaml.safe_load(path.read_text())
    return KINDS[doc["kind"]].model_validate(doc)


def expect_line(path: Path) -> str:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("# expect: ")]
    assert len(lines) == 1, f"{path.name}: needs exactly one '# expect: ' line"
    return lines[0][len("# expect: ") :]


def minimal_spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": {"vmNames": ["web-01"]},
        "target": {"binary": "/usr/bin/qemu-system-x86_64", "version": "11.1.3"},
    }
    spec.update(changes)
    return spec


# --- examples ---------------------------------------------------------------------------------

VALID = sorted(EXAMPLES.glob("*.yaml"))
INVALID = sorted((EXAMPLES / "invalid").glob("*.yaml"))
TRANSITIONS = sorted((EXAMPLES / "transitions").glob("*.yaml"))


def test_example_files_exist() -> None:
    names = {p.name for p in VALID}
    assert {"vmupdate.yaml", "vmupdate-dryrun.yaml", "vmupdate-paused.yaml"} <= names
    assert len(INVALID) >= 15
    assert TRANSITIONS


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_examples_parse_and_round_trip(path: Path) -> None:
    obj = load(path)
    wire = obj.to_wire()  # type: ignore[attr-defined]
    assert type(obj).model_validate(wire) == obj
    # to_wire writes every field of the file with the same spelling (plus defaults)
    doc = yaml.safe_load(path.read_text())
    assert_subset(doc["spec"], wire["spec"])


def assert_subset(small: Any, big: Any, where: str = "") -> None:
    if isinstance(small, dict):
        assert isinstance(big, dict), where
        for k, v in small.items():
            assert k in big, f"{where}.{k} lost on the wire"
            assert_subset(v, big[k], f"{where}.{k}")
    elif isinstance(small, list):
        assert isinstance(big, list) and len(small) == len(big), where
        for i, (a, b) in enumerate(zip(small, big, strict=True)):
            assert_subset(a, b, f"{where}[{i}]")
    else:
        assert small == big, where


def test_rollout_example_is_what_the_issue_asks() -> None:
    obj = load(EXAMPLES / "vmupdate.yaml")
    assert isinstance(obj, VMUpdate)
    # It selects QEMU 10.0 VMs: only Auto (-> cpr-transfer) or CprTransfer can move them.
    assert obj.spec.mode is UpdateMode.AUTO
    assert obj.spec.selector.vm_names is not None and len(obj.spec.selector.vm_names) == 3
    assert obj.spec.strategy.canary == 1
    dry = load(EXAMPLES / "vmupdate-dryrun.yaml")
    paused = load(EXAMPLES / "vmupdate-paused.yaml")
    assert isinstance(dry, VMUpdate) and dry.spec.dry_run
    assert isinstance(paused, VMUpdate) and paused.spec.paused


CPR_EXEC_SINCE = (10, 2)  # cpr-exec exists in QEMU 10.2 and later (on both sides)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_no_example_asks_a_mode_its_selected_versions_lack(path: Path) -> None:
    """examples/vmupdate.yaml selected 10.0 VMs with CprExec: it could never work."""
    obj = load(path)
    if not isinstance(obj, VMUpdate):
        return
    versions = obj.spec.selector.qemu_versions or []
    old = [v for v in versions if tuple(int(p) for p in v.split(".")[:2]) < CPR_EXEC_SINCE]
    target = tuple(int(p) for p in obj.spec.target.version.split(".")[:2])
    if obj.spec.mode is UpdateMode.CPR_EXEC:
        assert not old and target >= CPR_EXEC_SINCE, (path.name, versions)


def test_vmhost_example_summary_is_consistent() -> None:
    host = load(EXAMPLES / "vmhost.yaml")
    assert isinstance(host, VMHost) and host.status is not None
    assert host.status.summarize() == host.status


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_examples_are_rejected_in_python_too(path: Path) -> None:
    """Every invalid example fails pydantic validation, at the field the API server names;
    where the API server's message is one of ours (a CEL rule), pydantic says the same."""
    expect = expect_line(path)
    doc = yaml.safe_load(path.read_text())
    with pytest.raises(ValidationError) as info:
        KINDS[doc["kind"]].model_validate(doc)
    text = str(info.value)
    locs = [".".join(str(p) for p in e["loc"] if isinstance(p, str)) for e in info.value.errors()]
    assert expect in text or any(loc and loc in expect for loc in locs), (expect, text)


def test_invalid_examples_have_distinct_expectations() -> None:
    expects = [expect_line(p) for p in INVALID]
    assert len(set(expects)) == len(expects)
    for p in INVALID:
        assert p.read_text().startswith("# Invalid: "), p.name


@pytest.mark.parametrize("path", TRANSITIONS, ids=lambda p: p.name)
def test_transition_examples_are_well_formed(path: Path) -> None:
    expect_line(path)
    created, status, updated = yaml.safe_load_all(path.read_text())
    VMUpdate.model_validate(created)
    VMUpdateStatus.model_validate(status["status"])
    VMUpdate.model_validate(updated)
    assert created["metadata"]["name"] == status["metadata"]["name"]
    assert created["metadata"]["name"] == updated["metadata"]["name"]


# --- wire format --------------------------------------------------------------------------------


def test_wire_names_are_camel_case() -> None:
    spec = VMUpdateSpec.model_validate(
        minimal_spec(dryRun=True, strategy={"maxParallelPerHost": 1, "pauseBudgetMs": 5})
    )
    wire = spec.to_wire()
    assert set(wire) == {"selector", "target", "mode", "strategy", "dryRun", "paused"}
    assert set(wire["strategy"]) == {
        "maxParallel",
        "maxParallelPerHost",
        "canary",
        "pauseBudgetMs",
        "failurePolicy",
        "maxFailures",
    }
    status = VMUpdateStatus(
        observed_generation=1,
        pause_p50_ms=1,
        pause_max_ms=2,
        in_progress=0,
    ).to_wire()
    for key in ("observedGeneration", "pauseP50Ms", "pauseMaxMs", "inProgress", "dryRunPassed"):
        assert key in status
    records = VMUpdateHostStatus(
        vms={"n": VMRolloutStatus(host="h", name="n", pid_before=1, operation_id="x")},
    ).to_wire()
    assert set(records["vms"]["n"]) == {"host", "name", "pidBefore", "operationId", "phase"}
    vm = HostVM(name="a", memory_mib=256, cpr_modes=[CprMode.CPR_EXEC]).to_wire()
    assert vm["memoryMiB"] == 256 and vm["cprModes"] == ["CprExec"]


def test_snake_case_and_camel_case_both_accepted() -> None:
    a = RolloutStrategy.model_validate({"maxParallel": 3, "max_parallel_per_host": 2})
    assert (a.max_parallel, a.max_parallel_per_host) == (3, 2)


def test_to_wire_omits_none() -> None:
    spec = VMUpdateSpec.model_validate(minimal_spec())
    assert "sha256" not in spec.to_wire()["target"]
    assert set(spec.to_wire()["selector"]) == {"vmNames"}


def test_defaults() -> None:
    spec = VMUpdateSpec.model_validate(minimal_spec())
    assert spec.mode is UpdateMode.AUTO
    assert not spec.dry_run and not spec.paused
    s = spec.strategy
    assert (s.max_parallel, s.max_parallel_per_host, s.canary) == (1, 1, 0)
    assert (s.pause_budget_ms, s.failure_policy, s.max_failures) == (1000, "Halt", 0)


def test_kind_and_api_version() -> None:
    obj = VMUpdate.model_validate({"metadata": {"name": "x"}, "spec": minimal_spec()})
    wire = obj.to_wire()
    assert wire["apiVersion"] == "vmupdate.dev/v1alpha1" == API_VERSION
    assert wire["kind"] == "VMUpdate"
    assert f"{GROUP}/{VERSION}" == API_VERSION
    with pytest.raises(ValidationError):
        VMUpdate.model_validate({"kind": "VMHost", "spec": minimal_spec()})


def test_metadata_keeps_unknown_fields() -> None:
    meta = {"name": "x", "ownerReferences": [{"kind": "Foo"}], "generation": 3}
    obj = VMUpdate.model_validate({"metadata": meta, "spec": minimal_spec()})
    assert obj.metadata.generation == 3
    assert obj.to_wire()["metadata"]["ownerReferences"] == [{"kind": "Foo"}]


# --- Python twins of the CEL rules -------------------------------------------------------------


def target(**changes: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"binary": "/usr/bin/qemu-system-x86_64", "version": "11.1.3"}
    t.update(changes)
    return t


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"binary": "bin/qemu"}, "must be an absolute path"),
        ({"binary": "/a/../b"}, "'..' path segment"),
        ({"binary": "/a/b/.."}, "'..' path segment"),
        ({"binary": "/a/b/"}, "not a directory"),
        ({"version": "11.1"}, "MAJOR.MINOR.MICRO"),
        ({"version": "11.1.3\n"}, "MAJOR.MINOR.MICRO"),
        ({"version": "v11.1.3"}, "MAJOR.MINOR.MICRO"),
        ({"sha256": "A" * 64}, "64 lowercase hex"),
        ({"sha256": "a" * 63}, "64 lowercase hex"),
        ({"extraArgs": ["-daemonize"]}, "target.extraArgs may only hold"),
        ({"extraArgs": ["-m", "--incoming"]}, "target.extraArgs may only hold"),
    ],
)
def test_target_rules(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        UpdateTarget.model_validate(target(**changes))


@pytest.mark.parametrize(
    "changes",
    [
        {"binary": "/opt/qemu..11/bin/qemu"},  # '..' inside a name is not a segment
        {"binary": "/opt/./qemu"},
        {"sha256": "0123456789abcdef" * 4},
        {"extraArgs": ["-msg", "timestamp=on"]},
        {"version": "10.0.90"},
    ],
)
def test_target_rules_accept(changes: dict[str, Any]) -> None:
    UpdateTarget.model_validate(target(**changes))


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("web-01", True),
        ("*", True),
        ("web-??", True),
        ("db-[0-9][0-9]", True),
        ("db-[!a-c]x", True),
        ("vm.example:1@x+y=z~", True),
        ("web 01", False),
        ("a/b", False),
        ("db-[0-9", False),
        ("db-]", False),
        ("db-[]", False),
        ("", False),
        ("x" * 254, False),
    ],
)
def test_vm_name_patterns(name: str, ok: bool) -> None:
    doc = {"vmNames": [name]}
    if ok:
        VMSelector.model_validate(doc)
    else:
        with pytest.raises(ValidationError):
            VMSelector.model_validate(doc)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("node-a", True),
        ("a", True),
        ("worker-1.example.org", True),
        ("Node-A", False),
        ("node_a", False),
        ("-node", False),
        ("node-", False),
        ("node..a", False),
    ],
)
def test_host_names(name: str, ok: bool) -> None:
    doc = {"hostNames": [name]}
    if ok:
        VMSelector.model_validate(doc)
    else:
        with pytest.raises(ValidationError, match="must be node names"):
            VMSelector.model_validate(doc)


@pytest.mark.parametrize(
    ("version", "ok"),
    [("10", True), ("10.0", True), ("10.0.2", True), ("10.0.2.1", False), ("v10", False)],
)
def test_qemu_version_selector(version: str, ok: bool) -> None:
    doc = {"qemuVersions": [version]}
    if ok:
        VMSelector.model_validate(doc)
    else:
        with pytest.raises(ValidationError, match="must be QEMU versions"):
            VMSelector.model_validate(doc)


def test_selector_needs_one_field() -> None:
    with pytest.raises(ValidationError, match="at least one of hostNames"):
        VMSelector.model_validate({})
    VMSelector.model_validate({"hostSelector": {}})  # explicit "every host"


@pytest.mark.parametrize("field", ["hostNames", "vmNames", "qemuVersions"])
def test_selector_lists_are_non_empty_sets(field: str) -> None:
    value = {"hostNames": "node-a", "vmNames": "vm", "qemuVersions": "10.0"}[field]
    with pytest.raises(ValidationError):
        VMSelector.model_validate({field: []})
    with pytest.raises(ValidationError, match="Duplicate value"):
        VMSelector.model_validate({field: [value, value]})


@pytest.mark.parametrize(
    ("operator", "values", "ok"),
    [
        ("In", ["a"], True),
        ("NotIn", ["a", "b"], True),
        ("Exists", None, True),
        ("DoesNotExist", [], True),
        ("In", None, False),
        ("NotIn", [], False),
        ("Exists", ["a"], False),
        ("DoesNotExist", ["a"], False),
    ],
)
def test_match_expressions(operator: str, values: list[str] | None, ok: bool) -> None:
    req: dict[str, Any] = {"key": "k", "operator": operator}
    if values is not None:
        req["values"] = values
    doc = {"hostSelector": {"matchExpressions": [req]}}
    if ok:
        VMSelector.model_validate(doc)
    else:
        with pytest.raises(ValidationError, match="In and NotIn need a non-empty values"):
            VMSelector.model_validate(doc)


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ({"maxParallel": 2, "maxParallelPerHost": 3}, "must not exceed strategy.maxParallel"),
        ({"maxParallelPerHost": 2}, "must not exceed strategy.maxParallel"),
        ({"failurePolicy": "Continue", "maxFailures": 1}, "applies only to failurePolicy Halt"),
        ({"maxParallel": 1001}, "less than or equal to 1000"),
        ({"maxParallelPerHost": 65, "maxParallel": 100}, "less than or equal to 64"),
        ({"canary": -1}, "greater than or equal to 0"),
        ({"canary": 101}, "less than or equal to 100"),
        ({"pauseBudgetMs": 600001}, "less than or equal to 600000"),
        ({"maxFailures": 1001}, "less than or equal to 1000"),
        ({"failurePolicy": "halt"}, "'Halt' or 'Continue'"),
    ],
)
def test_strategy_rules(strategy: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        RolloutStrategy.model_validate(strategy)


@pytest.mark.parametrize(("mode", "prefer", "ok"), [
    (mode, prefer, prefer is None or mode == "Auto")
    for mode in ("Auto", "CprExec", "CprTransfer", "CprReboot")
    for prefer in (None, "SamePid", "ShortestPause")])
def test_prefer_only_with_auto(mode: str, prefer: str | None, ok: bool) -> None:
    strategy = {} if prefer is None else {"prefer": prefer}
    doc = minimal_spec(mode=mode, strategy=strategy)
    if ok:
        spec = VMUpdateSpec.model_validate(doc)
        assert spec.strategy.prefer == (None if prefer is None else Preference(prefer))
    else:
        message = "strategy.prefer applies only to mode Auto"
        with pytest.raises(ValidationError, match=re.escape(message)):
            VMUpdateSpec.model_validate(doc)


def test_prefer_unknown_value() -> None:
    with pytest.raises(ValidationError, match="'SamePid' or 'ShortestPause'"):
        RolloutStrategy.model_validate({"prefer": "Fastest"})


def test_strategy_rules_accept() -> None:
    RolloutStrategy.model_validate({"maxParallel": 5, "maxParallelPerHost": 5})
    RolloutStrategy.model_validate({"failurePolicy": "Halt", "maxFailures": 3})
    RolloutStrategy.model_validate({"failurePolicy": "Continue"})
    RolloutStrategy.model_validate({"pauseBudgetMs": 600000, "canary": 100})


def test_vmhost_name_must_be_node_name() -> None:
    spec = {"nodeName": "node-a"}
    VMHost.model_validate({"metadata": {"name": "node-a"}, "spec": spec})
    VMHost.model_validate({"spec": spec})  # no name yet: nothing to compare
    with pytest.raises(ValidationError, match=r"must equal spec\.nodeName"):
        VMHost.model_validate({"metadata": {"name": "node-b"}, "spec": spec})
    with pytest.raises(ValidationError, match=r"spec\.nodeName must be a node name"):
        VMHost.model_validate({"spec": {"nodeName": "Node_A"}})


def test_rule_python_twins_agree_with_regexes() -> None:
    """The CEL regex literal, unquoted, is the anchored Python regex of the twin."""
    for rule in (
        TARGET_VERSION_RULE,
        SHA256_RULE,
        HOST_NAME_RULE,
        VM_NAME_RULE,
        QEMU_VERSION_SELECTOR_RULE,
        NODE_NAME_RULE,
    ):
        literal = re.fullmatch(r"self\.matches\('(.*)'\)", rule.cel)
        assert literal is not None, rule.cel
        pattern = literal.group(1).replace("\\\\", "\\")
        assert pattern.startswith("^") and pattern.endswith("$")
        re.compile(pattern)


def test_cel_string_quoting() -> None:
    assert cel_string("a") == "'a'"
    assert cel_string("it's") == "'it\\'s'"
    assert cel_string("\\.") == "'\\\\.'"


# --- timestamps --------------------------------------------------------------------------------


def test_time_is_utc_whole_seconds_rfc3339() -> None:
    local = timezone(timedelta(hours=2))
    c = Condition(
        type="Ready",
        status=ConditionStatus.TRUE,
        reason="AllVMsUpdated",
        last_transition_time=datetime(2025, 6, 1, 14, 0, 0, 987654, tzinfo=local),
    )
    assert c.last_transition_time == T0
    assert c.to_wire()["lastTransitionTime"] == "2025-06-01T12:00:00Z"
    assert Condition.model_validate(c.to_wire()) == c


def test_naive_time_rejected() -> None:
    with pytest.raises(ValidationError):
        Condition(
            type="Ready",
            status=ConditionStatus.TRUE,
            reason="R",
            last_transition_time=datetime(2025, 1, 1),
        )


@pytest.mark.parametrize("reason", ["", "all updated", "1Bad", "Trailing,", "x" * 1025])
def test_condition_reason_must_be_camel_case(reason: str) -> None:
    with pytest.raises(ValidationError):
        Condition(type="Ready", status="True", reason=reason, last_transition_time=T0)  # type: ignore[arg-type]


@pytest.mark.parametrize("reason", ["AllVMsUpdated", "A", "Reason_1", "a:b,c_d"])
def test_condition_reason_accepts(reason: str) -> None:
    Condition(type="Ready", status="True", reason=reason, last_transition_time=T0)  # type: ignore[arg-type]


# --- condition() --------------------------------------------------------------------------------


def cond(
    type_: str = "Ready",
    status: str = "True",
    reason: str = "R",
    message: str = "",
    at: datetime = T0,
    generation: int | None = None,
) -> Condition:
    return Condition(
        type=type_,
        status=ConditionStatus(status),
        reason=reason,
        message=message,
        last_transition_time=at,
        observed_generation=generation,
    )


def upd(
    type_: str = "Ready",
    status: str = "True",
    reason: str = "R",
    message: str = "",
    generation: int | None = None,
) -> ConditionUpdate:
    return ConditionUpdate(
        type=type_,
        status=ConditionStatus(status),
        reason=reason,
        message=message,
        observed_generation=generation,
    )


NOW = T0 + timedelta(minutes=5)


def test_condition_added_to_empty_list() -> None:
    out = condition([], upd(generation=2), NOW)
    assert out == [cond(at=NOW, generation=2)]


@pytest.mark.parametrize(
    ("old", "new"),
    list(itertools.product([None, "True", "False", "Unknown"], ["True", "False", "Unknown"])),
)
def test_condition_transition_matrix(old: str | None, new: str) -> None:
    """lastTransitionTime moves exactly when status changes (or the condition is new)."""
    before = [] if old is None else [cond(status=old, reason="Old", message="old", generation=1)]
    out = condition(before, upd(status=new, reason="New", message="new", generation=2), NOW)
    assert len(out) == 1
    c = out[0]
    assert (c.type, c.status, c.reason, c.message, c.observed_generation) == (
        "Ready",
        new,
        "New",
        "new",
        2,
    )
    assert c.last_transition_time == (T0 if old == new else NOW)


def test_condition_same_status_updates_reason_message_generation_only() -> None:
    before = [cond(reason="A", message="a", generation=1)]
    out = condition(before, upd(reason="B", message="b", generation=None), NOW)
    assert out == [cond(reason="B", message="b", generation=None)]


def test_condition_other_types_untouched_and_order_kept() -> None:
    before = [
        cond("Ready", "False", at=T0),
        cond("Progressing", "True", at=T0 - timedelta(hours=1)),
        cond("Degraded", "False", at=T0 - timedelta(hours=2)),
    ]
    snapshot = [c.model_copy(deep=True) for c in before]
    out = condition(before, upd("Progressing", "False", reason="RolloutComplete"), NOW)
    assert [c.type for c in out] == ["Ready", "Progressing", "Degraded"]
    assert out[0] == before[0] and out[2] == before[2]
    assert out[1].status == "False" and out[1].last_transition_time == NOW
    assert before == snapshot  # input untouched
    out2 = condition(out, upd("Custom", "True"), NOW)
    assert [c.type for c in out2] == ["Ready", "Progressing", "Degraded", "Custom"]


def test_condition_drops_later_duplicates() -> None:
    before = [cond("Ready", "True"), cond("Degraded", "False"), cond("Ready", "False")]
    out = condition(before, upd("Ready", "True", reason="X"), NOW)
    assert [c.type for c in out] == ["Ready", "Degraded"]
    assert out[0].reason == "X" and out[0].last_transition_time == T0


def test_condition_ignores_time_carried_by_new() -> None:
    new = cond(status="False", at=T0 - timedelta(days=1))
    out = condition([cond(status="True")], new, NOW)
    assert out[0].last_transition_time == NOW
    same = cond(status="True", at=T0 - timedelta(days=1))
    assert condition([cond(status="True")], same, NOW)[0].last_transition_time == T0


def test_condition_now_normalised_and_must_be_aware() -> None:
    local = timezone(timedelta(hours=-7))
    out = condition([], upd(), datetime(2025, 6, 1, 5, 5, 0, 123456, tzinfo=local))
    assert out[0].last_transition_time == NOW
    with pytest.raises(ValueError, match="timezone-aware"):
        condition([], upd(), datetime(2025, 6, 1))


def test_condition_result_is_a_new_list() -> None:
    before = [cond()]
    out = condition(before, upd(), NOW)
    assert out is not before and out == before


def test_find_condition() -> None:
    cs = [cond("Ready"), cond("Degraded", "False")]
    assert find_condition(cs, "Degraded") == cs[1]
    assert find_condition(cs, "Progressing") is None


def test_condition_type_constants() -> None:
    assert CONDITION_TYPES == ("Ready", "Progressing", "Degraded")
    assert VMHOST_CONDITION_TYPES == ("Ready",)
    for r in Reason:
        assert re.fullmatch(CONDITION_REASON_RE, r.value)


# --- derived status fields -----------------------------------------------------------------------


def test_counted() -> None:
    phases = [
        ("Updated", 100),
        ("Updated", 300),
        ("Updated", 200),
        ("Updated", None),
        ("Pending", None),
        ("Preflight", None),
        ("Updating", None),
        ("Failed", None),
        ("RolledBack", 900),
        ("DryRunFailed", None),
        ("Skipped", None),
        ("DryRunPassed", None),
    ]
    rows = [
        VMRolloutStatus(host="h", name=f"vm{i}", phase=VMPhase(p), pause_ms=ms)
        for i, (p, ms) in enumerate(phases)
    ]
    s = VMUpdateStatus().counted(rows)
    assert (s.targets, s.updated, s.pending, s.in_progress) == (12, 4, 1, 2)
    assert (s.failed, s.skipped, s.dry_run_passed) == (3, 1, 1)
    assert s.targets == s.updated + s.pending + s.in_progress + s.failed + s.skipped + (
        s.dry_run_passed
    )
    assert (s.pause_p50_ms, s.pause_max_ms) == (200, 300)  # RolledBack pauses do not count
    assert s.hosts == 1 and [v.name for v in s.in_progress_vms] == ["vm5", "vm6"]
    assert [v.name for v in s.failed_vms] == ["vm7", "vm8", "vm9"]
    empty = VMUpdateStatus(pause_p50_ms=5, pause_max_ms=5, targets=3).counted([])
    assert (empty.targets, empty.pause_p50_ms, empty.pause_max_ms) == (0, None, None)


def test_summarize() -> None:
    vms = [
        HostVM(name="a", qemu_version="10.0.2", ready=True),
        HostVM(name="b", qemu_version="9.2.0"),
        HostVM(name="c", qemu_version="10.0.2", ready=True),
        HostVM(name="d", qemu_version="10.0.10"),
        HostVM(name="e"),
    ]
    s = VMHostStatus(vms=vms).summarize()
    assert (s.vm_count, s.ready_count) == (5, 2)
    assert s.qemu_versions == "9.2.0,10.0.2,10.0.10"
    assert VMHostStatus().summarize().qemu_versions is None


def test_endpoint_pattern() -> None:
    for ok in ("10.0.0.1:9443", "node-a.example:1", "[fd00::1]:9443"):
        VMHostStatus(endpoint=ok)
    for bad in ("10.0.0.1", "http://x:1", "x:port"):
        with pytest.raises(ValidationError):
            VMHostStatus(endpoint=bad)
