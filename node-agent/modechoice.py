"""Which CPR mode an update uses, and why: a pure decision over the two QEMUs' features,
the request and the preference (tested over every combination in tests/unit)."""

from __future__ import annotations

from vmupdate_agent.models import CprMode, Preference, QemuFeatures, RequestedMode


def choose_mode(requested: RequestedMode, old: QemuFeatures, new: QemuFeatures | None,
                prefer: Preference = Preference.SAME_PID) -> tuple[CprMode | None, str]:
    """Which CPR mode to use, and why. Auto takes the mode ``prefer`` values first when both
    QEMUs support it: cpr-exec for the same pid (the default), cpr-transfer for the shortest
    pause; else the other of the two. cpr-reboot is only used when asked for: it is meant
    for host kernel updates and pauses the guest for a whole restart. A named mode ignores
    ``prefer``."""
    new_modes = new.cpr_modes if new is not None else ()
    new_note = "" if new is not None else " (the new binary could not be probed)"
    if requested != RequestedMode.AUTO:
        mode = CprMode(requested.value)
        missing = []
        if mode not in old.cpr_modes:
            missing.append(f"the running QEMU {old.version}")
        if new is not None and mode not in new_modes:
            missing.append(f"the target QEMU {new.version}")
        if missing:
            return None, (f"{mode} was requested but {' and '.join(missing)} does not support "
                          f"it; ask for Auto or a mode both support")
        return mode, f"{mode} was requested{new_note}"
    if new is None:
        return None, "Auto cannot choose a mode: the new binary could not be probed"
    exec_both = CprMode.CPR_EXEC in old.cpr_modes and CprMode.CPR_EXEC in new_modes
    exec_ok = exec_both and old.has_cpr_exec_command
    transfer_ok = CprMode.CPR_TRANSFER in old.cpr_modes and CprMode.CPR_TRANSFER in new_modes
    if exec_both and not exec_ok:
        no_exec = (f"the running QEMU {old.version} lists cpr-exec but has no "
                   "cpr-exec-command parameter")
    else:
        no_exec = (f"cpr-exec needs QEMU >= 10.2 on both sides (running {old.version}, "
                   f"target {new.version})")
    if transfer_ok and (prefer == Preference.SHORTEST_PAUSE or not exec_ok):
        why = ("the shortest pause was preferred (the new QEMU starts before the guest "
               "stops; the VM gets a new pid)" if prefer == Preference.SHORTEST_PAUSE
               else f"{no_exec}, so the same pid cannot be kept")
        return CprMode.CPR_TRANSFER, f"Auto chose cpr-transfer: {why}; both support cpr-transfer"
    if exec_ok:
        why = "both QEMUs support cpr-exec (same pid, guest RAM and devices stay in place)"
        if prefer == Preference.SHORTEST_PAUSE:
            why += ("; the shortest pause was preferred but cpr-transfer is not supported by "
                    "both")
        return CprMode.CPR_EXEC, f"Auto chose cpr-exec: {why}"
    return None, (f"Auto found no CPR mode both QEMUs support (running {old.version}: "
                  f"{', '.join(old.cpr_modes) or 'none'}; target {new.version}: "
                  f"{', '.join(new_modes) or 'none'}); QEMU >= 10.0 is needed on both sides")
