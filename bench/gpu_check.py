"""A GPU check for a machine with an NVIDIA card: NVML through Tandem's exporter under load,
and the card's measured memory bandwidth against the emulator profiles' batch-1 bound.

    python -m bench.gpu_check --seconds 8 --json gpu_check.json

1. Serves the `tandem_` exporter with NVML on, scrapes it idle, then every half second while
   a bf16 matrix-product loop runs, so the dashboard path (NVML -> exporter -> /metrics) is
   checked on a real GPU, not only its "absent" branch.
2. Measures HBM bandwidth three ways: a device-to-device copy (bytes read + written), a
   read-only reduction, and a batch-1 GEMV chain over `--weights-gb` of bf16 matrices (what a
   decode step of an 8B model reads). The GEMV chain's time is the batch-1 decode floor the
   `h100-*-coder-8b` profiles must not undercut; it is also timed at batch 8, 64 and 256.
3. Times a prefill-shaped bf16 GEMM (8192 tokens x 4096 -> 14336) to give the fraction of
   the card's peak that prefill can reach.

Needs torch with CUDA (not a Tandem dependency: imported at run time).
"""

from __future__ import annotations

import argparse
import importlib
import json
import threading
import time
import urllib.request
from typing import Any

from routing.exporter import TandemMetrics

_GPU_SERIES = (
    "tandem_gpu_utilization_percent",
    "tandem_gpu_memory_used_bytes",
    "tandem_gpu_memory_total_bytes",
)


def _scrape(port: int) -> dict[str, float]:
    """The exporter's GPU series (first GPU), as name -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in _GPU_SERIES:
            if line.startswith(name + "{") and name not in out:
                out[name] = float(line.rsplit(" ", 1)[1])
    return out


def _timed(torch: Any, fn: Any, repeats: int) -> float:
    """Mean seconds of `fn()` over `repeats` runs after two warm-ups (CUDA events)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end)) / 1000.0 / repeats


def _matmul_load(torch: Any, seconds: float, result: dict[str, float]) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        n += 20
    elapsed = time.perf_counter() - t0
    result["matmul_tflops"] = 2 * 8192**3 * n / elapsed / 1e12
    result["matmul_seconds"] = elapsed


def nvml_under_load(torch: Any, seconds: float) -> dict[str, Any]:
    """Exporter readings idle and while a matmul loop runs."""
    metrics = TandemMetrics(gpu=True)
    port = metrics.serve(0)
    try:
        idle = _scrape(port)
        load: dict[str, float] = {}
        worker = threading.Thread(target=_matmul_load, args=(torch, seconds, load))
        worker.start()
        samples = []
        while worker.is_alive():
            time.sleep(0.5)
            samples.append(_scrape(port))
        worker.join()
        after = _scrape(port)
    finally:
        metrics.close()
    utils = [s.get("tandem_gpu_utilization_percent", -1.0) for s in samples]
    return {
        "exporter_port": port,
        "idle": idle,
        "under_load_util_percent": utils,
        "under_load_max_util_percent": max(utils, default=None),
        "under_load_memory_used_bytes": max(
            (s.get("tandem_gpu_memory_used_bytes", 0.0) for s in samples), default=None
        ),
        "after": after,
        **load,
    }


def _copy_and_read(torch: Any) -> dict[str, float]:
    """Device-to-device copy (bytes read + written) and a read-only reduction of 2 GiB."""
    src = torch.empty(2**30, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    nbytes = src.numel() * 2
    copy_s = _timed(torch, lambda: dst.copy_(src), 20)
    sum_s = _timed(torch, lambda: src.sum(dtype=torch.float32), 20)
    return {"copy_tb_s": 2 * nbytes / copy_s / 1e12, "read_tb_s": nbytes / sum_s / 1e12}


def _gemv_chain(torch: Any, weights_gb: float) -> dict[str, Any]:
    """A decode step's weight read: x @ W over `weights_gb` of bf16 [14336 x 4096] matrices."""
    hidden, ffn = 4096, 14336
    per = hidden * ffn * 2
    count = max(1, round(weights_gb * 1e9 / per))
    weights = [
        torch.empty(ffn, hidden, device="cuda", dtype=torch.bfloat16).normal_(std=0.02)
        for _ in range(count)
    ]
    steps: dict[str, float] = {}
    for batch in (1, 8, 64, 256):
        x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)

        def chain(x: Any = x) -> None:
            for w in weights:
                torch.nn.functional.linear(x, w)

        steps[str(batch)] = _timed(torch, chain, 10)
    total_bytes = count * per
    return {
        "gemv_weight_bytes": total_bytes,
        "gemv_step_s_by_batch": steps,
        "gemv_batch1_tb_s": total_bytes / steps["1"] / 1e12,
    }


def _prefill_gemm(torch: Any) -> float:
    """TFLOP/s of a prefill-shaped bf16 GEMM: 8192 tokens x 4096 -> 14336."""
    a = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    gemm_s = _timed(torch, lambda: torch.nn.functional.linear(a, w), 20)
    return 2 * 8192 * 4096 * 14336 / gemm_s / 1e12


def bandwidth(torch: Any, weights_gb: float) -> dict[str, Any]:
    """HBM bandwidth by copy, reduction and a batch-1 GEMV chain; prefill GEMM TFLOP/s."""
    out: dict[str, Any] = _copy_and_read(torch)
    torch.cuda.empty_cache()
    out.update(_gemv_chain(torch, weights_gb))
    torch.cuda.empty_cache()
    out["prefill_gemm_tflops"] = _prefill_gemm(torch)
    return out


def profile_floor(measured_tb_s: float) -> dict[str, Any]:
    """Each H100 emulator profile's batch-1 step against weight bytes / measured bandwidth."""
    from serving.emulator.profiles import PROFILES

    weights = {"coder-8b": 16.4e9, "reasoning-32b": 65.5e9}
    out: dict[str, Any] = {}
    for name, profile in sorted(PROFILES.items()):
        kind = next((k for k in weights if name.endswith(k)), None)
        if kind is None or not name.startswith("h100"):
            continue
        step = profile.step_s(0, 1, 1024)
        floor = weights[kind] / (measured_tb_s * 1e12)
        out[name] = {"batch1_step_ms": step * 1e3, "floor_ms_at_measured_bw": floor * 1e3}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print them and write them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="matmul load duration")
    parser.add_argument("--weights-gb", type=float, default=16.4, help="GEMV chain size")
    parser.add_argument("--json", dest="json_path", help="write the readings here")
    args = parser.parse_args(argv)
    torch: Any = importlib.import_module("torch")
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device")
        return 2
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "memory_total_bytes": torch.cuda.get_device_properties(0).total_memory,
        "torch": torch.__version__,
    }
    report["nvml"] = nvml_under_load(torch, args.seconds)
    report["bandwidth"] = bandwidth(torch, args.weights_gb)
    report["profiles"] = profile_floor(report["bandwidth"]["gemv_batch1_tb_s"])
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
