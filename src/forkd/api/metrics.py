"""Prometheus metrics of one daemon app, on its own registry (no process-global state).

Gauges read the runtime when scraped; histograms and counters are fed by the routes.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from forkd import __version__

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Forks take ~50 ms on KVM and seconds under TCG; branches up to minutes for big guests.
_SPAWN_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BRANCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Counts(Protocol):
    def snapshot_count(self) -> int: ...
    def active_sandbox_count(self) -> int: ...
    def branches_in_flight(self) -> int: ...
    def branch_concurrency_cap(self) -> int: ...


class Metrics:
    def __init__(self, counts: _Counts) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Gauge("forkd_snapshots_total", "Snapshots known to the daemon.",
              registry=r).set_function(counts.snapshot_count)  # fmt: skip
        Gauge("forkd_sandboxes_active", "Running sandboxes (child VMs).",
              registry=r).set_function(counts.active_sandbox_count)  # fmt: skip
        Gauge("forkd_branches_in_flight", "Branches being written right now.",
              registry=r).set_function(counts.branches_in_flight)  # fmt: skip
        Gauge("forkd_branch_concurrency_cap", "Configured maximum of concurrent branches "
              "(--branch-concurrency); more answer 503.",
              registry=r).set_function(counts.branch_concurrency_cap)  # fmt: skip
        Gauge("forkd_build_info", "Version of this forkd build.", ["version"],
              registry=r).labels(version=__version__).set(1)  # fmt: skip
        self.spawn_seconds = Histogram(
            "forkd_spawn_seconds", "Time to fork one child, launch to agent ready.",
            buckets=_SPAWN_BUCKETS, registry=r,
        )  # fmt: skip
        self.branch_seconds = Histogram(
            "forkd_branch_seconds", "Time a branch request took (to 201, or to 202 for live "
            "branches that finish in the background).", buckets=_BRANCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.agent_errors = Counter(
            "forkd_agent_errors_total", "Requests that failed in the guest agent or its channel.",
            registry=r,
        )  # fmt: skip
        self.sandbox_deaths = Counter(
            "forkd_sandbox_deaths_total", "Sandboxes whose QEMU exited without being killed.",
            registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
