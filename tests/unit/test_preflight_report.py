"""Preflight's report (`evaluate`: the mode, then every check in order) and the inventory's
readiness, on VMs built from recorded discovery answers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from tests.unit.preflight_inputs import (
    BASE,
    CHECKS,
    NEW,
    NO_PROBE,
    Edit,
    VmLoader,
    chain,
    good_inputs,
    host_,
    inputs_,
    new_,
    old_,
    same,
    vm_,
)
from tests.unit.qemu_features import (
    EXEC,
    F10,
    REBOOT,
    TRANSFER,
    V7,
    features,
)
from vmupdate_agent import discovery, preflight
from vmupdate_agent.models import (
    CprMode,
    Preference,
    RequestedMode,
    TapDevice,
)

C = pytest.param


# --- evaluate ---------------------------------------------------------------------------------


def test_evaluate_all_good(load_vm: VmLoader) -> None:
    report = preflight.evaluate(good_inputs(load_vm(BASE)))
    assert report.passed
    assert report.mode == EXEC
    assert report.mode_reason.startswith("Auto chose cpr-exec")
    assert (report.vm, report.target) == ("manual1", NEW)
    assert [c.name for c in report.checks] == ["mode", *CHECKS]
    assert report.checks[0].message == report.mode_reason
    assert all(c.passed and c.message == "ok" for c in report.checks[1:])
    assert report.failures() == ()


def test_evaluate_auto_against_qemu_10_uses_cpr_transfer(load_vm: VmLoader) -> None:
    # The VM has a tap by fd: fine for cpr-exec, refused by cpr-transfer: the report judges the
    # chosen mode.
    p = new_(F10)(good_inputs(load_vm("tap-fd")))
    report = preflight.evaluate(p)
    assert report.mode == TRANSFER
    assert [c.name for c in report.failures()] == ["tap-by-fd"]
    assert preflight.evaluate(good_inputs(load_vm("tap-fd"))).passed


def test_evaluate_follows_the_preference(load_vm: VmLoader) -> None:
    # The same tap-by-fd VM and QEMUs that can do both: the preference picks the mode, and the
    # checks judge the mode picked (cpr-transfer refuses the tap by fd).
    p = replace(good_inputs(load_vm("tap-fd")), prefer=Preference.SHORTEST_PAUSE)
    report = preflight.evaluate(p)
    assert report.mode == TRANSFER
    assert "shortest pause was preferred" in report.mode_reason
    assert [c.name for c in report.failures()] == ["tap-by-fd"]
    report = preflight.evaluate(replace(p, prefer=Preference.SAME_PID))
    assert report.mode == EXEC and report.passed


def test_evaluate_memfd_vm_asked_for_cpr_reboot(load_vm: VmLoader) -> None:
    report = preflight.evaluate(good_inputs(load_vm(BASE), RequestedMode.CPR_REBOOT))
    assert report.mode == REBOOT
    assert not report.passed
    assert [(c.name, c.passed) for c in report.failures()] == [("memory-shared", False)]
    assert "cpr-reboot needs memory-backend-file on /dev/shm" in report.failures()[0].message


def test_evaluate_file_backed_vm_asked_for_cpr_reboot(load_vm: VmLoader) -> None:
    report = preflight.evaluate(good_inputs(load_vm("memory-file-shm"),
                                            RequestedMode.CPR_REBOOT))
    assert report.mode == REBOOT and report.passed


def test_evaluate_without_a_mode_still_lists_every_problem(load_vm: VmLoader) -> None:
    p = chain(NO_PROBE, inputs_(dry_run=None), host_(guard_path=None))(
        good_inputs(load_vm("tap-ifname")))
    report = preflight.evaluate(p)
    assert report.mode is None and not report.passed
    assert report.checks[0].name == "mode"
    assert not report.checks[0].passed
    assert "could not be probed" in report.checks[0].message
    names = [c.name for c in report.checks]
    assert "dry-run" not in names  # nothing was run, and no mode to run it for
    assert names == ["mode", *(n for n in CHECKS if n != "dry-run")]
    # Judged as cpr-exec, the preferred mode.
    assert {c.name for c in report.failures()} == {
        "mode", "tap-by-fd", "target-probe", "mode-supported-by-target", "machine-type-known",
        "device-drivers-known", "cpr-exec-guard"}


def test_evaluate_judges_an_unsupported_requested_mode_as_that_mode(load_vm: VmLoader) -> None:
    p = new_(F10)(good_inputs(load_vm(BASE), RequestedMode.CPR_EXEC))
    report = preflight.evaluate(p)
    assert report.mode is None
    assert "the target QEMU 10.0.2 does not support it" in report.mode_reason
    assert {c.name for c in report.failures()} == {"mode", "mode-supported-by-target"}


def test_evaluate_with_a_mode_but_no_dry_run_fails(load_vm: VmLoader) -> None:
    report = preflight.evaluate(inputs_(dry_run=None)(good_inputs(load_vm(BASE))))
    assert report.mode == EXEC
    assert [c.name for c in report.failures()] == ["dry-run"]


# --- readiness --------------------------------------------------------------------------------


@pytest.mark.parametrize(("vm_name", "edit", "ready", "modes", "needles"), [
    C(BASE, same, True, (EXEC, TRANSFER), (), id="memfd-11.1"),
    C("memory-file-shm", same, True, (EXEC, TRANSFER, REBOOT), (), id="file-11.1"),
    C("qemu-10.0.2", same, True, (TRANSFER,), (), id="memfd-10.0"),
    C(BASE, old_(features(cmd=False)), True, (TRANSFER,),
      ("cpr-exec: the running QEMU 11.1.3 lists cpr-exec but has no cpr-exec-command",),
      id="cpr-exec-unusable-is-explained"),
    C("tap-fd", same, True, (EXEC,), (), id="tap-fd"),
    C("tap-ifname", same, False, (),
      ("opens tap 'tap0' by name", "netdevs net0 are taps", "ram0 is a memfd"), id="tap-name"),
    C("legacy-dialect", same, False, (), ("out-of-tree CPR dialect",), id="legacy"),
    C("qemu-9.2.0-no-aux-ram-share", same, False, (), ("ram0 is a memfd",), id="qemu-9.2"),
    C(BASE, old_(features(V7, ())), False, (),
      ("does not support cpr-transfer (it has: no CPR mode)",), id="qemu-7.2"),
    C("vfio-pci", same, True, (EXEC, TRANSFER), (), id="vfio-11.1"),
    C("qemu-10.0.2-vfio-pci", same, False, (), ("only from QEMU 10.1",), id="vfio-10.0"),
    C("runstate-inmigrate", same, False, (), ("the VM is 'inmigrate'",), id="inmigrate"),
    C(BASE, chain(vm_(migration_status="active"), old_(features(modes=()))), False, (),
      ("already migrating this VM",), id="migrating"),
    C("migration-blocker-all-modes", same, False, (), ("VirtFS",), id="blocked"),
    C("memory-ram-share-off", same, False, (), ("ram0 is ram with share=off",), id="ram"),
])
def test_readiness(load_vm: VmLoader, vm_name: str, edit: Edit, ready: bool,
                   modes: tuple[CprMode, ...], needles: tuple[str, ...]) -> None:
    vm = edit(good_inputs(load_vm(vm_name))).vm
    r = preflight.readiness(vm)
    assert (r.ready, r.modes) == (ready, modes)
    text = "\n".join(r.reasons)
    for needle in needles:
        assert needle in text
    if not needles:
        assert r.reasons == ()
    assert len(set(r.reasons)) == len(r.reasons)


def test_readiness_counts_hotplugged_devices(load_raw: Callable[[str], dict[str, Any]]) -> None:
    raw = load_raw("hotplugged-device")
    vm = discovery.build_vm_info(raw)
    assert preflight.readiness(vm).ready
    r = preflight.readiness(vm, discovery.hotplugged_devices(raw))
    assert not r.ready and r.modes == ()
    assert any("devices disk1 were hot-plugged" in reason for reason in r.reasons)


def test_readiness_explains_why_only_cpr_reboot_is_left(load_vm: VmLoader) -> None:
    # QEMU 10.0.2, RAM in a /dev/shm file, a tap by name: cpr-transfer is refused (taps), only
    # cpr-reboot is left, which does not count as ready: the reasons must say why.
    file_vm = load_vm("memory-file-shm")
    vm = load_vm("qemu-10.0.2").model_copy(update={
        "memory_backends": file_vm.memory_backends,
        "taps": (TapDevice(id="net0", ifname="tap0"),)})
    r = preflight.readiness(vm)
    assert r.modes == (REBOOT,)
    assert not r.ready
    assert any("net0" in reason for reason in r.reasons), r.reasons
