"""End-to-end helpers for the operator on a real control plane: simulated nodes (one agent
and one VMHost registrar each, with real QEMU VMs), the operator as a process, and small
kubectl helpers. Fixtures in :mod:`e2e.k8s.fixtures`."""
