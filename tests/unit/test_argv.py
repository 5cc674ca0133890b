"""QEMU command lines: parsing, keyval syntax, and the argvs the agent derives for a new QEMU.

Over 450 lines: table-driven cases of one parser and the argvs derived from it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from vmupdate_agent import argv as qargv
from vmupdate_agent.argv import ArgvError, Option, QemuArgv

QMP = "/run/vms/vm1/qmp.sock"
OPS_QMP = "/run/vmupdate/ops/cbe2ca45bb194dd5a14734ae3814702e/qmp.sock"


def P(*words: str) -> QemuArgv:
    return qargv.parse(["qemu-system-x86_64", *words])


def opts(a: QemuArgv) -> list[tuple[str, str | None]]:
    return [(o.name, o.value) for o in a.options]


@pytest.fixture
def recorded(load_raw: Callable[[str], dict[str, Any]]) -> list[str]:
    argv: list[str] = load_raw("raw-sid-11.1.3-memfd")["argv"]
    return argv


# --- parse ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("words", "expected"), [
    pytest.param(["-m", "256M"], [("m", "256M")], id="option-with-value"),
    pytest.param(["--m", "256M"], [("m", "256M")], id="double-dash"),
    pytest.param(["--machine=q35"], [("machine", "q35")], id="double-dash-equals"),
    pytest.param(["-S", "-m", "1G"], [("S", None), ("m", "1G")], id="flag-then-option"),
    pytest.param(["-s", "-m", "1G"], [("s", None), ("m", "1G")], id="lowercase-s-is-gdb-flag"),
    pytest.param(["disk.img"], [("hda", "disk.img")], id="bare-word-is-hda"),
    pytest.param(["-m", "1G", "disk.img", "-S"], [("m", "1G"), ("hda", "disk.img"), ("S", None)],
                 id="bare-word-between-options"),
    pytest.param(["-append", "-quiet"], [("append", "-quiet")],
                 id="value-starting-with-dash-is-a-value"),
    pytest.param(["-x-unknown"], [("x-unknown", None)], id="unknown-last-option-kept-as-flag"),
    pytest.param(["-x-unknown", "v"], [("x-unknown", "v")], id="unknown-option-takes-a-value"),
    pytest.param([], [], id="binary-only"),
])
def test_parse(words: list[str], expected: list[tuple[str, str | None]]) -> None:
    a = P(*words)
    assert a.binary == "qemu-system-x86_64"
    assert opts(a) == expected


# The options QEMU 10.0.2 and 11.1.3 (qemu-system-x86_64 -help) list without an argument.
QEMU_FLAGS = [
    "h", "help", "version", "mem-prealloc", "snapshot", "usb", "nographic", "full-screen",
    "win2k-hack", "no-fd-bootchk", "preconfig", "S", "s", "enable-kvm", "xen-attach",
    "xen-domid-restrict", "no-reboot", "no-shutdown", "daemonize", "only-migratable",
    "nodefaults", "no-user-config", "enable-sync-profile", "perfmap", "jitdump",
]


@pytest.mark.parametrize("flag", QEMU_FLAGS)
def test_parse_takes_no_argument_for_every_qemu_flag(flag: str) -> None:
    # Misreading a flag as taking a value shifts every following word: the new QEMU would get
    # another machine (or refuse to start), and CPR would lose the VM.
    assert opts(P(f"-{flag}", "-m", "256M")) == [(flag, None), ("m", "256M")]


def test_parse_rejects_an_empty_command_line() -> None:
    with pytest.raises(ArgvError, match="empty command line"):
        qargv.parse([])


def test_parse_and_render_round_trip_the_recorded_argv(recorded: list[str]) -> None:
    a = qargv.parse(recorded)
    assert a.binary == "/usr/bin/qemu-system-x86_64"
    assert a.render() == recorded
    assert a.values("incoming")[0] == "unix:" + OPS_QMP.replace("qmp.sock", "main.sock")
    assert json.loads(a.values("incoming")[1])["channel-type"] == "cpr"
    assert a.has("nodefaults") and a.has("no-user-config") and a.has("S")
    assert a.values("object") == ["memory-backend-memfd,id=ram0,size=256M,share=on"]


def test_values_and_has() -> None:
    a = P("-device", "a", "-S", "-device", "b")
    assert a.values("device") == ["a", "b"]
    assert a.values("S") == []  # a flag has no value
    assert a.has("S") and a.has("device") and not a.has("incoming")


@pytest.mark.parametrize(("option", "words"), [
    pytest.param(Option("S", None), ["-S"], id="flag"),
    pytest.param(Option("m", "1G"), ["-m", "1G"], id="value"),
    pytest.param(Option("append", ""), ["-append", ""], id="empty-value-kept"),
])
def test_option_render(option: Option, words: list[str]) -> None:
    assert option.render() == words


# --- keyval syntax --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("a=b,c=d", [("a", "b"), ("c", "d")], id="pairs"),
    pytest.param("tap,id=n0", [("tap", None), ("id", "n0")], id="leading-bare-word"),
    pytest.param("path=/a,,b,id=x", [("path", "/a,b"), ("id", "x")], id="escaped-comma"),
    pytest.param("k=v,,,x=y", [("k", "v,"), ("x", "y")], id="escaped-comma-then-separator"),
    pytest.param("k=v,,,,", [("k", "v,,")], id="two-escaped-commas-at-end"),
    pytest.param("a,,b", [("a,b", None)], id="escaped-comma-in-bare-word"),
    pytest.param("k=a=b", [("k", "a=b")], id="equals-in-value"),
    pytest.param("a=,b", [("a", ""), ("b", None)], id="empty-value"),
    pytest.param(",a=b", [("a", "b")], id="empty-part-dropped"),
    pytest.param("", [], id="empty"),
])
def test_split_keyvals(text: str, expected: list[tuple[str, str | None]]) -> None:
    assert qargv.split_keyvals(text) == expected


@pytest.mark.parametrize(("items", "text"), [
    pytest.param([("tap", None), ("id", "n0")], "tap,id=n0", id="bare-word-and-pair"),
    pytest.param([("path", "/a,b")], "path=/a,,b", id="comma-in-value-escaped"),
    pytest.param([("a,b", None)], "a,,b", id="comma-in-bare-word-escaped"),
    pytest.param([("a", "")], "a=", id="empty-value"),
    pytest.param([], "", id="nothing"),
])
def test_join_keyvals(items: list[tuple[str, str | None]], text: str) -> None:
    assert qargv.join_keyvals(items) == text


@pytest.mark.parametrize("text", [
    "memory-backend-memfd,id=ram0,size=256M,share=on",
    "file,id=ser0,path=/run/vms/vm1/serial.log,append=on",
    "file,id=s,path=/run/vms/a,,b.log",
    "tap,id=net0,fd=23,vhost=on,vhostfd=24",
    "k=v,,,x=y",
    "a=,b",
])
def test_keyvals_round_trip(text: str) -> None:
    assert qargv.join_keyvals(qargv.split_keyvals(text)) == text


@pytest.mark.parametrize(("value", "implied", "expected"), [
    pytest.param("virtio-net-pci,netdev=n0,id=nic0", "driver",
                 {"driver": "virtio-net-pci", "netdev": "n0", "id": "nic0"},
                 id="implied-driver"),
    pytest.param("driver=virtio-net-pci,id=nic0", "driver",
                 {"driver": "virtio-net-pci", "id": "nic0"}, id="explicit-driver"),
    pytest.param("socket,id=c0,path=/run/c.sock,server,wait=off", "backend",
                 {"backend": "socket", "id": "c0", "path": "/run/c.sock", "server": "on",
                  "wait": "off"}, id="later-bare-word-is-on"),
    pytest.param("file,id=s,path=/run/a,,b", "backend",
                 {"backend": "file", "id": "s", "path": "/run/a,b"}, id="escaped-comma"),
    pytest.param('{"qom-type":"memory-backend-memfd","id":"ram0","size":268435456,'
                 '"share":true,"merge":false}', "qom-type",
                 {"qom-type": "memory-backend-memfd", "id": "ram0", "size": "268435456",
                  "share": "on", "merge": "off"}, id="json-scalars-as-keyval-strings"),
    pytest.param('  {"driver":"vfio-pci","id":"hostdev0"}', "driver",
                 {"driver": "vfio-pci", "id": "hostdev0"}, id="json-leading-space"),
    pytest.param("", "driver", {}, id="empty"),
])
def test_option_props(value: str, implied: str, expected: dict[str, str]) -> None:
    assert qargv.option_props(value, implied) == expected


def test_option_props_bad_json_names_the_value() -> None:
    with pytest.raises(ArgvError, match=r"bad JSON option '\{\"driver\":'"):
        qargv.option_props('{"driver":', "driver")


# --- canonical, size ------------------------------------------------------------------------


def test_canonical_drops_how_the_vm_was_started(recorded: list[str]) -> None:
    a = qargv.parse(recorded)
    c = qargv.canonical(a)
    assert not c.has("incoming") and not c.has("S")
    kept = [o for o in a.options if o.name not in ("incoming", "S")]
    assert list(c.options) == kept
    assert c.binary == a.binary
    assert qargv.canonical(c) == c


@pytest.mark.parametrize(("words", "expected"), [
    pytest.param(["-daemonize", "-m", "1G"], [("m", "1G")], id="daemonize"),
    pytest.param(["--incoming", "defer", "-s"], [("s", None)], id="double-dash-incoming"),
    pytest.param(["-incoming", "defer", "-incoming", "x", "-name", "a"], [("name", "a")],
                 id="every-incoming"),
    pytest.param(["-pidfile", "/run/p", "-snapshot"], [("pidfile", "/run/p"), ("snapshot", None)],
                 id="others-kept"),
    # What the agent adds for the incoming side goes, so that updates do not pile it up;
    # any other -global stays, also another value of the same property.
    pytest.param([*qargv.INCOMING_EVENTS, "-global", "kvm-pit.lost_tick_policy=delay",
                  "--global", "migration.x-events=on", "-global", "migration.x-events=off"],
                 [("global", "kvm-pit.lost_tick_policy=delay"),
                  ("global", "migration.x-events=off")], id="incoming-events"),
])
def test_canonical(words: list[str], expected: list[tuple[str, str | None]]) -> None:
    assert opts(qargv.canonical(P(*words))) == expected


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("256M", 256 << 20, id="M"),
    pytest.param("256m", 256 << 20, id="m"),
    pytest.param("1G", 1 << 30, id="G"),
    pytest.param("2T", 2 << 40, id="T"),
    pytest.param("4k", 4 << 10, id="k"),
    pytest.param("4K", 4 << 10, id="K"),
    pytest.param("512", 512, id="no-suffix-is-bytes"),
    pytest.param("512B", 512, id="B-is-bytes"),
    pytest.param(" 1G ", 1 << 30, id="spaces"),
    pytest.param("268435456", 268435456, id="recorded-memdev-size"),
])
def test_size_to_bytes(text: str, expected: int) -> None:
    assert qargv.size_to_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1M", "1X", "M", "1 G B x"])
def test_size_to_bytes_rejects(text: str) -> None:
    with pytest.raises(ArgvError, match="not a size"):
        qargv.size_to_bytes(text)


# --- declared devices -----------------------------------------------------------------------


def test_declared_on_the_recorded_argv(recorded: list[str]) -> None:
    d = qargv.declared(qargv.parse(recorded))
    assert d.device_drivers == ()
    assert d.device_ids == ()
    assert d.object_types == ("memory-backend-memfd",)
    assert d.netdevs == ()
    assert d.chardevs == ({"backend": "file", "id": "ser0", "path": "/run/vms/vm1/serial.log",
                           "append": "on"},)


def test_declared_collects_every_spelling() -> None:
    a = P("-device", "virtio-net-pci,netdev=net0,id=nic0",
          "-device", '{"driver":"vfio-pci","host":"0000:01:00.0","id":"hostdev0"}',
          "-device", "driver=virtio-rng-pci",
          "-object", "iommufd,id=iommufd0",
          "-object", '{"qom-type":"memory-backend-file","id":"ram0","size":1024}',
          "-netdev", "tap,id=net0,fd=23",
          "-netdev", '{"type":"vhost-user","id":"net1","chardev":"vhu0"}',
          "-nic", "tap,ifname=tap1,model=virtio",
          "-chardev", "socket,id=vhu0,path=/run/vhu.sock",
          "-S")
    d = qargv.declared(a)
    assert d.device_drivers == ("virtio-net-pci", "vfio-pci", "virtio-rng-pci")
    assert d.device_ids == ("nic0", "hostdev0")
    assert d.object_types == ("iommufd", "memory-backend-file")
    assert d.netdevs == ({"type": "tap", "id": "net0", "fd": "23"},
                         {"type": "vhost-user", "id": "net1", "chardev": "vhu0"},
                         {"type": "tap", "ifname": "tap1", "model": "virtio"})
    assert d.chardevs == ({"backend": "socket", "id": "vhu0", "path": "/run/vhu.sock"},)


# --- building new command lines -------------------------------------------------------------


def test_with_binary_changes_only_the_binary(recorded: list[str]) -> None:
    a = qargv.parse(recorded)
    b = qargv.with_binary(a, "/usr/lib/qemu-new/qemu-system-x86_64")
    assert b.binary == "/usr/lib/qemu-new/qemu-system-x86_64"
    assert b.options == a.options
    assert b.render()[1:] == recorded[1:]


def test_appended_parses_the_words_after_the_options() -> None:
    a = P("-m", "1G")
    b = qargv.appended(a, ["-S", "-incoming", "defer", "disk.img"])
    assert opts(b) == [("m", "1G"), ("S", None), ("incoming", "defer"), ("hda", "disk.img")]
    assert b.binary == a.binary
    assert qargv.appended(a, []) is a
    assert qargv.appended(a, ()) == a


def test_new_argv_of_the_recorded_vm(recorded: list[str]) -> None:
    # What cpr-exec hands QEMU: the canonical argv under the new binary, the caller's extra
    # arguments, then -S and the incoming state.
    base = qargv.with_binary(qargv.canonical(qargv.parse(recorded)), "/opt/q/new")
    extra = qargv.appended(base, ["-msg", "timestamp=on"])
    new = qargv.appended(extra, ["-S", "-incoming", "file:/run/vmupdate/ops/x/state"]).render()
    assert new[0] == "/opt/q/new"
    assert new[new.index("-msg"):] == ["-msg", "timestamp=on", "-S", "-incoming",
                                       "file:/run/vmupdate/ops/x/state"]
    assert new.count("-S") == 1 and new.count("-incoming") == 1
    assert new[1:new.index("-msg")] == recorded[1:recorded.index("-S")]


# --- replace_socket_path --------------------------------------------------------------------


def test_replace_socket_path_in_the_recorded_argv(recorded: list[str]) -> None:
    a = qargv.canonical(qargv.parse(recorded))
    b = qargv.replace_socket_path(a, OPS_QMP, "/run/vmupdate/ops/new/qmp.sock")
    assert b.values("qmp") == ["unix:/run/vmupdate/ops/new/qmp.sock,server=on,wait=off"]
    assert [o for o in b.options if o.name != "qmp"] == [o for o in a.options if o.name != "qmp"]


@pytest.mark.parametrize(("option", "value", "expected"), [
    pytest.param("qmp", f"unix:{QMP}", "unix:/new/q.sock", id="unix-bare"),
    pytest.param("qmp", f"unix:{QMP},server=on,wait=off", "unix:/new/q.sock,server=on,wait=off",
                 id="unix-with-options"),
    pytest.param("chardev", f"socket,id=mon0,path={QMP},server=on,wait=off",
                 "socket,id=mon0,path=/new/q.sock,server=on,wait=off", id="keyval-path"),
    pytest.param("chardev", f"socket,id=c,,x,path={QMP}", "socket,id=c,,x,path=/new/q.sock",
                 id="keyval-keeps-escaped-commas"),
])
def test_replace_socket_path(option: str, value: str, expected: str) -> None:
    a = P(f"-{option}", value, "-m", "1G")
    b = qargv.replace_socket_path(a, QMP, "/new/q.sock")
    assert opts(b) == [(option, expected), ("m", "1G")]


def test_replace_socket_path_in_json() -> None:
    channel = {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix",
                                               "path": QMP}, "list": [QMP, "x"]}
    b = qargv.replace_socket_path(P("-incoming", json.dumps(channel)), QMP, "/new/q.sock")
    assert json.loads(b.values("incoming")[0]) == {
        "channel-type": "cpr", "addr": {"transport": "socket", "type": "unix",
                                        "path": "/new/q.sock"}, "list": ["/new/q.sock", "x"]}


@pytest.mark.parametrize(("option", "value"), [
    pytest.param("monitor", f"unix:{QMP}.hmp,server=on,wait=off", id="unix-longer-path"),
    pytest.param("chardev", f"socket,id=c,path={QMP}.hmp,server=on", id="keyval-longer-path"),
    pytest.param("incoming", json.dumps({"addr": {"path": f"{QMP}.cpr"}}), id="json-longer-path"),
    pytest.param("chardev", "file,id=s,path=/run/vms/vm2/qmp.sock", id="other-vm"),
])
def test_replace_socket_path_leaves_other_paths(option: str, value: str) -> None:
    # Only a socket exactly at the old path moves; a sibling whose name merely starts with it
    # (an HMP socket next to the QMP one) stays where the VM's users expect it.
    a = P(f"-{option}", value)
    assert qargv.replace_socket_path(a, QMP, "/new/q.sock") == a


# --- taps_by_fd -----------------------------------------------------------------------------


@pytest.mark.parametrize(("netdev", "expected"), [
    pytest.param("tap,id=net0,ifname=tap0,script=no,downscript=no", "tap,id=net0,fd=23",
                 id="script-downscript-dropped"),
    pytest.param("tap,id=net0,ifname=tap0,vhost=on,vhostfd=24",
                 "tap,id=net0,vhost=on,vhostfd=24,fd=23", id="vhost-kept"),
    pytest.param("tap,id=net0,ifname=tap0,br=br0,helper=/usr/libexec/qemu-bridge-helper",
                 "tap,id=net0,fd=23", id="bridge-helper-dropped"),
    pytest.param("tap,id=net0,ifname=tap9", "tap,id=net0,ifname=tap9", id="unknown-ifname-kept"),
    pytest.param("tap,id=net0,fd=7", "tap,id=net0,fd=7", id="already-by-fd"),
    pytest.param("user,id=net0", "user,id=net0", id="not-a-tap"),
    pytest.param("tap,id=net,,0,ifname=tap0", "tap,id=net,,0,fd=23", id="escaping-kept"),
])
def test_taps_by_fd(netdev: str, expected: str) -> None:
    a = P("-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,ifname=tap0")
    b = qargv.taps_by_fd(a, {"tap0": 23, "tap1": 24})
    assert opts(b) == [("netdev", expected), ("device", "virtio-net-pci,netdev=net0,ifname=tap0")]


def test_taps_by_fd_with_the_implied_key_spelled_out() -> None:
    a = P("-netdev", "type=tap,id=net0,ifname=tap0,script=no")
    b = qargv.taps_by_fd(a, {"tap0": 23})
    props = qargv.option_props(b.values("netdev")[0], "type")
    assert props.get("fd") == "23" and "ifname" not in props and "script" not in props


def test_taps_by_fd_on_recorded_tun_fds(load_raw: Callable[[str], dict[str, Any]]) -> None:
    raw = load_raw("tap-ifname")
    a = qargv.taps_by_fd(qargv.parse(raw["argv"]), raw["tun-fds"])
    assert a.values("netdev") == ["tap,id=net0,fd=23"]
    assert qargv.declared(a).netdevs == ({"type": "tap", "id": "net0", "fd": "23"},)


# --- dry_run_argv ---------------------------------------------------------------------------


def dry(a: QemuArgv) -> QemuArgv:
    return qargv.dry_run_argv(a, "/run/vmupdate/dry-run-abcd.sock", "abcd")


def test_dry_run_of_the_recorded_vm(recorded: list[str]) -> None:
    new = qargv.with_binary(qargv.canonical(qargv.parse(recorded)), "/opt/q/new")
    d = dry(new)
    assert d.binary == "/opt/q/new"
    assert d.values("qmp") == ["unix:/run/vmupdate/dry-run-abcd.sock,server=on,wait=off"]
    assert OPS_QMP not in " ".join(d.render())
    assert d.values("chardev") == ["null,id=ser0"]
    assert d.values("serial") == ["chardev:ser0"]
    assert d.values("name") == ["vmupdate-dry-run-abcd"]
    assert d.values("object") == ["memory-backend-memfd,id=ram0,size=256M,share=on"]
    assert d.values("machine") == ["pc-q35-10.0,memory-backend=ram0,aux-ram-share=on"]
    assert d.values("m") == ["256M"]
    assert d.values("kernel") == ["/run/vms/vm1/vmlinuz"]
    assert opts(d)[-4:] == [("qmp", "unix:/run/vmupdate/dry-run-abcd.sock,server=on,wait=off"),
                            ("S", None), ("incoming", "defer"), ("name", "vmupdate-dry-run-abcd")]
    swapped = {"qmp", "chardev", "name", "S", "incoming"}
    assert [o for o in d.options if o.name not in swapped] == \
        [o for o in new.options if o.name not in swapped]


def test_dry_run_drops_what_must_not_be_opened_twice() -> None:
    a = P("-S", "-incoming", "unix:/run/main.sock", "-daemonize", "-pidfile", "/run/vm1.pid",
          "-monitor", "unix:/run/hmp.sock,server=on,wait=off",
          "-qmp-pretty", "unix:/run/qmp2.sock,server=on,wait=off",
          "-chardev", "socket,id=mon0,path=/run/mon.sock,server=on,wait=off",
          "-mon", "chardev=mon0,mode=control",
          "-serial", "file:/run/vms/vm1/serial.log",
          "-serial", "chardev:mon0",
          "-name", "guest=vm1,debug-threads=on", "-m", "1G")
    d = dry(a)
    assert opts(d) == [
        ("chardev", "null,id=mon0"),
        ("serial", "null"),
        ("serial", "chardev:mon0"),
        ("m", "1G"),
        ("qmp", "unix:/run/vmupdate/dry-run-abcd.sock,server=on,wait=off"),
        ("S", None),
        ("incoming", "defer"),
        ("name", "vmupdate-dry-run-abcd"),
    ]


@pytest.mark.parametrize("obj", [
    pytest.param("memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/vm1-ram0,share=on,"
                 "prealloc=on,discard-data=on", id="keyval"),
    pytest.param(json.dumps({"qom-type": "memory-backend-file", "id": "ram0", "size": "256M",
                             "mem-path": "/dev/shm/vm1-ram0", "share": True, "prealloc": True}),
                 id="json"),
])
def test_dry_run_swaps_file_backed_ram_for_a_memfd_of_the_same_size(obj: str) -> None:
    d = dry(P("-object", obj, "-object", "iommufd,id=iommufd0"))
    assert d.values("object") == ["memory-backend-memfd,id=ram0,size=256M,share=on,prealloc=on",
                                  "iommufd,id=iommufd0"]
    assert "/dev/shm/vm1-ram0" not in " ".join(d.render())


def test_dry_run_memory_file_variant(load_raw: Callable[[str], dict[str, Any]]) -> None:
    a = qargv.canonical(qargv.parse(load_raw("memory-file-shm")["argv"]))
    assert dry(a).values("object") == ["memory-backend-memfd,id=ram0,size=256M,share=on"]


@pytest.mark.parametrize("netdev", [
    "tap,id=net0,ifname=tap0,script=no,downscript=no",
    "tap,id=net0,fd=23,vhost=on,vhostfd=24",
    "vhost-user,id=net0,chardev=vhu0",
    "vhost-vdpa,id=net0,vhostdev=/dev/vhost-vdpa-0",
    "bridge,id=net0,br=br0",
    '{"type":"tap","id":"net0","fd":"23"}',
])
def test_dry_run_swaps_host_network_backends_for_a_hub_port(netdev: str) -> None:
    d = dry(P("-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,id=nic0"))
    assert d.values("netdev") == ["hubport,id=net0,hubid=0"]
    assert d.values("device") == ["virtio-net-pci,netdev=net0,id=nic0"]


def test_dry_run_keeps_user_networking() -> None:
    assert dry(P("-netdev", "user,id=net0")).values("netdev") == ["user,id=net0"]


def test_dry_run_does_not_open_a_tap_given_by_nic() -> None:
    # -nic tap,... opens the tap like -netdev tap does: beside the running VM it is busy (or,
    # by fd=, a descriptor the dry run does not have).
    d = dry(P("-nic", "tap,ifname=tap0,script=no,downscript=no,model=virtio-net-pci"))
    for o in d.options:
        if o.name in ("nic", "netdev", "net") and o.value is not None:
            assert qargv.option_props(o.value, "type").get("type") != "tap", o


@pytest.mark.parametrize("vnc", ["unix:/run/vms/vm1/vnc.sock", "127.0.0.1:0"])
def test_dry_run_does_not_take_the_vms_vnc_listener(vnc: str) -> None:
    # A second listener on the VM's VNC display either fails (TCP port in use) or takes over
    # the VM's unix socket path: like monitors, it must not be opened by the dry run.
    d = dry(P("-vnc", vnc, "-m", "1G"))
    assert vnc not in d.values("vnc")


def test_dry_run_keeps_a_single_name_and_a_single_incoming(recorded: list[str]) -> None:
    d = dry(qargv.parse(recorded))  # not even canonical: -S and both -incoming in it
    r = d.render()
    assert r.count("-S") == 1 and r.count("-incoming") == 1 and r.count("-name") == 1
    assert d.values("incoming") == ["defer"]


# --- qmp_socket_paths -----------------------------------------------------------------------


def test_qmp_socket_paths_of_the_recorded_argv(recorded: list[str]) -> None:
    assert qargv.qmp_socket_paths(qargv.parse(recorded)) == [OPS_QMP]


@pytest.mark.parametrize(("words", "expected"), [
    pytest.param(["-qmp", "unix:/a.sock"], ["/a.sock"], id="qmp-bare"),
    pytest.param(["-qmp-pretty", "unix:/b.sock,server=on"], ["/b.sock"], id="qmp-pretty"),
    pytest.param(["-qmp", "tcp:127.0.0.1:4444,server=on"], [], id="tcp-ignored"),
    pytest.param(["-monitor", "unix:/hmp.sock,server=on"], [], id="hmp-ignored"),
    pytest.param(["-chardev", "socket,id=m0,path=/c.sock,server=on,wait=off",
                  "-mon", "chardev=m0,mode=control"], ["/c.sock"], id="mon-control"),
    pytest.param(["-mon", "chardev=m0,mode=control",
                  "-chardev", "socket,id=m0,path=/c.sock,server=on"], ["/c.sock"],
                 id="chardev-after-mon"),
    pytest.param(["-chardev", "socket,id=m0,path=/c.sock,server=on",
                  "-mon", "chardev=m0,mode=readline"], [], id="mon-readline-is-hmp"),
    pytest.param(["-chardev", "socket,id=m0,path=/c.sock,server=on",
                  "-mon", "chardev=m0"], [], id="mon-default-mode-is-hmp"),
    pytest.param(["-chardev", "file,id=m0,path=/c.log", "-mon", "chardev=m0,mode=control"], [],
                 id="mon-on-a-file"),
    pytest.param(["-qmp", "unix:/a.sock", "-chardev", "socket,id=m0,path=/c.sock,server=on",
                  "-mon", "chardev=m0,mode=control"], ["/a.sock", "/c.sock"], id="both"),
])
def test_qmp_socket_paths(words: list[str], expected: list[str]) -> None:
    assert qargv.qmp_socket_paths(P(*words)) == expected
