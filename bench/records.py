"""What every benchmark records beside its numbers: the machine, its load, the accelerator
and the versions; and the JSON document that holds it all."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

SCHEMA = 1


def _cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"


def _mem_total_mib(meminfo: str) -> int | None:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    """The host as a reader needs it to judge the numbers (no paths, no host name)."""
    return {
        "cpu": _cpu_model(_read("/proc/cpuinfo")),
        "cpus": os.cpu_count(),
        "mem_total_mib": _mem_total_mib(_read("/proc/meminfo")),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "loadavg": list(os.getloadavg()),
        "niceness": os.nice(0),
    }


def accelerator(query_kvm: dict[str, Any]) -> str:
    """TCG or KVM, from a running VM's answer to QMP `query-kvm`."""
    return "KVM" if query_kvm.get("enabled") else "TCG"


def document(benchmark: str, params: dict[str, Any], environment: dict[str, Any],
             results: list[dict[str, Any]], *, started: datetime.datetime,
             finished: datetime.datetime) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "params": params,
        "environment": environment,
        "results": results,
    }


def check_document(doc: Any) -> dict[str, Any]:
    """A document read back: the keys every report relies on, or ValueError naming it."""
    if not isinstance(doc, dict):
        raise ValueError("a benchmark record must be a JSON object")
    for key, kind in (("schema", int), ("benchmark", str), ("params", dict),
                      ("environment", dict), ("results", list)):
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"benchmark record: {key!r} missing or not a {kind.__name__}")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"benchmark record: schema {doc['schema']}, this code reads {SCHEMA}")
    return doc


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    return check_document(json.loads(path.read_text()))


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
