"""The benchmark: deterministic on the virtual clock, and a real-time smoke run over HTTP."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from bench.cli import main as bench_main

pytestmark = pytest.mark.integration

SMALL = ["--workload", "adhoc", "--sessions", "2", "--tasks", "4", "--quiet"]


def test_virtual_bench_is_deterministic_and_complete(tmp_path: Path) -> None:
    outs = []
    for i in range(2):
        path = tmp_path / f"r{i}.json"
        args = [*SMALL, "--policies", "seed-current,seed-phase3,fixed-8", "--json", str(path)]
        if i == 0:
            args += ["--plot", str(tmp_path / "r.png")]
        assert bench_main(args) == 0
        outs.append(path.read_text())
    assert outs[0] == outs[1]
    report = json.loads(outs[0])
    assert report["workload"] == "adhoc" and report["clock"] == "virtual"
    keys = {
        "policy", "makespan_s", "lower_bound_s", "efficiency", "tasks_per_s",
        "session_latency_mean_s", "session_latency_p50_s", "session_latency_p95_s",
        "gpu_busy", "tokens_per_s", "preemptions", "sessions_ok", "sessions_failed",
    }  # fmt: skip
    for result in report["results"]:
        assert keys <= set(result)
        assert result["sessions_ok"] == 2 and result["sessions_failed"] == 0
        assert 0 < result["efficiency"] <= 1.0 + 1e-9
        assert result["lower_bound_s"] <= result["makespan_s"]
        assert set(result["gpu_busy"]) == {"reasoning", "coder"}
        assert all(0 < v <= 1 for v in result["gpu_busy"].values())
    by = {r["policy"]: r for r in report["results"]}
    # Sessions one after another cannot beat the same work pipelined.
    assert by["seed-phase3"]["makespan_s"] < by["seed-current"]["makespan_s"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_real_clock_smoke_over_loopback_http(tmp_path: Path) -> None:
    path = tmp_path / "real.json"
    port = _free_port()
    code = bench_main(
        [
            "--metrics-port", str(port),
            "--workload", "adhoc", "--sessions", "1", "--tasks", "2", "--quiet",
            "--policies", "fixed-4", "--clock", "real",
            "--reasoning-profile", "cpu-tiny-reasoning", "--coder-profile", "cpu-tiny",
            "--max-tokens", "plan=48,code=32,review=48", "--json", str(path),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(path.read_text())["results"][0]
    assert result["sessions_ok"] == 1
    assert result["makespan_s"] > 0 and result["tokens_per_s"]["coder"] > 0
    # The benchmark served the router's series while it ran (the exporter stays up after).
    page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    admitted = [
        line for line in page.splitlines()
        if line.startswith("tandem_") and "admitted" in line and 'role="coder"' in line
    ]  # fmt: skip
    assert admitted and float(admitted[0].rsplit(" ", 1)[1]) >= 2
