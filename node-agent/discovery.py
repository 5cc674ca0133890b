"""Finding the VMs on this host and learning what each one is.

Two halves: `gather_raw` asks QEMU and /proc (I/O) and returns the raw answers as plain JSON;
`build_vm_info` turns those answers into a `VMInfo` (pure), so the interpretation can be tested
on recorded answers of devices this machine does not have (vfio, vhost).

A VM's own QEMU is never asked `query-qmp-schema`: building that answer grew a QEMU's heap by
23 MiB for good (QEMU 11.1, measured), memory every VM the agent lists would keep, and which
the exec of a cpr-exec must then free inside the guest's pause (+2 ms of its 5 ms exec).
What the schema would say is asked by name instead: a mode or parameter QEMU does not know
is refused with "does not accept value" or "is unexpected". A target binary's schema is
still read, in a throwaway probe QEMU (target.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from typing import Any

from vmupdate_agent import argv as qargv
from vmupdate_agent import pathpolicy, procfs
from vmupdate_agent.models import (
    MIGRATION_IDLE,
    CprMode,
    MemoryBackend,
    QemuFeatures,
    QemuVersion,
    TapDevice,
    VMInfo,
)
from vmupdate_agent.qmp import QmpError, QmpSession

log = logging.getLogger(__name__)

RawFacts = dict[str, Any]

# Migration capabilities that CPR cannot be combined with.
INCOMPATIBLE_CAPABILITIES = ("x-colo", "postcopy-ram", "background-snapshot", "postcopy-preempt")


class DiscoveryError(RuntimeError):
    pass


def find_sockets(globs: Iterable[str]) -> list[str]:
    found: set[str] = set()
    for pattern in globs:
        for path in glob.glob(pattern):
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    found.add(path)
    return sorted(found)


# --- pure interpretation --------------------------------------------------------------------


def cpr_modes_from_schema(schema: Sequence[dict[str, Any]]) -> list[str]:
    """MigMode's values, found by content: type names in the introspected schema are mangled."""
    for entry in schema:
        if entry.get("meta-type") != "enum":
            continue
        values = _enum_values(entry)
        if "cpr-reboot" in values or "cpr-exec" in values:
            return [v for v in values if v.startswith("cpr-")]
    return []


def _enum_values(entry: dict[str, Any]) -> list[str]:
    if "members" in entry:
        return [str(m["name"]) for m in entry["members"]]
    return [str(v) for v in entry.get("values", [])]


def legacy_dialect_from_schema(schema: Sequence[dict[str, Any]]) -> bool:
    """The out-of-tree cpr-exec some distributions ship (-migrate-mode-enable, cpr-exec-args)."""
    for entry in schema:
        name = str(entry.get("name", ""))
        if name in ("migrate-mode-enable",):
            return True
        for member in entry.get("members", []) or []:
            if isinstance(member, dict) and member.get("name") in ("cpr-exec-args",):
                return True
    return False


def parse_version(answer: dict[str, Any]) -> QemuVersion:
    q = answer["qemu"]
    return QemuVersion(major=int(q["major"]), minor=int(q["minor"]), micro=int(q["micro"]),
                       package=str(answer.get("package", "")).strip())


_VERSION_LINE = re.compile(r"QEMU emulator version (\d+)\.(\d+)\.(\d+)\s*(\(([^)]*)\))?")


def parse_version_output(text: str) -> QemuVersion | None:
    m = _VERSION_LINE.search(text)
    if not m:
        return None
    return QemuVersion(major=int(m.group(1)), minor=int(m.group(2)), micro=int(m.group(3)),
                       package=(m.group(5) or "").strip())


def build_vm_info(raw: RawFacts) -> VMInfo:
    argv = qargv.parse(raw["argv"])
    decl = qargv.declared(argv)
    modes = tuple(CprMode(m) for m in raw.get("cpr_modes", []) if m in CprMode._value2member_map_)
    features = QemuFeatures(
        version=parse_version(raw["query-version"]),
        cpr_modes=modes,
        legacy_cpr_dialect=bool(raw.get("legacy_dialect", False)),
        has_cpr_exec_command="cpr-exec-command" in raw.get("migrate-parameters", {}),
    )
    objects: dict[str, str] = raw.get("objects", {})
    backends = []
    for mem in raw.get("query-memdev", []):
        mem_id = str(mem.get("id", ""))
        qom_type = objects.get(mem_id, "")
        kind = {"memory-backend-memfd": "memfd", "memory-backend-file": "file",
                "memory-backend-ram": "ram"}.get(qom_type, "other")
        backends.append(MemoryBackend(id=mem_id, kind=kind,
                                      size_bytes=int(mem["size"]), share=bool(mem["share"]),
                                      mem_path=raw.get("mem-paths", {}).get(mem_id)))
    taps = []
    for nd in decl.netdevs:
        if nd.get("type") != "tap":
            continue
        taps.append(TapDevice(
            id=nd.get("id", nd.get("netdev", "")),
            ifname=nd.get("ifname"),
            fd=_first_fd(nd.get("fd") or nd.get("fds")),
            vhost=nd.get("vhost", "off") in ("on", "true", "yes"),
            vhostfd=_first_fd(nd.get("vhostfd") or nd.get("vhostfds")),
        ))
    vfio = tuple(d for d in decl.device_drivers if d.startswith("vfio-"))
    iommufd = tuple(o for o in decl.object_types if o == "iommufd")
    vhost = tuple(d for d in decl.device_drivers if d.startswith("vhost-"))
    vhost += tuple(f"netdev {nd.get('id', '?')}: {nd.get('type')}" for nd in decl.netdevs
                   if nd.get("type") in ("vhost-user", "vhost-vdpa"))
    blockers: dict[str, list[str]] = raw.get("blockers", {})
    status = raw.get("query-status", {})
    machine = str(raw.get("machine-type", "")).removesuffix("-machine")
    return VMInfo(
        qmp_path=raw["qmp_path"],
        pid=int(raw["pid"]),
        name=str(raw.get("query-name", {}).get("name", "")) or raw["qmp_path"],
        uuid=str(raw.get("query-uuid", {}).get("UUID", "")),
        argv=tuple(raw["argv"]),
        root=raw.get("root", "/"),
        binary=raw.get("binary", argv.binary),
        features=features,
        runstate=str(status.get("status", "unknown")),
        migration_status=str(raw.get("migration-status", "none")),
        machine_type=machine,
        memory_backends=tuple(backends),
        aux_ram_share=raw.get("aux-ram-share"),
        migration_blockers=tuple(sorted({r for rs in blockers.values() for r in rs})),
        blockers_by_mode={m: tuple(rs) for m, rs in sorted(blockers.items())},
        enabled_capabilities=tuple(raw.get("capabilities", [])),
        taps=tuple(taps),
        vfio_devices=vfio,
        iommufd_objects=iommufd,
        vhost_devices=vhost,
        device_drivers=tuple(dict.fromkeys(decl.device_drivers)),
        readconfig_options=tuple(raw.get("readconfig-options", [])),
    )


def _first_fd(value: str | None) -> int | None:
    """fd=N, or fds=N:M:... for a multiqueue tap: inherited descriptors, not a name."""
    if not value:
        return None
    head = value.split(":", 1)[0]
    return int(head) if head.isdigit() else None


def blockers_by_mode(raw: RawFacts) -> dict[str, list[str]]:
    return dict(raw.get("blockers", {}))


# A device section of a -readconfig file: [device "ID"].
_CONFIG_DEVICE = re.compile(r'^\s*\[\s*device\s+"([^"]+)"\s*\]', re.MULTILINE)


def readconfig_device_ids(text: str) -> list[str]:
    """The ids of the devices a -readconfig file declares (its `[device "ID"]` sections)."""
    return _CONFIG_DEVICE.findall(text)


_CONFIG_SECTION = re.compile(r'^\s*\[\s*([a-z-]+)(?:\s+"([^"]*)")?\s*\]\s*$')
_CONFIG_ENTRY = re.compile(r'^\s*([A-Za-z0-9_.-]+)\s*=\s*"([^"]*)"\s*$')  # no escapes in QEMU
# Sections that declare what preflight judges by the command line (devices and their back ends).
_CONFIG_AS_OPTIONS = ("device", "chardev", "netdev")


def readconfig_options(text: str) -> list[str]:
    """A -readconfig file's device, chardev and netdev sections as the command-line words
    that declare the same (`[device "vblk0"] driver = "x"` -> `-device driver=x,id=vblk0`)."""
    words: list[str] = []
    section: tuple[str, str | None] | None = None
    items: list[tuple[str, str | None]] = []

    def flush() -> None:
        if section is not None and section[0] in _CONFIG_AS_OPTIONS:
            ident = [("id", section[1])] if section[1] else []
            words.extend((f"-{section[0]}", qargv.join_keyvals([*items, *ident])))

    for line in text.splitlines():
        if m := _CONFIG_SECTION.match(line):
            flush()
            section, items = (m.group(1), m.group(2)), []
        elif section is not None and (m := _CONFIG_ENTRY.match(line)):
            items.append((m.group(1), m.group(2)))
    flush()
    return words


def _declared_ids(raw: RawFacts) -> set[str]:
    """Device ids the command line declares, those in its -readconfig files included (the
    new QEMU reads the same files)."""
    argv = qargv.parse(raw["argv"])
    return set(qargv.declared(argv).device_ids) | set(raw.get("readconfig-device-ids", []))


def hotplugged_devices(raw: RawFacts) -> list[str]:
    """Devices QEMU has that its argv does not declare: the new QEMU would not create them."""
    return sorted(set(raw.get("peripherals", [])) - _declared_ids(raw))


def unplugged_devices(raw: RawFacts) -> list[str]:
    """Devices the argv declares that QEMU no longer has: the new QEMU would create them."""
    if "peripherals" not in raw:
        return []
    return sorted(_declared_ids(raw) - set(raw["peripherals"]))


# --- I/O: asking QEMU -----------------------------------------------------------------------


async def _try(session: QmpSession, command: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return await session.cmd(command, args)
    except QmpError:
        return None


async def gather_raw(session: QmpSession) -> RawFacts:
    pid = session.peer_pid
    raw: RawFacts = {"qmp_path": session.path, "pid": pid}
    raw["argv"] = list(procfs.cmdline(pid))
    raw["root"] = procfs.root(pid)
    raw["binary"] = pathpolicy.origin(procfs.exe(pid))  # a pinned copy: its target's path
    raw["query-version"] = await session.cmd("query-version")
    raw["query-status"] = await session.cmd("query-status")
    raw["query-name"] = await _try(session, "query-name") or {}
    raw["query-uuid"] = await _try(session, "query-uuid") or {}
    raw["query-memdev"] = await _try(session, "query-memdev") or []
    objs = await _try(session, "qom-list", {"path": "/objects"}) or []
    raw["objects"] = {o["name"]: str(o["type"]).removeprefix("child<").removesuffix(">")
                      for o in objs if str(o.get("type", "")).startswith("child<")}
    raw["mem-paths"] = {}
    for name, qom_type in raw["objects"].items():
        if qom_type == "memory-backend-file":
            path = await _try(session, "qom-get", {"path": f"/objects/{name}",
                                                   "property": "mem-path"})
            if path:
                raw["mem-paths"][name] = path
    raw["aux-ram-share"] = await _try(session, "qom-get", {"path": "/machine",
                                                           "property": "aux-ram-share"})
    raw["machine-type"] = await _try(session, "qom-get", {"path": "/machine",
                                                          "property": "type"}) or ""
    params = await _try(session, "query-migrate-parameters") or {}
    raw["migrate-parameters"] = params
    caps = await _try(session, "query-migrate-capabilities") or []
    raw["capabilities"] = sorted(c["capability"] for c in caps if c.get("state"))
    migrate = await _try(session, "query-migrate") or {}
    raw["migration-status"] = str(migrate.get("status", "none"))
    if raw["migration-status"] in MIGRATION_IDLE:
        raw["cpr_modes"], raw["blockers"] = await _modes_and_blockers(session, params)
        raw["legacy_dialect"] = await _knows_parameter(session, "cpr-exec-args")
    else:  # a migration is running: its parameters are not touched (preflight says so)
        raw["cpr_modes"], raw["blockers"], raw["legacy_dialect"] = [], {}, False
    peri = await _try(session, "qom-list", {"path": "/machine/peripheral"}) or []
    raw["peripherals"] = sorted(p["name"] for p in peri
                                if str(p.get("type", "")).startswith("child<"))
    raw["tun-fds"] = procfs.tun_fds(pid)
    texts = await asyncio.to_thread(_read_configs, pid, raw["argv"])
    raw["readconfig-device-ids"] = [i for text in texts for i in readconfig_device_ids(text)]
    raw["readconfig-options"] = [w for text in texts for w in readconfig_options(text)]
    return raw


def _read_configs(pid: int, argv: Sequence[str]) -> list[str]:
    texts: list[str] = []
    for path in qargv.parse(argv).values("readconfig"):
        # As QEMU sees it (its root); relative paths are from its working directory.
        where = path if path.startswith("/") else os.path.join(f"/proc/{pid}/cwd", path)
        target = procfs.in_root(pid, where) if path.startswith("/") else where
        with contextlib.suppress(OSError, UnicodeDecodeError), \
                open(target, encoding="utf-8") as f:
            texts.append(f.read(1 << 20))
    return texts


_MIGMODE_ORDER = tuple(m.value for m in (CprMode.CPR_REBOOT, CprMode.CPR_TRANSFER,
                                          CprMode.CPR_EXEC))


def _not_in_schema(exc: QmpError) -> bool:
    """QEMU refused a value or a member its QAPI schema does not have (its input visitor's
    words), rather than what was asked."""
    return "does not accept value" in str(exc) or "is unexpected" in str(exc)


async def _modes_and_blockers(session: QmpSession, params: dict[str, Any]
                              ) -> tuple[list[str], dict[str, list[str]]]:
    """The CPR modes this QEMU accepts, and its migration blockers in each. QEMU reports the
    blockers of the current mode only, so each mode is selected in turn (a mode it refuses
    is one it does not have) and the VM's own mode put back."""
    modes: list[str] = []
    blockers: dict[str, list[str]] = {}
    for mode in _MIGMODE_ORDER:  # QEMU's order (its MigMode enum), as its schema lists them
        try:
            await session.cmd("migrate-set-parameters", {"mode": mode})
        except QmpError as exc:
            if not _not_in_schema(exc):
                log.warning("QEMU pid %s: selecting migration mode %s failed: %s",
                            session.peer_pid, mode, exc)
            continue
        modes.append(mode)
        info = await _try(session, "query-migrate") or {}
        blockers[mode] = [str(r) for r in info.get("blocked-reasons", [])]
    if params.get("mode") is not None and modes:
        await _try(session, "migrate-set-parameters", {"mode": params["mode"]})
    return modes, blockers


async def _knows_parameter(session: QmpSession, name: str) -> bool:
    """Whether QEMU has migration parameter `name`: asked by setting it to an empty list,
    which a QEMU without it refuses by name before doing anything."""
    try:
        await session.cmd("migrate-set-parameters", {name: []})
    except QmpError as exc:
        return not _not_in_schema(exc)
    return True


async def discover(path: str, *, timeout: float = 10.0) -> tuple[VMInfo, RawFacts]:
    session = await QmpSession.open(path, timeout=timeout, command_timeout=timeout)
    try:
        raw = await gather_raw(session)
    finally:
        await session.close()
    return build_vm_info(raw), raw


async def inventory(globs: Iterable[str], *, timeout: float = 10.0
                    ) -> list[tuple[str, VMInfo | None, str]]:
    """Every VM behind the configured sockets: (socket, info or None, error)."""
    paths = find_sockets(globs)

    async def one(path: str) -> tuple[str, VMInfo | None, str]:
        try:
            info, _ = await discover(path, timeout=timeout)
            return path, info, ""
        except (QmpError, OSError, qargv.ArgvError, KeyError) as exc:
            return path, None, str(exc)

    return list(await asyncio.gather(*(one(p) for p in paths)))
