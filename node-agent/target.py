"""Learning what the target QEMU binary is, without touching the VM.

Three looks, each turned into plain facts for the pure preflight checks:
- the file (inside the VM's root): exists, executable, where it really lives, sha256;
- a probe: `-version`, then the binary started with `-machine none` to ask over QMP which
  machine types, device types and CPR modes it has;
- a dry run: the exact new argv, started paused with a deferred incoming beside the VM, so
  every command-line failure (unknown option, other machine or memory size, a prefix that
  exits) shows here instead of after the point of no return.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmupdate_agent import argv as qargv
from vmupdate_agent import hostexec, pathpolicy, procfs
from vmupdate_agent.discovery import (
    cpr_modes_from_schema,
    legacy_dialect_from_schema,
    parse_version,
    parse_version_output,
)
from vmupdate_agent.models import CprMode, QemuFeatures, QemuVersion, VMInfo
from vmupdate_agent.qmp import QmpError, QmpSession


@dataclass(frozen=True)
class BinaryFacts:
    path: str
    exists: bool
    is_file: bool = False
    executable: bool = False
    # The path with every symlink resolved, inside the VM's root.
    real_path: str = ""
    sha256: str | None = None
    version_output: str = ""
    version: QemuVersion | None = None
    version_error: str = ""
    # Why the host's path rule (pathpolicy) refuses it: outside the allowed directories,
    # or a group/world-writable file or directory on its way. Empty when it is fine.
    policy_error: str = ""


@dataclass(frozen=True)
class ProbeFacts:
    ok: bool
    error: str = ""
    features: QemuFeatures | None = None
    machine_types: frozenset[str] = frozenset()
    qom_types: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DryRunFacts:
    ok: bool
    error: str = ""
    machine_type: str = ""
    memdevs: dict[str, int] = field(default_factory=dict)
    argv: tuple[str, ...] = ()


def is_allowed(path: str, dirs: tuple[str, ...]) -> bool:
    """Whether `path` (absolute, without '..') lies in one of `dirs` (pathpolicy's rule)."""
    return pathpolicy.lexically_under(path, dirs)


def resolve_in_root(root: str, path: str) -> str:
    """Resolve symlinks of `path` as the VM would (its root is `root` as the agent sees it)."""
    return pathpolicy.resolve_in_root(Path(root), path)


async def binary_facts(vm: VMInfo, path: str, *, want_sha256: bool, ctx: hostexec.HostContext,
                       allowed_dirs: tuple[str, ...], timeout: float = 20.0) -> BinaryFacts:
    """What the file is; it is only run (`-version`) when it lies under `allowed_dirs`, by its
    given path and by its resolved one (a symlink must not lead out of them)."""
    seen = procfs.in_root(vm.pid, path)
    try:
        st = seen.stat()
    except OSError:
        return BinaryFacts(path=path, exists=False)
    is_file = stat.S_ISREG(st.st_mode)
    executable = is_file and bool(st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
    root = pathpolicy.root_of(vm.pid)
    try:
        real = pathpolicy.resolve_in_root(root, path)
    except OSError:
        real = ""
    policy = pathpolicy.check(root, path, allowed_dirs) or ""
    digest = None
    if want_sha256 and is_file:
        digest = await asyncio.to_thread(_sha256, seen)
    version_out, version, err = "", None, ""
    if executable and policy:
        err = "not run: the target is refused by the host's path rule"
        executable_here = False
    else:
        executable_here = executable
    if executable_here:
        try:
            done = await hostexec.run(ctx.wrap(vm.pid, [path, "-version"]), timeout=timeout)
            version_out = (done.stdout + done.stderr).strip()
            version = parse_version_output(done.stdout)
            if done.returncode != 0:
                err = f"`{path} -version` exited {done.returncode}: {version_out[:300]}"
            elif version is None:
                err = f"`{path} -version` printed no QEMU version: {version_out[:300]!r}"
        except (hostexec.HostExecError, OSError) as exc:
            err = f"`{path} -version` could not run: {exc}"
    return BinaryFacts(path=path, exists=True, is_file=is_file, executable=executable,
                       real_path=real, sha256=digest, version_output=version_out,
                       version=version, version_error=err, policy_error=policy)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


async def _start_and_connect(vm: VMInfo, argv: list[str], sock: str, ctx: hostexec.HostContext,
                             timeout: float) -> tuple[hostexec.Spawned, QmpSession | None, str]:
    proc = await hostexec.spawn(ctx.wrap(vm.pid, argv))
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if proc.exited:
            return proc, None, (await proc.stderr_text()) or f"exited {proc.proc.returncode}"
        try:
            session = await QmpSession.open(sock, timeout=1.0, command_timeout=timeout)
            return proc, session, ""
        except QmpError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            await proc.stop()
            return proc, None, f"no QMP greeting within {timeout:.0f}s"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.proc.wait(), 0.01)


async def _finish(proc: hostexec.Spawned, session: QmpSession | None) -> None:
    if session is not None:
        with contextlib.suppress(QmpError):
            await session.cmd("quit", timeout=3.0)
        await session.close()
    await proc.stop()


async def probe(vm: VMInfo, path: str, *, runtime_dir: str, ctx: hostexec.HostContext,
                timeout: float = 20.0) -> ProbeFacts:
    sock = os.path.join(runtime_dir, f"probe-{secrets.token_hex(4)}.sock")
    argv = [path, "-machine", "none", "-nodefaults", "-display", "none", "-S",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    proc, session, err = await _start_and_connect(vm, argv, sock, ctx, timeout)
    try:
        if session is None:
            return ProbeFacts(ok=False, error=f"`{path}` did not start as QEMU: {err}")
        version = parse_version(await session.cmd("query-version"))
        schema: list[dict[str, Any]] = await session.cmd("query-qmp-schema", timeout=30)
        machines = await session.cmd("query-machines")
        names = {m["name"] for m in machines} | {m["alias"] for m in machines if "alias" in m}
        types = await session.cmd("qom-list-types", {"abstract": False})
        params = await session.cmd("query-migrate-parameters")
        modes = tuple(CprMode(m) for m in cpr_modes_from_schema(schema)
                      if m in CprMode._value2member_map_)
        features = QemuFeatures(version=version, cpr_modes=modes,
                                legacy_cpr_dialect=legacy_dialect_from_schema(schema),
                                has_cpr_exec_command="cpr-exec-command" in params)
        return ProbeFacts(ok=True, features=features, machine_types=frozenset(names),
                          qom_types=frozenset(t["name"] for t in types))
    except QmpError as exc:
        return ProbeFacts(ok=False, error=f"probing `{path}` over QMP failed: {exc}")
    finally:
        await _finish(proc, session)
        Path(sock).unlink(missing_ok=True)


async def dry_run(vm: VMInfo, new_argv: qargv.QemuArgv, *, runtime_dir: str,
                  ctx: hostexec.HostContext, timeout: float = 30.0) -> DryRunFacts:
    probe_id = secrets.token_hex(4)
    sock = os.path.join(runtime_dir, f"dry-run-{probe_id}.sock")
    argv = qargv.dry_run_argv(new_argv, sock, probe_id).render()
    proc, session, err = await _start_and_connect(vm, argv, sock, ctx, timeout)
    try:
        if session is None:
            return DryRunFacts(ok=False, error=err, argv=tuple(argv))
        memdevs = await session.cmd("query-memdev")
        machine = await session.cmd("qom-get", {"path": "/machine", "property": "type"})
        return DryRunFacts(ok=True, machine_type=str(machine).removesuffix("-machine"),
                           memdevs={str(m.get("id", "")): int(m["size"]) for m in memdevs},
                           argv=tuple(argv))
    except QmpError as exc:
        return DryRunFacts(ok=False, error=f"dry run over QMP failed: {exc}", argv=tuple(argv))
    finally:
        await _finish(proc, session)
        Path(sock).unlink(missing_ok=True)
