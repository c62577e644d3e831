"""A real Prometheus (Debian's `prometheus` package) scrapes our exporter on loopback."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.services import free_port
from routing.exporter import TandemMetrics

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not Path(PROMETHEUS).exists(),
        reason="needs the prometheus binary: apt-get install -y prometheus",
    ),
]


@pytest.fixture
def exporter() -> Iterator[tuple[TandemMetrics, int]]:
    metrics = TandemMetrics()
    port = metrics.serve(0)
    yield metrics, port
    metrics.close()


def test_prometheus_scrapes_tandem_series(
    tmp_path: Path, exporter: tuple[TandemMetrics, int]
) -> None:
    metrics, port = exporter
    ep = metrics.endpoint("coder", "coder@gpu1", "gpu1")
    ep.on_state(limit=16, in_flight=3, queued=5)
    ep.on_admit(0.25)
    metrics.stage_latency("plan", 4.0)
    metrics.session_progress("s1", 2, 8)
    metrics.parallel_tasks(6)

    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: tandem\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n"
    )
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        found: dict[str, float] = {}
        deadline = time.monotonic() + 60  # wall clock: a real server, not the event loop
        wanted = ("tandem_endpoint_limit", "tandem_endpoint_queue_length", "tandem_parallel_tasks")
        while time.monotonic() < deadline and len(found) < len(wanted):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            for name in wanted:
                try:
                    r = httpx.get(
                        f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": name}
                    )
                    result = r.json()["data"]["result"] if r.status_code == 200 else []
                except (httpx.HTTPError, ValueError, KeyError):
                    result = []
                if result:
                    found[name] = float(result[0]["value"][1])
            time.sleep(0.5)
        assert found == {
            "tandem_endpoint_limit": 16.0,
            "tandem_endpoint_queue_length": 5.0,
            "tandem_parallel_tasks": 6.0,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
