"""Real certificates for the tests: a CA, the agent's serving certificate, client certificates."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    name: str
    cert: x509.Certificate
    key: Key
    path: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` in one rename, as a Secret volume or cert-manager does."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def make_ca(directory: Path, name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.crt"
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM))
    return Authority(name, cert, key, path)


def issue(ca: Authority, directory: Path, stem: str, cn: str, *,
          dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), uris: tuple[str, ...] = (),
          server: bool = False) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    issued = Issued(directory / f"{stem}.crt", directory / f"{stem}.key")
    # Key first: for a moment the pair does not match, which the agent must ride out.
    _write_atomic(issued.key, key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    _write_atomic(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
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
                     ips=("127.0.0.1",), server=True),
        operator=issue(ca, directory, "operator", "vmupdate-operator"),
        spiffe=issue(ca, directory, "spiffe", "some-workload",
                     uris=("spiffe://cluster.local/ns/vmupdate/sa/operator",)),
        intruder=issue(ca, directory, "intruder", "intruder", dns=("intruder.example",)),
        stranger_ca=stranger_ca,
        stranger=issue(stranger_ca, directory, "stranger", "vmupdate-operator"),
    )
