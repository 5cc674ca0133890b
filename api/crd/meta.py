"""The Kubernetes conventions every model follows.

:class:`K8sModel` (camelCase on the wire, its ``__k8s_rules__`` enforced), the wire names,
timestamps as the API server writes them, the bounded string types, the object metadata, and
the merge patch that sets an object's status.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    PlainSerializer,
    StringConstraints,
    model_validator,
)
from pydantic.alias_generators import to_camel

from vmupdate_api.crd.constants import MAX_MESSAGE, MAX_NAME, MAX_PATH
from vmupdate_api.crd.rules import Rule


def k8s_time(value: datetime) -> datetime:
    """Kubernetes timestamps are UTC with whole seconds (metav1.Time)."""
    return value.astimezone(UTC).replace(microsecond=0)


def format_time(value: datetime) -> str:
    """RFC 3339 as Kubernetes writes it: ``2025-01-02T03:04:05Z``."""
    return k8s_time(value).strftime("%Y-%m-%dT%H:%M:%SZ")


Time = Annotated[
    AwareDatetime,
    AfterValidator(k8s_time),
    PlainSerializer(format_time, return_type=str, when_used="json"),
]
"""A timestamp: timezone-aware, normalised to UTC and whole seconds, RFC 3339 on the wire."""

Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]
Message = Annotated[str, StringConstraints(max_length=MAX_MESSAGE)]
Path = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATH)]
VersionString = Annotated[str, StringConstraints(max_length=64)]

_WIRE_NAMES = {"memory_mib": "memoryMiB", "failed_vms": "failedVMs",
               "in_progress_vms": "inProgressVMs"}


def wire_name(attribute: str) -> str:
    """The camelCase name a snake_case attribute has on the wire."""
    return _WIRE_NAMES.get(attribute) or to_camel(attribute)


class K8sModel(BaseModel):
    """Base of every model: camelCase on the wire, rules from ``__k8s_rules__`` enforced."""

    model_config = ConfigDict(
        alias_generator=wire_name,
        populate_by_name=True,
        use_attribute_docstrings=True,
        use_enum_values=False,
        json_schema_extra=lambda schema, cls: _add_model_rules(schema, cls),
    )

    __k8s_rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _run_k8s_rules(self) -> K8sModel:
        for rule in type(self).__k8s_rules__:
            rule.validate(self)
        return self

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict as the API server stores it (camelCase, no nulls)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _add_model_rules(schema: dict[str, Any], cls: Any) -> None:
    rules: tuple[Rule, ...] = getattr(cls, "__k8s_rules__", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.to_k8s() for r in rules]


class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata the operator and agent read (others are kept)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str | None = None
    generate_name: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: Time | None = None
    deletion_timestamp: Time | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    finalizers: list[str] | None = None


def status_merge_patch(status: K8sModel) -> dict[str, Any]:
    """A merge patch that makes an object's ``.status`` equal ``status``: fields unset now
    are sent as null, so the patch removes them (lists are replaced whole)."""
    wire = status.to_wire()
    for name, info in type(status).model_fields.items():
        wire.setdefault(info.alias or name, None)
    return {"status": wire}
