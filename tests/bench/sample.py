"""A small pause record of the shape `bench.pause.run_case` writes, built by hand."""

from __future__ import annotations

import datetime
from typing import Any

from bench import records


def cpr(method: str, backend: str, mem_mib: int, agent: list[float], hand: list[float],
        floor: list[float]) -> dict[str, Any]:
    return {"method": method, "backend": backend, "mem_mib": mem_mib, "flavour": "sid",
            "qemu_version": "11.1.3", "accelerator": "TCG", "rounds": len(agent),
            "series": {"agent_pause_ms": agent, "handmade_pause_ms": hand,
                       "floor_ms": floor, "plain_pause_ms": [], "plain_total_ms": []},
            "phase_ms": [{"start": 10.0, "stopping": 20.0 + i, "execed": 30.0,
                          "saved": 5.0, "total": 70.0 + i} for i in range(len(agent))],
            "guest_checked": True}


def plain(backend: str, mem_mib: int, pause: list[float], total: list[float]
          ) -> dict[str, Any]:
    return {"method": "plain", "backend": backend, "mem_mib": mem_mib, "flavour": "sid",
            "qemu_version": "11.1.3", "accelerator": "TCG", "rounds": len(pause),
            "series": {"agent_pause_ms": [], "handmade_pause_ms": [], "floor_ms": [],
                       "plain_pause_ms": pause, "plain_total_ms": total},
            "phase_ms": [], "guest_checked": True}


def results() -> list[dict[str, Any]]:
    return [
        cpr("cpr-exec", "memfd", 256, [50.0, 60.0, 55.0], [50.0, 50.0, 50.0], [20.0, 22.0]),
        cpr("cpr-exec", "memfd", 1024, [52.0], [49.0], [21.0]),
        cpr("cpr-reboot", "file", 256, [90.0, 100.0], [80.0, 100.0], [30.0, 30.0]),
        plain("memfd", 256, [15.0, 17.0, 16.0], [1100.0, 1200.0, 1000.0]),
        plain("memfd", 1024, [18.0], [4000.0]),
    ]


def document() -> dict[str, Any]:
    t = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    env = {"machine": {"cpu": "Test CPU", "cpus": 2, "mem_total_mib": 4096, "kernel": "6.1",
                       "python": "3.11", "loadavg": [1.0, 1.0, 1.0], "niceness": 19},
           "qemu": {"sid": "QEMU emulator version 11.1.3"}}
    return records.document("pause", {"rounds": 3, "sizes_mib": [256, 1024]}, env,
                            results(), started=t, finished=t)
