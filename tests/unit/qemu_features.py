"""The QEMU versions and feature sets the preflight and mode-choice tests are written in."""

from __future__ import annotations

from vmupdate_agent.models import CprMode, QemuFeatures, QemuVersion

EXEC, TRANSFER, REBOOT = CprMode.CPR_EXEC, CprMode.CPR_TRANSFER, CprMode.CPR_REBOOT
ALL_MODES = (REBOOT, TRANSFER, EXEC)
NO_EXEC = (REBOOT, TRANSFER)

V11 = QemuVersion(major=11, minor=1, micro=3, package="Debian 1:11.1.3+ds-1")
V10_2 = QemuVersion(major=10, minor=2, micro=0)
V10_1 = QemuVersion(major=10, minor=1, micro=0)
V10 = QemuVersion(major=10, minor=0, micro=2, package="Debian 1:10.0.2+ds-2+deb13u1~bpo12+1")
V9_2 = QemuVersion(major=9, minor=2, micro=0)
V9_1 = QemuVersion(major=9, minor=1, micro=0)
V7 = QemuVersion(major=7, minor=2, micro=0)


def features(version: QemuVersion = V11, modes: tuple[CprMode, ...] = ALL_MODES, *,
             cmd: bool = True, legacy: bool = False) -> QemuFeatures:
    return QemuFeatures(version=version, cpr_modes=modes, has_cpr_exec_command=cmd,
                        legacy_cpr_dialect=legacy)


F11 = features()
F10 = features(V10, NO_EXEC, cmd=False)
