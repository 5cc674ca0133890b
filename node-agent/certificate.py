"""The agent's serving certificate for its own node, through the CSR API.

The key is made here, on the node, and never leaves it. A CertificateSigningRequest for
exactly the node's name (``CN=<node>``, one DNS SAN ``<node>``) goes to the signer
``vmupdate.dev/agent-serving`` with the pod-bound ServiceAccount token, so the API server
records which node asked; the operator approves and signs only a request for that node
(``vmupdate_operator.csr_signer``). The signed certificate and its key are written where the
agent's TLS loads them (``tls.crt``, ``tls.key``); the agent picks up a changed pair at the
next handshake (``vmupdate_agent.tls``), so renewal needs no restart. A new key and request
are made when two thirds of the certificate's lifetime have passed.

Run as a sidecar next to the agent (it shares the folder the agent's ``tls`` points at)::

    python -m vmupdate_agent.certificate --node-name NODE --dir /etc/vmupdate/tls/serving
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import logging
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vmupdate_api.signer import SIGNER_NAME

log = logging.getLogger(__name__)

USAGES = ["digital signature", "server auth"]
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


class CertificateError(RuntimeError):
    pass


# --- pure ------------------------------------------------------------------------------------


def make_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def csr_pem(key: ec.EllipticCurvePrivateKey, node: str) -> bytes:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_object(name: str, request_pem: bytes, ttl_s: int) -> dict[str, Any]:
    return {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": name},
            "spec": {"request": base64.b64encode(request_pem).decode(),
                     "signerName": SIGNER_NAME, "usages": USAGES,
                     "expirationSeconds": ttl_s}}


def csr_name(node: str) -> str:
    return f"vmupdate-agent-{node[:200]}-{secrets.token_hex(4)}"


def outcome(obj: dict[str, Any]) -> bytes | None:
    """The signed certificate of a CSR object, None while pending; raises when denied."""
    status = obj.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("type") in ("Denied", "Failed") and c.get("status", "True") == "True":
            raise CertificateError(f"CertificateSigningRequest {obj['metadata']['name']} "
                                   f"{c['type'].lower()}: {c.get('message') or c.get('reason')}")
    cert = status.get("certificate")
    return base64.b64decode(cert) if cert else None


def renew_at(cert_pem: bytes) -> dt.datetime:
    """When to ask for the next one: two thirds into the certificate's lifetime."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * 2 / 3


def certificate_for(cert_pem: bytes, key: ec.EllipticCurvePrivateKey, node: str) -> None:
    """Refuse a signed certificate that is not for this key and this node."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CertificateError(f"the signed certificate is not PEM: {exc}") from exc
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise CertificateError("the signed certificate is not for the key this agent made")
    try:
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if node not in names:
        raise CertificateError(f"the signed certificate names {names}, not node {node}")


# --- I/O -------------------------------------------------------------------------------------


def write_pair(directory: Path, cert_pem: bytes, key: ec.EllipticCurvePrivateKey) -> None:
    """Key first, then certificate, each by rename: the agent never reads a half-written
    file, and a key without its certificate is refused by its reload (it keeps the old)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in ((KEY_FILE, key_pem(key)), (CERT_FILE, cert_pem)):
        tmp = directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, directory / name)


async def request_certificate(api: Any, node: str, *, ttl_s: int = 7 * 24 * 3600,
                              timeout: float = 120.0, poll_s: float = 1.0,
                              ) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """Make a key, ask for its certificate, wait (at most ``timeout``) for it to be signed."""
    from kubernetes_asyncio import client

    certs: Any = client.CertificatesV1Api(api)
    key = make_key()
    name = csr_name(node)
    await asyncio.wait_for(certs.create_certificate_signing_request(
        csr_object(name, csr_pem(key, node), ttl_s)), 30)
    log.info("asked for a serving certificate for node %s (CSR %s)", node, name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        obj = api.sanitize_for_serialization(await asyncio.wait_for(
            certs.read_certificate_signing_request(name), 30))
        cert = outcome(obj)
        if cert is not None:
            certificate_for(cert, key, node)
            return cert, key
        if loop.time() > deadline:
            raise CertificateError(f"CertificateSigningRequest {name} was not signed within "
                                   f"{timeout:.0f} s (is the operator running?)")
        await asyncio.sleep(poll_s)


async def keep_certificate(node: str, directory: Path, stop: asyncio.Event, *,
                           ttl_s: int, timeout: float, api: Any = None) -> None:
    """Keep a valid certificate for ``node`` in ``directory`` until ``stop``; failures are
    retried after a pause (the previous certificate stays in place)."""
    own = api is None
    if api is None:
        from vmupdate_api.kube import api_client

        api = await api_client()
    try:
        while not stop.is_set():
            wait = 30.0
            try:
                current = directory / CERT_FILE
                due = renew_at(current.read_bytes()) if current.exists() else None
                now = dt.datetime.now(dt.UTC)
                if due is None or due <= now:
                    cert, key = await request_certificate(api, node, ttl_s=ttl_s,
                                                          timeout=timeout)
                    write_pair(directory, cert, key)
                    log.info("serving certificate for %s written, valid until %s", node,
                             x509.load_pem_x509_certificate(cert).not_valid_after_utc)
                    due = renew_at(cert)
                wait = max(1.0, min((due - dt.datetime.now(dt.UTC)).total_seconds(), 3600.0))
            except Exception as exc:
                log.warning("serving certificate for %s not renewed: %r", node, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
    finally:
        if own:
            await api.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmupdate_agent.certificate",
                                description="Keep this node's serving certificate (CSR API).")
    p.add_argument("--node-name", required=True)
    p.add_argument("--dir", required=True, type=Path, help="where tls.crt and tls.key go")
    p.add_argument("--ttl", type=int, default=7 * 24 * 3600, help="seconds asked for")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait per request")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ttl < 600:
        p.error("--ttl must be at least 600 seconds (the API server's minimum)")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await keep_certificate(args.node_name, args.dir, stop, ttl_s=args.ttl,
                               timeout=args.timeout)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
