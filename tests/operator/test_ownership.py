"""One owner per VM: the rule itself, the planner's Blocked rows, the condition that says why,
and two VMUpdates planning against each other that update a VM once, never back and forth."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.operator.builders import NEW, NEW_VERSION, T0, host, make_plan, on_target, spec, vm
from vmupdate_api.crd.conditions import Reason, find_condition
from vmupdate_api.crd.vmhost import HostVM
from vmupdate_api.crd.vmupdate import UpdatePhase, VMPhase, VMRolloutStatus
from vmupdate_api.crd.vmupdate_spec import UpdateTarget, VMSelector, VMUpdateSpec
from vmupdate_operator.inventory import HostInventory
from vmupdate_operator.ownership import Claim, claim_from_body, owner
from vmupdate_operator.records import record_from_body
from vmupdate_operator.status import build_status

ALT = "/opt/qemu-alt/bin/qemu-system-x86_64"
EVERYTHING = VMSelector.model_validate({"hostSelector": {}})
KEY = ("a", "x")


def claim(name: str, minute: int, *, selector: VMSelector = EVERYTHING,
          target: UpdateTarget | None = None, in_flight: bool = False, acted: bool = False,
          deleting: bool = False, dry_run: bool = False) -> Claim:
    return Claim(uid=f"uid-{name}", name=name, created=T0 + timedelta(minutes=minute),
                 selector=selector,
                 target=target or UpdateTarget(binary=NEW, version=NEW_VERSION),
                 in_flight=frozenset({KEY}) if in_flight else frozenset(),
                 acted=frozenset({KEY}) if acted else frozenset(),
                 deleting=deleting, dry_run=dry_run)


X = vm("x")


def own(me: Claim, *others: Claim, the_vm: HostVM = X) -> str:
    return owner(me, list(others), "a", {}, the_vm).name


# --- the rule -------------------------------------------------------------------------------


def test_alone_it_owns() -> None:
    assert own(claim("me", 5)) == "me"


def test_the_oldest_owns() -> None:
    assert own(claim("me", 5), claim("old", 1)) == "old"
    assert own(claim("me", 1), claim("young", 5)) == "me"


def test_equal_creation_times_fall_back_to_the_name() -> None:
    assert own(claim("b", 1), claim("a", 1)) == "a"
    assert own(claim("a", 1), claim("b", 1)) == "a"


def test_a_vm_taken_first_stays_with_its_taker() -> None:
    assert own(claim("old", 1), claim("young", 5, acted=True)) == "young"


def test_a_running_operation_is_never_taken_over() -> None:
    assert own(claim("old", 1, acted=True), claim("young", 5, in_flight=True)) == "young"
    # ... even when the runner no longer selects the VM, or is being deleted.
    narrow = VMSelector.model_validate({"vmNames": ["other"]})
    assert own(claim("old", 1), claim("young", 5, selector=narrow, in_flight=True,
                                         deleting=True)) == "young"


def test_a_vmupdate_being_deleted_lets_go() -> None:
    assert own(claim("me", 5), claim("old", 1, deleting=True, acted=True)) == "me"


def test_dry_runs_own_nothing() -> None:
    assert own(claim("me", 5), claim("old", 1, dry_run=True, in_flight=True)) == "me"


def test_others_that_do_not_select_the_vm_do_not_count() -> None:
    by_name = VMSelector.model_validate({"vmNames": ["y*"]})
    by_version = VMSelector.model_validate({"qemuVersions": ["11.1"]})
    by_host = VMSelector.model_validate({"hostNames": ["b"]})
    for sel in (by_name, by_version, by_host):
        assert own(claim("me", 5), claim("old", 1, selector=sel)) == "me"


def test_an_older_one_selects_the_vm_on_its_target_whatever_the_versions() -> None:
    """Once the old one moved the VM to its target, its selector (by version) still covers it:
    the young one does not take the VM back."""
    by_version = VMSelector.model_validate({"qemuVersions": ["10.0"]})
    assert own(claim("me", 5), claim("old", 1, selector=by_version),
               the_vm=on_target("x")) == "old"


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)))
def test_exactly_one_owner_whoever_asks(flags: tuple[bool, ...]) -> None:
    """Both sides compute the same owner, for every combination of states."""
    a_acted, b_acted, a_running, b_running = flags
    if a_running and b_running:
        return  # cannot happen: starting needs ownership
    a = claim("a", 1, acted=a_acted, in_flight=a_running)
    b = claim("b", 2, acted=b_acted, in_flight=b_running)
    assert own(a, b) == own(b, a)


def test_claim_from_an_object_and_its_records() -> None:
    body: dict[str, Any] = {
        "metadata": {"name": "u", "uid": "uid-u", "creationTimestamp": "2025-06-01T12:00:00Z"},
        "spec": {"selector": {"vmNames": ["x"]}, "target": {"binary": NEW,
                                                           "version": NEW_VERSION}},
        "status": {"phase": "Progressing"},
    }
    record = record_from_body({
        "spec": {"vmUpdate": "u", "vmUpdateUid": "uid-u", "host": "a"},
        "status": {"vms": {
            "x": {"host": "a", "name": "x", "phase": "Updating", "operationId": "vmu-1"},
            "y": {"host": "a", "name": "y", "phase": "Updated", "operationId": "vmu-2"},
            "z": {"host": "a", "name": "z", "phase": "Updated"},  # already on target
            "w": {"host": "a", "name": "w", "phase": "Pending", "operationId": "vmu-3"},
            "v": {"host": "a", "name": "v", "phase": "RolledBack", "operationId": "vmu-4"},
        }},
    })
    assert record is not None and (record.uid, record.host) == ("uid-u", "a")
    assert [r.name for r in record.rows()] == ["x", "y", "z", "w", "v"]
    c = claim_from_body(body)
    assert c is not None and c.in_flight == frozenset() and c.acted == frozenset()
    assert (c.uid, c.name, c.created) == ("uid-u", "u", datetime(2025, 6, 1, 12, tzinfo=UTC))
    c = c.with_keys(record.in_flight, record.acted)
    assert c.in_flight == {("a", "x")} and c.acted == {("a", "y"), ("a", "v")}
    assert record_from_body({"spec": {"host": "a"}}) is None
    assert not c.deleting and not c.dry_run
    body["metadata"]["deletionTimestamp"] = "2025-06-01T13:00:00Z"
    again = claim_from_body(body)
    assert again is not None and again.deleting
    assert claim_from_body({"metadata": {"uid": "u"}, "spec": {"target": {}}}) is None


# --- in the planner -------------------------------------------------------------------------


def blocked_by_old() -> tuple[Claim, Claim]:
    return claim("me", 5), claim("old", 1, target=UpdateTarget(binary=ALT, version="11.1.3"))


def test_a_vm_owned_by_another_is_blocked_and_names_the_owner() -> None:
    me, old = blocked_by_old()
    plan = make_plan(spec(), [host("a", vm("x"), vm("y"))], me=me, others=[old],
                     uid=me.uid)
    rows = {r.name: r for r in plan.rows}
    assert rows["x"].phase == VMPhase.BLOCKED and rows["y"].phase == VMPhase.BLOCKED
    assert rows["x"].message is not None and "VMUpdate old" in rows["x"].message
    assert ALT in rows["x"].message and plan.started == ()


def test_only_the_vms_the_other_selects_are_blocked() -> None:
    me = claim("me", 5)
    old = claim("old", 1, selector=VMSelector.model_validate({"vmNames": ["x"]}))
    plan = make_plan(spec(), [host("a", vm("x"), vm("y"))], me=me, others=[old], uid=me.uid)
    assert {r.name: r.phase for r in plan.rows} == {"x": VMPhase.BLOCKED,
                                                    "y": VMPhase.PREFLIGHT}


def test_a_blocked_vm_is_pending_again_when_its_owner_is_gone() -> None:
    me, old = blocked_by_old()
    hosts = [host("a", vm("x"))]
    first = make_plan(spec(), hosts, me=me, others=[old], uid=me.uid)
    assert first.rows[0].phase == VMPhase.BLOCKED
    later = make_plan(spec(), hosts, first.rows, me=me, others=[], uid=me.uid)
    assert later.rows[0].phase == VMPhase.PREFLIGHT and later.started


def test_a_blocked_vm_already_on_the_target_is_updated_without_an_operation() -> None:
    me, old = blocked_by_old()
    plan = make_plan(spec(), [host("a", on_target("x"))], me=me, others=[old], uid=me.uid)
    assert plan.rows[0].phase == VMPhase.UPDATED and plan.rows[0].operation_id is None


def test_a_blocked_vm_that_leaves_the_selection_is_skipped() -> None:
    me, old = blocked_by_old()
    first = make_plan(spec(), [host("a", vm("x"))], me=me, others=[old], uid=me.uid)
    narrowed = spec(selector={"vmNames": ["y"]})
    later = make_plan(narrowed, [host("a", vm("x"))], first.rows, me=me, others=[old],
                      uid=me.uid)
    assert later.rows[0].phase == VMPhase.SKIPPED


def test_dry_runs_are_never_blocked() -> None:
    me, old = blocked_by_old()
    plan = make_plan(spec(dryRun=True), [host("a", vm("x"))], me=me, others=[old],
                     uid=me.uid)
    assert plan.rows[0].phase == VMPhase.PREFLIGHT


def test_the_condition_says_why() -> None:
    me, old = blocked_by_old()
    s = spec()
    plan = make_plan(s, [host("a", vm("x"))], me=me, others=[old], uid=me.uid)
    status = build_status(previous=None, spec=s, generation=1, plan=plan,
                          now=T0 + timedelta(seconds=1))
    assert status.phase == UpdatePhase.DEGRADED and status.blocked == 1
    for type_, value in (("Degraded", "True"), ("Ready", "False"), ("Progressing", "False")):
        c = find_condition(status.conditions, type_)
        assert c is not None and c.reason == Reason.OVERLAPPING_VMUPDATE
        assert c.status.value == value and "VMUpdate old" in c.message


# --- two VMUpdates, each planning against the other -----------------------------------------


class Side:
    def __init__(self, name: str, minute: int, target: UpdateTarget) -> None:
        self.name = name
        self.claim = claim(name, minute, target=target)
        self.spec = VMUpdateSpec.model_validate({
            "selector": {"hostSelector": {}},
            "target": target.to_wire(),
            "strategy": {"maxParallel": 10, "maxParallelPerHost": 10}})
        self.rows: tuple[VMRolloutStatus, ...] = ()

    def me(self) -> Claim:
        return self.claim.with_rows(self.rows)


def test_two_overlapping_vmupdates_update_a_vm_once() -> None:
    """The situation that moved a VM back and forth 28 times in a minute: both select it,
    each with another target. Agents finish each operation at once here."""
    a = Side("a", 1, UpdateTarget(binary=NEW, version=NEW_VERSION))
    b = Side("b", 2, UpdateTarget(binary=ALT, version=NEW_VERSION))
    current = vm("x")
    updates: list[str] = []
    now = T0
    for step in range(40):
        now += timedelta(seconds=3)
        side, other = (a, b) if step % 2 else (b, a)
        inventory = [HostInventory(name="a", labels={}, endpoint="127.0.0.1:1",
                                   heartbeat=now, vms=(current,))]
        plan = make_plan(side.spec, inventory, side.rows, me=side.me(),
                         others=[other.me()], uid=side.claim.uid, now=now)
        rows = list(plan.rows)
        for i, r in enumerate(rows):
            if r in plan.started:  # the agent updates it at once
                updates.append(side.name)
                t = side.spec.target
                current = current.model_copy(update={"binary": t.binary,
                                                     "qemu_version": t.version})
                rows[i] = r.model_copy(update={"phase": VMPhase.UPDATED, "finished_at": now})
        side.rows = tuple(rows)
    assert updates == ["a"]
    assert a.rows[0].phase == VMPhase.UPDATED
    assert b.rows[0].phase == VMPhase.BLOCKED and "VMUpdate a" in (b.rows[0].message or "")
