"""Prefix-cache figures from vLLM `/metrics` pages of every naming era, and over a run."""

from __future__ import annotations

import pytest

from bench.sampler import MetricsSampler
from routing.endpoints import Replica
from routing.vllm_metrics import ServerSnapshot, parse_metrics, prefix_hit_rate_between

_LOAD = (
    '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} 2.0\n'
    '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} 0.0\n'
)


def _v1_page(queries: float, hits: float) -> str:
    """A current V1 page: token counters named `vllm:prefix_cache_*`."""
    return _LOAD + (
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in tokens.\n"
        "# TYPE vllm:prefix_cache_queries_total counter\n"
        f'vllm:prefix_cache_queries_total{{model_name="m",engine="0"}} {queries}\n'
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in tokens.\n"
        "# TYPE vllm:prefix_cache_hits_total counter\n"
        f'vllm:prefix_cache_hits_total{{model_name="m",engine="0"}} {hits}\n'
    )


def _early_v1_page(queries: float, hits: float) -> str:
    """The first V1 releases: the same counters named `vllm:gpu_prefix_cache_*`."""
    return _LOAD + (
        "# TYPE vllm:gpu_prefix_cache_queries counter\n"
        f'vllm:gpu_prefix_cache_queries_total{{model_name="m"}} {queries}\n'
        f'vllm:gpu_prefix_cache_queries_created{{model_name="m"}} 1.7e9\n'
        "# TYPE vllm:gpu_prefix_cache_hits counter\n"
        f'vllm:gpu_prefix_cache_hits_total{{model_name="m"}} {hits}\n'
    )


def _v0_page(rate: float) -> str:
    """The V0 engine: a block hit-rate gauge since start, GPU and CPU."""
    return _LOAD + (
        "# HELP vllm:cpu_prefix_cache_hit_rate CPU prefix cache block hit rate.\n"
        "# TYPE vllm:cpu_prefix_cache_hit_rate gauge\n"
        'vllm:cpu_prefix_cache_hit_rate{model_name="m"} -1.0\n'
        "# HELP vllm:gpu_prefix_cache_hit_rate GPU prefix cache block hit rate.\n"
        "# TYPE vllm:gpu_prefix_cache_hit_rate gauge\n"
        f'vllm:gpu_prefix_cache_hit_rate{{model_name="m"}} {rate}\n'
    )


def test_v1_counters_are_read() -> None:
    snap = parse_metrics(_v1_page(1000, 250), 0.0)
    assert (snap.prefix_cache_queries_total, snap.prefix_cache_hits_total) == (1000, 250)
    assert snap.prefix_cache_hit_rate_since_start is None
    assert snap.prefix_hit_rate == pytest.approx(0.25)


def test_early_v1_counter_names_are_read() -> None:
    snap = parse_metrics(_early_v1_page(800, 600), 0.0)
    assert (snap.prefix_cache_queries_total, snap.prefix_cache_hits_total) == (800, 600)
    assert snap.prefix_hit_rate == pytest.approx(0.75)


def test_a_page_with_both_counter_names_is_not_counted_twice() -> None:
    both = _v1_page(1000, 400) + _early_v1_page(1000, 400).removeprefix(_LOAD)
    snap = parse_metrics(both, 0.0)
    assert (snap.prefix_cache_queries_total, snap.prefix_cache_hits_total) == (1000, 400)


def test_v0_gauge_is_read_and_the_cpu_gauge_ignored() -> None:
    snap = parse_metrics(_v0_page(0.6), 0.0)
    assert snap.prefix_cache_queries_total == 0
    assert snap.prefix_cache_hit_rate_since_start == pytest.approx(0.6)
    assert snap.prefix_hit_rate == pytest.approx(0.6)


def test_v0_gauges_of_several_engines_average() -> None:
    page = _LOAD + (
        'vllm:gpu_prefix_cache_hit_rate{model_name="m",engine="0"} 0.2\n'
        'vllm:gpu_prefix_cache_hit_rate{model_name="m",engine="1"} 0.6\n'
    )
    assert parse_metrics(page, 0.0).prefix_cache_hit_rate_since_start == pytest.approx(0.4)


def test_rate_over_a_run_is_the_counters_increase() -> None:
    start = parse_metrics(_v1_page(10_000, 9_000), 0.0)  # a warm server: 90% before the run
    end = parse_metrics(_v1_page(14_000, 10_000), 60.0)
    assert prefix_hit_rate_between([(start, end)]) == pytest.approx(0.25)


def test_rate_over_a_run_sums_the_replicas_tokens() -> None:
    a = (parse_metrics(_v1_page(0, 0), 0.0), parse_metrics(_v1_page(1000, 900), 1.0))
    b = (parse_metrics(_early_v1_page(0, 0), 0.0), parse_metrics(_early_v1_page(3000, 100), 1.0))
    assert prefix_hit_rate_between([a, b]) == pytest.approx(1000 / 4000)


def test_v0_servers_give_their_gauge_since_start() -> None:
    start = parse_metrics(_v0_page(0.0), 0.0)
    end = parse_metrics(_v0_page(0.7), 60.0)
    assert prefix_hit_rate_between([(start, end)]) == pytest.approx(0.7)


def test_no_queries_failed_scrapes_or_a_restart_give_no_rate() -> None:
    idle = parse_metrics(_v1_page(500, 100), 0.0)
    assert prefix_hit_rate_between([(idle, idle)]) is None
    failed = ServerSnapshot.failed(1.0, "HTTP 500")
    assert prefix_hit_rate_between([(idle, failed)]) is None
    restarted = parse_metrics(_v1_page(50, 10), 2.0)
    assert prefix_hit_rate_between([(idle, restarted)]) is None
    assert prefix_hit_rate_between([]) is None


def test_the_real_server_bench_reads_each_roles_rate_from_its_first_and_last_samples() -> None:
    replica = Replica(url="http://h/v1", model="m", gpu="gpu1")
    sampler = MetricsSampler({"coder": [replica], "reasoning": [replica]})
    sampler.samples["coder"] = [
        [
            ServerSnapshot.failed(0.0, "connection refused"),
            parse_metrics(_v1_page(1000, 500), 1.0),
            parse_metrics(_v1_page(1500, 600), 2.0),
            parse_metrics(_v1_page(3000, 1700), 3.0),
        ]
    ]
    sampler.samples["reasoning"] = [[parse_metrics(_v0_page(0.1), 0.0)]]
    assert sampler.prefix_hit_rate("coder") == pytest.approx(1200 / 2000)
    assert sampler.prefix_hit_rate("reasoning") == pytest.approx(0.1)
