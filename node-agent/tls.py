"""Mutual TLS for the agent: certificates from files, reloaded when they change.

gRPC asks `CertificateFiles.fetch` before every new TLS handshake (grpc's
`dynamic_ssl_server_credentials`); it answers with a new configuration only when one of the
files changed and the new set is usable, so a certificate rotated on disk (cert-manager,
a projected Secret) is served to new connections without a restart, and a half-written
rotation keeps the previous certificate rather than breaking the agent.

A valid client certificate is not enough: what its identity may call is decided per call
by `vmupdate_agent.authz`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vmupdate_agent.config import TlsConfig

log = logging.getLogger(__name__)


class TlsError(RuntimeError):
    pass


@dataclass(frozen=True)
class KeyMaterial:
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes


def _stamp(paths: Sequence[str]) -> tuple[tuple[int, int, int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def check_material(m: KeyMaterial) -> None:
    """Raise TlsError unless the key matches the certificate and the CA file holds a cert."""
    try:
        cert = x509.load_pem_x509_certificate(m.cert_chain)
        key = serialization.load_pem_private_key(m.private_key, password=None)
        x509.load_pem_x509_certificates(m.client_ca)
    except ValueError as exc:
        raise TlsError(f"unreadable PEM: {exc}") from exc
    public = key.public_key()
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if public.public_bytes(*fmt) != cert.public_key().public_bytes(*fmt):
        raise TlsError("the private key does not belong to the certificate")


class CertificateFiles:
    """The serving certificate, its key and the client CA, read from files on demand."""

    def __init__(self, tls: TlsConfig) -> None:
        self.paths = (tls.cert_file, tls.key_file, tls.client_ca_file)
        self._lock = threading.Lock()  # gRPC calls fetch from its own threads
        self._stamp: tuple[tuple[int, int, int, int], ...] = ()
        self.reloads = 0

    def read(self) -> KeyMaterial:
        try:
            stamp = _stamp(self.paths)
            contents = []
            for p in self.paths:
                with open(p, "rb") as f:
                    contents.append(f.read())
        except OSError as exc:
            raise TlsError(f"cannot read {exc.filename}: {exc.strerror}") from exc
        material = KeyMaterial(*contents)
        check_material(material)
        self._stamp = stamp
        return material

    def configuration(self, m: KeyMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(m.private_key, m.cert_chain)],
                                                         root_certificates=m.client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration if the files changed, else None (keep)."""
        with self._lock:
            try:
                if _stamp(self.paths) == self._stamp:
                    return None
                material = self.read()
            except (OSError, TlsError) as exc:
                log.warning("TLS files changed but are not usable (%s); keeping the previous "
                            "certificate", exc)
                return None
            self.reloads += 1
            log.info("TLS certificate files reloaded (%d)", self.reloads)
            return self.configuration(material)

    def server_credentials(self) -> grpc.ServerCredentials:
        with self._lock:
            initial = self.configuration(self.read())
        # grpc documents None from the fetcher as "keep the current one"; the stubs do not.
        fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch)
        return grpc.dynamic_ssl_server_credentials(
            initial, fetcher, require_client_authentication=True)
