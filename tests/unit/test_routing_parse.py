"""Parsing vLLM /metrics pages (both naming eras) and scraping them without sockets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pytest_socket import disable_socket, enable_socket

from routing.endpoints import Replica, load_endpoints_file
from routing.vllm_metrics import parse_metrics, scrape

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(autouse=True)
def _no_network() -> Iterator[None]:
    disable_socket(allow_unix_socket=True)  # the event loop's self-pipe is a unix socketpair
    yield
    enable_socket()


def test_parses_v1_page() -> None:
    snap = parse_metrics((FIXTURES / "vllm_metrics_v1.txt").read_text(), taken_at=5.0)
    assert snap.ok and snap.taken_at == 5.0
    assert (snap.running, snap.waiting) == (42.0, 3.0)
    assert snap.kv_usage == pytest.approx(0.6125)
    assert snap.preemptions_total == 7.0
    assert snap.prefix_hit_rate == pytest.approx(0.25)
    assert snap.generation_tokens_total == 482311.0
    assert snap.itl_sum_s / snap.itl_count == pytest.approx(0.015, abs=1e-3)
    assert snap.ttft_count == 1200.0


def test_parses_older_page_names() -> None:
    snap = parse_metrics((FIXTURES / "vllm_metrics_old.txt").read_text(), taken_at=0.0)
    assert snap.ok
    assert snap.kv_usage == pytest.approx(0.985)  # from vllm:gpu_cache_usage_perc
    assert snap.itl_count == 301877.0  # from vllm:time_per_output_token_seconds
    assert snap.preemptions_total == 112.0
    assert snap.prefix_hit_rate is None


def test_sums_engines() -> None:
    page = (
        'vllm:num_requests_running{model_name="m",engine="0"} 3\n'
        'vllm:num_requests_running{model_name="m",engine="1"} 4\n'
        'vllm:num_requests_waiting{model_name="m",engine="0"} 1\n'
    )
    snap = parse_metrics(page, 0.0)
    assert (snap.running, snap.waiting, snap.kv_usage) == (7.0, 1.0, None)


@pytest.mark.parametrize("page", ["", "python_info 1\n", "not a { metrics page"])
def test_pages_without_vllm_series_are_not_ok(page: str) -> None:
    snap = parse_metrics(page, 1.0)
    assert not snap.ok and snap.error


async def test_scrape_through_transport() -> None:
    page = (FIXTURES / "vllm_metrics_v1.txt").read_text()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=page)
        return httpx.Response(500)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        ok = await scrape(client, "http://gpu1:8002/metrics", 2.0)
        bad = await scrape(client, "http://gpu1:8002/nope", 3.0)
    assert ok.ok and ok.running == 42.0
    assert not bad.ok and bad.error == "HTTP 500" and bad.taken_at == 3.0


def test_replica_metrics_url_default_and_override() -> None:
    assert Replica("http://h:8001/v1", "m", "gpu0").scrape_url() == "http://h:8001/metrics"
    assert Replica("http://h:8001/v1/", "m", "gpu0").scrape_url() == "http://h:8001/metrics"
    assert Replica("http://h/v1", "m", "g", metrics_url="http://x/m").scrape_url() == "http://x/m"


def test_load_endpoints_file(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(
        "reasoning:\n  - {url: 'http://127.0.0.1:8001/v1', model: r1, gpu: gpu0}\n"
        "coder:\n  - {url: 'http://127.0.0.1:8002/v1', model: coder, gpu: gpu1}\n"
        "  - {url: 'http://127.0.0.1:8003/v1', model: coder, gpu: gpu1}\n"
    )
    eps = load_endpoints_file(path)
    assert [r.url for r in eps["coder"]] == ["http://127.0.0.1:8002/v1", "http://127.0.0.1:8003/v1"]
    assert eps["reasoning"][0] == Replica("http://127.0.0.1:8001/v1", "r1", "gpu0")
    path.write_text("planner:\n  - {url: u, model: m, gpu: g}\n")
    with pytest.raises(ValueError, match="unknown role"):
        load_endpoints_file(path)
    path.write_text("coder:\n  - {url: u, model: m}\n")
    with pytest.raises(ValueError, match="lacks gpu"):
        load_endpoints_file(path)
