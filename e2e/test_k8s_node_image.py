"""The project's image, built from the Dockerfile by e2e/image/build.sh (buildah, FROM images
made from Debian packages), run by a real containerd + runc as a node would run it:

* both entry points start and answer ``--help``;
* the default user (the operator's) is not root;
* the final stage holds no C compiler;
* the guard is static (no ELF interpreter) and runs;
* the agent finds the image's guard (``$VMUPDATE_GUARD_BINARY``) and installs it into its
  runtime dir without building one (it could not: no compiler).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.node.containerd import Containerd, Netns

pytestmark = pytest.mark.k8s

TOP = Path(__file__).resolve().parent.parent


def build_image() -> tuple[Path, str]:
    """Build (warm: every unchanged step cached) and return the OCI archive and the image."""
    res = subprocess.run([str(TOP / "e2e/image/build.sh")], capture_output=True, text=True,
                         timeout=3600, check=False)
    assert res.returncode == 0, f"e2e/image/build.sh failed:\n{res.stderr[-4000:]}"
    archive = Path(res.stdout.strip().splitlines()[-1])
    version = next(line.split('"')[1] for line in (TOP / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version = "))
    return archive, f"docker.io/library/vmupdate:{version}"


@pytest.fixture(scope="module")
def image_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Containerd, str]]:
    archive, image = build_image()
    netns = Netns.create("vmupdate-img")
    try:
        ctrd = Containerd.start(tmp_path_factory.mktemp("containerd"), netns)
        try:
            ctrd.import_image(archive)
            yield ctrd, image
        finally:
            ctrd.stop()
    finally:
        netns.delete()


def test_entry_points_answer_help(image_runtime: tuple[Containerd, str]) -> None:
    ctrd, image = image_runtime
    for entry in ("vmupdate-operator", "vmupdate-agent"):
        res = ctrd.run(image, [entry, "--help"])
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"usage: {entry}"), res.stdout
    # The registrar sidecar's entry point, as the chart runs it.
    res = ctrd.run(image, ["python", "-m", "vmupdate_agent.registration", "--help"])
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr


def test_runs_as_nobody_by_default(image_runtime: tuple[Containerd, str]) -> None:
    ctrd, image = image_runtime
    res = ctrd.run(image, ["id", "-u"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "65534"


NO_COMPILER = """
import glob, shutil, sys
found = [n for n in ("gcc", "cc", "c++", "g++", "clang", "tcc", "as", "ld") if shutil.which(n)]
found += glob.glob("/usr/bin/*-linux-gnu-gcc*") + glob.glob("/usr/lib/gcc/*/*/cc1")
print(found)
sys.exit(1 if found else 0)
"""


def test_final_stage_has_no_compiler(image_runtime: tuple[Containerd, str]) -> None:
    ctrd, image = image_runtime
    res = ctrd.run(image, ["python", "-c", NO_COMPILER])
    assert res.returncode == 0, f"compilers in the image: {res.stdout}{res.stderr}"


GUARD_CHECK = """
import json, os, struct, subprocess, tempfile
from vmupdate_agent import engine, guard
from vmupdate_agent.config import AgentConfig
path = os.environ["VMUPDATE_GUARD_BINARY"]
data = open(path, "rb").read()
assert data[:4] == b"\\x7fELF" and data[4] == 2, "not a 64-bit ELF"
phoff, = struct.unpack_from("<Q", data, 0x20)
phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
alone = subprocess.run([path, "--version"], capture_output=True, text=True, env={})
cfg = AgentConfig(socket_globs=["/run/vms/*/qmp.sock"], allowed_binary_dirs=["/opt/qemu/bin"],
                  runtime_dir=tempfile.mkdtemp())
installed = engine.install_guard(cfg.runtime_dir, cfg.guard_binary)
print(json.dumps({
    "interp": 3 in types, "alone_rc": alone.returncode, "alone": alone.stdout.strip(),
    "source": guard.source_digest(), "config_guard": cfg.guard_binary, "env_guard": path,
    "installed_version": guard.built_version(installed), "installed": installed,
    "runtime_dir": cfg.runtime_dir,
}))
"""


def test_guard_is_static_runs_and_the_agent_finds_it(
        image_runtime: tuple[Containerd, str]) -> None:
    ctrd, image = image_runtime
    res = ctrd.run(image, ["python", "-c", GUARD_CHECK])
    assert res.returncode == 0, res.stderr
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts["interp"] is False, "the guard has an ELF interpreter: not static"
    assert facts["alone_rc"] == 0, "the guard does not run"
    assert facts["alone"] == facts["source"], "the guard is not built from the packaged source"
    assert facts["config_guard"] == facts["env_guard"] == "/usr/lib/vmupdate/vmupdate-cpr-guard"
    assert facts["installed"] == f"{facts['runtime_dir']}/bin/vmupdate-cpr-guard"
    assert facts["installed_version"] == facts["source"]
