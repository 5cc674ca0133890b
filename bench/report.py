"""From the pause benchmark's records to its tables (pure: records in, markdown out)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .stats import Summary, markdown_table, paired_ratios, ratio, summarize

# The agent's phases (phase_ms keys: the time spent after each progress event until the
# next) and what each one holds, per mode. The pause runs from `stopping` to `resumed`.
PHASE_ORDER = ("start", "accepted", "preflight", "stopping", "execed", "transferred",
               "saved", "resumed", "verified", "total")
PHASE_MEANING = {
    "start": "connect, discovery",
    "accepted": "preflight checks",
    "preflight": "set-up before STOP (parameters; cpr-transfer: start the new QEMU)",
    "stopping": "STOP, save; cpr-exec: exec; cpr-reboot: save",
    "execed": "cpr-exec: new QEMU start-up + load, its version, the guard's commit",
    "transferred": "cpr-transfer: load in the new QEMU",
    "saved": "`cont` until RESUME (cpr-reboot: new QEMU start-up + load too)",
    "resumed": "verify version, pid, runstate",
    "verified": "finish",
    "total": "the whole operation",
}


def _s(result: dict[str, Any], key: str) -> Summary:
    return summarize(result["series"].get(key, []))


def _label(result: dict[str, Any]) -> str:
    return f"{result['method']} ({result['backend']})"


def by_size(results: Iterable[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """label -> RAM size (MiB) -> record; a later record of the same case wins."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        out.setdefault(_label(r), {})[int(r["mem_mib"])] = r
    return out


def _size(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


def pause_table(results: list[dict[str, Any]]) -> str:
    """Pause by method and RAM size: median (min–max) ms; plain migration's total time."""
    grid = by_size(results)
    sizes = sorted({int(r["mem_mib"]) for r in results})
    rows = []
    for label, cases in sorted(grid.items()):
        key = "plain_pause_ms" if label.startswith("plain") else "agent_pause_ms"
        rows.append([f"{label} pause", *(_s(cases[s], key).cell() if s in cases else "—"
                                         for s in sizes)])
        if label.startswith("plain"):
            rows.append([f"{label} total", *(_s(cases[s], "plain_total_ms").cell()
                                             if s in cases else "—" for s in sizes)])
    return markdown_table(["ms, median (min–max)", *(_size(s) for s in sizes)], rows)


def overhead_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Agent vs hand-made pause per CPR case: both summaries and the ratios."""
    rows = []
    for r in results:
        if r["method"] == "plain":
            continue
        agent, hand = _s(r, "agent_pause_ms"), _s(r, "handmade_pause_ms")
        unguarded = _s(r, "agent_unguarded_pause_ms")  # cpr-exec only; older records: none
        rows.append({"case": f"{_label(r)} {_size(int(r['mem_mib']))}", "agent": agent,
                     "handmade": hand, "ratio": ratio(agent, hand),
                     "paired": paired_ratios(r["series"]["agent_pause_ms"],
                                             r["series"]["handmade_pause_ms"]),
                     "unguarded": unguarded,
                     "unguarded_ratio": ratio(unguarded, hand) if unguarded.n else math.nan})
    return rows


def overhead_table(results: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["case", "agent ms", "hand-made ms", "ratio of medians", "round ratios",
         "agent without the guard ms", "its ratio of medians"],
        [[o["case"], o["agent"].cell(), o["handmade"].cell(), o["ratio"],
          o["paired"].cell(2), o["unguarded"].cell() if o["unguarded"].n else "—",
          o["unguarded_ratio"]] for o in overhead_rows(results)])


#: The issue's bound on the agent's pause over the hand-made one's, per mode.
OVERHEAD_BOUND = 1.05


def mode_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Agent vs hand-made pause per CPR mode, every case of the mode pooled (the pause does
    not grow with RAM size nor differ by backend, so its rounds are samples of one thing):
    the pooled medians' ratio, the round ratios, and how many cases are within the bound."""
    rows = []
    for method in sorted({r["method"] for r in results} - {"plain"}):
        cases = [r for r in results if r["method"] == method]
        agent = [v for r in cases for v in r["series"]["agent_pause_ms"]]
        hand = [v for r in cases for v in r["series"]["handmade_pause_ms"]]
        paired = [x for r in cases for x in (
            a / h for a, h in zip(r["series"]["agent_pause_ms"],
                                  r["series"]["handmade_pause_ms"], strict=False) if h > 0)]
        within = sum(1 for r in cases
                     if ratio(_s(r, "agent_pause_ms"), _s(r, "handmade_pause_ms"))
                     <= OVERHEAD_BOUND)
        rows.append({"mode": method, "cases": len(cases), "agent": summarize(agent),
                     "handmade": summarize(hand),
                     "ratio": ratio(summarize(agent), summarize(hand)),
                     "paired": summarize(paired), "cases_within": within})
    return rows


def mode_table(results: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["mode (cases pooled)", "rounds", "agent ms", "hand-made ms", "ratio of medians",
         "round ratios", f"cases at ≤ {OVERHEAD_BOUND:.2f}"],
        [[o["mode"], o["agent"].n, o["agent"].cell(), o["handmade"].cell(), o["ratio"],
          o["paired"].cell(2), f"{o['cases_within']} of {o['cases']}"]
         for o in mode_rows(results)])


def phase_summaries(phases: list[dict[str, float]]) -> dict[str, Summary]:
    """Per phase name, over the rounds that have it, in the agent's order."""
    names = [p for p in PHASE_ORDER if any(p in ph for ph in phases)]
    names += sorted({k for ph in phases for k in ph} - set(names))
    return {n: summarize(ph[n] for ph in phases if n in ph) for n in names}


def breakdown_table(results: list[dict[str, Any]]) -> str:
    """Per CPR case: each agent phase's median, the agent's pause, the hand-made pause and
    the floor (the new QEMU's start-up alone); what the agent adds is pause - hand-made."""
    rows = []
    for r in results:
        if r["method"] == "plain":
            continue
        phases = phase_summaries(r["phase_ms"])
        agent, hand, floor = (_s(r, k) for k in ("agent_pause_ms", "handmade_pause_ms",
                                                  "floor_ms"))
        added = agent.median - hand.median if agent.n and hand.n else math.nan
        rows.append([f"{_label(r)} {_size(int(r['mem_mib']))}",
                     "; ".join(f"{k} {v.median:.1f}" for k, v in phases.items()),
                     agent.cell(), hand.cell(), floor.cell(), added])
    return markdown_table(["case", "agent phases, median ms", "pause (agent)",
                           "pause (hand-made)", "floor: new QEMU to QMP greeting",
                           "agent adds, ms"], rows)


def machine_line(doc: dict[str, Any]) -> str:
    m = doc["environment"].get("machine", {})
    load = "/".join(f"{x:.1f}" for x in m.get("loadavg", []))
    return (f"{m.get('cpu')} ×{m.get('cpus')}, {m.get('mem_total_mib')} MiB, Linux "
            f"{m.get('kernel')}; load average at start {load}, niceness "
            f"{m.get('niceness')}; {doc['started']}")


def environment_lines(doc: dict[str, Any]) -> str:
    accels = sorted({str(r.get("accelerator")) for r in doc["results"]})
    versions = ", ".join(f"{k} {v}" for k, v in
                         sorted(doc["environment"].get("qemu", {}).items()))
    return (f"{machine_line(doc)}; accelerator {'/'.join(accels)}; QEMU {versions}; "
            f"{doc['params'].get('rounds')} rounds")


def short_title(doc: dict[str, Any]) -> str:
    """One line for a plot: accelerator, CPUs, load, rounds, date."""
    m = doc["environment"].get("machine", {})
    accels = "/".join(sorted({str(r.get("accelerator")) for r in doc["results"]}))
    load = (m.get("loadavg") or [math.nan])[0]
    return (f"{accels}, {m.get('cpus')} CPUs, load {load:.1f}, {doc['params'].get('rounds')} "
            f"rounds, {doc['started'][:10]}")
