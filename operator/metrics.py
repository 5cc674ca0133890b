"""Prometheus metrics of the operator (served on ``--metrics-port``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Guest pauses are milliseconds to seconds; whole updates seconds to minutes; rollouts up to
# hours.
PAUSE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UPDATE_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
ROLLOUT_BUCKETS = (5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.vm_pause = Histogram(
            "vmupdate_vm_pause_seconds", "Guest pause of a VM update (QEMU STOP to RESUME)",
            ["mode"], buckets=PAUSE_BUCKETS, registry=r)
        self.vm_update = Histogram(
            "vmupdate_vm_update_duration_seconds",
            "From the operator's request to the agent's result, per VM", ["outcome"],
            buckets=UPDATE_BUCKETS, registry=r)
        self.rollout = Histogram(
            "vmupdate_rollout_duration_seconds",
            "From a VMUpdate's startTime to every selected VM running the target",
            buckets=ROLLOUT_BUCKETS, registry=r)
        self.vm_updates = Counter(
            "vmupdate_vm_updates", "VM updates finished, by outcome", ["outcome"], registry=r)
        self.preflights = Counter(
            "vmupdate_preflights", "Dry-run preflights finished, by verdict", ["verdict"],
            registry=r)
        self.in_flight = Gauge(
            "vmupdate_vm_updates_in_flight", "VM updates and preflights running now",
            registry=r)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Serve /metrics from a thread (prometheus_client's own server)."""
        start_http_server(port, addr=address, registry=self.registry)
