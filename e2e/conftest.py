"""Fixtures of every end-to-end module, imported here once: a session fixture imported into
two test modules is two fixtures, so each module would start its own fleet and operator
(against the same cluster: the second sandbox fixture finds the first one's KUBECONFIG)."""

from e2e.k8s.fixtures import *  # noqa: F403  (fixtures)
