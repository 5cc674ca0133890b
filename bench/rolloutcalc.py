"""Pure parts of the real rollout benchmark: its plan (targets, per-host limit), the record
of one run from what was observed, and its table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .fleetcalc import ideal_ms
from .stats import markdown_table, summarize

MAX_PER_HOST = 64  # the CRD's bound of strategy.maxParallelPerHost


def per_host_limit(parallel: int, hosts: int) -> int:
    """maxParallelPerHost that lets `parallel` VMs run at once over `hosts` hosts."""
    if parallel < 1 or hosts < 1:
        raise ValueError("parallel and hosts: at least 1")
    return min(parallel, MAX_PER_HOST, math.ceil(parallel / hosts))


def targets_in_turn(flavours: tuple[str, str], runs: int) -> list[tuple[str, str]]:
    """(from, to) of each run: every run moves every VM, from the build the previous run
    left it on to the other one."""
    a, b = flavours
    return [(a, b) if i % 2 == 0 else (b, a) for i in range(runs)]


@dataclass(frozen=True)
class GuestCheck:
    """What one VM's guest showed across a run."""

    vm: str
    host: str
    same_token: bool
    continuous: bool
    checksums_ok: bool
    runs_target: bool
    problem: str = ""

    @property
    def ok(self) -> bool:
        return self.same_token and self.continuous and self.checksums_ok and self.runs_target


def run_record(*, hosts: int, vms_per_host: int, parallel: int, phase: str | None,
               total_ms: float, agent_ms: Sequence[float], pauses_ms: Sequence[float],
               guests: Sequence[GuestCheck], target: str) -> dict[str, Any]:
    """The record of one rollout. `agent_ms`: each VM's update as its agent timed it (its
    journal, accepted to finished); the ideal is their median per wave, the fewest waves
    `parallel` allows."""
    vms = hosts * vms_per_host
    per_host = per_host_limit(parallel, hosts)
    per_vm = summarize(agent_ms)
    ideal = (ideal_ms(vms, parallel, per_vm.median, hosts=hosts, per_host=per_host)
             if per_vm.n else math.nan)
    return {
        "hosts": hosts, "vms": vms, "parallel": parallel, "per_host": per_host,
        "target": target, "phase": phase, "total_ms": total_ms,
        "agent_ms": per_vm.as_dict(), "ideal_ms": ideal,
        "pause_ms": summarize(pauses_ms).as_dict(),
        "guests": [vars(g) | {"ok": g.ok} for g in guests],
        "guests_ok": sum(g.ok for g in guests),
    }


def _cell(d: dict[str, Any]) -> str:
    if not d.get("n"):
        return "—"
    return f"{d['median']:.1f} ({d['min']:.1f}–{d['max']:.1f})"


def rollout_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        ideal = r["ideal_ms"]
        factor = r["total_ms"] / ideal if ideal and not math.isnan(ideal) else math.nan
        rows.append([f"{r['hosts']} × {r['vms'] // r['hosts']}", r["parallel"], r["per_host"],
                     r["phase"], r["total_ms"] / 1000, ideal / 1000, factor,
                     _cell(r["agent_ms"]), _cell(r["pause_ms"]),
                     f"{r['guests_ok']}/{r['vms']}"])
    return markdown_table(["hosts × VMs", "parallel", "per host", "phase", "total s",
                           "ideal s", "× ideal", "one VM by its agent, ms",
                           "pause ms", "guests checked ok"], rows)
