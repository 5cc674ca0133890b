"""Which VMs a VMUpdate's selector matches, and whether a VM runs the target. Pure.

Every selector field that is given must match (AND); within a list any entry may match (OR).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from vmupdate_api.crd.vmhost import HostVM
from vmupdate_api.crd.vmupdate_spec import LabelSelector, SelectorOperator, UpdateTarget, VMSelector


def labels_match(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics; an empty selector matches everything."""
    for key, value in (selector.match_labels or {}).items():
        if labels.get(key) != value:
            return False
    for req in selector.match_expressions or []:
        values = req.values or []
        present = req.key in labels
        if req.operator == SelectorOperator.IN and not (present and labels[req.key] in values):
            return False
        if req.operator == SelectorOperator.NOT_IN and present and labels[req.key] in values:
            return False
        if req.operator == SelectorOperator.EXISTS and not present:
            return False
        if req.operator == SelectorOperator.DOES_NOT_EXIST and present:
            return False
    return True


def host_matches(selector: VMSelector, host_name: str, labels: Mapping[str, str]) -> bool:
    if selector.host_names is not None and host_name not in selector.host_names:
        return False
    return selector.host_selector is None or labels_match(selector.host_selector, labels)


def name_matches(selector: VMSelector, vm_name: str) -> bool:
    """Shell-style globs, case-sensitive (``*``, ``?``, ``[a-z]``, ``[!x]``)."""
    if selector.vm_names is None:
        return True
    return any(fnmatch.fnmatchcase(vm_name, pattern) for pattern in selector.vm_names)


def version_matches(selector: VMSelector, version: str | None) -> bool:
    """Exact version or dotted prefix: ``10.0`` matches 10.0.2, not 10.01.1."""
    if selector.qemu_versions is None:
        return True
    if not version:
        return False
    return any(version == v or version.startswith(v + ".") for v in selector.qemu_versions)


def runs_target(vm: HostVM, target: UpdateTarget) -> bool:
    """The VM's QEMU is the target binary at the target version (both as its agent saw)."""
    return vm.binary == target.binary and vm.qemu_version == target.version
