"""QEMU command lines: parse the running VM's argv and build the new QEMU's from it.

Pure functions. The new argv is always derived from the VM's canonical argv (what QEMU itself
parsed, read from /proc/<pid>/cmdline), never hand-edited, because CPR loads device state
into whatever machine the new command line builds: any difference loses the VM.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# QEMU options that take no argument (from qemu-options.hx, the ones without HAS_ARG).
# Everything else takes exactly one.
NO_ARG_OPTIONS = frozenset(
    {
        "S", "s", "snapshot", "nodefaults", "no-user-config", "nodefconfig", "daemonize",
        "no-reboot", "no-shutdown", "enable-kvm", "nographic", "full-screen", "no-hpet",
        "no-acpi", "only-migratable", "preconfig", "no-fd-bootchk", "win2k-hack", "usb",
        "no-quit", "alt-grab", "ctrl-grab", "sdl", "curses", "portrait", "semihosting",
        "xen-attach", "xen-domid-restrict", "version", "help", "h", "enable-sync-profile",
        "old-param", "rtc-td-hack", "no-kvm", "no-kvm-irqchip", "no-kvm-pit",
        "no-kvm-pit-reinjection", "singlestep", "one-insn-per-tb", "no-frame", "no-graphic",
        "perfmap", "jitdump", "mem-prealloc", "enable-fips",
    }
)

# Options that must not be carried into the new QEMU: the agent adds its own incoming and
# -S, and a daemonizing QEMU would fork away from the pid that cpr-exec must keep.
_DROPPED_FOR_NEW = frozenset({"incoming", "S", "daemonize"})

# Added by the agent to a QEMU it starts to receive a VM: that QEMU reports its incoming
# migration as MIGRATION events, which the agent waits on inside the guest's pause instead
# of polling (modes.migration.wait_incoming_loaded). Dropped again from the argv a next update
# starts from, like -incoming and -S.
INCOMING_EVENTS = ("-global", "migration.x-events=on")


class ArgvError(ValueError):
    """A command line the agent cannot work with, with the reason."""


@dataclass(frozen=True)
class Option:
    name: str  # without leading dashes
    value: str | None

    def render(self) -> list[str]:
        return [f"-{self.name}"] if self.value is None else [f"-{self.name}", self.value]


_ADDED_FOR_INCOMING = frozenset({Option("global", INCOMING_EVENTS[1])})


@dataclass(frozen=True)
class QemuArgv:
    binary: str
    options: tuple[Option, ...]

    def render(self) -> list[str]:
        out = [self.binary]
        for opt in self.options:
            out.extend(opt.render())
        return out

    def values(self, name: str) -> list[str]:
        return [o.value for o in self.options if o.name == name and o.value is not None]

    def has(self, name: str) -> bool:
        return any(o.name == name for o in self.options)


def parse(argv: Sequence[str]) -> QemuArgv:
    if not argv:
        raise ArgvError("empty command line")
    options: list[Option] = []
    i = 1
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-") or word in ("-", "--"):
            # A bare word is a disk image (the legacy -hda shorthand).
            options.append(Option("hda", word))
            i += 1
            continue
        name = word.lstrip("-")
        if "=" in name and word.startswith("--"):
            name, _, value = name.partition("=")
            options.append(Option(name, value))
            i += 1
            continue
        if name in NO_ARG_OPTIONS:
            options.append(Option(name, None))
            i += 1
            continue
        if i + 1 >= len(argv):
            # Unknown to us and last: keep it as a flag; QEMU itself judges it.
            options.append(Option(name, None))
            break
        options.append(Option(name, argv[i + 1]))
        i += 2
    return QemuArgv(argv[0], tuple(options))


def split_keyvals(value: str) -> list[tuple[str, str | None]]:
    """QEMU's 'a=b,c=d' option syntax; ',,' is an escaped comma; a bare word has no '='."""
    parts: list[str] = []
    cur = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            if i + 1 < len(value) and value[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    out: list[tuple[str, str | None]] = []
    for part in parts:
        if "=" in part:
            k, _, v = part.partition("=")
            out.append((k, v))
        elif part:
            out.append((part, None))
    return out


def join_keyvals(items: Iterable[tuple[str, str | None]]) -> str:
    def esc(s: str) -> str:
        return s.replace(",", ",,")

    return ",".join(esc(k) if v is None else f"{esc(k)}={esc(v)}" for k, v in items)


def option_props(value: str, implied_key: str) -> dict[str, str]:
    """Properties of an option value in keyval or JSON form; a leading bare word is the
    implied key (the driver of -device, the type of -netdev/-chardev/-object)."""
    stripped = value.lstrip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ArgvError(f"bad JSON option {value!r}: {exc}") from exc
        return {str(k): _json_scalar(v) for k, v in obj.items()}
    props: dict[str, str] = {}
    for n, (k, v) in enumerate(split_keyvals(value)):
        if v is None:
            if n == 0:
                props[implied_key] = k
            else:
                props[k] = "on"
        else:
            props[k] = v
    return props


def _json_scalar(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def canonical(argv: QemuArgv, qmp_path: str | None = None) -> QemuArgv:
    """The VM's argv without what describes how it was started rather than what it is.

    With `qmp_path` (where the VM's monitor is found), a command line that names another
    path for its only QMP socket gets it corrected: after cpr-transfer or cpr-reboot the new
    QEMU listened on a temporary path that was then renamed to the well-known one, and the
    next QEMU must listen where the VM is known to be.
    """
    out = QemuArgv(argv.binary, tuple(o for o in argv.options if o.name not in _DROPPED_FOR_NEW
                                      and o not in _ADDED_FOR_INCOMING))
    if qmp_path is not None:
        paths = qmp_socket_paths(out)
        if qmp_path not in paths and len(paths) == 1:
            out = replace_socket_path(out, paths[0], qmp_path)
    return out


def size_to_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if not m:
        raise ArgvError(f"not a size: {text!r}")
    n = int(m.group(1))
    unit = m.group(2).upper()
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    if unit == "" and n < (1 << 20):
        # QEMU reads a plain -m number as MiB; object sizes without a suffix are bytes.
        pass
    return n * mult


# --- what a VM's argv declares --------------------------------------------------------------


@dataclass(frozen=True)
class DeclaredDevices:
    device_drivers: tuple[str, ...]
    object_types: tuple[str, ...]
    netdevs: tuple[dict[str, str], ...]
    chardevs: tuple[dict[str, str], ...]
    device_ids: tuple[str, ...]


def declared(argv: QemuArgv) -> DeclaredDevices:
    drivers: list[str] = []
    ids: list[str] = []
    objects: list[str] = []
    netdevs: list[dict[str, str]] = []
    chardevs: list[dict[str, str]] = []
    for opt in argv.options:
        if opt.value is None:
            continue
        if opt.name == "device":
            props = option_props(opt.value, "driver")
            if "driver" in props:
                drivers.append(props["driver"])
            if "id" in props:
                ids.append(props["id"])
        elif opt.name == "object":
            props = option_props(opt.value, "qom-type")
            if "qom-type" in props:
                objects.append(props["qom-type"])
        elif opt.name == "netdev":
            netdevs.append(option_props(opt.value, "type"))
        elif opt.name == "nic":
            props = option_props(opt.value, "type")
            netdevs.append(props)
        elif opt.name == "chardev":
            chardevs.append(option_props(opt.value, "backend"))
    return DeclaredDevices(tuple(drivers), tuple(objects), tuple(netdevs), tuple(chardevs),
                           tuple(ids))


# --- building new command lines -------------------------------------------------------------


def without(argv: QemuArgv, *names: str) -> QemuArgv:
    return QemuArgv(argv.binary, tuple(o for o in argv.options if o.name not in names))


def with_binary(argv: QemuArgv, binary: str) -> QemuArgv:
    return QemuArgv(binary, argv.options)


def appended(argv: QemuArgv, words: Sequence[str]) -> QemuArgv:
    if not words:
        return argv
    extra = parse([argv.binary, *words])
    return QemuArgv(argv.binary, argv.options + extra.options)


def replace_socket_path(argv: QemuArgv, old_path: str, new_path: str) -> QemuArgv:
    """Point every listening socket at old_path (a QMP monitor, usually) to new_path."""
    out: list[Option] = []
    for opt in argv.options:
        value = opt.value
        if value is not None and old_path in value:
            if value == f"unix:{old_path}" or value.startswith(f"unix:{old_path},"):
                value = "unix:" + new_path + value[len("unix:") + len(old_path):]
            elif value.lstrip().startswith("{"):
                obj = json.loads(value)
                value = json.dumps(_replace_in_json(obj, old_path, new_path))
            else:
                items = [(k, new_path if v == old_path else v) for k, v in split_keyvals(value)]
                value = join_keyvals(items)
        out.append(Option(opt.name, value))
    return QemuArgv(argv.binary, tuple(out))


def _replace_in_json(obj: object, old: str, new: str) -> object:
    if isinstance(obj, dict):
        return {k: _replace_in_json(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_in_json(v, old, new) for v in obj]
    return new if obj == old else obj


def taps_by_fd(argv: QemuArgv, ifname_to_fd: dict[str, int]) -> QemuArgv:
    """Rewrite `-netdev tap,ifname=X` to `fd=N` with the descriptor the running QEMU holds.

    QEMU's tap descriptors survive exec (they are not close-on-exec), so a QEMU exec'd with
    ifname= finds its own tap busy; with fd= it adopts the same tap, same queue, no link flap.
    """
    out: list[Option] = []
    for opt in argv.options:
        if opt.name == "netdev" and opt.value is not None and not opt.value.startswith("{"):
            items = split_keyvals(opt.value)
            props = option_props(opt.value, "type")
            if props.get("type") == "tap":
                ifname = props.get("ifname")
                if ifname is not None and ifname in ifname_to_fd:
                    kept = [(k, v) for k, v in items
                            if k not in ("ifname", "script", "downscript", "br", "helper")]
                    kept.append(("fd", str(ifname_to_fd[ifname])))
                    out.append(Option("netdev", join_keyvals(kept)))
                    continue
        out.append(opt)
    return QemuArgv(argv.binary, tuple(out))


_MONITOR_OPTIONS = frozenset({"qmp", "qmp-pretty", "monitor", "mon"})
# Listeners and files the running VM holds, or that describe how it was started.
_NOT_TWICE = frozenset({"pidfile", "incoming", "S", "daemonize", "vnc", "spice", "gdb",
                        "qtest", "debugcon", "parallel"})
_HOST_NETDEVS = frozenset({"tap", "vhost-user", "vhost-vdpa", "bridge"})


def dry_run_argv(argv: QemuArgv, qmp_path: str, probe_id: str) -> QemuArgv:
    """The new QEMU's exact argv made safe to start beside the running VM.

    It keeps everything that decides whether the new QEMU accepts the command line (options,
    machine, devices, memory sizes), and swaps what cannot be opened twice or must not be
    touched: monitors and character devices (its own QMP socket, null chardevs), file-backed
    RAM (an anonymous memfd of the same size), pidfiles, taps (a hub port), and it starts
    paused with a deferred incoming, so no guest code runs and no state is read.
    """
    out: list[Option] = []
    for opt in argv.options:
        if opt.name in _MONITOR_OPTIONS or opt.name in _NOT_TWICE:
            continue
        if opt.value is None:
            out.append(opt)
            continue
        if opt.name == "chardev":
            props = option_props(opt.value, "backend")
            out.append(Option("chardev", f"null,id={props.get('id', 'chr')}"))
            continue
        if opt.name == "serial" and not opt.value.startswith("chardev:"):
            out.append(Option("serial", "null"))
            continue
        if opt.name == "object":
            props = option_props(opt.value, "qom-type")
            if props.get("qom-type") == "memory-backend-file":
                keep = {k: v for k, v in props.items()
                        if k in ("id", "size", "share", "merge", "dump", "prealloc")}
                keep["qom-type"] = "memory-backend-memfd"
                out.append(Option("object", join_keyvals(
                    [("memory-backend-memfd", None)]
                    + [(k, v) for k, v in keep.items() if k != "qom-type"])))
                continue
        if opt.name in ("netdev", "nic"):
            props = option_props(opt.value, "type")
            if props.get("type") in _HOST_NETDEVS:
                if opt.name == "netdev":
                    out.append(Option("netdev", f"hubport,id={props.get('id', 'net')},hubid=0"))
                else:
                    nic: list[tuple[str, str | None]] = [("hubport", None), ("hubid", "0")]
                    nic += [(k, v) for k, v in props.items() if k in ("model", "mac", "id")]
                    out.append(Option("nic", join_keyvals(nic)))
                continue
        if opt.name == "device":
            props = option_props(opt.value, "driver")
            # Host devices cannot be opened a second time beside the VM, nor vhost-user back
            # ends (they serve one front end: the dry run would wait for them forever); the
            # probe's driver check covers them.
            if props.get("driver", "").startswith(("vfio-", "vhost-user", "vhost-vdpa")):
                continue
        out.append(opt)
    out.append(Option("qmp", f"unix:{qmp_path},server=on,wait=off"))
    out.append(Option("S", None))
    out.append(Option("incoming", "defer"))
    out.append(Option("name", f"vmupdate-dry-run-{probe_id}"))
    return QemuArgv(argv.binary, tuple(_dedupe_name(out)))


def _dedupe_name(options: list[Option]) -> list[Option]:
    # The dry run's own -name goes last; QEMU takes the last, but drop earlier ones so the
    # process list does not show a second QEMU under the VM's name.
    last = max((i for i, o in enumerate(options) if o.name == "name"), default=-1)
    return [o for i, o in enumerate(options) if o.name != "name" or i == last]


def qmp_socket_paths(argv: QemuArgv) -> list[str]:
    """Paths of the QMP monitors a command line declares (either spelling)."""
    paths: list[str] = []
    chardev_paths: dict[str, str] = {}
    for opt in argv.options:
        if opt.name == "chardev" and opt.value is not None:
            props = option_props(opt.value, "backend")
            if props.get("backend") == "socket" and "path" in props and "id" in props:
                chardev_paths[props["id"]] = props["path"]
    for opt in argv.options:
        if opt.value is None:
            continue
        if opt.name in ("qmp", "qmp-pretty") and opt.value.startswith("unix:"):
            paths.append(opt.value[len("unix:"):].split(",", 1)[0])
        elif opt.name == "mon":
            props = option_props(opt.value, "chardev")
            if props.get("mode") == "control" and props.get("chardev") in chardev_paths:
                paths.append(chardev_paths[props["chardev"]])
    return paths
