"""The agents' serving-certificate signer decides on real CSRs (vmupdate_operator.csr_signer),
and the agent's side builds, checks and writes what it gets (vmupdate_agent.certificate)."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from e2e.cluster.sandbox import CertificateAuthority
from vmupdate_agent import certificate
from vmupdate_agent.config import TlsConfig
from vmupdate_agent.tls import CertificateFiles
from vmupdate_api.signer import NODE_EXTRA, SIGNER_NAME
from vmupdate_operator import csr_signer
from vmupdate_operator.csr_signer import SigningCA, decide, issue

AGENT = "system:serviceaccount:vmupdate:vmupdate-agent"
NODE = "node-a"
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def pem_request(subject: list[x509.NameAttribute], sans: list[x509.GeneralName] | None,
                key: Any = EC_KEY, extra: x509.ExtensionType | None = None) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if extra is not None:
        b = b.add_extension(extra, critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def cn(name: str) -> list[x509.NameAttribute]:
    return [x509.NameAttribute(NameOID.COMMON_NAME, name)]


def spec(request: bytes | None = None, **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "signerName": SIGNER_NAME, "username": AGENT, "extra": {NODE_EXTRA: [NODE]},
        "usages": ["digital signature", "server auth"],
        "request": base64.b64encode(request or certificate.csr_pem(EC_KEY, NODE)).decode()}
    out.update(over)
    return out


def tampered() -> bytes:
    der = x509.load_pem_x509_csr(certificate.csr_pem(EC_KEY, NODE)).public_bytes(
        serialization.Encoding.DER).replace(NODE.encode(), b"node-x")
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


# name, spec builder, the reason's tell-tale words
DENIED: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("other-user", lambda: spec(username="system:serviceaccount:vmupdate:other"),
     "not the agent's ServiceAccount"),
    ("a-node-user", lambda: spec(username="system:node:node-a"), "not the agent's"),
    ("token-without-node", lambda: spec(extra={}), "names no node"),
    ("token-two-nodes", lambda: spec(extra={NODE_EXTRA: [NODE, "node-b"]}), "names no node"),
    ("client-auth", lambda: spec(usages=["digital signature", "client auth"]),
     "not serving usages"),
    ("server-and-client-auth", lambda: spec(usages=["server auth", "client auth"]),
     "not serving usages"),
    ("no-usages", lambda: spec(usages=[]), "not serving usages"),
    ("not-base64", lambda: {**spec(), "request": "%%%"}, "not a PEM certificate request"),
    ("not-a-csr", lambda: spec(b"-----BEGIN NONSENSE-----\n"), "not a PEM certificate request"),
    ("bad-signature", lambda: spec(tampered()), "signature does not match"),
    ("other-node-cn", lambda: spec(pem_request(cn("node-b"), [x509.DNSName("node-b")])),
     "may ask only for node-a"),
    ("other-node-san", lambda: spec(pem_request(cn(NODE), [x509.DNSName("node-b")])),
     "may ask only for node-a"),
    ("two-dns-names", lambda: spec(pem_request(cn(NODE), [x509.DNSName(NODE),
                                                          x509.DNSName("node-b")])),
     "may ask only for node-a"),
    ("no-san", lambda: spec(pem_request(cn(NODE), None)), "may ask only for node-a"),
    ("ip-san", lambda: spec(pem_request(cn(NODE), [x509.DNSName(NODE), x509.IPAddress(
        __import__("ipaddress").ip_address("10.0.0.1"))])), "SANs other than"),
    ("uri-san", lambda: spec(pem_request(cn(NODE), [x509.DNSName(NODE),
                                                    x509.UniformResourceIdentifier("spiffe://x")])),
     "SANs other than"),
    ("organization", lambda: spec(pem_request(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"), *cn(NODE)],
        [x509.DNSName(NODE)])), "exactly CN=<node>"),
    ("ca-extension", lambda: spec(pem_request(cn(NODE), [x509.DNSName(NODE)], extra=
                                              x509.BasicConstraints(ca=True, path_length=None))),
     "extensions the signer does not grant"),
    ("p521-key", lambda: spec(pem_request(cn(NODE), [x509.DNSName(NODE)],
                                          ec.generate_private_key(ec.SECP521R1()))),
     "curve secp521r1"),
    ("rsa-1024", lambda: spec(pem_request(cn(NODE), [x509.DNSName(NODE)],
                                          rsa.generate_private_key(65537, 1024))),
     "1024 bits"),
]


@pytest.mark.parametrize(("name", "make", "why"), DENIED, ids=[c[0] for c in DENIED])
def test_denied_with_the_reason(name: str, make: Callable[[], dict[str, Any]],
                                why: str) -> None:
    d = decide(make(), AGENT)
    assert d is not None and not d.approve, name
    assert why in d.reason, d.reason


def test_other_signers_are_not_looked_at() -> None:
    assert decide(spec(signerName="kubernetes.io/kube-apiserver-client"), AGENT) is None
    assert decide(spec(signerName=None), AGENT) is None


def test_the_agents_own_node_is_approved() -> None:
    d = decide(spec(), AGENT)
    assert d is not None and d.approve and d.node == NODE
    rsa_ok = spec(pem_request(cn(NODE), [x509.DNSName(NODE)],
                              rsa.generate_private_key(65537, 2048)))
    assert (decide(rsa_ok, AGENT) or csr_signer.Decision(False, "")).approve


def _ca() -> tuple[CertificateAuthority, SigningCA]:
    ca = CertificateAuthority.create("test-agent-ca")
    key = ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    return ca, SigningCA.from_pem(ca.cert_pem, key)


def test_issued_certificate_names_the_node_and_serves_only() -> None:
    ca, signing = _ca()
    now = dt.datetime.now(dt.UTC)
    pem = issue(signing, spec(expirationSeconds=3600), NODE, now)
    cert = x509.load_pem_x509_certificate(pem)
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.rfc4514_string() == f"CN={NODE}"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.DNSName(NODE)]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - now <= dt.timedelta(seconds=3601)
    certificate.certificate_for(pem, EC_KEY, NODE)
    # The lifetime asked for is clamped into [10 min, max].
    long = x509.load_pem_x509_certificate(issue(signing, spec(expirationSeconds=10**9),
                                                NODE, now, max_ttl_s=7200))
    assert long.not_valid_after_utc - now <= dt.timedelta(seconds=7201)
    short = x509.load_pem_x509_certificate(issue(signing, spec(expirationSeconds=1), NODE, now))
    assert short.not_valid_after_utc - now >= dt.timedelta(seconds=599)


def test_agent_refuses_a_certificate_for_another_key_or_node() -> None:
    _, signing = _ca()
    now = dt.datetime.now(dt.UTC)
    pem = issue(signing, spec(), NODE, now)
    with pytest.raises(certificate.CertificateError, match="not for the key"):
        certificate.certificate_for(pem, ec.generate_private_key(ec.SECP256R1()), NODE)
    with pytest.raises(certificate.CertificateError, match="not node node-b"):
        certificate.certificate_for(pem, EC_KEY, "node-b")
    with pytest.raises(certificate.CertificateError, match="not PEM"):
        certificate.certificate_for(b"junk", EC_KEY, NODE)


def test_outcome_of_a_csr_object() -> None:
    meta = {"metadata": {"name": "x"}}
    assert certificate.outcome({**meta}) is None
    assert certificate.outcome({**meta, "status": {"conditions": [
        {"type": "Approved", "status": "True"}]}}) is None
    assert certificate.outcome({**meta, "status": {"certificate": base64.b64encode(
        b"PEM").decode()}}) == b"PEM"
    with pytest.raises(certificate.CertificateError, match="denied: may ask only"):
        certificate.outcome({**meta, "status": {"conditions": [
            {"type": "Denied", "status": "True", "message": "may ask only for node-a"}]}})
    with pytest.raises(certificate.CertificateError, match="failed"):
        certificate.outcome({**meta, "status": {"conditions": [
            {"type": "Failed", "status": "True", "reason": "SignerError"}]}})


def test_renewal_is_two_thirds_into_the_lifetime() -> None:
    _, signing = _ca()
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    pem = issue(signing, spec(expirationSeconds=3 * 3600), NODE, now)
    cert = x509.load_pem_x509_certificate(pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert certificate.renew_at(pem) == start + (end - start) * 2 / 3


def test_written_pair_is_loaded_and_reloaded_by_the_agents_tls(tmp_path: Path) -> None:
    ca, signing = _ca()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    tls = TlsConfig(cert_file=str(tmp_path / "tls.crt"), key_file=str(tmp_path / "tls.key"),
                    client_ca_file=str(tmp_path / "ca.crt"))
    key = certificate.make_key()
    certificate.write_pair(tmp_path, issue(signing, spec(certificate.csr_pem(key, NODE)), NODE,
                                           dt.datetime.now(dt.UTC)), key)
    assert (tmp_path / "tls.key").stat().st_mode & 0o077 == 0
    files = CertificateFiles(tls)
    files.read()
    assert files.fetch() is None  # unchanged
    key2 = certificate.make_key()
    certificate.write_pair(tmp_path, issue(signing, spec(certificate.csr_pem(key2, NODE)),
                                           NODE, dt.datetime.now(dt.UTC)), key2)
    assert files.fetch() is not None and files.reloads == 1
