"""The whole server's figures in Prometheus' text format, read when scraped.

A prometheus_client collector over the scoreboard: the primary reads every worker's
row, so there are no per-worker files and no multiprocess folder to clean up, and a
scrape costs the workers nothing. Workers are labelled by their slot (``worker``,
the cluster's id) and ``pid``; the shared pool's figures are ``allcores_pool_*``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from allcores._system import resident_bytes
from allcores.cluster.primary import Primary
from allcores.observe.scoreboard import LAG_BUCKETS_MS, LATENCY_BUCKETS_S, RowSnapshot
from allcores.server.shared_pool.owner import SharedPool

__all__ = ["ServerCollector", "registry_for"]


class ServerCollector(Collector):
    def __init__(self, primary: Primary, pool: SharedPool | None = None) -> None:
        self._primary = primary
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        primary = self._primary
        labels = ["worker", "pid"]
        requests = CounterMetricFamily(
            "allcores_requests", "HTTP requests answered, per worker.", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "allcores_requests_in_flight", "HTTP requests being answered now.", labels=labels
        )
        connections = GaugeMetricFamily(
            "allcores_connections_open", "Connections open, per worker.", labels=labels
        )
        lag = GaugeMetricFamily(
            "allcores_loop_lag_seconds", "Event-loop lag at the last beat.", labels=labels
        )
        rss = GaugeMetricFamily("allcores_resident_bytes", "Resident memory.", labels=labels)
        latency = HistogramMetricFamily(
            "allcores_request_duration_seconds",
            "Time the app took to answer, per worker.",
            labels=labels,
        )
        lag_histogram = HistogramMetricFamily(
            "allcores_loop_lag_histogram_seconds",
            "Event-loop lag at each 50 ms beat, per worker.",
            labels=labels,
        )
        for worker in sorted(primary.workers.values(), key=lambda w: w.id):
            row = primary.scoreboard.read(worker.row)
            values = [str(worker.id), str(worker.pid)]
            requests.add_metric(values, row.requests_total)
            in_flight.add_metric(values, row.tasks)
            connections.add_metric(values, max(0, worker.open_connections))
            lag.add_metric(values, row.lag_ms / 1000)
            rss.add_metric(values, resident_bytes(worker.pid))
            latency.add_metric(
                values,
                _cumulative(row.latency_histogram, LATENCY_BUCKETS_S),
                sum_value=row.latency_sum,
            )
            lag_histogram.add_metric(
                values,
                _cumulative(row.lag_histogram, [ms / 1000 for ms in LAG_BUCKETS_MS]),
                sum_value=_lag_sum(row),
            )
        yield from (requests, in_flight, connections, lag, rss, latency, lag_histogram)
        workers = GaugeMetricFamily("allcores_workers", "Workers serving now.")
        workers.add_metric([], len(primary.serving(listening=True)))
        yield workers
        restarts = CounterMetricFamily(
            "allcores_restarts", "Workers replaced, by cause.", labels=["cause"]
        )
        for cause in ("crash", "hung", "reload", "recycle"):
            restarts.add_metric([cause], primary.restarts.get(cause, 0))
        yield restarts
        if self._pool is not None:
            yield from self._pool_metrics(self._pool)

    def _pool_metrics(self, pool: SharedPool) -> Iterator[Metric]:
        rows = [row for row in pool.rows() if row.pid]
        busy = sum(1 for row in rows if row.state_name == "busy")
        offloads = sum(
            self._primary.scoreboard.read(w.row).offloads for w in self._primary.workers.values()
        )
        for name, text, value in (
            ("allcores_pool_processes", "Processes of the shared CPU pool.", len(rows)),
            ("allcores_pool_busy", "Pool processes running a task now.", busy),
            ("allcores_pool_queue", "Tasks waiting for a pool process.", max(0, offloads - busy)),
        ):
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], value)
            yield gauge
        tasks = CounterMetricFamily(
            "allcores_pool_tasks", "Tasks run, per pool process.", labels=["process", "pid"]
        )
        run = HistogramMetricFamily(
            "allcores_pool_run_seconds", "Run time of pool tasks.", labels=["process", "pid"]
        )
        wait = HistogramMetricFamily(
            "allcores_pool_wait_seconds",
            "Time pool tasks waited for a process.",
            labels=["process", "pid"],
        )
        for row in rows:
            values = [str(row.index + 1), str(row.pid)]
            tasks.add_metric(values, row.tasks_total)
            run.add_metric(
                values,
                _cumulative(row.latency_histogram, LATENCY_BUCKETS_S),
                sum_value=row.latency_sum,
            )
            wait.add_metric(
                values, _cumulative(row.wait_histogram, LATENCY_BUCKETS_S), sum_value=row.wait_sum
            )
        restarts = CounterMetricFamily(
            "allcores_pool_restarts", "Pool processes replaced, by cause.", labels=["cause"]
        )
        for cause in ("crash", "timeout", "cancel", "killed"):
            restarts.add_metric([cause], pool.restarts.get(cause, 0))
        yield from (tasks, run, wait, restarts)


def registry_for(primary: Primary, pool: SharedPool | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(primary, pool))
    return registry


def _cumulative(
    counts: tuple[int, ...], bounds: tuple[float, ...] | list[float]
) -> list[tuple[str, float]]:
    total = 0.0
    buckets = []
    for bound, count in zip([*bounds, float("inf")], counts, strict=True):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return buckets


def _lag_sum(row: RowSnapshot) -> float:
    # The row keeps lag counts per bucket, not their sum: each counts at its bucket's
    # lower bound, a floor that Prometheus' averages then err below, never above.
    lower = [0.0, *(ms / 1000 for ms in LAG_BUCKETS_MS)]
    return sum(bound * count for bound, count in zip(lower, row.lag_histogram, strict=True))
