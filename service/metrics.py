"""Prometheus metrics: cheap counters on the request path, everything else read at scrape time.

Gauges (cells, rooms, readiness) are computed from the registry when ``/metrics`` is scraped, so
the hot path pays only for a counter increment and one histogram observation.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from prefill_bootstrap import __version__
from prefill_bootstrap.shared.events import EVENT_KINDS, TableEvent

if TYPE_CHECKING:
    from prefill_bootstrap.service.registry import Registry

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Metrics", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REGISTRATION_OUTCOMES = ("new", "same", "replaced", "conflict", "invalid", "unauthorized")


class LatencyHistogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


class Metrics:
    """Counters the request path bumps; plain ints, since the event loop is single-threaded."""

    def __init__(self) -> None:
        self.registrations: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        """Table events published, by kind (the registry's event log subscription bumps it)."""
        self.watchers_dropped = 0
        """Event streams dropped for falling more than --watcher-buffer-bytes behind."""
        self.not_ready_responses = 0
        self.unauthorized = 0
        self.latency: dict[tuple[str, str], LatencyHistogram] = {}

    def count_event(self, event: TableEvent) -> None:
        """An event-log subscriber: events by kind, for the ``events`` counter family."""
        self.events[event.kind] += 1

    def observe(self, route: str, method: str, seconds: float) -> None:
        key = (route, method)
        histogram = self.latency.get(key)
        if histogram is None:
            histogram = self.latency[key] = LatencyHistogram()
        histogram.observe(seconds)


class _RegistryCollector(Collector):
    """Reads the registry at scrape time and yields every family."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        registry = self.registry
        table, rooms, metrics = registry.group.table, registry.rooms, registry.metrics
        p = "prefill_bootstrap_"
        info = InfoMetricFamily(f"{p}build", "Server version and the current instance id.")
        info.add_metric([], {"version": __version__, "instance_id": registry.group.instance_id})
        yield info
        gauges = (
            ("expected_cells", "Cells the topology expects (0 before the first registration).",
             table.expected_count or 0),
            ("registered_cells", "Distinct cells registered, expired leases included.",
             table.registered_count),
            ("missing_cells", "Cells not registered or whose lease expired.",
             table.missing_count),
            ("expired_cells", "Registered cells whose lease expired.",
             len(table.expired_cells())),
            ("ready", "1 when every expected cell is registered and live.",
             int(table.is_complete)),
            ("rooms", "bootstrap_room entries currently held.", len(rooms)),
            ("parked_long_polls", "Requests waiting (?wait=) for the table to complete.",
             len(registry.waits)),
            ("watchers", "Open event streams plus event long polls waiting for the next event.",
             len(registry.watchers)),
        )  # fmt: skip
        for name, help_text, value in gauges:
            yield GaugeMetricFamily(p + name, help_text, value=value)
        outcomes = CounterMetricFamily(
            f"{p}registrations", "PUT /route outcomes.", labels=["outcome"]
        )
        for outcome in REGISTRATION_OUTCOMES:
            outcomes.add_metric([outcome], metrics.registrations[outcome])
        yield outcomes
        events = CounterMetricFamily(
            f"{p}events", "Table events published to watchers, by kind.", labels=["kind"]
        )
        for kind in EVENT_KINDS:
            events.add_metric([kind], metrics.events[kind])
        yield events
        counters = (
            ("not_ready_responses", "503 answers served while the table was incomplete.",
             metrics.not_ready_responses),
            ("unauthorized_requests", "Requests refused for a missing or wrong token.",
             metrics.unauthorized),
            ("watchers_dropped", "Event streams dropped for falling too far behind.",
             metrics.watchers_dropped),
            ("room_evictions", "Room entries evicted by the capacity bound.", rooms.evicted),
            ("room_expirations", "Room entries dropped after their TTL.", rooms.expired),
            ("state_commits", "Durable state commits (one per group of writes).",
             registry.group.writer.commits),
            ("state_write_failures", "Failed durable writes; their requests got 503.",
             registry.group.writer.failures),
        )  # fmt: skip
        for name, help_text, value in counters:
            yield CounterMetricFamily(p + name, help_text, value=value)
        latency = HistogramMetricFamily(
            f"{p}request_duration_seconds",
            "Time to answer a request, by route and method.",
            labels=["route", "method"],
        )
        for (route, method), histogram in sorted(metrics.latency.items()):
            buckets, cumulative = [], 0
            for bound, count in zip(
                (*map(str, LATENCY_BUCKETS), "+Inf"), histogram.counts, strict=True
            ):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([route, method], buckets, histogram.total)
        yield latency


def render(registry: Registry) -> bytes:
    """The Prometheus text exposition format."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(_RegistryCollector(registry))
    return generate_latest(collectors)
