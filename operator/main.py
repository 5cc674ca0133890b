"""`vmupdate-operator`: run the operator (kopf) with the project's settings.

    vmupdate-operator --agent-ca-file ca.crt --agent-cert-file op.crt --agent-key-file op.key

Cluster-wide; the Kubernetes credentials are the pod's service account in a cluster, else
$KUBECONFIG. High availability: run two or more replicas; they join the ClusterKopfPeering
``vmupdate`` (create it with the CRD, see operator/manifests/), the live replica with the
highest priority works and the others stand by (a random priority each unless --priority
is given: equal priorities would pause all of them). When the active replica dies, a
standby takes over once its keep-alive has expired (--peering-lifetime) and resumes every
rollout from the VMUpdates' status and the agents' journals.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

import kopf

from vmupdate_operator import config as operator_config


class QuietWakeUps(logging.Filter):
    NOISY = ("Handler 'vmhost_changed' succeeded", "Handler 'vmupdate_changed' succeeded")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOISY)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = operator_config.from_args(argv)
    except operator_config.ConfigError as exc:
        print(f"vmupdate-operator: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The wake-up handlers run on every VMHost heartbeat and VMUpdate write; their
    # "succeeded" lines would be most of the log.
    logging.getLogger("kopf.objects").addFilter(QuietWakeUps())
    # Importing registers the handlers with kopf's default registry.
    from vmupdate_operator import handlers  # noqa: F401

    if cfg.signer_ca_dir and cfg.agent_user:
        from pathlib import Path

        from vmupdate_operator.csr_signer import SigningCA
        from vmupdate_operator.handlers import csr

        ca_dir = Path(cfg.signer_ca_dir)
        try:
            ca = SigningCA.from_pem((ca_dir / "tls.crt").read_bytes(),
                                    (ca_dir / "tls.key").read_bytes())
        except (OSError, ValueError) as exc:
            print(f"vmupdate-operator: --agent-signer-ca-dir: {exc}", file=sys.stderr)
            return 2
        csr.register(ca, cfg.agent_user)

    liveness = f"http://0.0.0.0:{cfg.health_port}/healthz" if cfg.health_port else None
    asyncio.run(kopf.operator(
        clusterwide=True,
        standalone=cfg.standalone,
        peering_name=None if cfg.standalone else cfg.peering_name,
        priority=cfg.priority,
        liveness_endpoint=liveness,
        memo=kopf.Memo(config=cfg),
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
