"""Discovery's pure half, on recorded QMP answers: the CPR modes and dialect from the schema,
versions, and the VMInfo built from gather_raw's answers (recorded and derived variants)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from vmupdate_agent import argv as qargv
from vmupdate_agent import discovery, preflight
from vmupdate_agent.models import (
    CprMode,
    MemoryBackend,
    QemuFeatures,
    QemuVersion,
    RequestedMode,
    TapDevice,
    Target,
    VMInfo,
)
from vmupdate_agent.preflight import HostFacts, PreflightInputs
from vmupdate_agent.target import BinaryFacts

FIXTURES = Path(__file__).resolve().parent / "fixtures"

RawLoader = Callable[[str], dict[str, Any]]
SchemaLoader = Callable[[str], list[dict[str, Any]]]
BASE = "raw-sid-11.1.3-memfd"
EXEC, TRANSFER, REBOOT = CprMode.CPR_EXEC, CprMode.CPR_TRANSFER, CprMode.CPR_REBOOT
MIB = 1 << 20


# --- the schema -------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "modes"), [
    ("10.0.2", ["cpr-reboot", "cpr-transfer"]),
    ("11.1.3", ["cpr-reboot", "cpr-transfer", "cpr-exec"]),
])
def test_cpr_modes_from_recorded_schema(load_schema: SchemaLoader, version: str,
                                        modes: list[str]) -> None:
    schema = load_schema(version)
    assert discovery.cpr_modes_from_schema(schema) == modes
    # Why it goes by values: the type's name is mangled, and another enum has a 'cpr' value.
    [mig_mode] = [e for e in schema if e["meta-type"] == "enum" and "cpr-reboot" in e["values"]]
    assert mig_mode["name"].isdigit()
    assert any(e["meta-type"] == "enum" and e["values"] == ["main", "cpr"] for e in schema)


@pytest.mark.parametrize(("schema", "modes"), [
    pytest.param([{"meta-type": "enum", "name": "77", "values": ["normal", "cpr-reboot"]}],
                 ["cpr-reboot"], id="values-form"),
    pytest.param([{"meta-type": "enum", "name": "77",
                   "members": [{"name": "normal"}, {"name": "cpr-reboot"},
                               {"name": "cpr-transfer"}]}],
                 ["cpr-reboot", "cpr-transfer"], id="members-form"),
    pytest.param([{"meta-type": "enum", "name": "MigMode",
                   "values": ["normal", "cpr-exec"]}], ["cpr-exec"], id="cpr-exec-alone"),
    pytest.param([{"meta-type": "enum", "name": "1", "values": ["main", "cpr"]},
                  {"meta-type": "object", "name": "2",
                   "members": [{"name": "cpr-reboot", "type": "str"}]},
                  {"meta-type": "enum", "name": "3",
                   "values": ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]}],
                 ["cpr-reboot", "cpr-transfer", "cpr-exec"], id="skips-other-entries"),
    pytest.param([{"meta-type": "enum", "name": "1", "values": ["normal"]}], [],
                 id="normal-only"),
    pytest.param([{"meta-type": "command", "name": "query-version"}], [], id="no-enum"),
    pytest.param([], [], id="empty"),
])
def test_cpr_modes_from_schema(schema: list[dict[str, Any]], modes: list[str]) -> None:
    assert discovery.cpr_modes_from_schema(schema) == modes


@pytest.mark.parametrize("version", ["10.0.2", "11.1.3"])
def test_upstream_schemas_are_not_the_legacy_dialect(load_schema: SchemaLoader,
                                                     version: str) -> None:
    assert not discovery.legacy_dialect_from_schema(load_schema(version))


def test_legacy_dialect_in_an_otherwise_recorded_schema(load_schema: SchemaLoader) -> None:
    schema = load_schema("11.1.3")
    [params] = [e for e in schema if e["meta-type"] == "object"
                and any(m["name"] == "cpr-exec-command" for m in e["members"])]
    renamed = copy.deepcopy(schema)
    for entry in renamed:
        if entry["name"] == params["name"]:
            for m in entry["members"]:
                if m["name"] == "cpr-exec-command":
                    m["name"] = "cpr-exec-args"
    assert discovery.legacy_dialect_from_schema(renamed)
    with_command = [*schema, {"meta-type": "command", "name": "migrate-mode-enable",
                              "arg-type": "0", "ret-type": "0"}]
    assert discovery.legacy_dialect_from_schema(with_command)


@pytest.mark.parametrize(("schema", "legacy"), [
    pytest.param([{"meta-type": "command", "name": "migrate-mode-enable"}], True,
                 id="migrate-mode-enable"),
    pytest.param([{"meta-type": "object", "name": "150",
                   "members": [{"name": "mode", "type": "439"},
                               {"name": "cpr-exec-args", "type": "[str]"}]}], True,
                 id="cpr-exec-args-member"),
    pytest.param([{"meta-type": "object", "name": "150",
                   "members": [{"name": "cpr-exec-command", "type": "[str]"}]}], False,
                 id="upstream-cpr-exec-command"),
    pytest.param([{"meta-type": "enum", "name": "1", "values": ["cpr-exec-args"]}], False,
                 id="an-enum-value-is-not-a-member"),
    pytest.param([{"meta-type": "object", "name": "1", "members": None}], False,
                 id="members-null"),
    pytest.param([{"meta-type": "builtin", "json-type": "str"}], False, id="no-name"),
    pytest.param([], False, id="empty"),
])
def test_legacy_dialect_from_schema(schema: list[dict[str, Any]], legacy: bool) -> None:
    assert discovery.legacy_dialect_from_schema(schema) is legacy


# --- versions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "expected"), [
    pytest.param({"package": "Debian 1:11.1.3+ds-1", "qemu": {"major": 11, "micro": 3,
                                                               "minor": 1}},
                 QemuVersion(major=11, minor=1, micro=3, package="Debian 1:11.1.3+ds-1"),
                 id="recorded-11.1.3"),
    pytest.param({"package": " v10.1.0-12-gabcdef ", "qemu": {"major": 10, "micro": 50,
                                                               "minor": 1}},
                 QemuVersion(major=10, minor=1, micro=50, package="v10.1.0-12-gabcdef"),
                 id="package-stripped"),
    pytest.param({"qemu": {"major": "9", "micro": "0", "minor": "2"}},
                 QemuVersion(major=9, minor=2, micro=0), id="no-package"),
])
def test_parse_version(answer: dict[str, Any], expected: QemuVersion) -> None:
    assert discovery.parse_version(answer) == expected


def test_parse_version_of_the_recording(load_raw: RawLoader) -> None:
    v = discovery.parse_version(load_raw(BASE)["query-version"])
    assert str(v) == "11.1.3" and v.package == "Debian 1:11.1.3+ds-1"


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n"
                  "Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n",
                  QemuVersion(major=10, minor=0, micro=2,
                              package="Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"), id="backports"),
    pytest.param("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1)\n",
                 QemuVersion(major=11, minor=1, micro=3, package="Debian 1:11.1.3+ds-1"),
                 id="sid"),
    pytest.param("QEMU emulator version 9.2.0\n"
                 "Copyright (c) 2003-2024 Fabrice Bellard and the QEMU Project developers\n",
                 QemuVersion(major=9, minor=2, micro=0), id="no-package-copyright-not-taken"),
    pytest.param("qemu-system-x86_64: warning: something\n"
                 "QEMU emulator version 10.1.50 (v10.1.0-1234-gdeadbeef)\n",
                 QemuVersion(major=10, minor=1, micro=50, package="v10.1.0-1234-gdeadbeef"),
                 id="after-a-warning"),
    pytest.param("", None, id="empty"),
    pytest.param("/bin/true: no output", None, id="not-qemu"),
    pytest.param("QEMU emulator version 10.0\n", None, id="no-micro"),
])
def test_parse_version_output(text: str, expected: QemuVersion | None) -> None:
    assert discovery.parse_version_output(text) == expected


# --- build_vm_info: the recording ----------------------------------------------------------


def test_build_vm_info_from_the_recording(load_raw: RawLoader) -> None:
    raw = load_raw(BASE)
    vm = discovery.build_vm_info(raw)
    assert vm == VMInfo(
        qmp_path="/run/vms/vm1/qmp.sock",
        pid=30072,
        name="manual1",
        uuid="11111111-2222-3333-4444-555555555555",
        argv=tuple(raw["argv"]),
        root="/",
        binary="/usr/bin/qemu-system-x86_64",
        features=QemuFeatures(
            version=QemuVersion(major=11, minor=1, micro=3, package="Debian 1:11.1.3+ds-1"),
            cpr_modes=(REBOOT, TRANSFER, EXEC),
            legacy_cpr_dialect=False,
            has_cpr_exec_command=True,
        ),
        runstate="running",
        machine_type="pc-q35-10.0",
        memory_backends=(MemoryBackend(id="ram0", kind="memfd", size_bytes=256 * MIB,
                                       share=True, mem_path=None),),
        aux_ram_share=True,
        blockers_by_mode={"cpr-exec": (), "cpr-reboot": (), "cpr-transfer": ()},
    )
    assert vm.memory_bytes == 256 * MIB
    assert discovery.hotplugged_devices(raw) == []
    assert discovery.blockers_by_mode(raw) == {"cpr-exec": [], "cpr-reboot": [],
                                               "cpr-transfer": []}


def test_the_recorded_vm_is_ready(load_raw: RawLoader) -> None:
    r = preflight.readiness(discovery.build_vm_info(load_raw(BASE)))
    assert r.ready and r.modes == (EXEC, TRANSFER) and r.reasons == ()


# --- build_vm_info: the variants ------------------------------------------------------------


def attrs(vm: VMInfo, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(vm, n) for n in names}


VARIANT_FACTS: list[Any] = [
    pytest.param("qemu-10.0.2", {
        "features": QemuFeatures(
            version=QemuVersion(major=10, minor=0, micro=2,
                                package="Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"),
            cpr_modes=(REBOOT, TRANSFER), has_cpr_exec_command=False)}, id="qemu-10.0.2"),
    pytest.param("qemu-9.2.0-no-aux-ram-share", {
        "aux_ram_share": None, "machine_type": "pc-q35-9.2",
        "features": QemuFeatures(version=QemuVersion(major=9, minor=2, micro=0),
                                 cpr_modes=(REBOOT,))}, id="qemu-9.2.0"),
    pytest.param("aux-ram-share-off", {
        "aux_ram_share": False,
        "migration_blockers": tuple(sorted(
            f"Memory region {r} is not compatible with CPR. share=on is required for "
            "memory-backend objects, and aux-ram-share=on is required."
            for r in ("pc.bios", "pc.rom", "/rom@etc/acpi/tables", "/rom@etc/table-loader",
                      "/rom@etc/acpi/rsdp")))}, id="aux-ram-share-off"),
    pytest.param("memory-ram-share-off", {
        "memory_backends": (MemoryBackend(id="ram0", kind="ram", size_bytes=256 * MIB,
                                          share=False),),
        "migration_blockers": ("Memory region ram0 is not compatible with CPR. share=on is "
                               "required for memory-backend objects, and aux-ram-share=on is "
                               "required.",)}, id="memory-ram-share-off"),
    pytest.param("memory-file-shm", {
        "memory_backends": (MemoryBackend(id="ram0", kind="file", size_bytes=256 * MIB,
                                          share=True, mem_path="/dev/shm/vm1-ram0"),)},
                 id="memory-file-shm"),
    pytest.param("memory-file-shm-aux-ram-share-off", {
        "memory_backends": (MemoryBackend(id="ram0", kind="file", size_bytes=256 * MIB,
                                          share=True, mem_path="/dev/shm/vm1-ram0"),),
        "aux_ram_share": False,
        "migration_blockers": tuple(sorted(
            f"Memory region {r} is not compatible with CPR. share=on is required for "
            "memory-backend objects, and aux-ram-share=on is required."
            for r in ("pc.bios", "pc.rom", "/rom@etc/acpi/tables", "/rom@etc/table-loader",
                      "/rom@etc/acpi/rsdp")))}, id="memory-file-shm-aux-ram-share-off"),
    pytest.param("legacy-dialect", {
        "features": QemuFeatures(version=QemuVersion(major=9, minor=1, micro=0),
                                 cpr_modes=(REBOOT, EXEC), legacy_cpr_dialect=True,
                                 has_cpr_exec_command=False)}, id="legacy-dialect"),
    pytest.param("migration-blocker-all-modes", {
        "migration_blockers": ("Migration is disabled when VirtFS export path '/srv/share' is "
                               "mounted in the guest using mount_tag 'share'",),
        "device_drivers": ("virtio-9p-pci",)}, id="blocker-all-modes"),
    pytest.param("capability-x-colo", {"enabled_capabilities": ("x-colo",)}, id="x-colo"),
    pytest.param("capability-postcopy-ram", {"enabled_capabilities": ("postcopy-ram",)},
                 id="postcopy-ram"),
    pytest.param("capability-background-snapshot",
                 {"enabled_capabilities": ("background-snapshot",)}, id="background-snapshot"),
    pytest.param("tap-ifname", {"taps": (TapDevice(id="net0", ifname="tap0"),),
                                "device_drivers": ("virtio-net-pci",)}, id="tap-ifname"),
    pytest.param("tap-fd", {"taps": (TapDevice(id="net0", fd=23),),
                            "device_drivers": ("virtio-net-pci",)}, id="tap-fd"),
    pytest.param("tap-fd-vhost-vhostfd",
                 {"taps": (TapDevice(id="net0", fd=23, vhost=True, vhostfd=24),),
                  "device_drivers": ("virtio-net-pci",)}, id="tap-vhostfd"),
    pytest.param("tap-fd-vhost-no-vhostfd",
                 {"taps": (TapDevice(id="net0", fd=23, vhost=True),),
                  "device_drivers": ("virtio-net-pci",)}, id="tap-vhost-no-vhostfd"),
    pytest.param("vfio-pci", {"vfio_devices": ("vfio-pci",), "iommufd_objects": (),
                              "device_drivers": ("vfio-pci",)}, id="vfio-pci"),
    pytest.param("vfio-pci-iommufd", {"vfio_devices": ("vfio-pci",),
                                      "iommufd_objects": ("iommufd",),
                                      "device_drivers": ("vfio-pci",)}, id="iommufd"),
    pytest.param("qemu-10.0.2-vfio-pci", {
        "vfio_devices": ("vfio-pci",), "device_drivers": ("vfio-pci",),
        "features": QemuFeatures(
            version=QemuVersion(major=10, minor=0, micro=2,
                                package="Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"),
            cpr_modes=(REBOOT, TRANSFER))}, id="vfio-10.0"),
    pytest.param("vhost-user-net", {"taps": (), "vhost_devices": ("netdev net0: vhost-user",),
                                    "device_drivers": ("virtio-net-pci",)}, id="vhost-user"),
    pytest.param("hotplugged-device", {"device_drivers": ()}, id="hotplugged"),
    pytest.param("runstate-inmigrate", {"runstate": "inmigrate"}, id="inmigrate"),
    pytest.param("runstate-postmigrate", {"runstate": "postmigrate"}, id="postmigrate"),
]


@pytest.mark.parametrize(("name", "facts"), VARIANT_FACTS)
def test_build_vm_info_from_variants(load_raw: RawLoader, name: str,
                                     facts: dict[str, Any]) -> None:
    base = discovery.build_vm_info(load_raw(BASE))
    vm = discovery.build_vm_info(load_raw(name))
    assert attrs(vm, tuple(facts)) == facts
    # Nothing else moved: every other fact is the recording's.
    # blockers_by_mode follows migration_blockers (checked per mode in its own test).
    untouched = tuple(n for n in VMInfo.model_fields
                      if n not in facts and n not in ("argv", "blockers_by_mode"))
    assert attrs(vm, untouched) == attrs(base, untouched)
    if "migration_blockers" not in facts:
        assert set(vm.blockers_by_mode.values()) <= {()}


def test_every_variant_is_covered() -> None:
    ids = {p.values[0] for p in VARIANT_FACTS}
    assert ids == {f.stem for f in (FIXTURES / "variants").glob("*.json")}


@pytest.mark.parametrize(("name", "hotplugged"), [
    (BASE, []),
    ("hotplugged-device", ["disk1"]),
    ("vfio-pci", []),
    ("tap-fd", []),
    ("migration-blocker-all-modes", []),
])
def test_hotplugged_devices(load_raw: RawLoader, name: str, hotplugged: list[str]) -> None:
    assert discovery.hotplugged_devices(load_raw(name)) == hotplugged


def test_hotplugged_devices_compares_ids_in_every_spelling(load_raw: RawLoader) -> None:
    raw = load_raw(BASE)
    raw["argv"] += ["-device", '{"driver":"virtio-rng-pci","id":"rng0"}',
                    "-device", "virtio-blk-pci,drive=d0,id=disk0",
                    "-device", "virtio-balloon-pci"]
    raw["peripherals"] = ["zz-late", "rng0", "disk0", "a-late"]
    assert discovery.hotplugged_devices(raw) == ["a-late", "zz-late"]
    raw.pop("peripherals")
    assert discovery.hotplugged_devices(raw) == []


# --- build_vm_info: defaults and spellings ---------------------------------------------------


def test_build_vm_info_defaults_for_missing_answers(load_raw: RawLoader) -> None:
    raw = load_raw(BASE)
    for key in ("query-name", "query-uuid", "root", "binary", "query-status", "objects",
                "mem-paths", "aux-ram-share", "machine-type", "legacy_dialect", "blockers",
                "capabilities", "migrate-parameters", "cpr_modes"):
        raw.pop(key)
    raw["argv"][0] = "/opt/qemu/bin/qemu-system-x86_64"
    vm = discovery.build_vm_info(raw)
    assert vm.name == "/run/vms/vm1/qmp.sock"
    assert vm.uuid == ""
    assert vm.root == "/"
    assert vm.binary == "/opt/qemu/bin/qemu-system-x86_64"
    assert vm.runstate == "unknown"
    assert vm.memory_backends == (MemoryBackend(id="ram0", kind="other", size_bytes=256 * MIB,
                                                share=True),)
    assert vm.aux_ram_share is None
    assert vm.machine_type == ""
    assert vm.features.cpr_modes == ()
    assert not vm.features.has_cpr_exec_command and not vm.features.legacy_cpr_dialect
    assert vm.migration_blockers == () and vm.enabled_capabilities == ()


def test_build_vm_info_ignores_modes_it_cannot_drive(load_raw: RawLoader) -> None:
    raw = load_raw(BASE)
    raw["cpr_modes"] = ["cpr-exec", "cpr-future", "normal", "cpr-reboot"]
    assert discovery.build_vm_info(raw).features.cpr_modes == (EXEC, REBOOT)


def test_build_vm_info_empty_name_falls_back_to_the_socket(load_raw: RawLoader) -> None:
    raw = load_raw(BASE)
    raw["query-name"] = {}
    assert discovery.build_vm_info(raw).name == "/run/vms/vm1/qmp.sock"


def test_build_vm_info_blockers_deduplicated_and_sorted(load_raw: RawLoader) -> None:
    raw = load_raw(BASE)
    raw["blockers"] = {"cpr-exec": ["b", "a"], "cpr-transfer": ["a"], "cpr-reboot": []}
    assert discovery.build_vm_info(raw).migration_blockers == ("a", "b")


@pytest.mark.parametrize(("words", "taps", "vhost_devices"), [
    pytest.param(["-netdev", '{"type":"tap","id":"n1","fd":"30","vhost":true,"vhostfd":"31"}'],
                 (TapDevice(id="n1", fd=30, vhost=True, vhostfd=31),), (), id="json-tap"),
    pytest.param(["-netdev", "tap,id=n1,ifname=tap1,vhost=yes"],
                 (TapDevice(id="n1", ifname="tap1", vhost=True),), (), id="vhost-yes"),
    pytest.param(["-netdev", "tap,id=n1,ifname=tap1,vhost=off"],
                 (TapDevice(id="n1", ifname="tap1"),), (), id="vhost-off"),
    pytest.param(["-netdev", "tap,id=n1,fd=notanumber"], (TapDevice(id="n1"),), (),
                 id="fd-not-a-number"),
    pytest.param(["-nic", "tap,ifname=tap2,model=virtio-net-pci"],
                 (TapDevice(id="", ifname="tap2"),), (), id="nic-tap"),
    pytest.param(["-netdev", "user,id=n1"], (), (), id="user-net"),
    pytest.param(["-netdev", "vhost-vdpa,id=n2,vhostdev=/dev/vhost-vdpa-0"], (),
                 ("netdev n2: vhost-vdpa",), id="vhost-vdpa"),
    pytest.param(["-device", "vhost-user-blk-pci,chardev=c0,id=blk0"], (),
                 ("vhost-user-blk-pci",), id="vhost-user-device"),
    pytest.param(["-device", "vhost-vsock-pci,guest-cid=3"], (), ("vhost-vsock-pci",),
                 id="vhost-kernel-device"),
])
def test_build_vm_info_network_and_vhost(load_raw: RawLoader, words: list[str],
                                         taps: tuple[TapDevice, ...],
                                         vhost_devices: tuple[str, ...]) -> None:
    raw = load_raw(BASE)
    raw["argv"] += words
    vm = discovery.build_vm_info(raw)
    assert (vm.taps, vm.vhost_devices) == (taps, vhost_devices)


def test_build_vm_info_json_vfio_and_iommufd(load_raw: RawLoader) -> None:
    raw = load_raw(BASE)
    raw["argv"] += ["-object", '{"qom-type":"iommufd","id":"iommufd0"}',
                    "-device", '{"driver":"vfio-pci","host":"0000:01:00.0","id":"hostdev0",'
                               '"iommufd":"iommufd0"}',
                    "-device", "vfio-pci-nohotplug,host=0000:02:00.0",
                    "-device", "virtio-net-pci,id=a", "-device", "virtio-net-pci,id=b"]
    vm = discovery.build_vm_info(raw)
    assert vm.vfio_devices == ("vfio-pci", "vfio-pci-nohotplug")
    assert vm.iommufd_objects == ("iommufd",)
    assert vm.device_drivers == ("vfio-pci", "vfio-pci-nohotplug", "virtio-net-pci")


def test_multiqueue_tap_and_vhost_by_descriptors_are_inherited(load_raw: RawLoader) -> None:
    # A multiqueue tap passed as fds=/vhostfds= is adopted by descriptor just like fd=/vhostfd=:
    # it must not be reported as a tap opened by name, nor as vhost without its descriptor.
    raw = load_raw("tap-fd")
    raw["argv"][raw["argv"].index("tap,id=net0,fd=23")] = \
        "tap,id=net0,fds=23:24,vhost=on,vhostfds=25:26"
    vm = discovery.build_vm_info(raw)
    p = PreflightInputs(vm=vm, target=Target(binary="/"), requested=RequestedMode.CPR_EXEC,
                        host=HostFacts(allowed_dirs=(), runtime_dir_free_bytes=0),
                        binary=BinaryFacts(path="/", exists=False))
    assert preflight.check_taps(p, EXEC) is None
    assert preflight.check_vhost(p, EXEC) is None


# --- the derived fixtures are what make_variants.py produces -------------------------------


def test_variants_are_current(make_variants: ModuleType) -> None:
    files = {f.stem: f.read_text() for f in (FIXTURES / "variants").glob("*.json")}
    assert set(files) == set(make_variants.VARIANTS)
    for name in make_variants.VARIANTS:
        assert files[name] == make_variants.render(make_variants.build(name)), (
            f"{name}.json is stale: run tests/unit/fixtures/make_variants.py")


def test_variants_keep_the_recording_consistent() -> None:
    # Every device with an id in argv is also a peripheral, as QEMU reports it.
    for f in (FIXTURES / "variants").glob("*.json"):
        raw = json.loads(f.read_text())
        assert discovery.hotplugged_devices(raw) == (["disk1"] if f.stem == "hotplugged-device"
                                                     else []), f.stem
        declared = qargv.declared(qargv.parse(raw["argv"])).device_ids
        assert set(declared) <= set(raw["peripherals"]), f.stem


def test_blockers_are_kept_per_mode(load_raw: RawLoader) -> None:
    """QEMU blocks cpr-transfer, not cpr-exec or cpr-reboot, when ROMs are not shared."""
    vm = discovery.build_vm_info(load_raw("aux-ram-share-off"))
    assert vm.blockers_by_mode["cpr-exec"] == () and vm.blockers_by_mode["cpr-reboot"] == ()
    assert set(vm.blockers_by_mode["cpr-transfer"]) == set(vm.migration_blockers)


def test_readconfig_device_ids() -> None:
    text = ('# a comment [device "no"]\n[device "rng0"]\n  driver = "virtio-rng-pci"\n'
            '[drive "d0"]\n  file = "x"\n [ device "disk-1" ]\n[machine]\n')
    assert discovery.readconfig_device_ids(text) == ["rng0", "disk-1"]
    assert discovery.readconfig_device_ids("") == []


def test_devices_from_readconfig_count_as_declared(load_raw: RawLoader) -> None:
    raw = load_raw(BASE)
    raw["peripherals"] = ["rng0"]
    assert discovery.hotplugged_devices(raw) == ["rng0"]
    raw["readconfig-device-ids"] = ["rng0", "gone0"]
    assert discovery.hotplugged_devices(raw) == []
    assert discovery.unplugged_devices(raw) == ["gone0"]
