"""The one allowlist of ``target.extraArgs``: which options the new QEMU may be given, and why.

The agent appends these arguments to the VM's own command line when it starts the new QEMU,
as root or as the VM's user, on every selected host. Whoever may create a VMUpdate chooses
them, so anything that opens a monitor (``-qmp``, ``-monitor``, ``-chardev``), reads or
writes host files (``-object secret,file=``, ``-object filter-dump``, ``-readconfig``,
``-add-fd``, ``-D``, ``-trace file=``), weakens the process (``-sandbox off``,
``-run-with``) or changes the machine (which breaks the CPR load anyway) must not pass.

What an update legitimately needs on top of the VM's own arguments is small: the machine and
its devices must stay exactly the same for the CPR state to load, so the only useful options
are the ones that change how the new process reports, not what it builds or touches. Each
allowed option takes exactly one value, which must match its pattern (RE2 syntax, anchored,
so the API server's CEL and Python agree).

This module is the single source: the CRD's CEL rule (``api/crd/rules.py``), the agent's
request validation (``node-agent/convert.py``) and its preflight (``node-agent/preflight.py``)
all call it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_EXTRA_ARGS = 64
"""At most this many entries (options and their values)."""


@dataclass(frozen=True)
class AllowedOption:
    name: str
    """The option exactly as QEMU spells it (single dash)."""
    value_pattern: str
    """The value that must follow it: an anchored RE2/Python regular expression."""
    value_help: str
    """The accepted values, for error messages."""
    reason: str
    """Why an update may need it, and why it is harmless."""


_MSG_KEY = r"(timestamp|guest-name)=(on|off)"

ALLOWED: tuple[AllowedOption, ...] = (
    AllowedOption(
        name="-msg",
        value_pattern=rf"^{_MSG_KEY}(,{_MSG_KEY})?$",
        value_help="timestamp=on|off and/or guest-name=on|off, comma-separated",
        reason="the format of the new QEMU's own error messages (a timestamp, the guest's "
        "name), so its log lines up with the old one's; it opens nothing and changes neither "
        "the machine nor the host",
    ),
)

_BY_NAME = {o.name: o for o in ALLOWED}


def allowed_summary() -> str:
    """The allowlist in one line, for error messages."""
    return "; ".join(f"{o.name} <{o.value_help}>" for o in ALLOWED)


def problems(args: Sequence[str], field: str) -> list[str]:
    """Every way `args` breaks the allowlist, each message starting with `field[index]`
    (`[index]` alone when `field` is empty)."""
    out: list[str] = []
    if len(args) > MAX_EXTRA_ARGS:
        out.append(f"{field}: {len(args)} entries; at most {MAX_EXTRA_ARGS} are accepted")
        return out
    i = 0
    while i < len(args):
        name = args[i]
        option = _BY_NAME.get(name)
        if option is None:
            shown = name if len(name) <= 64 else name[:64] + "..."
            out.append(f"{field}[{i}]: {shown!r} is not an allowed option; extra arguments "
                       f"may only be: {allowed_summary()} (each option followed by its value)")
            i += 2
            continue
        if i + 1 >= len(args):
            out.append(f"{field}[{i}]: {name} needs a value ({option.value_help})")
        elif not re.fullmatch(option.value_pattern, args[i + 1]):
            value = args[i + 1]
            shown = value if len(value) <= 64 else value[:64] + "..."
            out.append(f"{field}[{i + 1}]: {shown!r} is not an accepted value of {name}: "
                       f"give {option.value_help}")
        i += 2
    return out


def is_allowed(args: Sequence[str]) -> bool:
    return not problems(args, "extraArgs")


def _cel_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def cel_rule() -> str:
    """The same rule in CEL, for ``self`` bound to the list (at most MAX_EXTRA_ARGS long):
    an even number of entries, each even one an allowed option, the next its value."""
    pair = " || ".join(
        f"(self[i] == {_cel_string(o.name)} && self[i + 1].matches({_cel_string(o.value_pattern)}))"
        for o in ALLOWED)
    starts = ", ".join(str(i) for i in range(0, MAX_EXTRA_ARGS, 2))
    return f"size(self) % 2 == 0 && [{starts}].all(i, i >= size(self) || {pair})"


CEL_MESSAGE = (
    "target.extraArgs may only hold these options, each followed by its value: "
    f"{allowed_summary()}; anything else (monitors, chardevs, objects, config files, fds, "
    "-sandbox, -run-with, ...) would reach a privileged QEMU on every host"
)
