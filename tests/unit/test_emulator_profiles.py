"""The profiles reproduce their reference points when the engine is driven on a virtual clock."""

from __future__ import annotations

import asyncio

import pytest

from serving.clock import run
from serving.emulator.engine import CHARS_PER_TOKEN, Engine
from serving.emulator.profiles import PROFILES, Profile, saturated_time_s, solo_latency_s


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


@pytest.mark.parametrize(("concurrency", "reference"), [(1, 215), (50, 8018), (200, 13348)])
def test_h100_coder_matches_nim_reference(concurrency: int, reference: float) -> None:
    # NIM's table is ISL 1000 / OSL 1000.
    tps = run(_closed_loop(PROFILES["h100-coder-8b"], concurrency, 1000, 1000, 2), virtual=True)
    assert tps == pytest.approx(reference, rel=0.15)


def test_h100_coder_step_terms_match_blis_and_hbm_bound() -> None:
    coder = PROFILES["h100-coder-8b"]
    assert coder.prefill_token_s == pytest.approx(17.25e-6)
    assert coder.decode_seq_s == pytest.approx(6.0e-6)
    assert 4.0e-3 < coder.step_s(0, 1, 1000) < 4.8e-3 * 1.1  # about the 16 GB / 3.35 TB/s bound
    assert coder.max_num_batched_tokens == 8192
    assert 400_000 < coder.kv_cache_tokens < 520_000


def test_reasoning_32b_is_four_times_the_coder_and_has_a_small_cache() -> None:
    coder, reasoning = PROFILES["h100-coder-8b"], PROFILES["h100-reasoning-32b"]
    assert reasoning.base_s == pytest.approx(4 * coder.base_s)
    assert reasoning.prefill_token_s == pytest.approx(4 * coder.prefill_token_s)
    assert solo_latency_s(reasoning, 1000, 1000) == pytest.approx(
        4 * solo_latency_s(coder, 1000, 1000), rel=0.1
    )
    assert 10_000 < reasoning.kv_cache_tokens < 100_000
    assert reasoning.reasoning and not coder.reasoning
    tps = run(_closed_loop(reasoning, 1, 1000, 1000, 1), virtual=True)
    assert tps == pytest.approx(215 / 4, rel=0.15)


def test_every_profile_documents_its_source() -> None:
    assert {"h100-coder-8b", "h100-reasoning-32b", "cpu-tiny", "cpu-tiny-reasoning"} <= set(
        PROFILES
    )
    for profile in PROFILES.values():
        assert len(profile.source) > 40
        assert profile.kv_cache_tokens % profile.block_size == 0
        assert profile.max_model_len <= profile.kv_cache_tokens
    assert PROFILES["cpu-tiny"].max_model_len == 4096
    assert PROFILES["cpu-tiny-reasoning"].reasoning


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
