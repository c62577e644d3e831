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
