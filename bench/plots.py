"""PNG plots of the pause benchmark's records (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .report import by_size, overhead_rows
from .stats import summarize


def pause_vs_ram(results: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Median pause (bars from min to max) against RAM size, one line per method/backend."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, cases in sorted(by_size(results).items()):
        key = "plain_pause_ms" if label.startswith("plain") else "agent_pause_ms"
        sizes = sorted(cases)
        sums = [summarize(cases[s]["series"][key]) for s in sizes]
        xs = [s / 1024 for s in sizes]
        ax.errorbar(xs, [m.median for m in sums],
                    yerr=[[m.median - m.min for m in sums], [m.max - m.median for m in sums]],
                    marker="o", capsize=3, label=label)
        if label.startswith("plain"):
            totals = [summarize(cases[s]["series"]["plain_total_ms"]) for s in sizes]
            ax.plot(xs, [m.median for m in totals], "x--", label=f"{label}: total time")
    ax.set_xlabel("guest RAM, GiB")
    ax.set_ylabel("guest pause, ms (median, min–max)")
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def agent_vs_handmade(results: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Per CPR case: the agent's median pause beside the hand-made one's, and the floor."""
    rows = overhead_rows(results)
    floors = [summarize(r["series"]["floor_ms"]) for r in results if r["method"] != "plain"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows)), 4.5))
    xs = list(range(len(rows)))
    width = 0.27
    for offset, name, values in (
            (-width, "agent", [o["agent"].median for o in rows]),
            (0.0, "hand-made QMP", [o["handmade"].median for o in rows]),
            (width, "floor (new QEMU start-up)", [f.median for f in floors])):
        ax.bar([x + offset for x in xs], values, width, label=name)
    for x, o in zip(xs, rows, strict=True):
        ax.annotate(f"{o['ratio']:.2f}×", (x - width, o["agent"].median),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, [o["case"] for o in rows], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("ms, median (log scale)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def fleet_vs_ideal(results: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Rollout time against the ideal, per parallelism (runs without injected failures)."""
    runs = sorted((r for r in results if not r.get("fail_every")), key=lambda r: r["parallel"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [r["parallel"] for r in runs]
    ax.plot(xs, [r["total_ms"] / 1000 for r in runs], "o-", label="measured")
    ax.plot(xs, [r["ideal_ms"] / 1000 for r in runs], "x--", label="ideal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("maxParallel")
    ax.set_ylabel("rollout time, s")
    vms = {r["vms"] for r in runs}
    ax.set_title(f"{title}; {'/'.join(str(v) for v in sorted(vms))} VMs", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
