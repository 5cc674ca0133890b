"""vhost back ends and CPR: which devices each mode can carry across an update. Pure.

What QEMU 11.1.3 does with a vhost-user-blk device served by qemu-storage-daemon while the
guest writes and reads its disk (measured; docs/vhost-user.md has the numbers and the tests):
- cpr-exec: QEMU's end of the vhost-user socket is close-on-exec, so the exec drops the
  connection; the back end goes back to listening, the new QEMU connects while it builds the
  device, negotiates again, and takes the ring positions from the migration stream. Guest
  I/O goes on and reads back what was written before. Supported.
- cpr-transfer: the new QEMU is started while the old one still holds the connection. QEMU
  hands over RAM and ROM descriptors only (the cpr state has no chardev), so the new QEMU
  connects anew while building the device; a vhost-user back end serves one front end at a
  time, so the new QEMU waits for the answer to its first message (GET_FEATURES) forever and
  the handover never starts (the update times out; the guest never stops). QEMU raises no
  migration blocker for it. Refused.
- cpr-reboot: QEMU itself carries the device when the old process quits before the new one
  starts (checked by hand). The agent, though, starts the new QEMU beside the stopped old one,
  so that a new QEMU that cannot start leaves the old one to resume: that new QEMU waits on
  the back end like cpr-transfer's, the guest stays paused until the agent gives up (its
  handover timeout) and resumes the old one. Refused.

Only vhost-user-blk was tried; other vhost-user devices (net, fs, scsi, ...) and vDPA and
kernel vhost devices (vhost-vsock, vhost-scsi) stay refused in every mode. The back end must
listen and QEMU connect (a socket chardev with path=, not server=on, not fd=): that is the
set-up that was verified, and the only one in which the new QEMU finds the back end by
itself. A vhost-user device declared in a -readconfig file is refused in every mode: the dry
run reads the same file and would wait on the back end (docs/vhost-user.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from vmupdate_agent import argv as qargv
from vmupdate_agent.models import CprMode

BLK_DRIVERS = frozenset({"vhost-user-blk", "vhost-user-blk-pci",
                         "vhost-user-blk-pci-transitional",
                         "vhost-user-blk-pci-non-transitional"})
_ON = ("on", "true", "yes")


class Kind(StrEnum):
    USER_BLK = "vhost-user-blk"
    USER_OTHER = "vhost-user"
    VDPA = "vdpa"
    KERNEL = "vhost-kernel"


@dataclass(frozen=True)
class VhostDevice:
    what: str  # how a person finds it in the command line, e.g. "device vblk0 (vhost-user-blk-pci)"
    kind: Kind
    chardev_problem: str | None = None  # why its chardev is not the verified set-up
    in_config: bool = False  # declared in a -readconfig file, not on the command line


def _kind(driver: str) -> Kind | None:
    if driver in BLK_DRIVERS:
        return Kind.USER_BLK
    if driver.startswith("vhost-user"):
        return Kind.USER_OTHER
    if driver.startswith("vhost-vdpa"):
        return Kind.VDPA
    if driver.startswith("vhost-"):
        return Kind.KERNEL
    return None


def _chardev_problem(chardev_id: str | None, chardevs: dict[str, dict[str, str]]) -> str | None:
    if not chardev_id:
        return "it names no chardev"
    props = chardevs.get(chardev_id)
    if props is None:
        return f"its chardev {chardev_id} is not on the command line"
    if props.get("backend") != "socket":
        return f"its chardev {chardev_id} is {props.get('backend')!r}, not a socket"
    if props.get("server", "off") in _ON:
        return (f"its chardev {chardev_id} listens (server=on): after the update the back end "
                "would have to find the new QEMU")
    if not props.get("path"):
        return f"its chardev {chardev_id} is not a UNIX socket path (path=)"
    return None


def devices(argv: Sequence[str], readconfig_options: Sequence[str] = ()
            ) -> tuple[VhostDevice, ...]:
    """The vhost devices a VM declares, on its command line and in its -readconfig files
    (`readconfig_options`: their sections as command-line words), each with its kind."""
    parsed = qargv.parse(argv)
    config = qargv.parse([parsed.binary, *readconfig_options])
    chardevs: dict[str, dict[str, str]] = {}
    for value in (*parsed.values("chardev"), *config.values("chardev")):
        props = qargv.option_props(value, "backend")
        if "id" in props:
            chardevs[props["id"]] = props
    return (*_declared(parsed, chardevs, in_config=False),
            *_declared(config, chardevs, in_config=True))


def _declared(parsed: qargv.QemuArgv, chardevs: dict[str, dict[str, str]], *,
              in_config: bool) -> list[VhostDevice]:
    found: list[VhostDevice] = []
    for value in parsed.values("device"):
        props = qargv.option_props(value, "driver")
        driver = props.get("driver", "")
        kind = _kind(driver)
        if kind is None:
            continue
        name = f"device {props['id']} ({driver})" if "id" in props else f"device {driver}"
        problem = (_chardev_problem(props.get("chardev"), chardevs)
                   if kind == Kind.USER_BLK else None)
        found.append(VhostDevice(name, kind, problem, in_config))
    for opt in ("netdev", "nic"):
        for value in parsed.values(opt):
            props = qargv.option_props(value, "type")
            kind = {"vhost-user": Kind.USER_OTHER, "vhost-vdpa": Kind.VDPA}.get(
                props.get("type", ""))
            if kind is not None:
                found.append(VhostDevice(f"netdev {props.get('id', '?')} ({props['type']})",
                                         kind, None, in_config))
    return found


def problem(device: VhostDevice, mode: CprMode) -> str | None:
    """Why `mode` cannot carry `device` across an update (None: it can), with what to do."""
    if device.in_config and device.kind in (Kind.USER_BLK, Kind.USER_OTHER):
        return (f"{device.what} is declared in a -readconfig file: preflight's dry run reads "
                f"the same file and would wait on the back end the VM holds, so {mode} cannot "
                "be checked. Declare the device and its chardev on the command line "
                "(-chardev socket,... -device ...)")
    if device.kind == Kind.USER_BLK:
        if mode == CprMode.CPR_TRANSFER:
            return (f"{device.what}: cpr-transfer starts the new QEMU while the old one still "
                    "holds the vhost-user connection, which QEMU does not hand over; the back "
                    "end serves one front end at a time, so the new QEMU would wait for it "
                    "forever. Use cpr-exec: the connection is made again after the exec")
        if mode == CprMode.CPR_REBOOT:
            return (f"{device.what}: cpr-reboot starts the new QEMU beside the stopped old one "
                    "(the way back if it fails), and the new QEMU would wait for the vhost-user "
                    "back end the old one still holds, with the guest paused. Use cpr-exec: "
                    "the connection is made again after the exec")
        if device.chardev_problem is not None:
            return (f"{device.what}: {device.chardev_problem}. {mode} carries vhost-user-blk "
                    "over only when QEMU connects to a back end that listens on a UNIX socket "
                    "(-chardev socket,id=...,path=...), so the new QEMU can connect again")
        return None
    if device.kind == Kind.USER_OTHER:
        return (f"{device.what}: of the vhost-user devices only vhost-user-blk is known to "
                f"survive CPR; {mode} of this one was never verified. Update this VM by "
                "restarting it")
    if device.kind == Kind.VDPA:
        return (f"{device.what}: vDPA devices are not preserved by CPR; update this VM by "
                "restarting it")
    return (f"{device.what}: kernel vhost devices are not preserved by CPR (the new QEMU "
            "would open a second vhost instance); update this VM by restarting it")


def problems(argv: Sequence[str], mode: CprMode, readconfig_options: Sequence[str] = ()
             ) -> list[str]:
    return [msg for d in devices(argv, readconfig_options)
            if (msg := problem(d, mode)) is not None]
