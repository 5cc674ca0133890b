"""Certificates for the e2e fleet: one CA, a serving certificate per agent, client identities
for the operator and the VMHost registrars (both in the agents' allowlist)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from e2e.cluster.sandbox import CertificateAuthority

OPERATOR_IDENTITY = "vmupdate-operator"
REGISTRAR_IDENTITY = "vmupdate-registrar"
ALLOWLIST = (OPERATOR_IDENTITY, REGISTRAR_IDENTITY)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class FleetPki:
    directory: Path
    ca_cert: Path
    operator: Pair
    registrar: Pair
    _ca: CertificateAuthority

    def agent(self, node: str) -> Pair:
        """The serving certificate of the agent on ``node`` (valid for 127.0.0.1 and the
        node name), written once."""
        pair = Pair(self.directory / f"agent-{node}.crt", self.directory / f"agent-{node}.key")
        if not pair.cert.exists():
            cert, key = self._ca.issue(f"vmupdate-agent-{node}", server_names=[node, "localhost"],
                                       server_ips=["127.0.0.1"])
            _write(pair, cert, key)
        return pair


def _write(pair: Pair, cert: bytes, key: bytes) -> None:
    pair.key.write_bytes(key)
    pair.key.chmod(0o600)
    pair.cert.write_bytes(cert)


def make_fleet_pki(directory: Path) -> FleetPki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create("vmupdate-e2e-fleet-ca")
    ca_cert = directory / "ca.crt"
    ca_cert.write_bytes(ca.cert_pem)
    identities = {}
    for name in ALLOWLIST:
        pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
        _write(pair, *ca.issue(name))
        identities[name] = pair
    return FleetPki(directory, ca_cert, identities[OPERATOR_IDENTITY],
                    identities[REGISTRAR_IDENTITY], ca)
