"""Admission rules: one definition for the API server (CEL) and for Python.

A :class:`Rule` carries the CEL expression the API server runs (``x-kubernetes-validations``),
the message a person sees, and, where it can be judged from one object alone, the same check
in Python, so the operator and the tests reject exactly what the API server rejects, with the
same words. :class:`Validations` attaches rules to a field or list item type; a model's own
rules are its ``__k8s_rules__`` (see :class:`vmupdate_api.crd.meta.K8sModel`).

Also here: the regular expressions the schemas and rules share, and the rules of the
constrained spec fields (binary, version, sha256, extraArgs, host and VM names).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from vmupdate_api import extra_args as allowlist


@dataclass(frozen=True)
class Rule:
    """One ``x-kubernetes-validations`` entry and, where possible, its Python twin.

    ``cel`` is evaluated by the API server with ``self`` bound to the value at the place the
    rule is attached (``oldSelf`` to the stored value for transition rules). ``check`` gets the
    same value in Python (a model instance for model rules) and returns True when it is valid;
    it is None for rules Python cannot judge from one object (transition rules).
    """

    cel: str
    message: str
    check: Callable[[Any], bool] | None = None
    field_path: str | None = None

    def to_k8s(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out

    def validate(self, value: Any) -> None:
        if self.check is not None and not self.check(value):
            raise ValueError(self.message)


@dataclass(frozen=True)
class Validations:
    """``Annotated`` marker attaching :class:`Rule` objects to a field or list item type."""

    rules: tuple[Rule, ...]

    def __get_pydantic_core_schema__(
        self, source_type: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        def run(value: Any) -> Any:
            for rule in self.rules:
                rule.validate(value)
            return value

        return core_schema.no_info_after_validator_function(run, handler(source_type))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema.setdefault("x-kubernetes-validations", []).extend(
            r.to_k8s() for r in self.rules
        )
        return json_schema


def cel_string(text: str) -> str:
    """Quote ``text`` as a CEL string literal (single quotes, backslash escapes)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def regex_rule(core: str, message: str) -> Rule:
    """A rule that the whole string matches ``core`` (RE2 / Python ``re`` common subset)."""
    compiled = re.compile(core)
    return Rule(
        cel=f"self.matches({cel_string('^' + core + '$')})",
        message=message,
        check=lambda v: compiled.fullmatch(v) is not None,
    )


def unique_values(values: list[str] | None) -> list[str] | None:
    """Python twin of ``x-kubernetes-list-type: set`` (the server says "Duplicate value")."""
    if values is not None:
        seen: set[str] = set()
        for v in values:
            if v in seen:
                raise ValueError(f'Duplicate value: "{v}"')
            seen.add(v)
    return values


LIST_SET: dict[str, Any] = {"x-kubernetes-list-type": "set"}

# Regular expressions (the part between ^ and $), shared by CEL and Python.
NODE_NAME_RE = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
VM_NAME_PATTERN_RE = r"([A-Za-z0-9._:@+=~*?-]|\[!?[A-Za-z0-9._:@+=~-]+\])+"
QEMU_VERSION_RE = r"[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}"
QEMU_VERSION_PREFIX_RE = r"[0-9]{1,4}(\.[0-9]{1,4}){0,2}"
SHA256_RE = r"[0-9a-f]{64}"
ENDPOINT_RE = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$"
CONDITION_TYPE_RE = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_RE = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
LABEL_VALUE_RE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

BINARY_RULES = (
    Rule(
        cel="self.startsWith('/')",
        message="target.binary must be an absolute path (start with '/'), "
        "e.g. /usr/bin/qemu-system-x86_64",
        check=lambda v: v.startswith("/"),
    ),
    Rule(
        cel="!self.contains('/../') && !self.endsWith('/..')",
        message="target.binary must not contain a '..' path segment: give the resolved path",
        check=lambda v: "/../" not in v and not v.endswith("/.."),
    ),
    Rule(
        cel="!self.endsWith('/')",
        message="target.binary must name the QEMU executable, not a directory "
        "(remove the trailing '/')",
        check=lambda v: not v.endswith("/"),
    ),
)
TARGET_VERSION_RULE = regex_rule(
    QEMU_VERSION_RE,
    "target.version must be a QEMU version MAJOR.MINOR.MICRO such as 11.1.3 "
    "(as `qemu-system-x86_64 -version` prints it)",
)
SHA256_RULE = regex_rule(
    SHA256_RE,
    "target.sha256 must be 64 lowercase hex characters (the first field sha256sum prints)",
)
EXTRA_ARGS_RULE = Rule(
    cel=allowlist.cel_rule(),
    message=allowlist.CEL_MESSAGE,
    check=allowlist.is_allowed,
)
HOST_NAME_RULE = regex_rule(
    NODE_NAME_RE,
    "selector.hostNames entries must be node names: lowercase letters, digits, '-' and '.', "
    "starting and ending with a letter or digit",
)
VM_NAME_RULE = regex_rule(
    VM_NAME_PATTERN_RE,
    "selector.vmNames entries must be VM names or glob patterns: letters, digits, "
    "'._:@+=~-', wildcards '*' '?', and closed [...] classes; no spaces or '/'",
)
NODE_NAME_RULE = regex_rule(
    NODE_NAME_RE,
    "spec.nodeName must be a node name: lowercase letters, digits, '-' and '.', "
    "starting and ending with a letter or digit",
)
QEMU_VERSION_SELECTOR_RULE = regex_rule(
    QEMU_VERSION_PREFIX_RE,
    "selector.qemuVersions entries must be QEMU versions such as 10.0.2, "
    "or a prefix such as 10.0 (matches every 10.0.x)",
)
