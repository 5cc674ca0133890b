"""How every component reaches the Kubernetes API."""

from __future__ import annotations

from kubernetes_asyncio import client, config


async def api_client() -> client.ApiClient:
    """In a pod: its service account; outside: $KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    except config.ConfigException:
        configuration = client.Configuration()
        await config.load_kube_config(client_configuration=configuration)
        return client.ApiClient(configuration)
