from e2e.cluster.fixtures import apply_crds, k8s_cluster, kubectl  # noqa: F401
