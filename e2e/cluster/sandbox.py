"""A real, local Kubernetes control plane for tests: etcd + kube-apiserver (+ controller-manager).

The binaries come from ``e2e/cluster/build.sh`` (built from the Go module proxy and cached
outside the checkout). :meth:`Sandbox.start` generates a private CA and certificates, starts
the processes on free loopback ports with their data and logs in a work directory, waits until
the API server is ready and writes an admin kubeconfig there. :meth:`Sandbox.from_kubeconfig`
wraps an existing cluster (a kind cluster, a real one) behind the same interface instead.

Every process is stopped by pid in :meth:`Sandbox.stop` (SIGTERM, then SIGKILL), which is
idempotent and registered with :mod:`atexit`; the children also get a parent-death signal, so a
killed test run does not leave them behind.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = "e2e/cluster/build.sh"
SERVICE_CIDR = "10.96.0.0/24"
STATE_FILE = "sandbox.json"
ADMIN_USER = "vmupdate-admin"


class SandboxError(RuntimeError):
    """The sandbox could not be started, reached or used."""


class BinariesMissing(SandboxError):
    """The control-plane binaries are not built: run e2e/cluster/build.sh."""


class PortTaken(SandboxError):
    """A free port picked for a server was taken before the server bound it."""


# --------------------------------------------------------------------------- binaries


def versions() -> dict[str, str]:
    """The pinned versions from ``versions.env`` (K8S_VERSION, ETCD_VERSION, HELM_VERSION)."""
    out: dict[str, str] = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    out["K8S_VERSION"] = os.environ.get("VMUPDATE_K8S_VERSION", out["K8S_VERSION"])
    return out


def default_bin_dir() -> Path:
    """Where build.sh puts the binaries: ``$VMUPDATE_K8S_BIN`` or the versioned cache dir."""
    if env := os.environ.get("VMUPDATE_K8S_BIN"):
        return Path(env)
    cache = Path(os.environ.get("VMUPDATE_CACHE", "/var/cache/vmupdate"))
    return cache / "k8s" / versions()["K8S_VERSION"] / "bin"


def find_binary(name: str, bin_dir: Path | None = None, *, allow_path: bool = False) -> Path:
    """The path of a sandbox binary, or :class:`BinariesMissing` naming build.sh."""
    bin_dir = bin_dir or default_bin_dir()
    candidate = bin_dir / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    if allow_path and (found := shutil.which(name)):
        return Path(found)
    raise BinariesMissing(
        f"{name} not found in {bin_dir}: the Kubernetes sandbox binaries are not built. "
        f"Run `bash {BUILD_SCRIPT}` (builds kube-apiserver, kube-controller-manager, kubectl, "
        "etcd and helm from the Go module proxy into $VMUPDATE_CACHE, ~15-20 min cold, "
        "seconds when cached), or point VMUPDATE_K8S_BIN at a directory holding them."
    )


# --------------------------------------------------------------------------- PKI


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class CertificateAuthority:
    """A throwaway CA that signs the serving certificate and client identities."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, common_name: str = "vmupdate-sandbox-ca") -> CertificateAuthority:
        key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, cert_file: Path, key_file: Path) -> CertificateAuthority:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(key, x509.load_pem_x509_certificate(cert_file.read_bytes()))

    def issue(
        self,
        common_name: str,
        organizations: Sequence[str] = (),
        *,
        server_names: Sequence[str] = (),
        server_ips: Sequence[str] = (),
        uris: Sequence[str] = (),
        days: int = 30,
    ) -> tuple[bytes, bytes]:
        """A (cert PEM, key PEM) pair: a client cert, or a serving cert if names are given.
        ``uris``: URI SANs (a workload identity such as SPIFFE), on either kind."""
        key = _key()
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        serving = bool(server_names or server_ips)
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                    if serving
                    else [ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _cert_pem(cert), _key_pem(key)

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def make_kubeconfig(
    server: str,
    ca_pem: bytes,
    user: str,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    token: str | None = None,
    cluster: str = "vmupdate-sandbox",
) -> str:
    """A self-contained kubeconfig (certificates inline) for one identity."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    auth: dict[str, str] = {}
    if cert_pem is not None and key_pem is not None:
        auth["client-certificate-data"] = b64(cert_pem)
        auth["client-key-data"] = b64(key_pem)
    if token is not None:
        auth["token"] = token
    context = f"{user}@{cluster}"
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}
                if ca_pem
                else {"server": server, "insecure-skip-tls-verify": True},
            }
        ],
        "users": [{"name": user, "user": auth}],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": user}}],
        "current-context": context,
        "preferences": {},
    }
    return yaml.safe_dump(doc, sort_keys=False)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _pid_runs(pid: int, exe: str) -> bool:
    """Whether pid is alive and still the process we started (pids get reused)."""
    if not _pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(os.fsencode(exe) == arg for arg in cmdline[:4])


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    pid: int = 0
    #: variables set (or replaced) in the inherited environment, e.g. another KUBECONFIG
    env: dict[str, str] | None = None

    def start(self, *, die_with_parent: bool) -> None:
        argv = self.argv
        setpriv = shutil.which("setpriv")
        if die_with_parent and setpriv:
            # setpriv execs the command in place: the pid stays the command's own.
            argv = [setpriv, "--pdeathsig", "SIGKILL", "--", *argv]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=None if self.env is None else {**os.environ, **self.env},
            )
        self.pid = self.popen.pid

    def exited(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        return None if _pid_runs(self.pid, self.argv[0]) else 0

    def stop(self, timeout: float) -> None:
        if not self.pid:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            if self.exited() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.exited() is None:
                time.sleep(0.05)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5)  # reap
        if self.exited() is None:
            raise SandboxError(f"{self.name} (pid {self.pid}) did not exit")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --------------------------------------------------------------------------- the sandbox


@dataclass
class Sandbox:
    """A Kubernetes API to test against: started here (``start``) or an existing one."""

    kubeconfig: Path
    server: str
    workdir: Path
    bin_dir: Path = field(default_factory=default_bin_dir)
    external: bool = False
    processes: list[ManagedProcess] = field(default_factory=list)
    ca: CertificateAuthority | None = None
    ca_pem: bytes = b""
    startup_seconds: float = 0.0
    #: seconds from the start until each phase was ready (etcd, kube-apiserver, ...)
    timings: dict[str, float] = field(default_factory=dict)
    _stopped: bool = False
    _t0: float = 0.0

    # ------------------------------------------------------------------ constructors

    @classmethod
    def start(
        cls,
        workdir: str | os.PathLike[str],
        *,
        controller_manager: bool = True,
        bin_dir: str | os.PathLike[str] | None = None,
        timeout: float = 90.0,
        die_with_parent: bool = True,
        extra_apiserver_args: Sequence[str] = (),
    ) -> Sandbox:
        """Start etcd and kube-apiserver (and kube-controller-manager) under ``workdir``.

        Returns once ``/readyz`` answers ok and, with the controller manager, the ``default``
        ServiceAccount exists. ``die_with_parent=False`` keeps the processes alive after this
        Python process exits (the CLI's ``up``); stop them with ``down``/:meth:`attach`.
        A port taken between picking and binding it (another process won the race) is retried
        with new ports.
        """
        for attempt in range(3):
            try:
                return cls._start_once(
                    workdir,
                    controller_manager=controller_manager,
                    bin_dir=bin_dir,
                    timeout=timeout,
                    die_with_parent=die_with_parent,
                    extra_apiserver_args=extra_apiserver_args,
                )
            except PortTaken:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _start_once(
        cls,
        workdir: str | os.PathLike[str],
        *,
        controller_manager: bool,
        bin_dir: str | os.PathLike[str] | None,
        timeout: float,
        die_with_parent: bool,
        extra_apiserver_args: Sequence[str],
    ) -> Sandbox:
        workdir = Path(workdir).resolve()
        bdir = Path(bin_dir) if bin_dir else default_bin_dir()
        needed = ["etcd", "kube-apiserver", "kubectl"]
        if controller_manager:
            needed.append("kube-controller-manager")
        exe = {name: str(find_binary(name, bdir)) for name in needed}

        workdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(workdir / "etcd", ignore_errors=True)  # a fresh cluster every time
        pki, logs = workdir / "pki", workdir / "logs"
        ca = CertificateAuthority.create()
        _write(pki / "ca.crt", ca.cert_pem, 0o644)
        _write(pki / "ca.key", _key_pem(ca.key))
        serving_cert, serving_key = ca.issue(
            "kube-apiserver",
            server_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            server_ips=["127.0.0.1", str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))],
        )
        _write(pki / "apiserver.crt", serving_cert, 0o644)
        _write(pki / "apiserver.key", serving_key)
        sa_key = _key()
        _write(pki / "sa.key", _key_pem(sa_key))
        _write(
            pki / "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            0o644,
        )
        admin_cert, admin_key = ca.issue(ADMIN_USER, ["system:masters"])
        _write(pki / "admin.crt", admin_cert, 0o644)
        _write(pki / "admin.key", admin_key)

        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
        server = f"https://127.0.0.1:{api_port}"
        kubeconfig = workdir / "kubeconfig"
        _write(
            kubeconfig,
            make_kubeconfig(server, ca.cert_pem, ADMIN_USER, admin_cert, admin_key).encode(),
        )

        sb = cls(
            kubeconfig=kubeconfig,
            server=server,
            workdir=workdir,
            bin_dir=bdir,
            ca=ca,
            ca_pem=ca.cert_pem,
        )
        if die_with_parent:
            atexit.register(sb.stop)
        t0 = sb._t0 = time.monotonic()
        try:
            etcd = ManagedProcess(
                "etcd",
                [
                    exe["etcd"],
                    "--name=sandbox",
                    f"--data-dir={workdir / 'etcd'}",
                    f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                    f"--initial-cluster=sandbox=http://127.0.0.1:{etcd_peer}",
                    "--unsafe-no-fsync",
                    "--quota-backend-bytes=4294967296",
                    "--log-level=warn",
                ],
                logs / "etcd.log",
            )
            sb._launch(etcd, die_with_parent)
            sb._wait(
                "etcd /health",
                lambda: _http_ok(f"http://127.0.0.1:{etcd_port}/health"),
                t0 + timeout,
                etcd,
            )
            apiserver = ManagedProcess(
                "kube-apiserver",
                [
                    exe["kube-apiserver"],
                    f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={api_port}",
                    f"--cert-dir={workdir / 'apiserver-certs'}",
                    f"--tls-cert-file={pki / 'apiserver.crt'}",
                    f"--tls-private-key-file={pki / 'apiserver.key'}",
                    f"--client-ca-file={pki / 'ca.crt'}",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-account-key-file={pki / 'sa.pub'}",
                    f"--service-account-signing-key-file={pki / 'sa.key'}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--authorization-mode=Node,RBAC",
                    "--allow-privileged=true",
                    # Without a controller manager nobody creates the `default` ServiceAccount
                    # that this admission plugin insists on for every Pod.
                    *(
                        ()
                        if controller_manager
                        else ("--disable-admission-plugins=ServiceAccount",)
                    ),
                    "--endpoint-reconciler-type=none",
                    "--v=1",
                    *extra_apiserver_args,
                ],
                logs / "kube-apiserver.log",
            )
            sb._launch(apiserver, die_with_parent)
            sb._wait(
                "kube-apiserver /readyz",
                lambda: sb._get("/readyz")[0] == 200,
                t0 + timeout,
                apiserver,
            )
            sb._wait(
                "namespace default",
                lambda: sb._get("/api/v1/namespaces/default")[0] == 200,
                t0 + timeout,
                apiserver,
            )
            if controller_manager:
                kcm_cert, kcm_key = ca.issue("system:kube-controller-manager")
                kcm_kubeconfig = _write(
                    workdir / "kube-controller-manager.kubeconfig",
                    make_kubeconfig(
                        server, ca.cert_pem, "system:kube-controller-manager", kcm_cert, kcm_key
                    ).encode(),
                )
                kcm = ManagedProcess(
                    "kube-controller-manager",
                    [
                        exe["kube-controller-manager"],
                        f"--kubeconfig={kcm_kubeconfig}",
                        # No serving endpoint (nothing scrapes it): no authn/authz set-up.
                        "--secure-port=0",
                        # Controllers start faster when their clients are not throttled.
                        "--kube-api-qps=200",
                        "--kube-api-burst=400",
                        "--leader-elect=false",
                        "--use-service-account-credentials=true",
                        f"--service-account-private-key-file={pki / 'sa.key'}",
                        f"--root-ca-file={pki / 'ca.crt'}",
                        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                        f"--cluster-signing-key-file={pki / 'ca.key'}",
                        f"--service-cluster-ip-range={SERVICE_CIDR}",
                        "--v=1",
                    ],
                    logs / "kube-controller-manager.log",
                )
                sb._launch(kcm, die_with_parent)
                sb._wait(
                    "ServiceAccount default/default (from the controller manager)",
                    lambda: sb._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
                    t0 + timeout,
                    kcm,
                )
        except BaseException:
            sb.stop()
            raise
        sb.startup_seconds = time.monotonic() - t0
        sb._save_state()
        return sb

    @classmethod
    def from_kubeconfig(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        workdir: str | os.PathLike[str] | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
    ) -> Sandbox:
        """Use an existing cluster: ``path`` or ``$KUBECONFIG`` (first entry) or ~/.kube/config.

        Nothing is started or stopped. kubectl is the built one if present, else from PATH.
        """
        if path is None:
            env = os.environ.get("KUBECONFIG", "")
            first = env.split(os.pathsep)[0] if env else ""
            path = first or Path.home() / ".kube" / "config"
        kubeconfig = Path(path).expanduser().resolve()
        if not kubeconfig.is_file():
            raise SandboxError(f"kubeconfig {kubeconfig} does not exist")
        doc = yaml.safe_load(kubeconfig.read_text()) or {}
        try:
            ctx_name = doc["current-context"]
            ctx = next(c["context"] for c in doc["contexts"] if c["name"] == ctx_name)
            cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == ctx["cluster"])
        except (KeyError, StopIteration, TypeError) as e:
            raise SandboxError(f"{kubeconfig}: no usable current-context ({e!r})") from e
        ca_pem = b""
        if data := cluster.get("certificate-authority-data"):
            ca_pem = base64.b64decode(data)
        elif file := cluster.get("certificate-authority"):
            ca_pem = (kubeconfig.parent / file).read_bytes()
        wd = Path(workdir) if workdir else kubeconfig.parent
        return cls(
            kubeconfig=kubeconfig,
            server=cluster["server"],
            workdir=wd,
            bin_dir=Path(bin_dir) if bin_dir else default_bin_dir(),
            external=True,
            ca_pem=ca_pem,
        )

    @classmethod
    def from_env(cls, workdir: str | os.PathLike[str], **start_kwargs: Any) -> Sandbox:
        """``$KUBECONFIG`` set: use that cluster; otherwise start a sandbox in ``workdir``."""
        if os.environ.get("KUBECONFIG"):
            return cls.from_kubeconfig(workdir=workdir)
        return cls.start(workdir, **start_kwargs)

    @classmethod
    def attach(cls, workdir: str | os.PathLike[str]) -> Sandbox:
        """The sandbox that ``python -m e2e.cluster up`` left running in ``workdir``."""
        workdir = Path(workdir).resolve()
        try:
            state = json.loads((workdir / STATE_FILE).read_text())
        except FileNotFoundError as e:
            raise SandboxError(f"no sandbox state in {workdir}") from e
        pki = workdir / "pki"
        ca = CertificateAuthority.load(pki / "ca.crt", pki / "ca.key")
        procs = [
            ManagedProcess(p["name"], p["argv"], Path(p["log"]), pid=p["pid"])
            for p in state["processes"]
        ]
        return cls(
            kubeconfig=Path(state["kubeconfig"]),
            server=state["server"],
            workdir=workdir,
            bin_dir=Path(state["bin_dir"]),
            processes=procs,
            ca=ca,
            ca_pem=ca.cert_pem,
        )

    # ------------------------------------------------------------------ use

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid]

    @property
    def kubectl_path(self) -> Path:
        return find_binary("kubectl", self.bin_dir, allow_path=self.external)

    @property
    def helm_path(self) -> Path:
        return find_binary("helm", self.bin_dir, allow_path=self.external)

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 60.0,
        check: bool = False,
        kubeconfig: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster (as admin, or as ``kubeconfig``'s identity)."""
        argv = [
            str(self.kubectl_path),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            f"--cache-dir={self.workdir / '.kube-cache'}",
            *args,
        ]
        try:
            res = subprocess.run(
                argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise SandboxError(f"kubectl {' '.join(args)} timed out after {timeout} s") from e
        if check and res.returncode != 0:
            raise SandboxError(
                f"kubectl {' '.join(args)} failed ({res.returncode}):\n{res.stderr}{res.stdout}"
            )
        return res

    def client_kubeconfig(
        self,
        user: str,
        groups: Iterable[str] = (),
        path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 60.0,
    ) -> Path:
        """Mint a client certificate for ``user`` in ``groups``; write a kubeconfig for it.

        A sandbox started here signs it with its own CA. On an external cluster the
        certificate goes through the CertificateSigningRequest API (signer
        ``kubernetes.io/kube-apiserver-client``), approved with the admin credentials: that
        needs the cluster's controller manager to sign (kind and kubeadm clusters do).
        """
        groups = list(groups)
        if self.ca is not None:
            cert, key = self.ca.issue(user, groups)
        else:
            cert, key = self._mint_via_csr(user, groups, timeout)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in user)
        target = Path(path) if path else self.workdir / "users" / f"{safe}.kubeconfig"
        return _write(target, make_kubeconfig(self.server, self.ca_pem, user, cert, key).encode())

    def _mint_via_csr(self, user: str, groups: list[str], timeout: float) -> tuple[bytes, bytes]:
        key = _key()
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, user))
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name(subject))
            .sign(key, hashes.SHA256())
        )
        name = f"vmupdate-test-{user.lower()[:40]}-{os.urandom(4).hex()}"
        name = "".join(c if c.isalnum() or c in "-." else "-" for c in name)
        manifest = {
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest",
            "metadata": {"name": name},
            "spec": {
                "request": base64.b64encode(csr.public_bytes(serialization.Encoding.PEM)).decode(),
                "signerName": "kubernetes.io/kube-apiserver-client",
                "expirationSeconds": 86400,
                "usages": ["digital signature", "client auth"],
            },
        }
        self.kubectl("create", "-f", "-", input=json.dumps(manifest), check=True)
        try:
            self.kubectl("certificate", "approve", name, check=True)
            deadline = time.monotonic() + timeout
            while True:
                res = self.kubectl(
                    "get", "csr", name, "-o", "jsonpath={.status.certificate}", check=True
                )
                if res.stdout.strip():
                    return base64.b64decode(res.stdout.strip()), _key_pem(key)
                if time.monotonic() > deadline:
                    raise SandboxError(
                        f"CertificateSigningRequest {name} was not signed within {timeout} s "
                        "(does the cluster run a controller manager with a signer?)"
                    )
                time.sleep(0.2)
        finally:
            self.kubectl("delete", "csr", name, "--ignore-not-found", "--wait=false")

    def api_client(self, kubeconfig: str | os.PathLike[str] | None = None) -> Any:
        """A ``kubernetes.client.ApiClient`` for this cluster (admin, or ``kubeconfig``)."""
        from kubernetes import config  # imported lazily: not every user needs it

        path = str(kubeconfig or self.kubeconfig)
        return config.new_client_from_config(config_file=path)  # type: ignore[no-untyped-call]

    def env(self) -> dict[str, str]:
        """Environment variables that point kubectl/helm/kopf at this cluster."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    # ------------------------------------------------------------------ stop

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every process started here, newest first; idempotent. No-op if external."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        errors = []
        for proc in reversed(self.processes):
            try:
                proc.stop(timeout)
            except SandboxError as e:
                errors.append(str(e))
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / STATE_FILE).unlink()
        if errors:
            raise SandboxError("; ".join(errors))

    def detach(self) -> None:
        """Leave the processes running past this Python process (see :meth:`attach`)."""
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        self._stopped = True

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _launch(self, proc: ManagedProcess, die_with_parent: bool) -> None:
        self.processes.append(proc)
        proc.start(die_with_parent=die_with_parent)

    def _wait(self, what: str, ready: Any, deadline: float, proc: ManagedProcess) -> None:
        while True:
            if (rc := proc.exited()) is not None:
                if "address already in use" in proc.tail():
                    raise PortTaken(f"{proc.name}: a port was taken; log {proc.log}")
                raise SandboxError(
                    f"{proc.name} exited with {rc} while waiting for {what}; "
                    f"log {proc.log}:\n{proc.tail()}"
                )
            with contextlib.suppress(OSError):
                if ready():
                    self.timings[what] = round(time.monotonic() - self._t0, 3)
                    return
            if time.monotonic() > deadline:
                raise SandboxError(f"timed out waiting for {what}; log {proc.log}:\n{proc.tail()}")
            time.sleep(0.1)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode())
        pki = self.workdir / "pki"
        ctx.load_cert_chain(pki / "admin.crt", pki / "admin.key")
        return ctx

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                self.server + path, context=self._ssl_context(), timeout=5
            ) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _save_state(self) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "bin_dir": str(self.bin_dir),
            "processes": [
                {"name": p.name, "argv": p.argv, "log": str(p.log), "pid": p.pid}
                for p in self.processes
            ],
        }
        _write(self.workdir / STATE_FILE, json.dumps(state, indent=2).encode(), 0o644)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError:
        return False
