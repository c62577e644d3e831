"""The profiles' shape and bounds, and cpu-tiny's measured points, on a virtual clock.

The H100 profiles' published points are checked in test_emulator_calibration.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import typer

from cli.app import main as tandem
from cli.emulate import profile_arg
from serving.clock import run
from serving.emulator.engine import CHARS_PER_TOKEN, Engine
from serving.emulator.profiles import (
    PROFILES,
    Profile,
    dump_profile_file,
    saturated_time_s,
    solo_latency_s,
)


def _prompt(tag: str, tokens: int) -> str:
    return (f"{tag}: " + "x" * tokens * CHARS_PER_TOKEN)[: tokens * CHARS_PER_TOKEN]


async def _closed_loop(
    profile: Profile, concurrency: int, prompt_tokens: int, output_tokens: int, per_client: int
) -> float:
    """Output tokens per second with `concurrency` clients each sending requests back to back."""
    engine = Engine(profile)
    loop = asyncio.get_running_loop()

    async def client(c: int) -> None:
        for i in range(per_client):
            await engine.submit(_prompt(f"c{c} r{i}", prompt_tokens), output_tokens).result()

    start = loop.time()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    elapsed = loop.time() - start
    await engine.aclose()
    return concurrency * per_client * output_tokens / elapsed


@pytest.mark.parametrize(
    ("concurrency", "reference"), [(1, 896), (4, 3647), (16, 10886), (32, 15092), (64, 16659)]
)
def test_cpu_tiny_matches_measured_vllm_cpu(concurrency: int, reference: float) -> None:
    tps = run(_closed_loop(PROFILES["cpu-tiny"], concurrency, 32, 256, 4), virtual=True)
    assert tps == pytest.approx(reference, rel=0.15)


def test_nvl_profiles_are_the_sxm_fit_moved_by_bandwidth_and_flops() -> None:
    sxm, nvl = PROFILES["h100-sxm-coder-8b"], PROFILES["h100-nvl-coder-8b"]
    bandwidth, flops = 3.35 / 3.9, 989 / 835
    assert nvl.base_s == pytest.approx(sxm.base_s * bandwidth)
    assert nvl.context_token_s == pytest.approx(sxm.context_token_s * bandwidth)
    assert nvl.prefill_token_s == pytest.approx(sxm.prefill_token_s * flops)
    assert nvl.decode_seq_s == pytest.approx(sxm.decode_seq_s * flops)
    assert nvl.kv_cache_tokens > sxm.kv_cache_tokens  # 94 GB vs 80 GB
    for profile in (sxm, nvl):
        # vLLM V1's H100 defaults; c=512 in the calibration needs max_num_seqs >= 512.
        assert (profile.max_num_seqs, profile.max_num_batched_tokens) == (1024, 8192)


@pytest.mark.parametrize("card", ["sxm", "nvl"])
def test_reasoning_32b_is_four_times_the_coder_and_has_a_small_cache(card: str) -> None:
    coder, reasoning = PROFILES[f"h100-{card}-coder-8b"], PROFILES[f"h100-{card}-reasoning-32b"]
    assert reasoning.base_s == pytest.approx(4 * coder.base_s)
    assert reasoning.prefill_token_s == pytest.approx(4 * coder.prefill_token_s)
    assert reasoning.context_token_s == pytest.approx(coder.context_token_s * 262_144 / 147_456)
    assert solo_latency_s(reasoning, 1000, 1000) == pytest.approx(
        4 * solo_latency_s(coder, 1000, 1000), rel=0.1
    )
    assert 10_000 < reasoning.kv_cache_tokens < 100_000
    assert reasoning.reasoning and not coder.reasoning
    coder_tps = run(_closed_loop(coder, 1, 1000, 1000, 1), virtual=True)
    tps = run(_closed_loop(reasoning, 1, 1000, 1000, 1), virtual=True)
    assert tps == pytest.approx(coder_tps / 4, rel=0.1)


def test_every_profile_documents_its_source() -> None:
    assert {
        "h100-nvl-coder-8b",
        "h100-nvl-reasoning-32b",
        "h100-sxm-coder-8b",
        "h100-sxm-reasoning-32b",
        "h100-coder-8b",
        "h100-reasoning-32b",
        "cpu-tiny",
        "cpu-tiny-reasoning",
    } <= set(PROFILES)
    for profile in PROFILES.values():
        assert len(profile.source) > 40
        assert profile.kv_cache_tokens % profile.block_size == 0
        assert profile.max_model_len <= profile.kv_cache_tokens
    for name in ("h100-nvl-coder-8b", "h100-sxm-reasoning-32b"):
        assert f"serving/emulator/calibration/{name}.yaml" in PROFILES[name].source
    assert PROFILES["cpu-tiny"].max_model_len == 4096
    assert PROFILES["cpu-tiny-reasoning"].reasoning


def test_emulate_cli_takes_names_aliases_and_profile_files(tmp_path: Path) -> None:
    assert profile_arg("h100-coder-8b") is PROFILES["h100-nvl-coder-8b"]
    assert profile_arg("h100-sxm-reasoning-32b") is PROFILES["h100-sxm-reasoning-32b"]
    custom = dataclasses.replace(PROFILES["cpu-tiny"], name="mine", base_s=2e-3)
    path = tmp_path / "mine.yaml"
    dump_profile_file(custom, path)
    assert profile_arg(str(path)) == custom
    with pytest.raises(typer.BadParameter, match="unknown emulator profile 'h100'"):
        profile_arg("h100")


def test_emulate_cli_refuses_an_unknown_profile_before_serving(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert tandem(["emulate", "--profile", "h200-coder-8b", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown emulator profile 'h200-coder-8b'" in err
    assert "known:" in err and "h100-nvl-coder-8b" in err


async def _serve(profile: Profile, requests: list[tuple[str, int]]) -> float:
    engine = Engine(profile)
    loop = asyncio.get_running_loop()
    start = loop.time()
    handles = [engine.submit(text, out) for text, out in requests]
    await asyncio.gather(*(h.result() for h in handles))
    await engine.aclose()
    return loop.time() - start


@pytest.mark.parametrize("name", ["cpu-tiny", "h100-coder-8b", "h100-reasoning-32b"])
@pytest.mark.parametrize(
    ("prompt_tokens", "output_tokens"), [(1, 1), (16, 5), (777, 64), (9000, 40)]
)
def test_solo_latency_is_what_the_engine_does_alone(
    name: str, prompt_tokens: int, output_tokens: int
) -> None:
    profile = PROFILES[name]
    prompt_tokens = min(prompt_tokens, profile.max_model_len - output_tokens)
    measured = run(_serve(profile, [(_prompt("solo", prompt_tokens), output_tokens)]), virtual=True)
    expected = solo_latency_s(profile, prompt_tokens, output_tokens)
    assert measured == pytest.approx(expected, rel=1e-3, abs=1e-5)


def _request_sets() -> list[tuple[str, list[tuple[str, int]], list[tuple[int, int, int]]]]:
    sets = []
    # Many small distinct requests: bounded by max_num_seqs.
    small = [(_prompt(f"s{i}", 40), 50 + i % 7) for i in range(100)]
    sets.append(("cpu-tiny", small, [(40, o, 0) for _, o in small]))
    # Long prompts: bounded by the token budget and prefill work.
    long = [(_prompt(f"l{i}", 6000), 200) for i in range(24)]
    sets.append(("h100-coder-8b", long, [(6000, 200, 0) for _ in long]))
    # A shared prefix: every request but the first finds it cached.
    shared = "s" * (2048 * CHARS_PER_TOKEN)
    pref = [(shared + _prompt(f"p{i}", 500), 300) for i in range(30)]
    sets.append(("h100-coder-8b", pref, [(2548, 300, 0 if i == 0 else 2048) for i in range(30)]))
    # Over-admission on the small reasoning cache: preemptions.
    big = [(_prompt(f"b{i}", 3000), 1500) for i in range(40)]
    sets.append(("h100-reasoning-32b", big, [(3000, 1500, 0) for _ in big]))
    return sets


@pytest.mark.parametrize("case", range(4))
def test_saturated_time_is_a_lower_bound_on_the_engine(case: int) -> None:
    name, requests, shapes = _request_sets()[case]
    profile = PROFILES[name]
    measured = run(_serve(profile, requests), virtual=True)
    bound = saturated_time_s(profile, shapes)
    assert bound <= measured
    assert bound > 0.5 * measured  # and not a trivial one


def _roofline_toy(**changes: float) -> Profile:
    """cpu-tiny under the roofline model, with a KV read so long batches turn read-bound."""
    fields: dict[str, float] = {"context_token_s": 2e-7, "prefill_token_s": 100e-6, **changes}
    return dataclasses.replace(
        PROFILES["cpu-tiny"], name="roofline-toy", step_model="roofline", **fields
    )


def test_roofline_step_pays_the_larger_of_reads_and_compute() -> None:
    additive = dataclasses.replace(PROFILES["cpu-tiny"], context_token_s=2e-7, prefill_token_s=1e-4)
    roofline = dataclasses.replace(additive, step_model="roofline")
    base, dec = additive.base_s, additive.decode_seq_s
    # Read-bound: 2 decodes (0.2 ms of matmuls) under 1.04 ms of weights and 0.2 ms of KV.
    assert roofline.step_s(0, 2, 1000) == pytest.approx(base + 2e-4 + 2 * dec)
    assert roofline.step_s(0, 2, 1000) == additive.step_s(0, 2, 1000)
    # Compute-bound: 100 prompt tokens and 2 decodes, 10.2 ms of matmuls, hide the reads.
    assert roofline.step_s(100, 2, 1000) == pytest.approx(102 * 1e-4 + 2 * dec)
    assert additive.step_s(100, 2, 1000) == pytest.approx(base + 2e-4 + 100 * 1e-4 + 2 * dec)
    guided = dataclasses.replace(roofline, guided_seq_s=1e-3)
    assert guided.step_s(100, 2, 1000, 1) == pytest.approx(roofline.step_s(100, 2, 1000) + 1e-3)


@pytest.mark.parametrize("model", ["additive", "roofline"])
@pytest.mark.parametrize(("seqs", "context"), [(2, 100), (32, 32 * 50), (32, 32 * 2000)])
def test_decode_step_ends_are_the_sum_of_the_steps(model: str, seqs: int, context: int) -> None:
    profile = dataclasses.replace(_roofline_toy(), step_model=model)
    ends = profile.decode_step_ends_s(5.0, seqs, context, 1, 400)
    expected, end = [], 5.0
    for m in range(400):
        end += profile.step_s(0, seqs, context + seqs * m, 1)
        expected.append(end)
    assert ends == pytest.approx(expected, rel=1e-12)


def test_roofline_profile_coalesces_steps_into_the_same_schedule() -> None:
    # 32 decodes: 3.2 ms of matmuls over a 1.04 ms weight read, until their KV read (0.2 us a
    # token) overtakes it; coalesced steps must cross that point as single steps do.
    profile = _roofline_toy()
    requests = [(_prompt(f"r{i}", 40 + 10 * i), 600 + 7 * i) for i in range(32)]

    async def serve(max_coalesced_steps: int | None) -> Engine:
        engine = Engine(profile, max_coalesced_steps=max_coalesced_steps)
        handles = [engine.submit(text, out) for text, out in requests]
        await asyncio.gather(*(h.result() for h in handles))
        await engine.aclose()
        return engine

    bulk = run(serve(None), virtual=True)
    single = run(serve(1), virtual=True)
    assert bulk.steps == single.steps
    for x, y in zip(bulk.records, single.records, strict=True):
        assert x.finish_s == pytest.approx(y.finish_s, abs=1e-6)
        assert x.first_token_s == pytest.approx(y.first_token_s, abs=1e-6)
    assert profile.step_s(0, 32, 32 * 50) > profile.step_s(0, 0, 32 * 50) + 2e-3  # compute-bound
    assert profile.step_s(0, 32, 32 * 900) == pytest.approx(
        profile.base_s + profile.context_token_s * 32 * 900 + 32 * profile.decode_seq_s
    )  # read-bound by the end


@pytest.mark.parametrize("output_tokens", [1, 2, 50])
def test_solo_latency_holds_for_a_compute_bound_roofline_decode(output_tokens: int) -> None:
    profile = _roofline_toy(prefill_token_s=3e-3)  # one token's matmuls outlast the reads
    measured = run(_serve(profile, [(_prompt("solo", 300), output_tokens)]), virtual=True)
    assert measured == pytest.approx(solo_latency_s(profile, 300, output_tokens), rel=1e-6)


def test_step_model_is_checked_and_survives_a_profile_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="step_model must be one of"):
        dataclasses.replace(PROFILES["cpu-tiny"], step_model="max")  # type: ignore[arg-type]
    path = tmp_path / "roofline.yaml"
    dump_profile_file(_roofline_toy(), path)
    assert "step_model: roofline" in path.read_text(encoding="utf-8")
    assert profile_arg(str(path)) == _roofline_toy()
    assert PROFILES["cpu-tiny"].step_model == "additive"
