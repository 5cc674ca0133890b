"""The CSR signer of the agents' serving certificates: one name for the agent that asks
(``vmupdate_agent.certificate``), the operator that signs (``vmupdate_operator.csr_signer``)
and the chart's RBAC."""

SIGNER_NAME = "vmupdate.dev/agent-serving"
# Set by the API server on the CSR of a pod-bound ServiceAccount token: the pod's node.
NODE_EXTRA = "authentication.kubernetes.io/node-name"
