"""The Helm chart (charts/vmupdate) in tests: render it with the sandbox's helm, and run a
pod's container as a process the way a kubelet would start it.

No kubelet runs in the sandbox, so a container of an installed (or rendered) pod template is
started here instead: ``$(VAR)`` references expanded from its env (downward API fields given
by the caller), and every path under a volume's mountPath mapped to a local folder holding what
the kubelet would put there (a Secret's or ConfigMap's keys as files, an empty dir). The
command line is the chart's, not a copy of it, so the test runs what a cluster would run.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster.sandbox import find_binary

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "vmupdate"


def helm_path() -> Path:
    """The helm that e2e/cluster/build.sh builds (the tests error, never skip, without it)."""
    return find_binary("helm")


def helm(*args: str, kubeconfig: str | os.PathLike[str] | None = None, timeout: float = 120,
         check: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    # Helm's caches and config go to a private folder, not the home directory.
    home = Path(tempfile.gettempdir()) / f"vmupdate-helm-{os.getuid()}"
    for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"),
                     ("HELM_DATA_HOME", "data")):
        env.setdefault(var, str(home / sub))
    res = subprocess.run([str(helm_path()), *args], capture_output=True, text=True,
                         timeout=timeout, env=env, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stderr}{res.stdout}")
    return res


def values_args(values: Mapping[str, Any] | None, workdir: Path) -> list[str]:
    """``-f FILE`` for a values mapping (written to ``workdir``), or nothing."""
    if not values:
        return []
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"values-{os.urandom(4).hex()}.yaml"
    path.write_text(yaml.safe_dump(dict(values)))
    return ["-f", str(path)]


def template(values: Mapping[str, Any] | None = None, *, workdir: Path,
             release: str = "vmupdate", namespace: str = "vmupdate-system",
             extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The chart's objects as ``helm template`` renders them (templates only, no CRDs)."""
    res = helm("template", release, str(CHART), "--namespace", namespace,
               *values_args(values, workdir), *extra, check=True)
    return [d for d in yaml.safe_load_all(res.stdout) if isinstance(d, dict)]


def find(objects: Sequence[Mapping[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    """The one object of ``kind`` whose name ends with ``suffix``."""
    found = [o for o in objects
             if o.get("kind") == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: {[o['metadata']['name'] for o in found]}"
    return dict(found[0])


def rules(role: Mapping[str, Any]) -> set[tuple[str, str, str, str]]:
    """A Role's rules as (apiGroup, resource[/subresource], verb, resourceName or "")."""
    out = set()
    for rule in role.get("rules") or []:
        for group in rule.get("apiGroups") or [""]:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    for name in rule.get("resourceNames") or [""]:
                        out.add((group, resource, verb, name))
    return out


# --- a container as a process ----------------------------------------------------------------


@dataclass
class LocalPod:
    """What the kubelet would prepare for one pod: its volumes as local folders."""

    spec: Mapping[str, Any]
    workdir: Path
    #: Secret name -> key -> content (what ``kubectl get secret`` holds, decoded).
    secrets: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)
    #: ConfigMap name -> key -> text.
    config_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: hostPath path -> local folder standing in for it.
    host_paths: Mapping[str, Path] = field(default_factory=dict)
    #: downward API fieldPath (spec.nodeName, status.podIP, ...) -> value.
    fields: Mapping[str, str] = field(default_factory=dict)
    _volumes: dict[str, Path] = field(default_factory=dict)

    def volume(self, name: str) -> Path:
        """The local folder of volume ``name`` (filled once, like the kubelet does)."""
        if name in self._volumes:
            return self._volumes[name]
        spec = next(v for v in self.spec.get("volumes") or [] if v["name"] == name)
        folder = self.workdir / "volumes" / name
        if "secret" in spec:
            data = self.secrets[spec["secret"]["secretName"]]
            folder.mkdir(parents=True, exist_ok=True)
            for key, content in data.items():
                (folder / key).write_bytes(content)
                (folder / key).chmod(0o600)
        elif "configMap" in spec:
            folder.mkdir(parents=True, exist_ok=True)
            for key, text in self.config_maps[spec["configMap"]["name"]].items():
                (folder / key).write_text(text)
        elif "emptyDir" in spec:
            folder.mkdir(parents=True, exist_ok=True)
        elif "hostPath" in spec:
            folder = self.host_paths[spec["hostPath"]["path"]]
        else:
            raise NotImplementedError(f"volume {name}: {sorted(spec)} (no local stand-in)")
        self._volumes[name] = folder
        return folder

    def container(self, name: str) -> Mapping[str, Any]:
        every = [*(self.spec.get("initContainers") or []), *self.spec["containers"]]
        return next(c for c in every if c["name"] == name)

    def env(self, name: str) -> dict[str, str]:
        """The container's env: values, and downward API fields from ``fields``."""
        out: dict[str, str] = {}
        for var in self.container(name).get("env") or []:
            if "value" in var:
                out[var["name"]] = _expand(var["value"], out)
            elif "fieldRef" in var.get("valueFrom", {}):
                out[var["name"]] = self.fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                raise NotImplementedError(f"env {var['name']}: {var}")
        return out

    def mounts(self, name: str, skip: Sequence[str] = ()) -> dict[str, Path]:
        """mountPath -> local folder, for the container's mounts (but the ``skip`` volumes)."""
        return {m["mountPath"]: self.volume(m["name"])
                for m in self.container(name).get("volumeMounts") or []
                if m["name"] not in skip}

    def local_path(self, name: str, path: str) -> Path:
        """Where a path inside container ``name`` is on this machine."""
        for m in sorted(self.container(name).get("volumeMounts") or [],
                        key=lambda m: len(m["mountPath"]), reverse=True):
            mount = m["mountPath"].rstrip("/")
            if path == mount or path.startswith(mount + "/"):
                return self.volume(m["name"]) / path[len(mount):].lstrip("/")
        raise LookupError(f"{path} is on no volume of container {name}")

    def argv(self, name: str, skip_volumes: Sequence[str] = ()) -> list[str]:
        """command + args: $(VAR) expanded, mounted paths mapped to the local folders."""
        c = self.container(name)
        env = self.env(name)
        mounts = self.mounts(name, skip_volumes)
        return [_map_paths(_expand(a, env), mounts)
                for a in [*(c.get("command") or []), *(c.get("args") or [])]]

    def run(self, name: str, *, env: Mapping[str, str] | None = None, timeout: float = 60,
            path_dirs: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        """Run a container that exits (an init container) to its end."""
        full = {**os.environ, **self.env(name), **(env or {})}
        if path_dirs:
            full["PATH"] = os.pathsep.join([*path_dirs, full.get("PATH", "")])
        return subprocess.run(self.argv(name), capture_output=True, text=True, env=full,
                              timeout=timeout, check=False)


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's $(VAR) expansion (an unknown variable stays as written)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _map_paths(text: str, mounts: Mapping[str, Path]) -> str:
    """Every mountPath in ``text`` (as a whole path component) -> its local folder."""
    if not mounts:
        return text
    alternation = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w/.-])({alternation})(?=/|$|[^\w.-])")
    return pattern.sub(lambda m: str(mounts[m.group(1)]), text)
