"""vhost devices and CPR, the pure rule (vmupdate_agent.vhost_user) and its place in preflight:
every kind of device x every chardev set-up x every mode, against the table measured on QEMU
11.1.3 (docs/vhost-user.md; the real-QEMU side is tests/agent/test_vhost_user.py)."""

from __future__ import annotations

import itertools

import pytest

from tests.unit.conftest import read_raw
from tests.unit.test_preflight import good_inputs
from vmupdate_agent import argv as qargv
from vmupdate_agent import discovery, preflight, vhost_user
from vmupdate_agent.models import CprMode, MemoryBackend, RequestedMode, VMInfo
from vmupdate_agent.vhost_user import Kind

EXEC, TRANSFER, REBOOT = CprMode.CPR_EXEC, CprMode.CPR_TRANSFER, CprMode.CPR_REBOOT
MODES = (EXEC, TRANSFER, REBOOT)
SOCK = "/run/vms/vm1/vhost-user-blk.sock"

# chardev set-ups of a vhost-user-blk device: (words, why it is not the verified set-up)
CHARDEVS: dict[str, tuple[list[str], str | None]] = {
    "client-socket": (["-chardev", f"socket,id=vhu0,path={SOCK}"], None),
    "client-socket-reconnect": (["-chardev", f"socket,id=vhu0,path={SOCK},reconnect-ms=1000"],
                                None),
    "server-socket": (["-chardev", f"socket,id=vhu0,path={SOCK},server=on,wait=off"],
                      "its chardev vhu0 listens (server=on)"),
    "server-bare-word": (["-chardev", f"socket,id=vhu0,path={SOCK},server,nowait"],
                         "its chardev vhu0 listens (server=on)"),
    "fd-socket": (["-chardev", "socket,id=vhu0,fd=33"],
                  "its chardev vhu0 is not a UNIX socket path (path=)"),
    "not-a-socket": (["-chardev", "file,id=vhu0,path=/tmp/x"],
                     "its chardev vhu0 is 'file', not a socket"),
    "missing-chardev": ([], "its chardev vhu0 is not on the command line"),
}
BLK_DRIVERS = sorted(vhost_user.BLK_DRIVERS)
# (words, kind, the name a person finds it by)
OTHERS: dict[str, tuple[list[str], Kind, str]] = {
    "vhost-user-net": (["-chardev", f"socket,id=c1,path={SOCK}",
                        "-netdev", "vhost-user,id=net0,chardev=c1",
                        "-device", "virtio-net-pci,netdev=net0"],
                       Kind.USER_OTHER, "netdev net0 (vhost-user)"),
    "vhost-user-net-nic": (["-chardev", f"socket,id=c1,path={SOCK}",
                            "-nic", "vhost-user,id=nic1,chardev=c1"],
                           Kind.USER_OTHER, "netdev nic1 (vhost-user)"),
    "vhost-user-fs": (["-chardev", f"socket,id=c1,path={SOCK}",
                       "-device", "vhost-user-fs-pci,chardev=c1,tag=fs,id=fs0"],
                      Kind.USER_OTHER, "device fs0 (vhost-user-fs-pci)"),
    "vhost-user-scsi": (["-chardev", f"socket,id=c1,path={SOCK}",
                         "-device", "vhost-user-scsi-pci,chardev=c1"],
                        Kind.USER_OTHER, "device vhost-user-scsi-pci"),
    "vhost-vdpa-netdev": (["-netdev", "vhost-vdpa,id=n2,vhostdev=/dev/vhost-vdpa-0"],
                          Kind.VDPA, "netdev n2 (vhost-vdpa)"),
    "vhost-vdpa-device": (["-device", "vhost-vdpa-device-pci,vhostdev=/dev/vhost-vdpa-0"],
                          Kind.VDPA, "device vhost-vdpa-device-pci"),
    "vhost-vsock": (["-device", "vhost-vsock-pci,guest-cid=3,id=vsock0"],
                    Kind.KERNEL, "device vsock0 (vhost-vsock-pci)"),
    "vhost-scsi": (["-device", "vhost-scsi-pci,wwpn=naa.5001405,id=vs0"],
                   Kind.KERNEL, "device vs0 (vhost-scsi-pci)"),
}


def argv_with(words: list[str]) -> list[str]:
    return [*read_raw()["argv"], *words]


def blk_words(driver: str, chardev: str) -> list[str]:
    return [*CHARDEVS[chardev][0], "-device", f"{driver},chardev=vhu0,id=vblk0"]


def expected_blk(mode: CprMode, chardev: str) -> str | None:
    """The measured table: cpr-exec with a back end that listens on a UNIX socket path QEMU
    connects to; cpr-transfer and cpr-reboot (as the agent runs it) never."""
    if mode == TRANSFER:
        return "cpr-transfer starts the new QEMU while the old one still holds"
    if mode == REBOOT:
        return "cpr-reboot starts the new QEMU beside the stopped old one"
    return CHARDEVS[chardev][1]


# --- the rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("driver", "chardev", "mode"),
                         list(itertools.product(BLK_DRIVERS, CHARDEVS, MODES)))
def test_vhost_user_blk_per_mode_and_chardev(driver: str, chardev: str, mode: CprMode) -> None:
    [device] = vhost_user.devices(argv_with(blk_words(driver, chardev)))
    assert device.kind == Kind.USER_BLK
    assert device.what == f"device vblk0 ({driver})"
    msg = vhost_user.problem(device, mode)
    want = expected_blk(mode, chardev)
    if want is None:
        assert msg is None
        return
    assert msg is not None
    assert want in msg
    assert msg.startswith(f"device vblk0 ({driver}): ")  # names the device
    if mode in (TRANSFER, REBOOT):
        assert "Use cpr-exec" in msg  # what to do instead
    else:
        assert str(mode) in msg and "-chardev socket,id=...,path=..." in msg


def test_vhost_user_blk_without_a_chardev_property() -> None:
    [device] = vhost_user.devices(argv_with(["-device", "vhost-user-blk-pci,id=vblk0"]))
    assert device.chardev_problem == "it names no chardev"
    assert vhost_user.problem(device, EXEC) is not None


@pytest.mark.parametrize(("name", "mode"), list(itertools.product(OTHERS, MODES)))
def test_other_vhost_devices_are_refused_in_every_mode(name: str, mode: CprMode) -> None:
    words, kind, what = OTHERS[name]
    [device] = vhost_user.devices(argv_with(words))
    assert (device.kind, device.what) == (kind, what)
    msg = vhost_user.problem(device, mode)
    assert msg is not None and msg.startswith(f"{what}: ")
    assert "restarting it" in msg
    if kind == Kind.USER_OTHER:
        assert "only vhost-user-blk" in msg and str(mode) in msg


def test_json_device_syntax() -> None:
    words = ["-chardev", f"socket,id=vhu0,path={SOCK}",
             "-device", '{"driver":"vhost-user-blk-pci","chardev":"vhu0","id":"vblk0"}']
    [device] = vhost_user.devices(argv_with(words))
    assert (device.kind, device.chardev_problem) == (Kind.USER_BLK, None)


def test_no_vhost_devices() -> None:
    assert vhost_user.devices(read_raw()["argv"]) == ()
    assert vhost_user.problems(read_raw()["argv"], TRANSFER) == []


def test_every_device_is_reported() -> None:
    words = [*blk_words("vhost-user-blk-pci", "client-socket"),
             "-chardev", f"socket,id=vhu1,path={SOCK}.2",
             "-device", "vhost-user-blk-pci,chardev=vhu1,id=vblk1", *OTHERS["vhost-vsock"][0]]
    argv = argv_with(words)
    assert [d.what for d in vhost_user.devices(argv)] == [
        "device vblk0 (vhost-user-blk-pci)", "device vblk1 (vhost-user-blk-pci)",
        "device vsock0 (vhost-vsock-pci)"]
    assert len(vhost_user.problems(argv, TRANSFER)) == 3
    assert [m.split(":")[0] for m in vhost_user.problems(argv, EXEC)] == [
        "device vsock0 (vhost-vsock-pci)"]


# --- in preflight -----------------------------------------------------------------------------


def vm_with(words: list[str], *, file_ram: bool = False) -> VMInfo:
    raw = read_raw()
    raw["argv"] = argv_with(words)
    vm = discovery.build_vm_info(raw)
    if file_ram:  # cpr-reboot needs RAM in a file on /dev/shm
        vm = vm.model_copy(update={"memory_backends": tuple(
            MemoryBackend(id=b.id, kind="file", size_bytes=b.size_bytes, share=True,
                          mem_path="/dev/shm/vm1") for b in vm.memory_backends)})
    return vm


@pytest.mark.parametrize(("chardev", "mode"), list(itertools.product(CHARDEVS, MODES)))
def test_preflight_report_names_device_and_mode(chardev: str, mode: CprMode) -> None:
    vm = vm_with(blk_words("vhost-user-blk-pci", chardev), file_ram=mode == REBOOT)
    report = preflight.evaluate(good_inputs(vm, RequestedMode(mode.value)))
    want = expected_blk(mode, chardev)
    [check] = [c for c in report.checks if c.name == "vhost"]
    failed = [c.name for c in report.failures()]
    if want is None:
        assert check.passed, check.message
        assert report.passed, failed
    else:
        assert not check.passed and want in check.message
        assert "device vblk0 (vhost-user-blk-pci)" in check.message
        assert failed == ["vhost"]  # refused in preflight, by this check alone


def test_auto_on_a_qemu_without_cpr_exec_is_refused_with_the_reason() -> None:
    # Auto falls back to cpr-transfer where cpr-exec is missing: the vhost check says why
    # that cannot carry the disk.
    vm = vm_with(blk_words("vhost-user-blk-pci", "client-socket"))
    vm = vm.model_copy(update={"features": vm.features.model_copy(
        update={"cpr_modes": (TRANSFER, REBOOT), "has_cpr_exec_command": False})})
    report = preflight.evaluate(good_inputs(vm))
    assert report.mode == TRANSFER
    [check] = [c for c in report.checks if c.name == "vhost"]
    assert not check.passed and "Use cpr-exec" in check.message


def test_readiness_of_a_vhost_user_blk_vm() -> None:
    vm = vm_with(blk_words("vhost-user-blk-pci", "client-socket"), file_ram=True)
    ready = preflight.readiness(vm)
    assert ready.ready
    assert ready.modes == (EXEC,)


def test_readiness_with_a_listening_chardev_names_the_fix() -> None:
    vm = vm_with(blk_words("vhost-user-blk-pci", "server-socket"))
    ready = preflight.readiness(vm)
    assert not ready.ready
    assert any("server=on" in r and r.startswith("cpr-exec: ") for r in ready.reasons)


# --- the dry run leaves vhost-user back ends alone ----------------------------------------------


def test_dry_run_argv_drops_vhost_user_devices_and_their_sockets() -> None:
    words = [*blk_words("vhost-user-blk-pci", "client-socket"), *OTHERS["vhost-user-net"][0]]
    dry = qargv.dry_run_argv(qargv.parse(argv_with(words)), "/run/dry/qmp.sock", "p1")
    rendered = " ".join(dry.render())
    assert "vhost-user-blk-pci" not in rendered
    assert SOCK not in rendered  # no second front end knocks on the back end's socket
    assert "chardev null,id=vhu0" in rendered
    assert "hubport,id=net0" in rendered


# --- devices declared in -readconfig files ---------------------------------------------------

CONFIG = f"""# the VM's devices
[chardev "vhu0"]
  backend = "socket"
  path = "{SOCK}"

[device "vblk0"]
  driver = "vhost-user-blk-pci"
  chardev = "vhu0"
[machine]
  type = "pc-q35-10.0"
[device]
  driver = "virtio-rng-pci"
  note = "a value, with a comma"
"""


def test_readconfig_sections_become_command_line_words() -> None:
    assert discovery.readconfig_options(CONFIG) == [
        "-chardev", f"backend=socket,path={SOCK},id=vhu0",
        "-device", "driver=vhost-user-blk-pci,chardev=vhu0,id=vblk0",
        "-device", "driver=virtio-rng-pci,note=a value,, with a comma",
    ]
    assert discovery.readconfig_options("") == []
    assert discovery.readconfig_options('[machine]\n  type = "q35"\n') == []


def test_build_vm_info_carries_the_readconfig_options() -> None:
    raw = read_raw()
    raw["readconfig-options"] = discovery.readconfig_options(CONFIG)
    assert discovery.build_vm_info(raw).readconfig_options == tuple(raw["readconfig-options"])
    assert discovery.build_vm_info(read_raw()).readconfig_options == ()


@pytest.mark.parametrize("mode", MODES)
def test_vhost_user_device_from_readconfig_is_refused_in_every_mode(mode: CprMode) -> None:
    options = discovery.readconfig_options(CONFIG)
    [device] = vhost_user.devices(read_raw()["argv"], options)
    assert (device.what, device.kind, device.in_config) == (
        "device vblk0 (vhost-user-blk-pci)", Kind.USER_BLK, True)
    msg = vhost_user.problem(device, mode)
    assert msg is not None
    assert msg.startswith("device vblk0 (vhost-user-blk-pci) is declared in a -readconfig file")
    assert f"so {mode} cannot be checked" in msg and "on the command line" in msg


def test_a_command_line_device_may_use_a_chardev_from_readconfig() -> None:
    options = ["-chardev", f"backend=socket,path={SOCK},id=vhu0"]
    argv = argv_with(["-device", "vhost-user-blk-pci,chardev=vhu0,id=vblk0"])
    [device] = vhost_user.devices(argv, options)
    assert (device.in_config, device.chardev_problem) == (False, None)
    assert vhost_user.problem(device, EXEC) is None


def test_preflight_refuses_a_readconfig_vhost_user_device() -> None:
    vm = vm_with([]).model_copy(
        update={"readconfig_options": tuple(discovery.readconfig_options(CONFIG))})
    report = preflight.evaluate(good_inputs(vm, RequestedMode.CPR_EXEC))
    assert [c.name for c in report.failures()] == ["vhost"]
    assert "-readconfig" in report.failures()[0].message
