"""The operator's writes to the Kubernetes API (kubernetes_asyncio); kopf does the watching."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from vmupdate_api.crd.constants import (
    GROUP,
    LABEL_VMUPDATE_UID,
    PLURAL_VMUPDATEHOSTS,
    PLURAL_VMUPDATES,
    VERSION,
)
from vmupdate_api.crd.meta import status_merge_patch
from vmupdate_api.crd.vmupdate import VMUpdateStatus

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


@dataclass(frozen=True)
class RecordWrite:
    """One VMUpdateHost to write: the whole object (to create it) and the merge patch from
    what it holds (to change it)."""

    name: str
    body: dict[str, Any]
    patch: dict[str, Any]
    exists: bool
    """As far as the writer knows (a wrong guess costs one more request)."""
    create: bool = True
    """False: only patch an existing object (a deleted VMUpdate's records are not made
    again)."""


class VMUpdateHostWriter:
    """Creates and patches VMUpdateHost objects (the per-VM records), and deletes a
    VMUpdate's records once it is gone."""

    def __init__(self, api: client.ApiClient, *, timeout: float = 15.0) -> None:
        self._objects: Any = client.CustomObjectsApi(api)
        self._timeout = timeout

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, self._timeout + 5)
        except (TimeoutError, OSError) as exc:
            raise StatusWriteError(f"{what}: {exc!r}") from exc

    async def write(self, record: RecordWrite) -> None:
        exists = record.exists
        for _ in range(3):
            try:
                if exists:
                    await self._call(f"VMUpdateHost {record.name}",
                                     self._objects.patch_cluster_custom_object(
                                         GROUP, VERSION, PLURAL_VMUPDATEHOSTS, record.name,
                                         record.patch, _content_type=MERGE_PATCH,
                                         _request_timeout=self._timeout))
                elif record.create:
                    await self._call(f"VMUpdateHost {record.name}",
                                     self._objects.create_cluster_custom_object(
                                         GROUP, VERSION, PLURAL_VMUPDATEHOSTS, record.body,
                                         _request_timeout=self._timeout))
                return
            except ApiException as exc:
                if exc.status == 404 and exists:
                    if not record.create:
                        return
                    exists = False
                    continue
                if exc.status == 409 and not exists:
                    exists = True  # made before, unknown to us: patch it
                    continue
                raise StatusWriteError(f"VMUpdateHost {record.name}: HTTP {exc.status} "
                                       f"{exc.reason}: {str(exc.body)[:500]}") from exc
        raise StatusWriteError(f"VMUpdateHost {record.name}: created and deleted meanwhile")

    async def delete_all(self, uid: str) -> None:
        """Delete every record of the VMUpdate ``uid``."""
        try:
            await self._call(f"VMUpdateHosts of {uid}",
                             self._objects.delete_collection_cluster_custom_object(
                                 GROUP, VERSION, PLURAL_VMUPDATEHOSTS,
                                 label_selector=f"{LABEL_VMUPDATE_UID}={uid}",
                                 _request_timeout=self._timeout))
        except ApiException as exc:
            raise StatusWriteError(f"VMUpdateHosts of {uid}: HTTP {exc.status} {exc.reason}: "
                                   f"{str(exc.body)[:500]}") from exc
