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



def _ca_with_key_id(kind: str) -> SigningCA:
    """A CA whose subject key identifier is computed the ``kind`` way from its key: the
    first 20 bytes of its SHA-256 (Go 1.25+, so Helm's genCA), its SHA-1 (RFC 5280), or
    no such extension ("none")."""
    import hashlib

    key = ec.generate_private_key(ec.SECP256R1())
    raw = key.public_key().public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.UncompressedPoint)
    now = dt.datetime.now(dt.UTC)
    name = x509.Name(cn("key-id-ca"))
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, key_cert_sign=True, crl_sign=True,
                   key_encipherment=False, content_commitment=False, data_encipherment=False,
                   key_agreement=False, encipher_only=False, decipher_only=False),
                   critical=True))
    key_id = {"sha256-truncated": hashlib.sha256(raw).digest()[:20],
              "sha1": hashlib.sha1(raw).digest(),  # an identifier (RFC 5280), not a hash check
              "none": None}[kind]
    if key_id is not None:
        builder = builder.add_extension(x509.SubjectKeyIdentifier(key_id), critical=False)
    return SigningCA(builder.sign(key, hashes.SHA256()), key)


def _openssl_handshake(ca: SigningCA, cert_pem: bytes, key: Any, tmp_path: Path) -> None:
    """A TLS handshake (OpenSSL, in memory) of a client trusting only ``ca`` with a server
    presenting ``cert_pem`` for NODE: raises ssl.SSLCertVerificationError without a chain."""
    import ssl

    (tmp_path / "leaf.crt").write_bytes(cert_pem)
    (tmp_path / "leaf.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "leaf.crt", tmp_path / "leaf.key")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cadata=ca.cert.public_bytes(
        serialization.Encoding.PEM).decode())
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=NODE)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for who, end in (("client", client), ("server", server)):
            if not done[who]:
                try:
                    end.do_handshake()
                    done[who] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError(f"handshake did not finish: {done}")


@pytest.mark.parametrize("kind", ["sha256-truncated", "sha1", "none"])
def test_issued_certificate_chains_to_the_ca_in_openssl(kind: str, tmp_path: Path) -> None:
    """The leaf's authority key identifier is the CA's own subject key identifier, however
    the CA's maker computed it: a leaf naming the key's SHA-1 under Helm's genCA CA (whose
    identifier is a truncated SHA-256) finds no issuer in OpenSSL, and the registrar and
    the operator refused every agent certificate of a plain `helm install`."""
    import ssl

    ca = _ca_with_key_id(kind)
    pem = issue(ca, spec(expirationSeconds=3600), NODE, dt.datetime.now(dt.UTC))
    aki = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier).value.key_identifier
    if kind != "none":
        assert aki == ca.cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value.digest
    _openssl_handshake(ca, pem, EC_KEY, tmp_path)
    if kind == "sha256-truncated":
        # The old rule (SHA-1 of the key) under this CA: OpenSSL builds no chain.
        leaf = x509.load_pem_x509_certificate(pem)
        old = (x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(leaf.issuer)
               .public_key(EC_KEY.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(leaf.not_valid_before_utc)
               .not_valid_after(leaf.not_valid_after_utc)
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(NODE)]),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False)
               .sign(ca.key, hashes.SHA256()))
        with pytest.raises(ssl.SSLCertVerificationError, match="local issuer"):
            _openssl_handshake(ca, old.public_bytes(serialization.Encoding.PEM), EC_KEY,
                               tmp_path)
