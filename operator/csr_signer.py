"""The signer of the agents' serving certificates (signerName ``vmupdate.dev/agent-serving``).

Each node's agent makes its key on the node and asks, through a CertificateSigningRequest
created with its pod-bound ServiceAccount token, for a certificate naming its node. The
API server records who asked (``spec.username``) and, for a token bound to a pod, the node
that pod runs on (``spec.extra["authentication.kubernetes.io/node-name"]``); neither can be
forged by the requester. This module approves and signs a request only when:

* its signer is ours (others are not looked at);
* the requester is the agent's ServiceAccount;
* the token names exactly one node, and the request asks for exactly that node: subject
  ``CN=<node>`` and nothing else, one DNS SAN ``<node>`` and no other SAN;
* it asks for serving use only (``server auth``, ``digital signature``, ``key encipherment``);
* its key is EC P-256/P-384 or RSA of at least 2048 bits, and it is signed by that key.

Anything else is denied with the reason. ``decide`` and ``issue`` are pure; ``review`` is the
thin I/O edge (approve or deny, then sign) the operator's CSR handler calls.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmupdate_api.signer import NODE_EXTRA, SIGNER_NAME

log = logging.getLogger(__name__)

ALLOWED_USAGES = frozenset({"server auth", "digital signature", "key encipherment"})
DEFAULT_TTL_S = 7 * 24 * 3600
MIN_TTL_S = 600


@dataclass(frozen=True)
class Decision:
    approve: bool
    reason: str
    node: str | None = None


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def _node_of(extra: Mapping[str, Sequence[str]] | None) -> str | None:
    values = list((extra or {}).get(NODE_EXTRA) or [])
    return values[0] if len(values) == 1 and values[0] else None


def _check_key(csr: x509.CertificateSigningRequest) -> str | None:
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            return f"EC curve {key.curve.name} is not accepted (P-256 or P-384)"
        return None
    if isinstance(key, rsa.RSAPublicKey):
        return None if key.key_size >= 2048 else f"RSA key of {key.key_size} bits (< 2048)"
    return f"key type {type(key).__name__} is not accepted (EC P-256/P-384 or RSA)"


def _requested_names(csr: x509.CertificateSigningRequest) -> tuple[list[str], str | None]:
    """(DNS SANs, a reason the request asks for more than DNS names, or None)."""
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return [], None
    dns = ext.value.get_values_for_type(x509.DNSName)
    if len(list(ext.value)) != len(dns):
        return dns, "the request asks for SANs other than the node's DNS name"
    others = [e.oid.dotted_string for e in csr.extensions
              if not isinstance(e.value, x509.SubjectAlternativeName)]
    if others:
        return dns, f"the request asks for extensions the signer does not grant: {others}"
    return dns, None


def decide(spec: Mapping[str, Any], agent_user: str) -> Decision | None:
    """Approve or deny a CSR's ``spec``; None when it is not for our signer."""
    if spec.get("signerName") != SIGNER_NAME:
        return None
    user = spec.get("username") or ""
    if user != agent_user:
        return Decision(False, f"requested by {user!r}, not the agent's ServiceAccount "
                               f"{agent_user!r}")
    token_node = _node_of(spec.get("extra"))
    if token_node is None:
        return Decision(False, "the requester's token names no node (only a token bound to "
                               "an agent pod may ask for a serving certificate)")
    usages = set(spec.get("usages") or [])
    if "server auth" not in usages or not usages <= ALLOWED_USAGES:
        return Decision(False, f"usages {sorted(usages)} are not serving usages "
                               f"(server auth, and only {sorted(ALLOWED_USAGES)})")
    try:
        csr = x509.load_pem_x509_csr(base64.b64decode(spec.get("request") or "", validate=True))
    except ValueError as exc:
        return Decision(False, f"spec.request is not a PEM certificate request: {exc}")
    if not csr.is_signature_valid:
        return Decision(False, "the request's signature does not match its key")
    bad_key = _check_key(csr)
    if bad_key:
        return Decision(False, bad_key)
    attrs = list(csr.subject)
    cn = [a.value for a in attrs if a.oid == NameOID.COMMON_NAME]
    if len(attrs) != 1 or len(cn) != 1:
        return Decision(False, f"the subject must be exactly CN=<node>, got "
                               f"{csr.subject.rfc4514_string()!r}")
    dns, bad_names = _requested_names(csr)
    if bad_names:
        return Decision(False, bad_names)
    asked = str(cn[0])
    if asked != token_node or dns != [token_node]:
        return Decision(False, f"node {token_node}'s agent asked for a certificate for "
                               f"CN={asked!r}, DNS={dns}; it may ask only for {token_node}")
    return Decision(True, f"the agent of node {token_node} asked for its own name",
                    token_node)


@dataclass(frozen=True)
class SigningCA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> SigningCA:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError("the CA key must be EC or RSA")
        return cls(x509.load_pem_x509_certificate(cert_pem), key)


def issue(ca: SigningCA, spec: Mapping[str, Any], node: str, now: dt.datetime,
          max_ttl_s: int = DEFAULT_TTL_S) -> bytes:
    """The serving certificate (PEM) for an approved request: CN and DNS SAN = node."""
    csr = x509.load_pem_x509_csr(base64.b64decode(spec["request"]))
    asked = spec.get("expirationSeconds")
    ttl = max(MIN_TTL_S, min(int(asked), max_ttl_s)) if asked else max_ttl_s
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .issuer_name(ca.cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(seconds=ttl), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=isinstance(ca.key, rsa.RSAPrivateKey),
            key_cert_sign=False, crl_sign=False, content_commitment=False,
            data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
        .add_extension(authority_key_identifier(ca), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def authority_key_identifier(ca: SigningCA) -> x509.AuthorityKeyIdentifier:
    """The CA certificate's own subject key identifier, which chain building matches
    exactly: it need not be the SHA-1 of the key (Go 1.25+, e.g. Helm's genCA, writes a
    truncated SHA-256; a leaf naming the SHA-1 then finds no issuer in OpenSSL)."""
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


# --- I/O: the CSR's approval and status subresources ----------------------------------------


def _conditions(obj: Mapping[str, Any]) -> set[str]:
    return {c.get("type", "") for c in (obj.get("status") or {}).get("conditions") or []}


async def review(api: Any, obj: dict[str, Any], agent_user: str, ca: SigningCA, *,
                 timeout: float = 15.0) -> Decision | None:
    """Approve and sign, or deny, one CSR object (as a dict). None: not ours, or already
    settled (denied, failed, or signed)."""
    from kubernetes_asyncio import client

    status = obj.get("status") or {}
    done = _conditions(obj)
    if status.get("certificate") or done & {"Denied", "Failed"}:
        return None
    decision = decide(obj.get("spec") or {}, agent_user)
    if decision is None:
        return None
    certs: Any = client.CertificatesV1Api(api)
    name = obj["metadata"]["name"]
    if "Approved" not in done:
        condition = {"type": "Approved" if decision.approve else "Denied", "status": "True",
                     "reason": "VMUpdateAgentNode" if decision.approve else
                     "VMUpdateNotTheAgentsNode", "message": decision.reason[:1024]}
        obj.setdefault("status", {}).setdefault("conditions", []).append(condition)
        approved = await asyncio.wait_for(
            certs.replace_certificate_signing_request_approval(name, obj), timeout)
        obj = api.sanitize_for_serialization(approved)
        log.info("CSR %s %s: %s", name, "approved" if decision.approve else "denied",
                 decision.reason)
    if decision.approve and decision.node:
        pem = issue(ca, obj["spec"], decision.node, dt.datetime.now(dt.UTC))
        obj.setdefault("status", {})["certificate"] = base64.b64encode(pem).decode()
        await asyncio.wait_for(certs.replace_certificate_signing_request_status(name, obj),
                               timeout)
        log.info("CSR %s signed for node %s", name, decision.node)
    return decision
