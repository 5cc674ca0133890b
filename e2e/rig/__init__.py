"""vmupdate's QEMU test rig: provisioned QEMUs, a ticking guest, detached test VMs.

Provision first (as root): ``e2e/rig/provision.sh``.  Then::

    rig = load_rig()
    vm = await start_vm(rig, "sid", name="demo")
    await vm.wait_ticking()
    ...
    vm.serial.assert_continuous()
    await vm.stop()
"""

from .config import Flavour, QemuInfo, Rig, RigNotProvisioned, load_rig, rig_json_path
from .serial import Line, SerialMonitor, Tick
from .vm import (
    Backend,
    TestVM,
    VMError,
    build_argv,
    connect_qmp,
    pid_alive,
    proc_state,
    qmp_peer_pid,
    running_vm,
    start_vm,
    wait_gone,
    zombies,
)

__all__ = [
    "Backend",
    "Flavour",
    "Line",
    "QemuInfo",
    "Rig",
    "RigNotProvisioned",
    "SerialMonitor",
    "TestVM",
    "Tick",
    "VMError",
    "build_argv",
    "connect_qmp",
    "load_rig",
    "pid_alive",
    "proc_state",
    "qmp_peer_pid",
    "rig_json_path",
    "running_vm",
    "start_vm",
    "wait_gone",
    "zombies",
]
