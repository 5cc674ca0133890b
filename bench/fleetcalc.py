"""Pure arithmetic of the fleet benchmark: the ideal rollout time, Prometheus text, the API
server's audit log, /proc figures of the operator, and the fleet table."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .stats import markdown_table

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def ideal_ms(vms: int, parallel: int, per_vm_ms: float, canary: int = 0, *,
             hosts: int = 0, per_host: int = 0) -> float:
    """A rollout with no overhead: the canaries one by one, then waves of `parallel` VMs;
    with `hosts` (VMs spread evenly) and `per_host`, also no fewer waves than one host's
    VMs take `per_host` at a time."""
    if vms <= 0:
        return 0.0
    if parallel < 1:
        raise ValueError("parallel: at least 1")
    first = min(canary, vms)
    waves = math.ceil((vms - first) / parallel)
    if hosts > 0 and per_host > 0:
        waves = max(waves, math.ceil(math.ceil((vms - first) / hosts) / per_host))
    return (first + waves) * per_vm_ms


def record_ideal_ms(record: dict[str, Any]) -> float:
    """The ideal of a fleet record, from its own fields."""
    return ideal_ms(int(record["vms"]), int(record["parallel"]), float(record["per_vm_ms"]),
                    hosts=int(record["hosts"]), per_host=int(record.get("per_host", 0)))


def prometheus_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


@dataclass
class ApiCost:
    """Requests and bytes of request bodies one client sent to the API server."""

    requests: int = 0
    writes: int = 0
    write_bytes: int = 0
    by_verb: dict[str, int] = field(default_factory=dict)


def audit_costs(lines: Iterable[str]) -> dict[str, ApiCost]:
    """Per user name, from an audit log at level Request (one JSON event per line; only the
    ResponseComplete stage counts, so each request once). Bytes are the request object's
    compact JSON."""
    out: dict[str, ApiCost] = {}
    for line in lines:
        if not line.strip():
            continue
        ev = json.loads(line)
        if ev.get("stage") != "ResponseComplete":
            continue
        cost = out.setdefault(ev.get("user", {}).get("username", "?"), ApiCost())
        verb = str(ev.get("verb", "?"))
        cost.requests += 1
        cost.by_verb[verb] = cost.by_verb.get(verb, 0) + 1
        if verb in WRITE_VERBS:
            cost.writes += 1
            obj = ev.get("requestObject")
            if obj is not None:
                cost.write_bytes += len(json.dumps(obj, separators=(",", ":")))
    return out


def cpu_seconds(stat: str, ticks_per_second: int) -> float:
    """utime + stime of a /proc/<pid>/stat line."""
    rest = stat[stat.rfind(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / ticks_per_second


def machine_busy(stat_before: str, stat_after: str) -> float:
    """The share of all CPUs' time that was busy (not idle, not waiting for I/O) between two
    reads of /proc/stat, 0-1."""
    def split(text: str) -> tuple[int, int]:
        for line in text.splitlines():
            if line.startswith("cpu "):
                fields = [int(v) for v in line.split()[1:]]
                # user nice system idle iowait irq softirq steal (guest time is in user).
                counted = fields[:8]
                return sum(counted), counted[3] + counted[4]
        raise ValueError("no aggregate cpu line in /proc/stat")
    total0, idle0 = split(stat_before)
    total1, idle1 = split(stat_after)
    if total1 <= total0:
        return math.nan
    return 1 - (idle1 - idle0) / (total1 - total0)


def peak_rss_mib(status: str) -> float:
    """VmHWM of a /proc/<pid>/status text, MiB."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise ValueError("no VmHWM in the status text")


def fleet_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        vms = max(1, r["vms"])
        op = r["api"].get("operator", {})
        rows.append([
            f"{r['hosts']} × {r['vms'] // max(1, r['hosts'])}", r["parallel"], r["phase"],
            r["total_ms"] / 1000, r["ideal_ms"] / 1000,
            r["total_ms"] / r["ideal_ms"] if r["ideal_ms"] else math.nan,
            op.get("requests", 0) / vms, op.get("write_bytes", 0) / vms / 1024,
            r["operator_cpu_s"], r["operator_peak_rss_mib"],
            r["etcd_db_bytes"] / 2**20, r["vmupdate_bytes"] / 1024,
            r.get("record_bytes_max", math.nan) / 1024,
            r.get("failure_to_halt_ms", math.nan) / 1000,
            *_cpu_columns(r),
            (r.get("load_at_start") or [math.nan])[0]])
    return markdown_table(
        ["hosts × VMs", "parallel", "phase", "total s", "ideal s", "× ideal",
         "operator API requests / VM", "operator KiB written / VM", "operator CPU s",
         "operator peak RSS MiB", "etcd MiB", "VMUpdate KiB", "largest VMUpdateHost KiB",
         "failure → halt s", "machine CPU busy %",
         "CPU s in the rollout: operator / API server + etcd / simulated hosts",
         "load at start"], rows)


def _cpu_columns(r: dict[str, Any]) -> list[Any]:
    cpu = r.get("rollout_cpu_s")
    if not cpu:  # records from before these were measured
        return [math.nan, "—"]
    return [100 * r.get("machine_busy", math.nan),
            f"{cpu['operator']:.0f} / {cpu['control_plane']:.0f} / {cpu['simulated_hosts']:.0f}"]


def profile_top(collapsed: str, n: int = 25) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's collapsed stacks ("frame;frame;... count" per line): the ``n`` frames
    with the most samples on top of the stack (self) and anywhere in it (inclusive), each
    as a share of all samples."""
    own: dict[str, int] = {}
    anywhere: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            anywhere[frame] = anywhere.get(frame, 0) + samples
    if not total:
        return {"self": [], "inclusive": []}

    def top(counts: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        return [(frame, samples / total) for frame, samples in ranked]
    return {"self": top(own), "inclusive": top(anywhere)}


def parse_plan(text: str) -> list[tuple[int, int, int]]:
    """``--fleet-plan``: comma-separated ``PARALLEL:HOSTSxVMS`` (e.g. ``1:10x5,100:200x5``),
    a fleet size per parallelism; (parallel, hosts, VMs per host) each."""
    out = []
    for part in (t.strip() for t in text.split(",")):
        m = re.fullmatch(r"(\d+):(\d+)x(\d+)", part)
        if m is None:
            raise ValueError(f"{part!r}: PARALLEL:HOSTSxVMS, e.g. 100:200x5")
        parallel, hosts, vms = (int(g) for g in m.groups())
        if not (1 <= parallel <= 1000 and hosts >= 1 and 1 <= vms <= 512):
            raise ValueError(f"{part!r}: parallel 1-1000 (the CRD's maxParallel), at least one "
                             "host, 1-512 VMs per host (a VMHost's bound)")
        out.append((parallel, hosts, vms))
    if not out:
        raise ValueError("empty")
    return out


def heartbeat_s(hosts: int) -> float:
    """The simulated registrars' heartbeat: 10 s, slower for big fleets, so that their
    VMHost writes stay near 5 a second (the operator's host-stale-after is three of them)."""
    return max(10.0, hosts / 5)
