"""Operator start and stop: kopf settings, shared clients, the metrics server."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from vmupdate_api.crd.constants import GROUP
from vmupdate_api.kube import api_client
from vmupdate_operator import config as operator_config
from vmupdate_operator.agents import AgentPool
from vmupdate_operator.context import AgentsNotConfigured, OperatorContext
from vmupdate_operator.kube import VMUpdateHostWriter, VMUpdateStatusWriter
from vmupdate_operator.metrics import Metrics

FINALIZER = f"{GROUP}/finalizer"


def configure(settings: kopf.OperatorSettings, cfg: operator_config.OperatorConfig) -> None:
    """Where kopf keeps its state and how replicas share the work."""
    # The CRDs' status schemas are strict (no x-kubernetes-preserve-unknown-fields), so kopf
    # must not keep its handler progress or diff-base in status: annotations under our own
    # prefix, and our own finalizer name.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = FINALIZER
    # Events are posted on purpose (per VM and per rollout); kopf's own handler logs would
    # drown them.
    settings.posting.level = logging.WARNING
    # HA: every replica joins the ClusterKopfPeering named by --peering-name; the live one
    # with the highest priority acts, the others pause (kopf's standard peering). Mandatory:
    # a missing peering object is an error, not a silent fallback to two active replicas.
    settings.peering.mandatory = not cfg.standalone
    settings.peering.lifetime = cfg.peering_lifetime_s
    # A watch that silently died (a dropped connection through a load balancer) is
    # re-established within a minute rather than never.
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.watching.connect_timeout = 10


@kopf.on.startup()
async def startup(*, settings: kopf.OperatorSettings, memo: Any,
                  logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    cfg = memo.get("config") or operator_config.from_args([])
    configure(settings, cfg)
    metrics = Metrics()
    if cfg.metrics_port:
        metrics.serve(cfg.metrics_port, cfg.metrics_address)
    api = await api_client()
    agents = (AgentPool(cfg.agent_tls, call_timeout=cfg.agent_call_timeout_s)
              if cfg.agent_tls else AgentsNotConfigured())
    if cfg.agent_tls is None:
        logger.warning("no agent TLS configured: VMUpdates are planned but no VM is updated")
    memo["ctx"] = OperatorContext(config=cfg, writer=VMUpdateStatusWriter(api),
                                  records=VMUpdateHostWriter(api), agents=agents,
                                  metrics=metrics, api=api)
    logger.info("vmupdate operator: peering %s, priority %d, metrics port %s",
                "off" if cfg.standalone else cfg.peering_name, settings.peering.priority,
                cfg.metrics_port or "off")


@kopf.on.cleanup()
async def cleanup(*, memo: Any, **_: Any) -> None:
    ctx: OperatorContext | None = memo.get("ctx")
    if ctx is None:
        return
    if isinstance(ctx.agents, AgentPool):
        await ctx.agents.close()
    await ctx.api.close()
