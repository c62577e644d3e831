"""Tandem's own Prometheus series (`tandem_*`), in a registry of their own.

Per endpoint: limit, in-flight, queue length, queue wait, admitted/failed calls, and the
TTFT and ITL the router saw. Per role: review calls answered (the review share). Per
workflow: stage latency, per-session progress, parallel task count. GPU utilisation and
memory come from NVML at scrape time, only when present.

Names pass `promtool check metrics` (tests/integration/test_promtool.py): only counters end
in `_total`, units are base units. Per-session series are removed when the session ends
(`session_ended`), so a long-lived process does not accumulate one label value per session
ever run, and no `_created` series are exported (they double the counter and histogram
series and no panel reads them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from routing.admission import Outcome
from routing.calls import ROLES
from routing.nvml import Nvml

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25)
_STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class EndpointMetrics:
    """One replica's series; an `routing.admission.AdmissionObserver`."""

    def __init__(self, owner: TandemMetrics, role: str, replica: str, gpu: str) -> None:
        labels = {"role": role, "replica": replica, "gpu": gpu}
        self._limit = owner.limit.labels(**labels)
        self._in_flight = owner.in_flight.labels(**labels)
        self._queue = owner.queue_length.labels(**labels)
        self._wait = owner.queue_wait.labels(**labels)
        self._admitted = owner.admitted.labels(**labels)
        self._failed = owner.failed.labels(**labels)
        self._ttft = owner.ttft.labels(**labels)
        self._itl = owner.itl.labels(**labels)

    def on_state(self, limit: int, in_flight: int, queued: int) -> None:
        """Limit, in-flight and queue gauges."""
        self._limit.set(limit)
        self._in_flight.set(in_flight)
        self._queue.set(queued)

    def on_admit(self, waited_s: float) -> None:
        """Count an admission and its queue wait."""
        self._admitted.inc()
        self._wait.observe(waited_s)

    def on_release(self, outcome: Outcome) -> None:
        """Count failures; observe TTFT and ITL of successful calls."""
        if outcome.kind in ("error", "dropped"):
            self._failed.inc()
        if outcome.ttft_s is not None:
            self._ttft.observe(outcome.ttft_s)
        if outcome.itl_s is not None:
            self._itl.observe(outcome.itl_s)


class _GpuCollector(Collector):
    def __init__(self, nvml: Nvml) -> None:
        self._nvml = nvml

    def collect(self) -> Iterable[Any]:
        readings = self._nvml.read()
        if readings is None:  # absent: no series at all, never a fake 0
            return []
        util = GaugeMetricFamily(
            "tandem_gpu_utilization_percent", "GPU utilisation (NVML)", labels=["gpu", "name"]
        )
        used = GaugeMetricFamily(
            "tandem_gpu_memory_used_bytes", "GPU memory used (NVML)", labels=["gpu", "name"]
        )
        total = GaugeMetricFamily(
            "tandem_gpu_memory_total_bytes", "GPU memory total (NVML)", labels=["gpu", "name"]
        )
        for r in readings:
            labels = [f"gpu{r.index}", r.name]
            util.add_metric(labels, r.util_percent)
            used.add_metric(labels, r.memory_used_bytes)
            total.add_metric(labels, r.memory_total_bytes)
        return [util, used, total]


class TandemMetrics:
    """All `tandem_*` series in one `CollectorRegistry`.

    Args:
        registry: Registry to use (a fresh one by default).
        gpu: Export NVML GPU gauges when a GPU is present.
        nvml: The NVML reader behind the GPU gauges (a fresh `Nvml` by default).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        gpu: bool = True,
        nvml: Nvml | None = None,
    ) -> None:
        # prometheus_client decides this per process, at scrape time; Tandem's process
        # exports only these series, so switching it off here covers every scrape.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ep = ["role", "replica", "gpu"]
        self.limit = Gauge("tandem_endpoint_limit", "Concurrency limit", ep, registry=r)
        self.in_flight = Gauge("tandem_endpoint_in_flight", "Calls holding a slot", ep, registry=r)
        self.queue_length = Gauge(
            "tandem_endpoint_queue_length", "Calls waiting for a slot", ep, registry=r
        )
        self.queue_wait = Histogram(
            "tandem_endpoint_queue_wait_seconds",
            "Time from arrival to admission",
            ep,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.admitted = Counter("tandem_endpoint_admitted", "Calls admitted", ep, registry=r)
        self.failed = Counter("tandem_endpoint_failed", "Calls failed", ep, registry=r)
        self.ttft = Histogram(
            "tandem_endpoint_ttft_seconds",
            "Time to first body chunk, as the router saw it",
            ep,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tandem_endpoint_itl_seconds",
            "Mean inter-token latency per streamed call, as the router saw it",
            ep,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.review_calls = Counter(
            "tandem_review_calls",
            "Review calls answered, by the role of the model that answered",
            ["role"],
            registry=r,
        )
        for role in ROLES:  # both series from the start, so a share reads 0, not absent
            self.review_calls.labels(role=role)
        self.stage = Histogram(
            "tandem_stage_latency_seconds",
            "Latency of a workflow stage",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.files_done = Gauge(
            "tandem_session_files_done", "Files written so far", ["session"], registry=r
        )
        self.files_planned = Gauge(
            "tandem_session_files_planned", "Files planned", ["session"], registry=r
        )
        self.progress = Gauge(
            "tandem_session_progress_ratio", "Files done / total", ["session"], registry=r
        )
        self.parallel = Gauge(
            "tandem_parallel_tasks", "Coder tasks running in parallel", registry=r
        )
        self._servers: list[tuple[Any, Any]] = []
        self.nvml: Nvml | None = None
        if gpu:
            self.nvml = nvml or Nvml()
            r.register(_GpuCollector(self.nvml))

    def endpoint(self, role: str, replica: str, gpu: str) -> EndpointMetrics:
        """The series of one replica, bound to its labels."""
        return EndpointMetrics(self, role, replica, gpu)

    def review_answered(self, role: str) -> None:
        """Count one review call answered by `role`'s model."""
        self.review_calls.labels(role=role).inc()

    def stage_latency(self, stage: str, seconds: float) -> None:
        """Observe one stage's latency (plan, code, review, ...)."""
        self.stage.labels(stage=stage).observe(seconds)

    def session_progress(self, session_id: str, done: int, total: int) -> None:
        """Files done out of total for a session."""
        self.files_done.labels(session=session_id).set(done)
        self.files_planned.labels(session=session_id).set(total)
        self.progress.labels(session=session_id).set(done / total if total > 0 else 0.0)

    def session_ended(self, session_id: str) -> None:
        """Remove the series of a finished session (idempotent; unknown ids are ignored)."""
        for gauge in (self.files_done, self.files_planned, self.progress):
            with contextlib.suppress(KeyError):
                gauge.remove(session_id)

    def parallel_tasks(self, n: int) -> None:
        """Coder tasks running in parallel now."""
        self.parallel.set(n)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve this registry on `http://host:port/metrics`; returns the bound port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._servers.append((server, thread))
        return int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP servers that `serve` started."""
        while self._servers:
            server, thread = self._servers.pop()
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
