"""The incremental planner (``planning.Planner``) plans exactly what ``planning.plan`` plans
from scratch, step after step, on random fleets whose inventories, rows, spec and rivals
change between steps -- and it does look again at what changed."""

from __future__ import annotations

import dataclasses
import random
from datetime import timedelta

import pytest

from tests.operator.builders import NEW, NEW_VERSION, T0, UID, host, on_target, spec, vm
from vmupdate_api.crd.vmupdate import IN_PROGRESS_VM_PHASES, VMPhase, VMRolloutStatus
from vmupdate_api.crd.vmupdate_spec import UpdateTarget, VMSelector, VMUpdateSpec
from vmupdate_operator import planning
from vmupdate_operator.inventory import HostInventory
from vmupdate_operator.ownership import Claim

ME = Claim(uid=UID, name="me", created=T0, selector=VMSelector.model_validate({"hostSelector": {}}),
           target=UpdateTarget(binary=NEW, version=NEW_VERSION))
RIVAL = Claim(uid="uid-rival", name="rival", created=T0 - timedelta(days=1),
              selector=VMSelector.model_validate({"vmNames": ["vm1*"]}),
              target=UpdateTarget(binary="/opt/other/qemu", version="12.0.0"))
OUTCOMES = (VMPhase.UPDATED, VMPhase.UPDATED, VMPhase.UPDATED, VMPhase.FAILED,
            VMPhase.ROLLED_BACK)


def _inventory(rng: random.Random, name: str, now_s: int) -> HostInventory:
    vms = []
    for j in range(rng.randint(0, 6)):
        kind = rng.random()
        if kind < 0.15:
            vms.append(on_target(f"vm{j}", pid=100 + j))
        else:
            vms.append(vm(f"vm{j}", pid=100 + j, ready=kind > 0.25,
                          not_ready_reasons=() if kind > 0.25 else ("share=off",)))
    heartbeat = None if rng.random() < 0.05 else T0 + timedelta(seconds=now_s - rng.choice(
        (0, 0, 0, 1, 120)))
    return host(name, *vms, labels={"zone": rng.choice("ab")}, heartbeat=heartbeat,
                endpoint=None if rng.random() < 0.05 else "127.0.0.1:9443")


def _touched(rng: random.Random, inventory: HostInventory) -> HostInventory:
    """The same host with one small change: a VM's readiness or the agent's endpoint."""
    if inventory.vms and rng.random() < 0.6:
        vms = list(inventory.vms)
        i = rng.randrange(len(vms))
        vms[i] = vms[i].model_copy(update={"ready": not vms[i].ready})
        return dataclasses.replace(inventory, vms=tuple(vms))
    return dataclasses.replace(inventory, endpoint=None if inventory.endpoint else "[::1]:9443")


def _regrouped(before: list[tuple[str, planning.HostRows]], rows: tuple[VMRolloutStatus, ...]
               ) -> list[tuple[str, planning.HostRows]]:
    """``rows`` host by host, each host's tuple the one of ``before`` while its rows are the
    same (as the rollout loop keeps them)."""
    groups: dict[str, list[VMRolloutStatus]] = {}
    for r in rows:
        groups.setdefault(r.host, []).append(r)
    old = dict(before)
    out = []
    for name, host_rows in groups.items():
        kept = old.get(name, ())
        same = len(kept) == len(host_rows) and all(
            a is b for a, b in zip(kept, host_rows, strict=True))
        out.append((name, kept if same else tuple(host_rows)))
    return out


def _finish(rng: random.Random, row: VMRolloutStatus, now_s: int) -> VMRolloutStatus:
    phase = VMPhase.DRY_RUN_PASSED if row.operation_id is None else rng.choice(OUTCOMES)
    return row.model_copy(update={
        "phase": phase, "finished_at": T0 + timedelta(seconds=now_s),
        "pause_ms": rng.choice((10.0, 50.0, 5000.0)) if phase == VMPhase.UPDATED else None,
        "message": f"{phase.value} by the agent"})


def _spec(rng: random.Random) -> tuple[VMUpdateSpec, bool]:
    selector = rng.choice(({"hostSelector": {}}, {"hostSelector": {"matchLabels": {"zone": "a"}}},
                           {"vmNames": ["vm[0-3]"]}, {"qemuVersions": ["10.0"]}))
    strategy = {"maxParallel": rng.choice((2, 3, 10)), "maxParallelPerHost": rng.choice((1, 2)),
                "canary": rng.choice((0, 0, 1)), "pauseBudgetMs": rng.choice((1000, 100000)),
                **rng.choice(({"failurePolicy": "Continue"},
                               {"failurePolicy": "Halt", "maxFailures": rng.choice((0, 5))}))}
    dry_run = rng.random() < 0.15
    return spec(selector=selector, strategy=strategy, dryRun=dry_run,
                paused=rng.random() < 0.1), rng.random() < 0.3


@pytest.mark.parametrize(("seed", "max_rows"), [*((s, None) for s in range(40)),
                                               *((s, 12) for s in range(40, 60))])
def test_incremental_plans_equal_plans_from_scratch(seed: int, max_rows: int | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if max_rows is not None:  # VMs beyond the limit are dropped, whichever host they are on
        monkeypatch.setattr(planning, "MAX_VM_ROWS", max_rows)
    rng = random.Random(seed)
    hosts = [_inventory(rng, f"h{i}", 0) for i in range(rng.randint(1, 12))]
    the_spec, with_me = _spec(rng)
    planner = planning.Planner()
    rows: tuple[VMRolloutStatus, ...] = ()
    generation = observed = 1
    by_host: list[tuple[str, planning.HostRows]] = []
    for step in range(1, 25):
        now = T0 + timedelta(seconds=10 * step)  # an untouched host goes stale
        kwargs = {"uid": UID, "generation": generation, "observed_generation": observed,
                  "spec": the_spec, "hosts": list(hosts), "rows": rows, "now": now,
                  "hold": "deleting" if rng.random() < 0.05 else None,
                  "me": ME if with_me else None,
                  "others": [RIVAL] if rng.random() < 0.2 else []}
        grouped = by_host if rng.random() < 0.7 else None  # as the loop gives them, or not
        incremental = planner.plan(**kwargs, by_host=grouped)  # type: ignore[arg-type]
        assert incremental == planning.plan(**kwargs), f"step {step}"  # type: ignore[arg-type]
        if rng.random() < 0.9:  # else the writes failed: the same rows again
            rows, observed = incremental.rows, generation
            by_host = list(incremental.hosts)
        # The agents finish some operations; hosts change; now and then the spec does.
        rows = tuple(_finish(rng, r, 10 * step) if r.phase in IN_PROGRESS_VM_PHASES
                     and rng.random() < 0.5 else r for r in rows)
        by_host = _regrouped(by_host, rows)
        for i in range(len(hosts)):
            if rng.random() < 0.15:
                hosts[i] = _inventory(rng, hosts[i].name, 10 * step)
            elif rng.random() < 0.15:
                hosts[i] = _touched(rng, hosts[i])
        if rng.random() < 0.05:
            hosts.append(_inventory(rng, f"h{len(hosts)}", 10 * step))
        if rng.random() < 0.05 and hosts:
            hosts.pop(rng.randrange(len(hosts)))
        if rng.random() < 0.08:
            the_spec, with_me = _spec(rng)
            generation += rng.random() < 0.7  # the planner's result depends on the spec alone
        with_me ^= rng.random() < 0.1


def test_rows_limit_counts_the_rows_of_every_host_before(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning, "MAX_VM_ROWS", 3)
    hosts = [host(name, vm("x"), vm("y")) for name in ("a", "b", "c")]
    plan = planning.plan(uid=UID, generation=1, observed_generation=1, spec=spec(paused=True),
                         hosts=hosts, rows=(), now=T0)
    assert [(r.host, r.name) for r in plan.rows] == [("a", "x"), ("a", "y"), ("b", "x")]
    assert plan.dropped == 3


def test_rows_limit_counts_the_hosts_it_did_not_look_at_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning, "MAX_VM_ROWS", 3)
    planner = planning.Planner()
    hosts = [host("a", vm("x"), vm("y")), host("b", vm("x"))]
    first = planner.plan(uid=UID, generation=1, observed_generation=1, spec=spec(paused=True),
                         hosts=hosts, rows=(), now=T0)
    assert first.dropped == 0
    hosts.append(host("c", vm("x"), vm("y")))
    second = planner.plan(uid=UID, generation=1, observed_generation=1,
                          spec=spec(paused=True), hosts=hosts, rows=first.rows, now=T0)
    assert second.dropped == 2 and len(second.rows) == 3
    assert second == planning.plan(uid=UID, generation=1, observed_generation=1,
                                   spec=spec(paused=True), hosts=hosts, rows=first.rows, now=T0)


def test_a_host_unchanged_but_available_again_is_looked_at_again() -> None:
    planner = planning.Planner()
    hosts = [host("a", vm("y"), heartbeat=T0)]  # x is gone from it
    rows = (VMRolloutStatus(host="a", name="x"),)
    now = T0 + timedelta(seconds=600)
    kwargs = {"uid": UID, "generation": 1, "observed_generation": 1, "spec": spec(),
              "hosts": hosts, "now": now}
    stale = planner.plan(rows=rows, stale_after=timedelta(seconds=60), **kwargs)
    assert {r.name: r.phase for r in stale.rows}["x"] == VMPhase.PENDING  # nothing concluded
    rows = stale.rows
    again = planner.plan(rows=rows, stale_after=timedelta(seconds=60), **kwargs)
    assert again.rows == rows  # nothing changed: the planner need not look at it again
    fresh = planner.plan(rows=rows, stale_after=timedelta(seconds=6000), **kwargs)
    assert {r.name: r.phase for r in fresh.rows}["x"] == VMPhase.SKIPPED
