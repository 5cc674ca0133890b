"""`vmupdate-agent`: the agent's operations for a person on a host, without Kubernetes.

    vmupdate-agent inventory                    the VMs on this host and their CPR readiness
    vmupdate-agent preflight VM --binary PATH   every check, pass or fail, with the reason
    vmupdate-agent update VM --binary PATH      update one VM in place, with live progress
    vmupdate-agent serve --config FILE          run the gRPC service (what the DaemonSet runs)

Settings come from --config (the agent's YAML) or from flags. Output is for people unless
--json is given. Exit codes: 0 done, 1 refused/failed (VM untouched), 2 bad usage,
3 rolled back (VM running on its old QEMU), 4 VM lost, 5 the VM is busy with another
operation (the message names it; nothing was done).

`update` and `preflight` take the same way in as the gRPC service (operations.py): the same
admission and binary checks, the VM's lock (shared with the service through the state dir,
so the two never run on one VM at once), the journal (`<state-dir>/operations/`), and
recovery: an update left running by a process that died (a killed CLI, or a service not
restarted) is finished or rolled back first, and the CLI says what it found.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import importlib
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from pydantic import ValidationError

from vmupdate_agent import admission, discovery, engine, hostexec, preflight, reaper, vmlock
from vmupdate_agent import config as agent_config
from vmupdate_agent.engine import Timeouts, UpdateAborted
from vmupdate_agent.journal import Journal
from vmupdate_agent.live import LiveOperation
from vmupdate_agent.models import (
    Outcome,
    Preference,
    ProgressEvent,
    RequestedMode,
    UpdateResult,
    VMInfo,
)
from vmupdate_agent.operations import Operations, Refused
from vmupdate_agent.qmp import QmpError
from vmupdate_agent.specs import PreflightSpec, UpdateSpec

DEFAULT_CONFIG = "/etc/vmupdate/agent.yaml"
EXIT = {Outcome.UPDATED: 0, Outcome.FAILED: 1, Outcome.ROLLED_BACK: 3, Outcome.LOST: 4}
EXIT_BUSY = 5
# A refusal's exit code: bad usage (2), busy (5), else refused with the VM untouched (1).
REFUSED_EXIT = {grpc.StatusCode.INVALID_ARGUMENT: 2, grpc.StatusCode.NOT_FOUND: 2,
                grpc.StatusCode.ALREADY_EXISTS: 2, grpc.StatusCode.FAILED_PRECONDITION: EXIT_BUSY}
# How long the CLI waits for the recovery of operations a dead process left running (each
# is bounded by the engine's timeouts; this is a last resort).
RECOVERY_WAIT_S = 900.0
# Flags that set a request's field, to name them in errors.
SPEC_FLAGS = {"vm": "the VM argument", "target.binary": "--binary", "target.sha256": "--sha256",
              "target.expected_version": "--version", "target.extra_args": "--extra-arg",
              "operation_id": "--op-id", "mode": "--mode"}
SpecT = TypeVar("SpecT", PreflightSpec, UpdateSpec)
# Flags that set a configuration field, to name them in errors.
FLAGS = {"socket_globs": "--socket-glob", "allowed_binary_dirs": "--allowed-dir",
         "runtime_dir": "--runtime-dir", "state_dir": "--state-dir"}


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
    p.add_argument("--state-dir", help="the journal and the VMs' locks, shared with the "
                   "agent service on this host (default: the configuration's state_dir, "
                   "/var/lib/vmupdate)")
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
            c.add_argument("--op-id", help="operation id (default: random); the same id again "
                           "shows the journaled operation instead of running a second one")
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


class Settings:
    """What the command line and the configuration say, merged and checked."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cfg: agent_config.AgentConfig | None = None
        path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
        if path:
            self.cfg = agent_config.load(path)
        cfg = self.cfg
        self.globs: list[str] = args.socket_glob or (cfg.socket_globs if cfg else [])
        allowed = args.allowed_dir or (cfg.allowed_binary_dirs if cfg else [])
        runtime = args.runtime_dir or (cfg.runtime_dir if cfg else "/run/vmupdate")
        for flag, value in (("--runtime-dir", args.runtime_dir),
                            ("--state-dir", args.state_dir)):
            if value is not None and not value.startswith("/"):
                raise UsageError(f"{flag} must be absolute, got {value!r}")
        host = hostexec.HostContext(
            prefix=tuple(cfg.host_exec_prefix) if cfg else hostexec.DEFAULT_PREFIX,
            detach=tuple(cfg.detach_prefix) if cfg else hostexec.DEFAULT_DETACH)
        timeouts = Timeouts()
        if cfg:
            t = cfg.timeouts
            timeouts = Timeouts(command=t.qmp_command_s, handover=t.handover_s, load=t.load_s,
                                guard_commit=t.guard_commit_s)
        self.engine = engine.EngineSettings(
            allowed_dirs=tuple(allowed), runtime_dir=runtime, host=host, timeouts=timeouts,
            guard_seize=cfg.cpr_exec_guard == "seize" if cfg else True)
        self.state_dir: str | None = args.state_dir or (cfg.state_dir if cfg else None)

    def agent_config(self, vm_ref: str) -> agent_config.AgentConfig:
        """The configuration operations.py runs with: the file's, with the flags over it. A VM
        given by its socket path needs no glob: the path is the glob."""
        globs = self.globs or ([glob.escape(vm_ref)] if vm_ref.startswith("/") else [])
        if not globs:
            raise UsageError("no QMP socket globs to find the VM: pass --socket-glob, "
                             "--config, or the VM's socket path")
        data: dict[str, Any] = self.cfg.model_dump() if self.cfg else {}
        data.update(socket_globs=globs, allowed_binary_dirs=list(self.engine.allowed_dirs),
                    runtime_dir=self.engine.runtime_dir)
        if self.state_dir:
            data["state_dir"] = self.state_dir
        try:
            return agent_config.AgentConfig.model_validate(data)
        except ValidationError as exc:
            raise UsageError("; ".join(
                f"{FLAGS.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" if e["loc"] else
                e["msg"] for e in exc.errors())) from None


def _flag(loc: tuple[int | str, ...]) -> str:
    dotted = ".".join(str(p) for p in loc)
    for field, flag in SPEC_FLAGS.items():
        if dotted == field or dotted.startswith(f"{field}."):
            return flag + dotted[len(field):]
    return dotted


def _checked(build: Callable[[], SpecT]) -> SpecT:
    """A spec built from flags; a bad value is a usage error naming its flag."""
    try:
        return build()
    except ValidationError as exc:
        raise UsageError("; ".join(_problem(e["loc"], e["msg"]) for e in exc.errors())
                         ) from None


def _problem(loc: tuple[int | str, ...], msg: str) -> str:
    if msg.startswith("Value error, "):  # our validators' own sentences
        return f"{_flag(loc)} {msg.removeprefix('Value error, ')}"
    return f"{_flag(loc)}: {msg}"


def _target(args: argparse.Namespace) -> dict[str, Any]:
    return {"binary": args.binary, "expected_version": args.expected_version or "",
            "sha256": args.sha256 or "", "extra_args": tuple(args.extra_arg)}


def _print(args: argparse.Namespace, data: Any, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(human)


async def _inventory(args: argparse.Namespace, settings: Settings) -> int:
    """Every VM, probed as the service probes them: under the VM's lock, so that a VM in the
    middle of an operation (of the service or another CLI) is shown busy, not disturbed."""
    if not settings.globs:
        raise UsageError("no QMP socket globs: pass --socket-glob or --config")
    state_dir = settings.state_dir or str(agent_config.AgentConfig.model_fields[
        "state_dir"].default)
    paths = await asyncio.to_thread(discovery.find_sockets, settings.globs)

    async def one(path: str) -> tuple[VMInfo | None, str]:
        try:
            lock = await admission.take(state_dir, path, admission.PROBE,
                                        "vmupdate-agent inventory")
        except vmlock.VmBusy as exc:
            return None, f"busy: {exc}"
        try:
            info, _ = await discovery.discover(path, timeout=settings.engine.timeouts.command)
            return info, ""
        except (QmpError, OSError, KeyError, ValueError) as exc:
            # ValueError: argv.ArgvError, a command line the agent cannot parse.
            return None, str(exc)
        finally:
            lock.release()

    out: list[dict[str, Any]] = []
    lines: list[str] = []
    for path, (info, err) in zip(paths, await asyncio.gather(*(one(p) for p in paths)),
                                 strict=True):
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


async def _operations(args: argparse.Namespace, settings: Settings,
                      config: agent_config.AgentConfig, *, guard: bool) -> Operations:
    """The service's way in, for this process: the journal, the VM locks, recovery of what a
    dead process left running (said on stderr)."""
    await asyncio.to_thread(os.makedirs, config.state_dir, mode=0o700, exist_ok=True)
    # Traversable (not listable): QEMUs running as a VM's user reach their work folders.
    await asyncio.to_thread(os.makedirs, config.runtime_dir, mode=0o711, exist_ok=True)
    eng = settings.engine
    if guard:
        eng = engine.EngineSettings(
            allowed_dirs=eng.allowed_dirs, runtime_dir=eng.runtime_dir, host=eng.host,
            timeouts=eng.timeouts, guard_seize=eng.guard_seize, guard_path=await asyncio.to_thread(
                engine.install_guard, eng.runtime_dir, config.guard_binary))
    ops = Operations(config, Journal(config.state_dir), eng,
                     program=f"vmupdate-agent {args.command}")
    taken = await ops.start(wait_for_owners=False)
    tasks = [live.task for live in taken if live.task is not None]
    if tasks:
        ids = ", ".join(live.id for live in taken)
        print(f"vmupdate-agent: the journal has operations still running ({ids}); resolving "
              "those no live process runs before going on", file=sys.stderr, flush=True)
        await asyncio.wait(tasks, timeout=RECOVERY_WAIT_S)
    for live in taken:
        _say_recovered(live)
    return ops


def _say_recovered(live: LiveOperation) -> None:
    rec = live.record
    if live.result is None:
        return  # run by a live process (the service, another CLI): left to it
    what = ("was left running by a process that stopped; resolved"
            if rec.resolved_after_restart else "was finished meanwhile by the process that ran it")
    pause = f", guest pause {live.result.pause_ms:.0f} ms" if live.result.pause_ms else ""
    print(f"vmupdate-agent: operation {rec.operation_id} on {rec.vm.name} {what}: "
          f"{live.result.outcome.value} — {live.result.message}{pause}", file=sys.stderr,
          flush=True)


async def _preflight(args: argparse.Namespace, settings: Settings) -> int:
    spec = _checked(lambda: PreflightSpec.model_validate(
        {"vm": args.vm, "target": _target(args), "mode": RequestedMode(args.mode),
         "prefer": Preference(args.prefer)}))
    ops = await _operations(args, settings, settings.agent_config(args.vm), guard=True)
    report = await ops.preflight(spec, dry_run=not args.no_dry_run)
    lines = [f"{report.vm}: {'PASS' if report.passed else 'FAIL'} ({report.mode_reason})"]
    lines += [f"  [{'ok' if c.passed else 'FAIL'}] {c.name}: {c.message}" for c in report.checks]
    _print(args, report.model_dump(mode="json"), "\n".join(lines))
    return 0 if report.passed else 1


async def _update(args: argparse.Namespace, settings: Settings) -> int:
    op_id = args.op_id or f"cli-{secrets.token_hex(8)}"
    spec = _checked(lambda: UpdateSpec.model_validate(
        {"vm": args.vm, "target": _target(args), "mode": RequestedMode(args.mode),
         "prefer": Preference(args.prefer), "operation_id": op_id}))
    config = settings.agent_config(args.vm)
    reaper.become_subreaper()
    orphan_reaper = reaper.OrphanReaper()
    reaping = asyncio.create_task(orphan_reaper.run())
    try:
        ops = await _operations(args, settings, config, guard=not args.no_guard)
        await ops.submit(spec, skip_preflight=args.skip_preflight)
        result: UpdateResult | None = None
        async for _, item in ops.follow_items(op_id, 0):
            if isinstance(item, ProgressEvent):
                if not args.json:
                    print(f"  {item.phase.value:<11} {item.message}", flush=True)
            else:
                result = item
    finally:
        reaping.cancel()
    assert result is not None  # follow_items ends with the result
    pause = f"{result.pause_ms:.0f} ms" if result.pause_ms is not None else "unknown"
    human = (f"{result.vm}: {result.outcome.value} — {result.message}\n"
             f"  operation {op_id}, mode {result.mode}, pid {result.pid_before} -> "
             f"{result.pid_after}, QEMU {result.version_before} -> {result.version_after}, "
             f"guest pause {pause}")
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
        settings = Settings(args)
        if args.command == "serve":
            if settings.cfg is None:
                raise UsageError("serve needs --config")
            # The server module pulls in TLS, health and reflection; the others do not.
            server = importlib.import_module("vmupdate_agent.server")
            return int(server.main_with_config(settings.cfg))
        if args.command == "inventory":
            return asyncio.run(_inventory(args, settings))
        if args.command == "preflight":
            return asyncio.run(_preflight(args, settings))
        return asyncio.run(_update(args, settings))
    except (UsageError, agent_config.ConfigError, LookupError) as exc:
        print(f"vmupdate-agent: {exc}", file=sys.stderr)
        return 2
    except Refused as exc:
        print(f"vmupdate-agent: refused: {exc.message}", file=sys.stderr)
        return REFUSED_EXIT.get(exc.code, 1)
    except (QmpError, UpdateAborted, OSError) as exc:
        print(f"vmupdate-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
