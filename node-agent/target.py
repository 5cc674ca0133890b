"""Learning what the target QEMU binary is, without touching the VM, and pinning it.

The pin: an update opens the target once (after the host's path rule allowed it), hashes
that open file while copying it to a private, root-only place in the runtime directory, and
from then on runs only that copy: the target's `-version`, the probe, the dry run and the new
QEMU. A file swapped at the target's path after the check is never run, and the requested
sha256 is checked on the very bytes that run, whether preflight runs or not.

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
import shutil
import stat
import time
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


class PinRefused(ValueError):
    """The target may not be pinned (so it is not run); the message names field and fix."""


@dataclass(frozen=True)
class Pinned:
    path: str  # the private copy: the same path in the agent's and the VM's root
    sha256: str


PIN_KEEP_S = 600.0  # an unused pinned copy younger than this may be an update's in flight


async def pin(vm: VMInfo, path: str, *, sha256: str | None, allowed_dirs: tuple[str, ...],
              runtime_dir: str) -> Pinned:
    """Open `path` in the VM's root once, hash that open file while copying it privately,
    and return the copy: what was verified is what runs. PinRefused when the path rule
    refuses it, it cannot be opened, or its bytes do not match `sha256`."""
    root = pathpolicy.root_of(vm.pid)
    why = pathpolicy.check(root, path, allowed_dirs)
    if why is not None:
        raise PinRefused(why)
    try:
        resolved = pathpolicy.resolve_in_root(root, path)
    except OSError as exc:
        raise PinRefused(f"target.binary: cannot resolve {path} in the VM's root: {exc}"
                         ) from exc
    pinned = await asyncio.to_thread(_pin_copy, root, resolved, path, sha256, runtime_dir)
    await asyncio.to_thread(_prune_pins, Path(runtime_dir) / pathpolicy.PIN_DIR, pinned.sha256)
    return pinned


def _pin_copy(root: Path, resolved: str, path: str, sha256: str | None,
              runtime_dir: str) -> Pinned:
    try:
        fd = os.open(root.joinpath(resolved.lstrip("/")),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise PinRefused(f"target.binary: cannot open {path} in the VM's root: "
                         f"{exc.strerror}") from exc
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PinRefused(f"target.binary: {path} is not a regular file")
        if not st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
            raise PinRefused(f"target.binary: {path} is not executable (chmod +x)")
        why = pathpolicy.writable_problem(resolved, st.st_mode)  # the file as opened
        if why is not None:
            raise PinRefused(why)
        base = Path(runtime_dir) / pathpolicy.PIN_DIR
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = base / f".tmp-{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        try:
            with open(tmp, "xb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    dst.write(chunk)
            got = digest.hexdigest()
            if sha256 and got != sha256.lower():
                raise PinRefused(f"target.sha256: {path} has sha256 {got}, expected "
                                 f"{sha256.lower()}: the file on this host is not the build "
                                 "you meant")
            os.chmod(tmp, 0o555)
            dest = base / got / path.lstrip("/")
            dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.replace(tmp, dest)
            os.utime(base / got)  # fresh: not pruned while this update runs
        finally:
            tmp.unlink(missing_ok=True)
    return Pinned(path=str(dest), sha256=got)


def _prune_pins(base: Path, keep: str) -> None:
    """Remove pinned copies no process runs and no update just made."""
    in_use: set[str] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                link = os.readlink(entry / "exe")
                if "/" + pathpolicy.PIN_DIR + "/" in link:
                    in_use.add(link.split("/" + pathpolicy.PIN_DIR + "/", 1)[1][:64])
    now = time.time()
    for d in base.iterdir():
        if d.name == keep or d.name in in_use or d.name.startswith("."):
            continue
        with contextlib.suppress(OSError):
            if now - d.stat().st_mtime > PIN_KEEP_S:
                shutil.rmtree(d)


def is_allowed(path: str, dirs: tuple[str, ...]) -> bool:
    """Whether `path` (absolute, without '..') lies in one of `dirs` (pathpolicy's rule)."""
    return pathpolicy.lexically_under(path, dirs)


def resolve_in_root(root: str, path: str) -> str:
    """Resolve symlinks of `path` as the VM would (its root is `root` as the agent sees it)."""
    return pathpolicy.resolve_in_root(Path(root), path)


async def binary_facts(vm: VMInfo, path: str, *, want_sha256: bool, ctx: hostexec.HostContext,
                       allowed_dirs: tuple[str, ...], timeout: float = 20.0,
                       run_path: str | None = None) -> BinaryFacts:
    """What the file is; it is only run (`-version`) when the host's path rule allows it.
    `run_path`: its pinned copy, which is hashed and run instead of the path."""
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
    runs = run_path or path
    if want_sha256 and is_file:
        digest = await asyncio.to_thread(_sha256, procfs.in_root(vm.pid, runs))
    version_out, version, err = "", None, ""
    if executable and policy:
        err = "not run: the target is refused by the host's path rule"
        executable_here = False
    else:
        executable_here = executable
    if executable_here:
        try:
            done = await hostexec.run(
                ctx.wrap(vm.pid, [runs, "-version"], probe_credentials(vm.pid)),
                timeout=timeout)
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
                             timeout: float, creds: hostexec.Credentials
                             ) -> tuple[hostexec.Spawned, QmpSession | None, str]:
    proc = await hostexec.spawn(ctx.wrap(vm.pid, argv, creds))
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


NOBODY = 65534


def probe_credentials(vm_pid: int) -> hostexec.Credentials:
    """Who runs the target's `-version` and its probe: the VM's user, or nobody (with
    no_new_privs) when the VM runs as root — they read nothing of the VM's. The dry run
    runs as the VM itself (it opens the VM's disks and files as the new QEMU will)."""
    creds = hostexec.credentials_of(vm_pid)
    if creds.uid != 0:
        return creds
    return hostexec.Credentials(NOBODY, NOBODY, (), True, creds.cgroups)


def _private_dir(runtime_dir: str, kind: str, creds: hostexec.Credentials) -> str:
    """A fresh folder for a probe's sockets, owned by whoever runs the probe."""
    d = os.path.join(runtime_dir, f"{kind}-{secrets.token_hex(4)}")
    os.mkdir(d, 0o700)
    if not creds.privileged:
        os.chown(d, creds.uid, creds.gid)
    return d


async def probe(vm: VMInfo, path: str, *, runtime_dir: str, ctx: hostexec.HostContext,
                timeout: float = 20.0) -> ProbeFacts:
    creds = probe_credentials(vm.pid)
    folder = _private_dir(runtime_dir, "probe", creds)
    sock = os.path.join(folder, "qmp.sock")
    argv = [path, "-machine", "none", "-nodefaults", "-display", "none", "-S",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    proc, session, err = await _start_and_connect(vm, argv, sock, ctx, timeout, creds)
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
        shutil.rmtree(folder, ignore_errors=True)


async def dry_run(vm: VMInfo, new_argv: qargv.QemuArgv, *, runtime_dir: str,
                  ctx: hostexec.HostContext, timeout: float = 30.0) -> DryRunFacts:
    probe_id = secrets.token_hex(4)
    creds = hostexec.credentials_of(vm.pid)
    folder = _private_dir(runtime_dir, "dry-run", creds)
    sock = os.path.join(folder, "qmp.sock")
    argv = qargv.dry_run_argv(new_argv, sock, probe_id).render()
    proc, session, err = await _start_and_connect(vm, argv, sock, ctx, timeout, creds)
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
        shutil.rmtree(folder, ignore_errors=True)
