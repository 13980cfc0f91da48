"""Prometheus metrics, one registry per Platform (so several apps in one
process, as in tests, do not collide).

With several API processes (`PGFLEET_API_WORKERS` > 1), `pgfleet serve`
sets PROMETHEUS_MULTIPROC_DIR before the workers start: their counters and
histograms live in files there, and every scrape, whichever process answers
it, sums all of them. The state gauges (pools, queue) are the answering
process's own."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


State = dict[str, list[tuple[dict[str, str], float]]]


class _StateCollector(Collector):
    """Gauges read at scrape time, from every reader the platform's parts
    registered (a reader that fails is skipped)."""

    def __init__(self) -> None:
        self.readers: list[Callable[[], State]] = []

    def read(self) -> State:
        state: State = {}
        for read in list(self.readers):
            try:
                for name, values in read().items():
                    state.setdefault(name, []).extend(values)
            except Exception:  # noqa: S112 - a scrape never fails for one part
                continue
        return state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self.read()
        docs = {
            "pgfleet_server_up": "1 if the regional server answered its last health check",
            "pgfleet_server_latency_seconds": "Round trip of the last health check",
            "pgfleet_server_connections": "Client connections on the server",
            "pgfleet_server_max_connections": "max_connections of the server",
            "pgfleet_server_databases": "Tenant databases on the server",
            "pgfleet_spares_ready": "Prepared spares ready on the server (last health check)",
            "pgfleet_spares_target": "Prepared spares the server keeps ready",
            "pgfleet_tenant_pools": "Open per-project connection pools in this process",
            "pgfleet_query_log_queue": "Query log rows waiting to be written",
        }
        for name, doc in docs.items():
            labels = sorted({k for lbl, _ in state.get(name, []) for k in lbl})
            fam = GaugeMetricFamily(name, doc, labels=labels)
            for lbl, value in state.get(name, []):
                fam.add_metric([lbl[k] for k in labels], value)
            yield fam


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._state = _StateCollector()
        self.registry.register(self._state)
        self.http_requests = Counter(
            "pgfleet_http_requests",
            "API requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "pgfleet_http_request_duration_seconds",
            "API request latency",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.provisions = Counter(
            "pgfleet_provisions",
            "Project provisioning attempts",
            ["region", "outcome"],
            registry=self.registry,
        )
        self.provision_duration = Histogram(
            "pgfleet_provision_duration_seconds",
            "Provisioning time",
            ["region"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        slow = (1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 7200)
        self.base_backups = Counter(
            "pgfleet_base_backups",
            "Base backups of the servers (pgBackRest), by type and outcome",
            ["region", "type", "outcome"],
            registry=self.registry,
        )
        self.base_backup_duration = Histogram(
            "pgfleet_base_backup_duration_seconds",
            "Time a base backup took",
            ["region", "type"],
            buckets=slow,
            registry=self.registry,
        )
        self.snapshots = Counter(
            "pgfleet_snapshots",
            "Project snapshots (pg_dump), by outcome",
            ["region", "outcome"],
            registry=self.registry,
        )
        self.snapshot_bytes = Counter(
            "pgfleet_snapshot_bytes",
            "Bytes written by project snapshots",
            ["region"],
            registry=self.registry,
        )
        self.snapshot_duration = Histogram(
            "pgfleet_snapshot_duration_seconds",
            "Time a project snapshot took",
            ["region"],
            buckets=slow,
            registry=self.registry,
        )
        self.restores = Counter(
            "pgfleet_restores",
            "Restores of a project, by source (pitr, snapshot) and outcome",
            ["region", "source", "outcome"],
            registry=self.registry,
        )
        self.restore_duration = Histogram(
            "pgfleet_restore_duration_seconds",
            "Time a restore took, request to verified project",
            ["region", "source"],
            buckets=slow,
            registry=self.registry,
        )
        self.spares_made = Counter(
            "pgfleet_spares_made",
            "Prepared spare projects made ahead by the workers",
            ["region"],
            registry=self.registry,
        )
        self.spares_claimed = Counter(
            "pgfleet_spares_claimed",
            "Creates that claimed a prepared spare (the rest took the slow path)",
            ["region"],
            registry=self.registry,
        )
        self.queries = Counter(
            "pgfleet_queries",
            "Statements run through pgfleet",
            ["region", "route", "outcome"],
            registry=self.registry,
        )
        self.query_duration = Histogram(
            "pgfleet_query_duration_seconds",
            "Statement latency through pgfleet",
            ["region", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def add_state(self, read: Callable[[], State]) -> None:
        self._state.readers.append(read)

    def render(self) -> bytes:
        if not os.environ.get(MULTIPROC_ENV):
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(self._state)
        return generate_latest(registry)
