"""`vmupdate-agent`: the agent's operations for a person on a host, without Kubernetes.

    vmupdate-agent inventory                    the VMs on this host and their CPR readiness
    vmupdate-agent preflight VM --binary PATH   every check, pass or fail, with the reason
    vmupdate-agent update VM --binary PATH      update one VM in place, with live progress
    vmupdate-agent serve --config FILE          run the gRPC service (what the DaemonSet runs)

Settings come from --config (the agent's YAML) or from flags. Output is for people unless
--json is given. Exit codes: 0 done, 1 refused/failed (VM untouched), 2 bad usage,
3 rolled back (VM running on its old QEMU), 4 VM lost.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from vmupdate_agent import config as agent_config
from vmupdate_agent import discovery, engine, hostexec, preflight, reaper
from vmupdate_agent.engine import Timeouts, UpdateAborted
from vmupdate_agent.models import Outcome, Preference, ProgressEvent, RequestedMode, Target
from vmupdate_agent.qmp import QmpError

DEFAULT_CONFIG = "/etc/vmupdate/agent.yaml"
EXIT = {Outcome.UPDATED: 0, Outcome.FAILED: 1, Outcome.ROLLED_BACK: 3, Outcome.LOST: 4}


class UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmupdate-agent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"agent configuration (default {DEFAULT_CONFIG} if it "
                   "exists)")
    p.add_argument("--socket-glob", action="append", default=[],
                   help="where QMP sockets are (repeatable); overrides the configuration")
    p.add_argument("--allowed-dir", action="append", default=[],
                   help="directory targets may come from (repeatable)")
    p.add_argument("--runtime-dir", help="state files and guard; visible to QEMU at the same "
                   "path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("inventory", help="list the VMs on this host")
    for name in ("preflight", "update"):
        c = sub.add_parser(name, help=f"{name} one VM")
        c.add_argument("vm", help="VM name, uuid or QMP socket path")
        c.add_argument("--binary", required=True, help="absolute path of the new QEMU")
        c.add_argument("--version", dest="expected_version", help="expected QEMU version")
        c.add_argument("--sha256", help="expected sha256 of the binary")
        c.add_argument("--mode", default="auto", choices=[m.value for m in RequestedMode])
        c.add_argument("--prefer", default=Preference.SAME_PID.value,
                       choices=[p.value for p in Preference],
                       help="what Auto values: the same pid (cpr-exec) or the shortest pause "
                       "(cpr-transfer)")
        c.add_argument("--extra-arg", action="append", default=[],
                       help="argument appended to the new QEMU's command line (repeatable)")
        if name == "update":
            c.add_argument("--op-id", help="operation id (default: random)")
            c.add_argument("--skip-preflight", action="store_true",
                           help="do not run the checks (the guard still protects cpr-exec)")
            c.add_argument("--no-guard", action="store_true",
                           help="cpr-exec without the guard: a failed exec loses the VM")
        else:
            c.add_argument("--no-dry-run", action="store_true")
    s = sub.add_parser("serve", help="run the gRPC service")
    # Accepted after the subcommand too (`serve --config FILE`, the DaemonSet's spelling).
    s.add_argument("--config", dest="serve_config", help="agent configuration")
    return p


def _settings(args: argparse.Namespace) -> tuple[agent_config.AgentConfig | None,
                                                 list[str], engine.EngineSettings]:
    cfg = None
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    if path:
        cfg = agent_config.load(path)
    globs = args.socket_glob or (cfg.socket_globs if cfg else [])
    allowed = tuple(args.allowed_dir or (cfg.allowed_binary_dirs if cfg else []))
    runtime = args.runtime_dir or (cfg.runtime_dir if cfg else "/run/vmupdate")
    if not runtime.startswith("/"):
        raise UsageError(f"--runtime-dir must be absolute, got {runtime!r}")
    host = hostexec.HostContext(
        prefix=tuple(cfg.host_exec_prefix) if cfg else hostexec.DEFAULT_PREFIX,
        detach=tuple(cfg.detach_prefix) if cfg else hostexec.DEFAULT_DETACH)
    timeouts = Timeouts()
    if cfg:
        t = cfg.timeouts
        timeouts = Timeouts(command=t.qmp_command_s, handover=t.handover_s, load=t.load_s,
                            guard_commit=t.guard_commit_s)
    settings = engine.EngineSettings(allowed_dirs=allowed, runtime_dir=runtime,
                                     host=host, timeouts=timeouts)
    return cfg, globs, settings


def _target(args: argparse.Namespace) -> Target:
    if not args.binary.startswith("/"):
        raise UsageError(f"--binary must be an absolute path, got {args.binary!r}")
    return Target(binary=args.binary, expected_version=args.expected_version,
                  sha256=args.sha256, extra_args=tuple(args.extra_arg))


def _print(args: argparse.Namespace, data: Any, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(human)


async def _inventory(args: argparse.Namespace, globs: list[str]) -> int:
    if not globs:
        raise UsageError("no QMP socket globs: pass --socket-glob or --config")
    rows = await discovery.inventory(globs)
    out: list[dict[str, Any]] = []
    lines: list[str] = []
    for path, info, err in rows:
        if info is None:
            out.append({"socket": path, "error": err})
            lines.append(f"{path}: cannot inspect: {err}")
            continue
        ready = preflight.readiness(info)
        out.append({"vm": info.model_dump(mode="json"), "readiness": ready.model_dump(mode="json")})
        lines.append(f"{info.name:<20} pid {info.pid:<8} QEMU {info.features.version!s:<8} "
                     f"{info.machine_type:<14} {info.memory_bytes >> 20:>6} MiB "
                     f"{info.runstate:<8} modes: {','.join(ready.modes) or '-':<24} "
                     f"{'ready' if ready.ready else 'NOT READY'}")
        lines.extend(f"    - {r}" for r in ready.reasons)
    _print(args, out, "\n".join(lines) or "no VMs found")
    return 0


async def _resolve(args: argparse.Namespace, globs: list[str]) -> str:
    info = await engine.find_vm(globs, args.vm)
    return info.qmp_path


async def _preflight(args: argparse.Namespace, globs: list[str],
                     settings: engine.EngineSettings) -> int:
    eng = engine.Engine(settings)
    report = await eng.preflight(await _resolve(args, globs), _target(args),
                                 RequestedMode(args.mode), dry_run=not args.no_dry_run,
                                 prefer=Preference(args.prefer))
    lines = [f"{report.vm}: {'PASS' if report.passed else 'FAIL'} ({report.mode_reason})"]
    lines += [f"  [{'ok' if c.passed else 'FAIL'}] {c.name}: {c.message}" for c in report.checks]
    _print(args, report.model_dump(mode="json"), "\n".join(lines))
    return 0 if report.passed else 1


async def _update(args: argparse.Namespace, globs: list[str],
                  settings: engine.EngineSettings) -> int:
    settings = engine.EngineSettings(
        allowed_dirs=settings.allowed_dirs, runtime_dir=settings.runtime_dir,
        guard_path=None if args.no_guard else engine.install_guard(
            settings.runtime_dir, os.environ.get("VMUPDATE_GUARD_BINARY")),
        host=settings.host, timeouts=settings.timeouts)
    reaper.become_subreaper()
    orphan_reaper = reaper.OrphanReaper()
    reaping = asyncio.create_task(orphan_reaper.run())

    def show(ev: ProgressEvent) -> None:
        if not args.json:
            print(f"  {ev.phase.value:<11} {ev.message}", flush=True)

    try:
        result = await engine.Engine(settings).update(
            await _resolve(args, globs), _target(args), RequestedMode(args.mode),
            op_id=args.op_id, skip_preflight=args.skip_preflight,
            use_guard=not args.no_guard, progress=show, prefer=Preference(args.prefer))
    finally:
        reaping.cancel()
    pause = f"{result.pause_ms:.0f} ms" if result.pause_ms is not None else "unknown"
    human = (f"{result.vm}: {result.outcome.value} — {result.message}\n"
             f"  mode {result.mode}, pid {result.pid_before} -> {result.pid_after}, QEMU "
             f"{result.version_before} -> {result.version_after}, guest pause {pause}")
    _print(args, result.model_dump(mode="json"), human)
    return EXIT[result.outcome]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "serve_config", None):
        args.config = args.serve_config
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # qemu.qmp logs every refused connection while the agent waits for a new QEMU.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        cfg, globs, settings = _settings(args)
        if args.command == "serve":
            if cfg is None:
                raise UsageError("serve needs --config")
            # The service pulls in grpc; the other commands do not need it.
            server = importlib.import_module("vmupdate_agent.server")
            return int(server.main_with_config(cfg))
        if args.command == "inventory":
            return asyncio.run(_inventory(args, globs))
        if not globs and not args.vm.startswith("/"):
            raise UsageError("no QMP socket globs to find the VM: pass --socket-glob, "
                             "--config, or the VM's socket path")
        if args.command == "preflight":
            return asyncio.run(_preflight(args, globs, settings))
        return asyncio.run(_update(args, globs, settings))
    except (UsageError, agent_config.ConfigError, LookupError) as exc:
        print(f"vmupdate-agent: {exc}", file=sys.stderr)
        return 2
    except (QmpError, UpdateAborted, OSError) as exc:
        print(f"vmupdate-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
