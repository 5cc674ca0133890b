"""The Helm chart (charts/vmupdate), rendered by the real helm (built by e2e/cluster/build.sh;
missing, these tests error): lint, templates with default and overridden values, the agent's
configuration as the pod builds it and the agent loads it, refused values, the RBAC rules,
and the generated files (values.schema.json, the kopf peering CRD) against their sources."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.k8s.chart import CHART, REPO, LocalPod, find, helm, rules, template
from vmupdate_agent import server
from vmupdate_agent.config import AgentConfig, ConfigError, TimeoutsConfig, load
from vmupdate_agent.engine import Timeouts
from vmupdate_api import chartgen, crdgen
from vmupdate_operator import config as operator_config

NAMESPACE = "vmupdate-system"

# A values file that changes most knobs at once (and still must render and load).
OVERRIDES: dict[str, Any] = {
    "image": {"repository": "registry.example/vmupdate", "tag": "9.9.9", "pullPolicy": "Always"},
    "agentServerName": "{node}.agents.example",
    "operator": {
        "replicas": 3, "tlsSecret": "op-tls", "logLevel": "DEBUG",
        "peering": {"name": "vmupdate-prod", "lifetimeSeconds": 30},
        "metrics": {"port": 9100, "service": {"enabled": False}}, "healthPort": 0,
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
    },
    "agent": {
        "tlsSecret": "agent-tls",
        "config": {
            "socket_globs": ["/run/vms/*/qmp.sock", "/run/vms/special/qmp.sock",
                             "/srv/kvm/*.qmp", "/var/run/libvirt/qemu/vm1.monitor"],
            "allowed_binary_dirs": ["/opt/qemu/bin", "/usr/libexec/qemu-new"],
            "state_dir": "/var/lib/vmupdate-agent",
            "runtime_dir": "/run/vmupdate-rt",
            "listen_address": "0.0.0.0:7443",
            "client_roles": {"operator": ["spiffe://cluster.local/ns/x/sa/op"],
                             "registrar": ["registrar"]},
            "detach_prefix": ["systemd-run", "--scope", "--slice=machine.slice"],
            "timeouts": {"load_s": 60, "guard_commit_s": 45.5},
        },
        "verbose": True,
        "hostNetwork": True,
        "extraHostPaths": ["/srv/vm-roots"],
        "nodeSelector": {"vmupdate.dev/qemu-host": "true"},
        "tolerations": [{"operator": "Exists"}],
    },
    "registrar": {"labels": {"zone": "a", "vmupdate.dev/qemu-host": "true"},
                  "intervalSeconds": 5, "endpoint": "[$(POD_IP)]:7443"},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chart")


@pytest.fixture(scope="module")
def default_objects(workdir: Path) -> list[dict[str, Any]]:
    return template(workdir=workdir, namespace=NAMESPACE)


@pytest.fixture(scope="module")
def override_objects(workdir: Path) -> list[dict[str, Any]]:
    return template(OVERRIDES, workdir=workdir, namespace=NAMESPACE, release="prod")


def pod_spec(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(objects, kind)["spec"]["template"]["spec"]
    return spec


def agent_yaml(objects: list[dict[str, Any]]) -> str:
    text: str = find(objects, "ConfigMap", "-agent")["data"]["agent.yaml"]
    return text


def built_config(objects: list[dict[str, Any]], tmp_path: Path, node: str) -> AgentConfig:
    """The agent's configuration as the pod builds it: the init container's own command
    run on the ConfigMap's text, then loaded by the agent's loader."""
    pod = LocalPod(pod_spec(objects, "DaemonSet"), tmp_path,
                   config_maps={find(objects, "ConfigMap", "-agent")["metadata"]["name"]:
                                {"agent.yaml": agent_yaml(objects)}},
                   fields={"spec.nodeName": node})
    res = pod.run("config")
    assert res.returncode == 0, res.stderr
    agent = pod.container("agent")
    config_arg = agent["args"][agent["args"].index("--config") + 1]
    return load(pod.local_path("agent", config_arg))


# --- chart metadata and lint -----------------------------------------------------------------


def test_chart_version_follows_the_project() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2" and chart["name"] == "vmupdate"
    assert chart["version"] == chart["appVersion"] == project["version"]


@pytest.mark.parametrize("with_overrides", [False, True], ids=["defaults", "overrides"])
def test_lint_is_clean(with_overrides: bool, workdir: Path) -> None:
    args = ["lint", "--strict", str(CHART)]
    if with_overrides:
        path = workdir / "lint-overrides.yaml"
        path.write_text(yaml.safe_dump(OVERRIDES))
        args += ["-f", str(path)]
    res = helm(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout


# --- rendering -------------------------------------------------------------------------------


def test_defaults_render_every_component(default_objects: list[dict[str, Any]]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in default_objects)
    assert kinds == [
        ("ClusterKopfPeering", "vmupdate"),
        ("ClusterRole", "vmupdate-agent"), ("ClusterRole", "vmupdate-operator"),
        ("ClusterRoleBinding", "vmupdate-agent"), ("ClusterRoleBinding", "vmupdate-operator"),
        ("ConfigMap", "vmupdate-agent"),
        ("DaemonSet", "vmupdate-agent"),
        ("Deployment", "vmupdate-operator"),
        ("Role", "vmupdate-operator-events"), ("RoleBinding", "vmupdate-operator-events"),
        ("Service", "vmupdate-operator-metrics"),
        ("ServiceAccount", "vmupdate-agent"), ("ServiceAccount", "vmupdate-operator"),
        ("ValidatingAdmissionPolicy", "vmupdate-vmhost-node-restriction"),
        ("ValidatingAdmissionPolicyBinding", "vmupdate-vmhost-node-restriction"),
    ]
    for obj in default_objects:
        namespace = obj["metadata"].get("namespace")
        if obj["kind"] in ("Role", "RoleBinding"):
            assert namespace == "default"  # where kopf posts the VMUpdates' events
        elif obj["kind"].startswith(("Cluster", "ValidatingAdmissionPolicy")):
            assert namespace is None
        else:
            assert namespace == NAMESPACE


def test_operator_deployment(default_objects: list[dict[str, Any]]) -> None:
    deployment = find(default_objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "vmupdate-operator"
    assert spec["enableServiceLinks"] is False
    (container,) = spec["containers"]
    assert container["image"] == "vmupdate:0.1.0"
    assert container["command"] == ["vmupdate-operator"]
    # The real operator's flag parser takes the chart's arguments.
    cfg = operator_config.from_args(container["args"], environ={})
    assert cfg.agent_tls is not None
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    secret_volume = next(v for v in spec["volumes"] if v["name"] == mounts[
        str(Path(cfg.agent_tls.cert_file).parent)])
    assert secret_volume["secret"]["secretName"] == "vmupdate-operator-tls"
    assert {Path(f).name for f in (cfg.agent_tls.ca_file, cfg.agent_tls.cert_file,
                                   cfg.agent_tls.key_file)} == {"ca.crt", "tls.crt", "tls.key"}
    assert cfg.agent_tls.server_name == "vmupdate-agent"
    assert (cfg.peering_name, cfg.standalone, cfg.peering_lifetime_s) == ("vmupdate", False, 60)
    assert (cfg.metrics_port, cfg.health_port) == (8080, 8081)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_operator_overrides(override_objects: list[dict[str, Any]]) -> None:
    deployment = find(override_objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert deployment["spec"]["replicas"] == 3
    assert container["image"] == "registry.example/vmupdate:9.9.9"
    assert container["imagePullPolicy"] == "Always"
    cfg = operator_config.from_args(container["args"], environ={})
    assert cfg.peering_name == "vmupdate-prod" and cfg.peering_lifetime_s == 30
    assert cfg.agent_tls is not None and cfg.agent_tls.server_name == "{node}.agents.example"
    assert cfg.agent_tls.for_host("node-7").server_name == "node-7.agents.example"
    assert (cfg.metrics_port, cfg.health_port, cfg.log_level) == (9100, 0, "DEBUG")
    assert "livenessProbe" not in container
    assert spec["nodeSelector"] == {"node-role.kubernetes.io/control-plane": ""}
    assert spec["tolerations"] == [{"operator": "Exists", "effect": "NoSchedule"}]
    assert not [o for o in override_objects if o["kind"] == "Service"]
    assert find(override_objects, "ClusterKopfPeering")["metadata"]["name"] == "vmupdate-prod"


def test_standalone_operator(workdir: Path) -> None:
    objects = template({"operator": {"replicas": 1, "peering": {"enabled": False,
                                                                "name": "vmupdate"}}},
                       workdir=workdir)
    (container,) = pod_spec(objects, "Deployment")["containers"]
    assert operator_config.from_args(container["args"], environ={}).standalone
    assert not [o for o in objects if o["kind"] == "ClusterKopfPeering"]
    assert not [r for r in rules(find(objects, "ClusterRole", "-operator"))
                if r[0] == "kopf.dev"]


@pytest.mark.parametrize("which", ["defaults", "overrides"])
def test_agent_config_is_what_the_agent_loads(
        which: str, default_objects: list[dict[str, Any]],
        override_objects: list[dict[str, Any]], tmp_path: Path) -> None:
    objects = default_objects if which == "defaults" else override_objects
    values = OVERRIDES["agent"]["config"] if which == "overrides" else yaml.safe_load(
        (CHART / "values.yaml").read_text())["agent"]["config"]
    cfg = built_config(objects, tmp_path, "worker-3.example")
    assert cfg.node_name == "worker-3.example"
    assert cfg.model_dump(include=set(values)) == AgentConfig.model_validate(
        {**values}).model_dump(include=set(values))
    # tls is the mounted Secret.
    pod = pod_spec(objects, "DaemonSet")
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    assert cfg.tls is not None
    tls_volume = mounts[str(Path(cfg.tls.cert_file).parent)]
    secret = next(v for v in pod["volumes"] if v["name"] == tls_volume)["secret"]
    assert secret["secretName"] == ("agent-tls" if which == "overrides" else "vmupdate-agent-tls")


def test_agent_daemonset_defaults(default_objects: list[dict[str, Any]]) -> None:
    spec = pod_spec(default_objects, "DaemonSet")
    assert spec["hostPID"] is True and "hostNetwork" not in spec
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    containers = {c["name"]: c for c in spec["containers"]}
    agent, registrar = containers["agent"], containers["registrar"]
    assert agent["securityContext"]["privileged"] is True
    assert agent["command"] + agent["args"] == [
        "vmupdate-agent", "serve", "--config", "/etc/vmupdate/agent.yaml"]
    assert agent["ports"] == [{"name": "grpc", "containerPort": 9443, "protocol": "TCP"}]
    assert agent["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    host = host_mounts(spec, "agent")
    # The Dockerfile's and README's host paths, at the same path inside.
    assert host == {"/var/lib/vmupdate": "/var/lib/vmupdate", "/run/vmupdate": "/run/vmupdate",
                    "/run/vms": "/run/vms"}
    assert registrar["command"] == ["python", "-m", "vmupdate_agent.registration"]
    assert "--node-name=$(NODE_NAME)" in registrar["args"]
    assert "--endpoint=$(POD_IP):9443" in registrar["args"]
    assert "--agent=127.0.0.1:9443" in registrar["args"]
    assert "--server-name=vmupdate-agent" in registrar["args"]
    assert "--label=vmupdate.dev/qemu-host=true" in registrar["args"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in registrar["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "POD_IP": "status.podIP"}
    # Only the registrar gets the service account token.
    token_mounts = [c["name"] for c in spec["containers"]
                    if any(m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
                           for m in c.get("volumeMounts") or [])]
    assert token_mounts == ["registrar"]
    # Above the agent's drain on SIGTERM with the default timeouts (server.py).
    defaults = TimeoutsConfig()
    drain = server.drain_timeout(Timeouts(
        command=defaults.qmp_command_s, handover=defaults.handover_s, load=defaults.load_s,
        guard_commit=defaults.guard_commit_s))
    assert spec["terminationGracePeriodSeconds"] > drain + server.STOP_GRACE_S


def host_mounts(spec: dict[str, Any], container: str) -> dict[str, str]:
    """mountPath -> host path, for the container's hostPath mounts."""
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    c = next(c for c in spec["containers"] if c["name"] == container)
    return {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]
            if m["name"] in volumes}


def test_agent_daemonset_overrides(override_objects: list[dict[str, Any]]) -> None:
    spec = pod_spec(override_objects, "DaemonSet")
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["nodeSelector"] == {"vmupdate.dev/qemu-host": "true"}
    # Every socket glob's fixed part (nested and duplicate ones once), the state and runtime
    # dirs and the extra paths.
    assert host_mounts(spec, "agent") == {p: p for p in (
        "/var/lib/vmupdate-agent", "/run/vmupdate-rt", "/run/vms", "/srv/kvm",
        "/var/run/libvirt/qemu", "/srv/vm-roots")}
    containers = {c["name"]: c for c in spec["containers"]}
    assert containers["agent"]["args"][0] == "--verbose"
    assert containers["agent"]["ports"][0]["containerPort"] == 7443
    args = containers["registrar"]["args"]
    assert "--server-name=$(NODE_NAME).agents.example" in args
    assert "--endpoint=[$(POD_IP)]:7443" in args and "--agent=127.0.0.1:7443" in args
    assert {"--label=zone=a", "--label=vmupdate.dev/qemu-host=true", "--interval=5"} <= set(args)


def test_registrar_off(workdir: Path) -> None:
    objects = template({"registrar": {"enabled": False}}, workdir=workdir)
    spec = pod_spec(objects, "DaemonSet")
    assert [c["name"] for c in spec["containers"]] == ["agent"]
    assert not [o for o in objects if o["kind"] == "ClusterRole"
                and o["metadata"]["name"].endswith("-agent")]
    assert not [o for o in objects if o["kind"].startswith("ValidatingAdmissionPolicy")]


def test_vmhost_admission_policy_names_the_agents_service_account(
        default_objects: list[dict[str, Any]]) -> None:
    """Proven on the real API server by e2e/test_k8s_security.py."""
    policy = find(default_objects, "ValidatingAdmissionPolicy")
    [condition] = policy["spec"]["matchConditions"]
    assert condition["expression"] == (
        f'request.userInfo.username == "system:serviceaccount:{NAMESPACE}:vmupdate-agent"')
    assert {tuple(r["resources"]) for r in policy["spec"]["matchConstraints"]["resourceRules"]
            } == {("vmhosts", "vmhosts/status")}
    binding = find(default_objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"],
                               "validationActions": ["Deny"]}


# --- RBAC ------------------------------------------------------------------------------------


def test_operator_rbac_is_exactly_what_it_uses(default_objects: list[dict[str, Any]]) -> None:
    """The list e2e/test_k8s_chart.py proves against the operator's recorded requests."""
    assert rules(find(default_objects, "ClusterRole", "-operator")) == {
        ("vmupdate.dev", "vmupdates", "list", ""), ("vmupdate.dev", "vmupdates", "watch", ""),
        ("vmupdate.dev", "vmupdates", "patch", ""),
        ("vmupdate.dev", "vmupdates/status", "patch", ""),
        ("vmupdate.dev", "vmhosts", "list", ""), ("vmupdate.dev", "vmhosts", "watch", ""),
        *(("vmupdate.dev", "vmupdatehosts", verb, "")
          for verb in ("list", "watch", "create", "patch", "deletecollection")),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list", ""),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch", ""),
        ("kopf.dev", "clusterkopfpeerings", "list", ""),
        ("kopf.dev", "clusterkopfpeerings", "watch", ""),
        ("kopf.dev", "clusterkopfpeerings", "patch", "vmupdate"),
    }
    assert rules(find(default_objects, "Role", "-operator-events")) == {
        ("", "events", "create", "")}
    for binding, suffix in (("ClusterRoleBinding", "-operator"),
                            ("RoleBinding", "-operator-events")):
        subjects = find(default_objects, binding, suffix)["subjects"]
        assert subjects == [{"kind": "ServiceAccount", "name": "vmupdate-operator",
                             "namespace": NAMESPACE}]


def test_agent_rbac(default_objects: list[dict[str, Any]], workdir: Path) -> None:
    assert rules(find(default_objects, "ClusterRole", "-agent")) == {
        ("vmupdate.dev", "vmhosts", "get", ""), ("vmupdate.dev", "vmhosts", "create", ""),
        ("vmupdate.dev", "vmhosts", "patch", ""),
        ("vmupdate.dev", "vmhosts/status", "patch", "")}
    # Without labels to merge the registrar never patches the object itself.
    objects = template({"registrar": {"labels": None}}, workdir=workdir)
    assert ("vmupdate.dev", "vmhosts", "patch", "") not in rules(
        find(objects, "ClusterRole", "-agent"))


# --- refused values --------------------------------------------------------------------------


# Refused by values.schema.json: `helm lint` and `helm template` (and install) say so.
SCHEMA_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"agent": {"config": {"timeouts": {"load_s": 0}}}}, "/agent/config/timeouts/load_s"),
    ({"agent": {"config": {"timeouts": {"handover_s": 601}}}},
     "/agent/config/timeouts/handover_s"),
    ({"agent": {"config": {"node_name": "n1"}}}, "'node_name' not allowed"),
    ({"agent": {"config": {"tls": {"cert_file": "/x"}}}}, "'tls' not allowed"),
    ({"agent": {"config": {"socket_glob": ["/run/vms/*/qmp.sock"]}}},
     "'socket_glob' not allowed"),
    ({"agent": {"config": {"state_dir": "var/lib/vmupdate"}}}, "/agent/config/state_dir"),
    ({"agent": {"config": {"allowed_binary_dirs": ["opt/qemu"]}}},
     "/agent/config/allowed_binary_dirs/0"),
    ({"agent": {"config": {"allowed_binary_dirs": []}}}, "/agent/config/allowed_binary_dirs"),
    ({"agent": {"config": {"socket_globs": None}}}, "missing property 'socket_globs'"),
    ({"agent": {"config": {"client_allowlist": "vmupdate-operator"}}},
     "/agent/config/client_allowlist"),
    ({"agent": {"config": {"client_roles": {"admin": ["x"]}}}}, "invalid propertyName 'admin'"),
    ({"operater": {"replicas": 1}}, "'operater' not allowed"),
    ({"operator": {"peering": {"lifetimeSeconds": 2}}}, "/operator/peering/lifetimeSeconds"),
    ({"operator": {"tlsSecret": "Not_A_Name"}}, "/operator/tlsSecret"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"certificates": {"agentServing": "cert-manager-csi"}}, "/certificates/agentServing"),
    ({"certificates": {"agentTtlSeconds": 60}}, "/certificates/agentTtlSeconds"),
]
# Refused by the templates (`fail`): `helm template` and install; `helm lint` only reports
# template failures as [INFO] (lint mode), so it is not asked.
TEMPLATE_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"agent": {"config": {"listen_address": "9443"}}}, "agent.config.listen_address"),
    ({"agent": {"config": {"socket_globs": ["/*/qmp.sock"]}}}, "agent.config.socket_globs"),
    ({"operator": {"replicas": 2, "peering": {"enabled": False}}}, "operator.replicas"),
    ({"certificates": {"create": "selfSigned"}}, "set certificates.agentServing=csr"),
    ({"certificates": {"create": "certManager"}}, "set certificates.agentServing=csr"),
    ({"certificates": {"agentServing": "csr"}, "registrar": {"enabled": False}},
     "keep registrar.enabled=true"),
]


def _refused(values: dict[str, Any], message: str, commands: tuple[str, ...],
             workdir: Path) -> None:
    path = workdir / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    for command in commands:
        args = [command, *(["t"] if command == "template" else ["--strict"]), str(CHART),
                "-f", str(path)]
        res = helm(*args)
        assert res.returncode != 0, f"helm {command} accepted {values}"
        assert message in res.stdout + res.stderr, res.stdout + res.stderr


@pytest.mark.parametrize(("values", "message"), SCHEMA_REFUSED,
                         ids=[m for _, m in SCHEMA_REFUSED])
def test_bad_values_are_refused_by_the_schema(values: dict[str, Any], message: str,
                                              workdir: Path) -> None:
    _refused(values, message, ("template", "lint"), workdir)


@pytest.mark.parametrize(("values", "message"), TEMPLATE_REFUSED,
                         ids=[m for _, m in TEMPLATE_REFUSED])
def test_bad_values_are_refused_by_the_templates(values: dict[str, Any], message: str,
                                                 workdir: Path) -> None:
    _refused(values, message, ("template",), workdir)


# --- generated files -------------------------------------------------------------------------


def test_generated_chart_files_are_checked_in() -> None:
    """Drift test: run `python -m vmupdate_api.chartgen` after changing AgentConfig or the
    peering CRD."""
    assert chartgen.drift(REPO) == []
    assert chartgen.main(["--check", "--root", str(REPO)]) == 0
    # The extra CRD in the chart's crds/ is not the CRD generator's business.
    assert crdgen.drift(REPO) == []
    assert (CHART / "crds" / "kopf.dev_clusterkopfpeerings.yaml").read_text().endswith(
        (REPO / "operator" / "manifests" / "kopf-peering-crd.yaml").read_text())


def test_drift_check_fails_on_a_stale_schema(tmp_path: Path) -> None:
    for rel in (chartgen.SCHEMA_FILE, chartgen.PEERING_CRD_SOURCE, chartgen.PEERING_CRD_FILE):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((REPO / rel).read_text())
    assert chartgen.drift(tmp_path) == []
    stale = tmp_path / chartgen.SCHEMA_FILE
    stale.write_text(stale.read_text().replace('"maximum": 600', '"maximum": 900', 1))
    assert chartgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert chartgen.main(["--root", str(tmp_path)]) == 0
    assert chartgen.drift(tmp_path) == []


def test_schema_follows_the_agent_model() -> None:
    schema = chartgen.agent_config_schema()
    model_fields = set(AgentConfig.model_fields)
    assert set(schema["properties"]) == model_fields - set(chartgen.CHART_OWNED)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) >= {"socket_globs", "allowed_binary_dirs"}
    timeouts = schema["properties"]["timeouts"]["properties"]
    assert set(timeouts) == set(TimeoutsConfig.model_fields)


@pytest.mark.parametrize("field", [*chartgen.ABSOLUTE_PATH_FIELDS,
                                   *chartgen.ABSOLUTE_PATH_LIST_FIELDS])
def test_schema_path_rule_is_the_models(field: str) -> None:
    """The schema's absolute-path patterns restate the model's validators: the model must
    refuse what the pattern refuses, and take what it takes."""
    base: dict[str, Any] = {"socket_globs": ["/run/vms/*/qmp.sock"],
                            "allowed_binary_dirs": ["/opt/qemu/bin"]}
    relative: Any = "relative/path"
    absolute: Any = "/absolute/path"
    if field in chartgen.ABSOLUTE_PATH_LIST_FIELDS:
        relative, absolute = [relative], [absolute]
    AgentConfig.model_validate({**base, field: absolute})
    with pytest.raises(ValueError, match=field):
        AgentConfig.model_validate({**base, field: relative})


def test_values_defaults_match_the_model() -> None:
    """values.yaml repeats the model's defaults the templates need (paths to mount, port)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["agent"]["config"]
    for name in chartgen.CHART_REQUIRED:
        assert values[name] == AgentConfig.model_fields[name].default, name


def test_a_bad_config_file_is_refused_by_the_agent_too(tmp_path: Path) -> None:
    """What the schema lets through, the agent still checks ('..' in a path)."""
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"socket_globs": ["/run/vms/*/qmp.sock"],
                                    "allowed_binary_dirs": ["/opt/../etc"]}))
    with pytest.raises(ConfigError, match="allowed_binary_dirs"):
        load(path)


# --- per-node agent certificates (certificates.agentServing=csr) -----------------------------

CSR_SELF_SIGNED = {"certificates": {"agentServing": "csr", "create": "selfSigned"}}


def _secret_pem(secret: dict[str, Any], key: str) -> bytes:
    import base64

    return base64.b64decode(secret["data"][key])


def test_self_signed_mode_creates_the_ca_and_client_certificates(workdir: Path) -> None:
    from cryptography import x509

    from vmupdate_operator.csr_signer import SigningCA

    objs = template(CSR_SELF_SIGNED, workdir=workdir, namespace=NAMESPACE)
    ca_secret = find(objs, "Secret", "vmupdate-ca")
    assert ca_secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    ca = SigningCA.from_pem(_secret_pem(ca_secret, "tls.crt"), _secret_pem(ca_secret, "tls.key"))
    for name, identity in (("vmupdate-operator-tls", "vmupdate-operator"),
                           ("vmupdate-registrar-tls", "vmupdate-registrar")):
        secret = find(objs, "Secret", name)
        assert _secret_pem(secret, "ca.crt") == _secret_pem(ca_secret, "tls.crt")
        cert = x509.load_pem_x509_certificate(_secret_pem(secret, "tls.crt"))
        cert.verify_directly_issued_by(ca.cert)
        assert cert.subject.get_attributes_for_oid(
            x509.oid.NameOID.COMMON_NAME)[0].value == identity
    # The operator signs with the CA and checks each agent against its node.
    op = pod_spec(objs, "Deployment")
    args = op["containers"][0]["args"]
    assert "--agent-server-name={node}" in args
    assert "--agent-signer-ca-dir=/etc/vmupdate/signer" in args
    assert f"--agent-service-account={NAMESPACE}/vmupdate-agent" in args
    [signer] = [v for v in op["volumes"] if v["name"] == "signer-ca"]
    assert signer["secret"]["secretName"] == "vmupdate-ca"
    cfg = operator_config.from_args([a for a in args if a.startswith("--agent-")])
    assert cfg.agent_user == f"system:serviceaccount:{NAMESPACE}:vmupdate-agent"


def test_csr_mode_agents_make_their_own_key_and_never_mount_the_ca(workdir: Path) -> None:
    objs = template(CSR_SELF_SIGNED, workdir=workdir, namespace=NAMESPACE)
    spec = pod_spec(objs, "DaemonSet")
    [sidecar] = [c for c in spec["initContainers"] if c["name"] == "certificate"]
    assert sidecar["restartPolicy"] == "Always"  # a sidecar, started before the agent
    assert sidecar["command"] + sidecar["args"][:2] == [
        "python", "-m", "vmupdate_agent.certificate", "--node-name=$(NODE_NAME)",
        "--dir=/etc/vmupdate/tls"]
    assert "startupProbe" in sidecar  # the agent starts once the first certificate is there
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["agent-tls"] == {"name": "agent-tls",
                                    "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
    assert volumes["client-ca"]["secret"] == {"secretName": "vmupdate-registrar-tls",
                                              "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                              "defaultMode": 0o444}
    # No Secret with a key the node must not hold: the CA's, the operator's.
    mounted = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert mounted == {"vmupdate-registrar-tls"}
    registrar = next(c for c in spec["containers"] if c["name"] == "registrar")
    assert "--server-name=$(NODE_NAME)" in registrar["args"]
    assert "client_ca_file: /etc/vmupdate/client-ca/ca.crt" in agent_yaml(objs)


def test_csr_mode_rbac(workdir: Path) -> None:
    objs = template({"certificates": {"agentServing": "csr"}}, workdir=workdir,
                    namespace=NAMESPACE)
    csr = "certificatesigningrequests"
    assert rules(find(objs, "ClusterRole", "-agent")) >= {
        ("certificates.k8s.io", csr, "create", ""), ("certificates.k8s.io", csr, "get", "")}
    assert {r for r in rules(find(objs, "ClusterRole", "-operator"))
            if r[0] == "certificates.k8s.io"} == {
        ("certificates.k8s.io", csr, "list", ""), ("certificates.k8s.io", csr, "watch", ""),
        ("certificates.k8s.io", f"{csr}/approval", "update", ""),
        ("certificates.k8s.io", f"{csr}/status", "update", ""),
        ("certificates.k8s.io", "signers", "approve", "vmupdate.dev/agent-serving"),
        ("certificates.k8s.io", "signers", "sign", "vmupdate.dev/agent-serving")}
    # Pre-made Secrets: nothing generated.
    assert not [o for o in objs if o["kind"] == "Secret"]


def test_secret_mode_is_unchanged(default_objects: list[dict[str, Any]]) -> None:
    spec = pod_spec(default_objects, "DaemonSet")
    assert [c["name"] for c in spec["initContainers"]] == ["config"]
    assert {v["name"]: v for v in spec["volumes"]}["agent-tls"]["secret"]["secretName"] == (
        "vmupdate-agent-tls")
    assert not [o for o in default_objects if o["kind"] == "Secret"]
    assert not [r for r in rules(find(default_objects, "ClusterRole", "-operator"))
                if r[0] == "certificates.k8s.io"]


def test_cert_manager_mode_renders_issuers_and_certificates(workdir: Path) -> None:
    """Render-tested only: cert-manager is not installed in the test cluster."""
    objs = template({"certificates": {"agentServing": "csr", "create": "certManager"}},
                    workdir=workdir, namespace=NAMESPACE)
    assert not [o for o in objs if o["kind"] == "Secret"]
    assert find(objs, "Issuer", "-selfsigned")["spec"] == {"selfSigned": {}}
    ca = find(objs, "Certificate", "-ca")["spec"]
    assert ca["isCA"] is True and ca["secretName"] == "vmupdate-ca"
    assert find(objs, "Issuer", "vmupdate-ca")["spec"] == {"ca": {"secretName": "vmupdate-ca"}}
    for who, secret, cn in (("operator", "vmupdate-operator-tls", "vmupdate-operator"),
                            ("registrar", "vmupdate-registrar-tls", "vmupdate-registrar")):
        spec = find(objs, "Certificate", f"-{who}")["spec"]
        assert (spec["secretName"], spec["commonName"]) == (secret, cn)
        assert spec["usages"] == ["digital signature", "client auth"]
        assert spec["issuerRef"]["name"] == "vmupdate-ca"
