"""One command for the benchmarks: `python -m bench --out DIR [options]`.

Runs the pause benchmark (every mode and backend at every RAM size, beside a plain
migration; the agent against the hand-made QMP sequence; the phases and the floor), then the
fleet benchmark (simulated agents, the real operator, API server and etcd; every
parallelism, then one run with failures). Prints the tables, writes `pause.json`,
`pause.md`, `fleet.json`, `fleet.md` and the PNG plots into DIR. Run it niced on a machine
that is otherwise quiet (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, cast, get_args

from e2e.rig import load_rig
from e2e.rig.config import Flavour
from e2e.rig.vm import Backend
from vmupdate_agent import engine, reaper

from . import fleetcalc, plots, records, report, rolloutcalc
from .fleet import FleetParams, run_fleet
from .pause import METHODS, Method, available_mib, plan_cases, room_problem, run_case
from .rollout import RolloutParams, run_rollouts
from .simagent import Replay, replay_from_record

FULL_SIZES = "256,1024,4096,8192"
# A fleet per parallelism, so that the whole series finishes in minutes here: parallelism 1
# over 20,000 VMs would take at least 40 minutes of replayed updates alone.
DEFAULT_FLEET_PLAN = "1:10x3,10:50x10,100:200x10,1000:1000x20"


def _list(kind: str, allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{kind}: {', '.join(bad) or 'empty'} not among {', '.join(allowed)}")
        return items
    return parse


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: {text!r} is not a comma-separated list "
                                         f"of MiB, e.g. {FULL_SIZES}") from None
    if not sizes or any(s < 64 or s > 1024 * 1024 for s in sizes):
        raise argparse.ArgumentTypeError("--sizes: each size is MiB between 64 and 1048576")
    return sizes


def _counts(flag: str) -> Any:
    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            values = []
        if not values or any(v < 1 or v > 1000 for v in values):
            raise argparse.ArgumentTypeError(f"{flag}: {text!r}: comma-separated numbers "
                                             "from 1 to 1000 (the CRD's maxParallel)")
        return values
    return parse


def _plan(text: str) -> list[tuple[int, int, int]]:
    try:
        return fleetcalc.parse_plan(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--fleet-plan: {e}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for JSON, tables, PNGs")
    p.add_argument("--sizes", type=_sizes, default=_sizes(FULL_SIZES),
                   help=f"guest RAM sizes, MiB (default {FULL_SIZES})")
    p.add_argument("--rounds", type=int, default=10, help="rounds per case (default 10)")
    p.add_argument("--methods", type=_list("--methods", METHODS), default=list(METHODS))
    p.add_argument("--backends", type=_list("--backends", get_args(Backend)),
                   default=list(get_args(Backend)))
    p.add_argument("--from-json", type=Path, metavar="JSON",
                   help="measure nothing: tables (and plots) again from an earlier "
                   "pause.json or fleet.json")
    p.add_argument("--only", choices=("pause", "fleet", "rollout"),
                   help="one benchmark (default: all three)")
    p.add_argument("--fleet-hosts", type=int, help="simulated hosts, the same fleet at "
                   "every --fleet-parallel (1000 when only the others are given)")
    p.add_argument("--fleet-vms-per-host", type=int, help="VMs per host (20)")
    p.add_argument("--fleet-parallel", type=_counts("--fleet-parallel"),
                   help="maxParallel of each fleet run (1,10,100,1000)")
    p.add_argument("--fleet-plan", type=_plan, metavar="P:HxV,...",
                   help="a fleet size per parallelism (default, when none of "
                        f"--fleet-hosts/--fleet-vms-per-host/--fleet-parallel is given: "
                        f"{DEFAULT_FLEET_PLAN})")
    p.add_argument("--fleet-profile", action="store_true",
                   help="sample the operator with py-spy (installed beside python)")
    p.add_argument("--fleet-replay", type=Path, metavar="PAUSE_JSON",
                   help="phase timings for the simulated agents (default: this run's "
                        "cpr-exec/memfd at its smallest size; else built-in ones)")
    p.add_argument("--rollout-hosts", type=int, default=3,
                   help="real rollout: simulated hosts, each a real agent (3)")
    p.add_argument("--rollout-vms-per-host", type=int, default=4,
                   help="real rollout: real VMs per host (4)")
    p.add_argument("--rollout-parallel", type=_counts("--rollout-parallel"),
                   default=[1, 3, 6],
                   help="real rollout: maxParallel of each run (default 1,3,6)")
    p.add_argument("--rollout-mem", type=int, default=256,
                   help="real rollout: guest RAM of each VM, MiB (256)")
    p.add_argument("--flavour", choices=get_args(Flavour), default="sid",
                   help="the rig's QEMU for old and new (default sid: all three modes)")
    return p


async def run_pause(args: argparse.Namespace) -> dict[str, Any]:
    # Stand in for the host's init, as the agent does on a host: the VMs are started
    # detached and are orphans once their QEMU is replaced; reaping them at once keeps the
    # host's own reaping delay out of every sequence that waits for the old QEMU to go.
    reaper.become_subreaper()
    orphans = asyncio.create_task(reaper.OrphanReaper(interval=0.02, grace=0.2).run())
    try:
        return await _run_pause(args)
    finally:
        orphans.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await orphans


async def _run_pause(args: argparse.Namespace) -> dict[str, Any]:
    cases = plan_cases(cast(list[Method], args.methods), cast(list[Backend], args.backends),
                       args.sizes)
    with open("/proc/meminfo") as f:
        free = available_mib(f.read())
    # Refused before the first VM boots, not an hour in (each case checks again at its start).
    problems = [p for c in cases if (p := room_problem(c, free)) is not None]
    if problems:
        raise SystemExit("\n".join(problems))
    rig = load_rig()
    started = records.now()
    env: dict[str, Any] = {"machine": records.machine(),
           "qemu": {f: rig.qemu(f).version_line for f in get_args(Flavour)}}
    runtime_dir = Path(rig.share) / "bench" / uuid.uuid4().hex[:8]
    runtime_dir.mkdir(parents=True)
    engine.install_guard(str(runtime_dir))  # built before the first round, not inside it
    results = []
    try:
        for case in cases:
            results.append(await run_case(rig, case, flavour=args.flavour, rounds=args.rounds,
                                          runtime_dir=runtime_dir, log=_log))
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
    env["loadavg_at_end"] = list(records.machine()["loadavg"])
    params = {"sizes_mib": args.sizes, "rounds": args.rounds, "methods": args.methods,
              "backends": args.backends, "flavour": args.flavour}
    return records.document("pause", params, env, results, started=started,
                            finished=records.now())


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def write_pause_outputs(doc: dict[str, Any], out: Path) -> str:
    """pause.json, pause.md (the tables) and the PNGs; returns the markdown."""
    records.write_json(out / "pause.json", doc)
    env = report.environment_lines(doc)
    results = doc["results"]
    text = "\n".join([
        f"Measured: {env}\n",
        "## Pause by mode and RAM size, beside a plain migration\n",
        report.pause_table(results),
        "## The agent against the hand-made QMP sequence, per mode\n",
        report.mode_table(results),
        "## The agent against the hand-made QMP sequence, per case\n",
        report.overhead_table(results),
        "## What the pause is made of, against the floor\n",
        report.breakdown_table(results),
    ])
    (out / "pause.md").write_text(text)
    title = report.short_title(doc)
    plots.pause_vs_ram(results, out / "pause-vs-ram.png", title)
    plots.agent_vs_handmade(results, out / "agent-vs-handmade.png", title)
    return text


def fleet_replay(pause_doc: dict[str, Any] | None) -> Replay:
    """cpr-exec on memfd at the smallest size measured, if the record has it."""
    if pause_doc is None:
        return Replay()
    cases = sorted((r for r in pause_doc["results"] if r["method"] == "cpr-exec"
                    and r["backend"] == "memfd" and r["phase_ms"]),
                   key=lambda r: int(r["mem_mib"]))
    return replay_from_record(cases[0]) if cases else Replay()


def fleet_plan(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """(parallel, hosts, VMs per host) of each fleet run."""
    if args.fleet_plan is not None:
        return list(args.fleet_plan)
    if (args.fleet_hosts, args.fleet_vms_per_host, args.fleet_parallel) == (None, None, None):
        return fleetcalc.parse_plan(DEFAULT_FLEET_PLAN)
    return [(n, args.fleet_hosts or 1000, args.fleet_vms_per_host or 20)
            for n in args.fleet_parallel or [1, 10, 100, 1000]]


async def run_fleets(args: argparse.Namespace, replay: Replay) -> dict[str, Any]:
    started = records.now()
    env: dict[str, Any] = {"machine": records.machine()}
    plan = fleet_plan(args)
    runs = [(FleetParams(hosts=h, vms_per_host=v, parallel=n, replay=replay,
                         heartbeat_s=fleetcalc.heartbeat_s(h), profile=args.fleet_profile),
             f"p{n}") for n, h, v in plan]
    # The halt: every second VM of every host fails (the second wave, all at once); the
    # first failure must stop the rollout.
    worst = max(runs, key=lambda run: run[0].parallel)[0]
    runs.append((replace(worst, fail_every=min(2, worst.vms_per_host)),
                 f"p{worst.parallel}-fail"))
    results = []
    workroot = Path(load_rig().share) / "bench" / f"fleet-{uuid.uuid4().hex[:8]}"
    try:
        for run, tag in runs:
            record = await run_fleet(run, workroot / tag)
            _log(f"fleet {tag}: {record['phase']} in {record['total_ms'] / 1000:.1f}s "
                 f"(ideal {record['ideal_ms'] / 1000:.1f}s)")
            results.append(record)
            # Kept as it goes: a long series cut short still leaves its runs.
            records.write_json(args.out / "fleet.partial.json", {"results": results})
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    env["loadavg_at_end"] = list(records.machine()["loadavg"])
    params = {"plan": [{"parallel": n, "hosts": h, "vms_per_host": v} for n, h, v in plan],
              "replay": {"mode": replay.mode,
              "phases_ms": dict(replay.phases), "pause_ms": replay.pause_ms}}
    return records.document("fleet", params, env, results, started=started,
                            finished=records.now())


def write_fleet_outputs(doc: dict[str, Any], out: Path) -> str:
    for record in doc["results"]:  # derived: one rule, applied to old records too
        record["ideal_ms"] = fleetcalc.record_ideal_ms(record)
    records.write_json(out / "fleet.json", doc)
    text = (f"Measured: {report.machine_line(doc)}\n\n"
            f"## One VMUpdate for the fleet\n\n{fleetcalc.fleet_table(doc['results'])}")
    (out / "fleet.md").write_text(text)
    load = (doc["environment"].get("machine", {}).get("loadavg") or [0.0])[0]
    plots.fleet_vs_ideal(doc["results"], out / "fleet-vs-ideal.png",
                         f"simulated agents, load {load:.1f}, {doc['started'][:10]}")
    return text


async def run_rollout(args: argparse.Namespace) -> dict[str, Any]:
    params = RolloutParams(hosts=args.rollout_hosts, vms_per_host=args.rollout_vms_per_host,
                           parallel=tuple(args.rollout_parallel), mem_mib=args.rollout_mem)
    workroot = Path(load_rig().share) / "bench" / f"rollout-{uuid.uuid4().hex[:8]}"
    reaper.become_subreaper()  # the VMs are detached: reap them at once, as on a host
    orphans = asyncio.create_task(reaper.OrphanReaper(interval=0.05, grace=0.5).run())
    try:
        return await run_rollouts(params, workroot, _log)
    finally:
        orphans.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await orphans
        shutil.rmtree(workroot, ignore_errors=True)


def write_rollout_outputs(doc: dict[str, Any], out: Path) -> str:
    records.write_json(out / "rollout.json", doc)
    text = (f"Measured: {report.machine_line(doc)}; accelerator "
            f"{doc['environment'].get('accelerator')}\n\n"
            f"## A small real rollout\n\n{rolloutcalc.rollout_table(doc['results'])}")
    (out / "rollout.md").write_text(text)
    load = (doc["environment"].get("machine", {}).get("loadavg") or [0.0])[0]
    plots.fleet_vs_ideal(doc["results"], out / "rollout-vs-ideal.png",
                         f"real VMs and agents, load {load:.1f}, {doc['started'][:10]}")
    return text


WRITERS = {"pause": write_pause_outputs, "fleet": write_fleet_outputs,
           "rollout": write_rollout_outputs}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.rounds < 1:
        parser().error("--rounds: at least 1")
    if any(n is not None and n < 1 for n in (args.fleet_hosts, args.fleet_vms_per_host)):
        parser().error("--fleet-hosts, --fleet-vms-per-host: at least 1")
    if args.fleet_plan is not None and (args.fleet_hosts, args.fleet_vms_per_host,
                                        args.fleet_parallel) != (None, None, None):
        parser().error("--fleet-plan: give it, or --fleet-hosts/--fleet-vms-per-host/"
                       "--fleet-parallel, not both")
    if not 1 <= args.rollout_hosts <= 16 or not 1 <= args.rollout_vms_per_host <= 16:
        parser().error("--rollout-hosts, --rollout-vms-per-host: 1 to 16 (real VMs)")
    if not 64 <= args.rollout_mem <= 8192:
        parser().error("--rollout-mem: 64 to 8192 MiB")
    doc: dict[str, Any] | None = None
    if args.from_json is not None:
        try:
            doc = records.read_json(args.from_json)
        except (OSError, ValueError) as e:
            parser().error(f"--from-json: {args.from_json}: {e}")
        if doc["benchmark"] not in WRITERS:
            parser().error(f"--from-json: a {doc['benchmark']!r} record; this reads "
                           f"{', '.join(WRITERS)}")
        print(WRITERS[doc["benchmark"]](doc, args.out))
        return 0
    if args.only in (None, "pause"):
        doc = asyncio.run(run_pause(args))
        print(write_pause_outputs(doc, args.out))
    if args.only in (None, "fleet"):
        source = doc
        if args.fleet_replay is not None:
            try:
                source = records.read_json(args.fleet_replay)
            except (OSError, ValueError) as e:
                parser().error(f"--fleet-replay: {args.fleet_replay}: {e}")
        fleet = asyncio.run(run_fleets(args, fleet_replay(source)))
        print(write_fleet_outputs(fleet, args.out))
    if args.only in (None, "rollout"):
        print(write_rollout_outputs(asyncio.run(run_rollout(args)), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
