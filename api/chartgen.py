"""Generate the Helm chart's files that restate an existing contract, so they cannot drift.

    python -m vmupdate_api.chartgen            # write them
    python -m vmupdate_api.chartgen --check    # exit 1 when the checked-in files differ

* ``charts/vmupdate/values.schema.json``: the chart's values; its ``agent.config`` part is the
  JSON schema of the node agent's configuration model (``vmupdate_agent.config.AgentConfig``),
  so ``helm install`` refuses an agent configuration the agent would refuse, naming the field.
* ``charts/vmupdate/crds/kopf.dev_clusterkopfpeerings.yaml``: kopf's peering CRD, copied from
  ``operator/manifests/kopf-peering-crd.yaml`` (Helm installs CRDs from ``crds/`` only).

A build tool, not a runtime contract: it reads the agent's model to write the chart.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vmupdate_agent.config import AgentConfig
from vmupdate_api import generated

COMMAND = "python -m vmupdate_api.chartgen"
CHART = "charts/vmupdate"
SCHEMA_FILE = f"{CHART}/values.schema.json"
PEERING_CRD_SOURCE = "operator/manifests/kopf-peering-crd.yaml"
PEERING_CRD_FILE = f"{CHART}/crds/kopf.dev_clusterkopfpeerings.yaml"

# AgentConfig fields the chart sets itself: tls from the mounted Secret, node_name per node
# (downward API). A value for them would be ignored or clash, so the schema refuses them.
CHART_OWNED = ("node_name", "tls")
# Fields the templates read (host paths to mount, the port to expose), so they must be given
# even where the model has a default.
CHART_REQUIRED = ("state_dir", "runtime_dir", "listen_address")
# The model checks these in Python validators (absolute paths), which its JSON schema cannot
# carry; the same rule as a pattern. tests/unit/test_chart.py checks that the model refuses
# what these patterns refuse.
ABSOLUTE = "^/"
ABSOLUTE_PATH_FIELDS = ("state_dir", "runtime_dir")
ABSOLUTE_PATH_LIST_FIELDS = ("socket_globs", "allowed_binary_dirs")


class SchemaError(ValueError):
    """The model's schema has a shape this generator does not know how to embed."""


def _inline(node: Any, defs: Mapping[str, Any], path: str) -> Any:
    """Resolve ``#/$defs/X`` references in place (the schema is embedded under
    ``agent.config``, where root-relative references would point elsewhere) and drop titles."""
    if isinstance(node, list):
        return [_inline(item, defs, f"{path}[]") for item in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    if "$ref" in node:
        ref = node["$ref"]
        prefix = "#/$defs/"
        if not isinstance(ref, str) or not ref.startswith(prefix) or ref[len(prefix):] not in defs:
            raise SchemaError(f"{path}: unsupported $ref {ref!r}")
        out.update(_inline(defs[ref[len(prefix):]], defs, path))
    for key, value in node.items():
        if key in ("$ref", "$defs", "title"):
            continue
        out[key] = _inline(value, defs, f"{path}.{key}")
    return out


def agent_config_schema() -> dict[str, Any]:
    """The JSON schema of ``agent.config``: AgentConfig without the chart-owned fields."""
    raw = AgentConfig.model_json_schema(mode="validation")
    schema: dict[str, Any] = _inline(raw, raw.get("$defs", {}), "agent.config")
    props: dict[str, Any] = schema["properties"]
    for name in CHART_OWNED:
        props.pop(name)
    for name in ABSOLUTE_PATH_FIELDS:
        props[name]["pattern"] = ABSOLUTE
    for name in ABSOLUTE_PATH_LIST_FIELDS:
        props[name]["items"]["pattern"] = ABSOLUTE
    if schema.get("additionalProperties") is not False:
        raise SchemaError("AgentConfig must forbid extra fields (a typo would pass silently)")
    required = [r for r in schema.get("required", []) if r not in CHART_OWNED]
    schema["required"] = required + [r for r in CHART_REQUIRED if r not in required]
    schema["description"] = (
        "The node agent's configuration (vmupdate_agent.config.AgentConfig; generated). "
        "The chart adds tls and node_name.")
    return schema


# --- the chart's own values ------------------------------------------------------------------


def _obj(properties: Mapping[str, Any], *, required: Sequence[str] = (),
         description: str | None = None) -> dict[str, Any]:
    """A closed object: a misspelt key is an error, not a silently ignored value."""
    out: dict[str, Any] = {"type": "object", "additionalProperties": False,
                           "properties": dict(properties)}
    if required:
        out["required"] = list(required)
    if description:
        out["description"] = description
    return out


def _str(description: str | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string", **extra}
    if description:
        out["description"] = description
    return out


def _int(minimum: int, maximum: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer", "minimum": minimum}
    if maximum is not None:
        out["maximum"] = maximum
    return out


def _seconds(minimum: float = 0) -> dict[str, Any]:
    return {"type": "number", "exclusiveMinimum": minimum}


_ANY_OBJECT: dict[str, Any] = {"type": "object"}  # Kubernetes' own types: checked by it
_ANY_LIST: dict[str, Any] = {"type": "array"}
_PORT = _int(0, 65535)
_NAME = _str(pattern="^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", maxLength=253)
_STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
_LOG_LEVEL = {"type": "string",
              "enum": ["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"]}


def _service_account() -> dict[str, Any]:
    return _obj({"create": {"type": "boolean"}, "name": _str(),
                 "annotations": _STRING_MAP}, required=["create"])


def _pod_placement() -> dict[str, Any]:
    """What both workloads take for their pods: resources, metadata, scheduling."""
    return {"resources": _ANY_OBJECT, "podAnnotations": _STRING_MAP, "podLabels": _STRING_MAP,
            "priorityClassName": _str(), "nodeSelector": _STRING_MAP,
            "tolerations": _ANY_LIST, "affinity": _ANY_OBJECT}


def values_schema() -> dict[str, Any]:
    operator = _obj({
        "replicas": _int(0),
        "serviceAccount": _service_account(),
        "rbac": _obj({"create": {"type": "boolean"}}),
        "tlsSecret": _NAME,
        "eventsNamespace": _NAME,
        "peering": _obj({
            "enabled": {"type": "boolean"},
            "name": _NAME,
            "create": {"type": "boolean"},
            "lifetimeSeconds": _int(5),
        }, required=["enabled", "name"]),
        "hostStaleAfterSeconds": _seconds(),
        "resyncSeconds": _seconds(),
        "updateTimeoutSeconds": _seconds(),
        "deletionWaitSeconds": _seconds(),
        "logLevel": _LOG_LEVEL,
        "metrics": _obj({"port": _PORT, "service": _obj({"enabled": {"type": "boolean"},
                                                         "port": _int(1, 65535)})}),
        "healthPort": _PORT,
        **_pod_placement(),
        "podSecurityContext": _ANY_OBJECT,
        "securityContext": _ANY_OBJECT,
    }, required=["replicas", "tlsSecret", "peering"])
    agent = _obj({
        "serviceAccount": _service_account(),
        "rbac": _obj({"create": {"type": "boolean"}}),
        "tlsSecret": _NAME,
        "config": agent_config_schema(),
        "verbose": {"type": "boolean"},
        "extraHostPaths": {"type": "array", "items": _str(pattern=ABSOLUTE)},
        "hostNetwork": {"type": "boolean"},
        "terminationGracePeriodSeconds": _int(0),
        "updateStrategy": _ANY_OBJECT,
        **_pod_placement(),
    }, required=["tlsSecret", "config"])
    registrar = _obj({
        "enabled": {"type": "boolean"},
        "tlsSecret": _NAME,
        "intervalSeconds": _seconds(),
        "labels": _STRING_MAP,
        "endpoint": _str("host:port the operator dials; default $(POD_IP):<agent port>"),
        "logLevel": _LOG_LEVEL,
        "resources": _ANY_OBJECT,
        "securityContext": _ANY_OBJECT,
    }, required=["enabled"])
    top = _obj({
        # Helm hands a parent chart's globals to a subchart.
        "global": _ANY_OBJECT,
        "nameOverride": _str(),
        "fullnameOverride": _str(),
        "image": _obj({"repository": _str(minLength=1), "tag": _str(),
                       "pullPolicy": {"type": "string",
                                      "enum": ["Always", "IfNotPresent", "Never"]}},
                      required=["repository"]),
        "imagePullSecrets": _ANY_LIST,
        "agentServerName": _str("the name checked on the agents' serving certificate"),
        "certificates": _obj({
            "agentServing": {"type": "string", "enum": ["secret", "csr"]},
            "create": {"type": "string", "enum": ["none", "selfSigned", "certManager"]},
            "caSecret": _NAME,
            "agentTtlSeconds": _int(600),
        }, required=["agentServing", "create"]),
        "operator": operator,
        "agent": agent,
        "registrar": registrar,
    }, required=["image", "operator", "agent", "registrar"])
    return {"$comment": f"Generated by `{COMMAND}` (api/chartgen.py); do not edit by hand.",
            **top}


# --- files -----------------------------------------------------------------------------------


def peering_crd(root: Path) -> str:
    source = (root / PEERING_CRD_SOURCE).read_text()
    return (f"# Generated by `{COMMAND}`: a copy of {PEERING_CRD_SOURCE}. Do not edit by hand.\n"
            + source)


def render(root: Path) -> dict[str, str]:
    """Relative path -> file text, for every generated file."""
    return {
        SCHEMA_FILE: json.dumps(values_schema(), indent=2, sort_keys=False) + "\n",
        PEERING_CRD_FILE: peering_crd(root),
    }


def drift(root: Path) -> list[str]:
    """Differences between the generated files and those under ``root`` (empty: none)."""
    return generated.drift(render(root), root)


def write(root: Path) -> list[str]:
    """Write every generated file under ``root``; return the relative paths changed."""
    return generated.write(render(root), root)


def main(argv: Sequence[str] | None = None) -> int:
    return generated.main(argv, command=COMMAND, description=__doc__.splitlines()[0],
                          what="chart files", check=drift, generate=write)


if __name__ == "__main__":
    sys.exit(main())

