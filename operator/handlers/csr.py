"""CertificateSigningRequests of the agents' serving certificates: approved and signed, or
denied, by ``vmupdate_operator.csr_signer``. Registered only when the operator is given the
signing CA (``--agent-signer-ca-dir``), so an operator without it never watches CSRs."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from vmupdate_api.signer import SIGNER_NAME
from vmupdate_operator.context import OperatorContext
from vmupdate_operator.csr_signer import SigningCA, review

log = logging.getLogger(__name__)


def _ours(spec: Any, **_: Any) -> bool:
    return bool(spec.get("signerName") == SIGNER_NAME)


def register(ca: SigningCA, agent_user: str) -> None:
    """Watch CSRs of our signer and settle each (kopf's default registry)."""

    @kopf.on.event("certificates.k8s.io", "v1", "certificatesigningrequests", when=_ours)
    async def agent_csr(*, body: kopf.Body, memo: Any, **_: Any) -> None:
        ctx: OperatorContext | None = memo.get("ctx")
        if ctx is None:
            return
        name = body.get("metadata", {}).get("name")
        try:
            await review(ctx.api, dict(body), agent_user, ca)
        except Exception as exc:  # an outage: the next event retries
            if getattr(exc, "status", None) == 409:
                # The event was older than the object (settled by the write of an earlier
                # event): the newer event settles it, or finds it settled.
                log.debug("CSR %s changed meanwhile: %r", name, exc)
                return
            log.warning("CSR %s not settled: %r", name, exc)
