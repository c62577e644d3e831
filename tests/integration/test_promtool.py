"""`promtool check metrics` on Tandem's /metrics after a real emulated session, and
`promtool check config` on the example scrape config (Debian's `prometheus` package)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from graph.graph import build_graph
from graph.runtime import emulated_endpoints
from graph.sessions import run_session
from graph.settings import Settings
from nodes.context import ServerOptions
from nodes.llm import RoutedModels
from routing.exporter import TandemMetrics
from routing.fanout import FanoutPolicy
from routing.nvml import GpuReading, Nvml
from routing.router import Router

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
SCRAPE_CONFIG = ROOT / "docs" / "prometheus.yml"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not Path(PROMTOOL).exists(),
        reason="needs promtool: apt-get install -y prometheus",
    ),
]


class TwoGpus(Nvml):
    """NVML readings of two busy H100s, so the GPU families are on the page too."""

    def read(self) -> list[GpuReading]:
        return [
            GpuReading(0, "NVIDIA H100 NVL", 87.0, 80.1e9, 100.5e9),
            GpuReading(1, "NVIDIA H100 NVL", 64.0, 91.2e9, 100.5e9),
        ]


def promtool_check_metrics(page: str) -> subprocess.CompletedProcess[str]:
    """Run `promtool check metrics` on a /metrics page (it reads stdin)."""
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=page, capture_output=True, text=True, timeout=60
    )


def _families(page: str) -> dict[str, int]:
    """Metric family name -> number of samples on the page."""
    return {f.name: len(f.samples) for f in text_string_to_metric_families(page)}


def _registered_families(metrics: TandemMetrics) -> set[str]:
    return {family.name for family in metrics.registry.collect()}


@pytest.mark.looptime
async def test_exporter_page_after_an_emulated_session_passes_promtool(tmp_path: Path) -> None:
    settings = Settings(workspace=tmp_path, max_files=4, max_review_rounds=1)
    metrics = TandemMetrics(nvml=TwoGpus())
    endpoints, _apps = emulated_endpoints(settings)
    router = Router(endpoints, limit="adaptive", metrics=metrics)
    models = RoutedModels(router=router)
    context = settings.run_context()
    fanout = FanoutPolicy(max_parallel=context.max_parallel_agents)
    port = metrics.serve(0)
    try:
        async with router:
            graph = build_graph(
                models,
                defaults=context,
                options=ServerOptions(workspace=tmp_path),
                fanout=fanout,
            )
            result = await run_session(
                graph,
                "Build a small todo CLI with storage and tests",
                "s-promtool",
                context=context,
                fanout=fanout,
                workspace=tmp_path,
                on_code_done=metrics.session_progress,
                on_stage=metrics.stage_latency,
            )
            metrics.parallel_tasks(sum(lane.admission.in_flight for lane in router.lanes("coder")))
        assert result.status in ("ok", "partial"), result.error
        # A thread, as a scraper would: the exporter's HTTP server runs in its own thread.
        url = f"http://127.0.0.1:{port}/metrics"
        during = (await asyncio.to_thread(httpx.get, url)).text
        metrics.session_ended("s-promtool")
        after = (await asyncio.to_thread(httpx.get, url)).text
    finally:
        metrics.close()

    # Every family the exporter defines is on the page with samples: the check covers all.
    found = _families(during)
    assert _registered_families(metrics) <= {name for name, n in found.items() if n > 0}
    assert 'tandem_session_progress_ratio{session="s-promtool"} 1.0' in during
    # Review on the reasoning model (the default): its answered review calls, none on the coder.
    reviews = {
        s.labels["role"]: s.value
        for f in text_string_to_metric_families(during)
        if f.name == "tandem_review_calls"
        for s in f.samples
    }
    assert reviews["reasoning"] >= 1 and reviews["coder"] == 0
    assert "_created" not in during

    checked = promtool_check_metrics(during)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stdout
    checked = promtool_check_metrics(after)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stdout

    # The session's series are gone once it ended; the endpoint series stay.
    assert 's-promtool"' not in after
    assert "tandem_endpoint_admitted_total{" in after


def test_promtool_flags_a_gauge_named_like_a_counter() -> None:
    # The check above can fail: the name the exporter once used is reported.
    page = (
        "# HELP tandem_session_files_total Files planned\n"
        "# TYPE tandem_session_files_total gauge\n"
        'tandem_session_files_total{session="s1"} 8.0\n'
    )
    checked = promtool_check_metrics(page)
    assert checked.returncode != 0
    assert 'non-counter metrics should not have "_total" suffix' in checked.stdout + checked.stderr


def test_example_scrape_config_passes_promtool() -> None:
    checked = subprocess.run(
        [PROMTOOL, "check", "config", str(SCRAPE_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr
