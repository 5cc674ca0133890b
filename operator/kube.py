"""The operator's writes to the Kubernetes API (kubernetes_asyncio); kopf does the watching."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from vmupdate_api.crd_models import (
    GROUP,
    PLURAL_VMUPDATES,
    VERSION,
    VMUpdateStatus,
    status_merge_patch,
)

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


class StatusWriteError(RuntimeError):
    """The status could not be written (the caller must not act as if it were)."""


class VMUpdateStatusWriter:
    """Writes a VMUpdate's status subresource. One writer per object (its rollout task), so
    a merge patch without resourceVersion cannot lose someone else's write."""

    def __init__(self, api: client.ApiClient, *, timeout: float = 15.0) -> None:
        # Typed as Any: the generated signatures omit the _content_type keyword they take.
        self._objects: Any = client.CustomObjectsApi(api)
        self._timeout = timeout

    async def write(self, name: str, status: VMUpdateStatus) -> None:
        try:
            await asyncio.wait_for(
                self._objects.patch_cluster_custom_object_status(
                    GROUP, VERSION, PLURAL_VMUPDATES, name, status_merge_patch(status),
                    _content_type=MERGE_PATCH, _request_timeout=self._timeout),
                self._timeout + 5)
        except ApiException as exc:
            raise StatusWriteError(f"status of VMUpdate {name}: HTTP {exc.status} "
                                   f"{exc.reason}: {str(exc.body)[:500]}") from exc
        except (TimeoutError, OSError) as exc:
            raise StatusWriteError(f"status of VMUpdate {name}: {exc!r}") from exc
