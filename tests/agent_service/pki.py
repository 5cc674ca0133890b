"""Real certificates for the tests: a CA, the agent's serving certificate, client certificates."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from e2e.cluster.sandbox import CertificateAuthority


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    name: str
    ca: CertificateAuthority
    path: Path


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` in one rename, as a Secret volume or cert-manager does."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def make_ca(directory: Path, name: str) -> Authority:
    ca = CertificateAuthority.create(name)
    path = directory / f"{name}.crt"
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, ca.cert_pem)
    return Authority(name, ca, path)


def issue(ca: Authority, directory: Path, stem: str, cn: str, *,
          dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), uris: tuple[str, ...] = ()
          ) -> Issued:
    """A certificate (a serving one when it names hosts) and its key, written under
    ``directory`` as <stem>.crt and <stem>.key."""
    cert, key = ca.ca.issue(cn, server_names=dns, server_ips=ips, uris=uris, days=1)
    directory.mkdir(parents=True, exist_ok=True)
    issued = Issued(directory / f"{stem}.crt", directory / f"{stem}.key")
    # Key first: for a moment the pair does not match, which the agent must ride out.
    _write_atomic(issued.key, key)
    _write_atomic(issued.cert, cert)
    return issued


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Issued
    operator: Issued  # allowed: CN vmupdate-operator
    spiffe: Issued  # allowed by its URI SAN only
    intruder: Issued  # same CA, identity not in the allowlist
    stranger_ca: Authority  # another CA
    stranger: Issued  # CN vmupdate-operator, but signed by the other CA

    ALLOWLIST = ("vmupdate-operator", "spiffe://cluster.local/ns/vmupdate/sa/operator")


def make_pki(directory: Path) -> Pki:
    ca = make_ca(directory, "test-ca")
    stranger_ca = make_ca(directory, "stranger-ca")
    return Pki(
        ca=ca,
        server=issue(ca, directory, "agent", "vmupdate-agent", dns=("localhost",),
                     ips=("127.0.0.1",)),
        operator=issue(ca, directory, "operator", "vmupdate-operator"),
        spiffe=issue(ca, directory, "spiffe", "some-workload",
                     uris=("spiffe://cluster.local/ns/vmupdate/sa/operator",)),
        intruder=issue(ca, directory, "intruder", "intruder", dns=("intruder.example",)),
        stranger_ca=stranger_ca,
        stranger=issue(stranger_ca, directory, "stranger", "vmupdate-operator"),
    )
