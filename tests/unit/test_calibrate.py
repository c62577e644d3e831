"""`serving.calibrate`: measuring an emulator on a virtual clock, the fit, the profile file."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest

from serving.calibrate import (
    TERMS,
    EngineLimits,
    Point,
    PointSpec,
    ServerInfo,
    WaveSample,
    blocker_tokens_for,
    build_profile,
    calibration_specs,
    emulate_points,
    expected_steps,
    fit_step_model,
    limits_for,
    nnls,
    point_features,
    wave_time_s,
)
from serving.emulator.profiles import PROFILES, Profile, get_profile

# A server whose five step terms all matter at the measured points.
GUIDED = {
    "type": "json_schema",
    "json_schema": {
        "name": "Probe",
        "schema": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
    },
}
KNOWN = replace(
    PROFILES["cpu-tiny"],
    name="known",
    base_s=2.0e-3,
    prefill_token_s=8.0e-6,
    decode_seq_s=40e-6,
    context_token_s=30e-9,
    guided_seq_s=1.5e-3,
    max_num_seqs=32,
    max_num_batched_tokens=2048,
    min_output_frac=1.0,
)


def _info(profile: Profile) -> ServerInfo:
    return ServerInfo(profile.served_model_name, profile.max_model_len, profile.kv_cache_tokens, 16)


def _limits(profile: Profile) -> EngineLimits:
    return limits_for(
        _info(profile),
        max_num_seqs=profile.max_num_seqs,
        max_num_batched_tokens=profile.max_num_batched_tokens,
    )


def test_calibrating_an_emulator_recovers_its_step_terms_and_writes_a_profile(
    tmp_path: Path,
) -> None:
    specs = calibration_specs(
        _info(KNOWN),
        levels=(1, 4, 16, 64),
        output_tokens=64,
        max_num_batched_tokens=KNOWN.max_num_batched_tokens,
        ttft_lengths=4,
        guided=True,
    )
    assert {s.kind for s in specs} == {"ttft", "itl"}
    assert len({s.prompt_tokens for s in specs if s.kind == "itl"}) == 2  # two contexts
    assert sum(s.guided for s in specs) == 1
    points = emulate_points(KNOWN, specs, guided_format=GUIDED)
    # Every wave reached the engine together: no wave was measured again.
    assert all(p.retries == 0 for p in points)
    fit = fit_step_model(points, _limits(KNOWN))
    for term in TERMS:
        assert fit.terms[term] == pytest.approx(getattr(KNOWN, term), rel=0.03), term
    assert fit.ttft_overhead_s < 0.05 * KNOWN.base_s  # the emulator has no HTTP overhead
    assert max(abs(r) for r in fit.residuals) < 0.01

    path = tmp_path / "calibrated.yaml"
    from serving.emulator.profiles import dump_profile_file

    profile = build_profile(
        fit, _limits(KNOWN), name="calibrated", served_model_name="m", role="reasoning",
        url="http://server/v1",
    )  # fmt: skip
    dump_profile_file(profile, path)
    loaded = get_profile(str(path))
    assert loaded == profile
    assert loaded.reasoning and loaded.reasoning_frac > 0
    assert loaded.max_num_seqs == KNOWN.max_num_seqs
    assert loaded.kv_cache_tokens == KNOWN.kv_cache_tokens
    assert "http://server/v1" in loaded.source and "itl c=16" in loaded.source


def test_a_profile_with_twice_the_decode_cost_misses_the_measured_points() -> None:
    specs = [PointSpec("itl", 32, c, 64) for c in (4, 16, 32)]
    measured = emulate_points(KNOWN, specs)
    wrong = emulate_points(replace(KNOWN, decode_seq_s=2 * KNOWN.decode_seq_s), specs)
    off = [w.value_s / m.value_s - 1 for w, m in zip(wrong, measured, strict=True)]
    assert off[-1] > 0.25  # at batch 32 the decode term is a third of the step
    assert off == sorted(off)  # and the miss grows with the batch


def test_features_are_the_coefficients_of_each_step_term() -> None:
    points = [
        Point(PointSpec("ttft", 500), 500, 1, 1.0, (1.0,), 0.0),
        Point(PointSpec("itl", 100, 8, 16), 100, 16, 1.0, (1.0,), 0.0),
        Point(PointSpec("itl", 100, 1, 16, guided=True), 100, 16, 1.0, (1.0,), 0.0),
    ]
    ttft, wave, guided = point_features(points, _limits(KNOWN))
    # A lone prompt: one step that prefills 500 tokens holding 500 tokens of context.
    assert ttft == pytest.approx([1.0, 500.0, 0.0, 500.0, 0.0], rel=1e-6, abs=1e-6)
    # Decode steps: each token after the first costs a step of 8 decodes; context grows.
    assert wave[0] > 0.99 and wave[1] == pytest.approx(0.0, abs=1e-6)
    assert wave[2] == pytest.approx(8.0, rel=0.01)
    assert 8 * 101 < wave[3] < 8 * 117
    assert wave[4] == pytest.approx(0.0, abs=1e-6)  # nothing guided in a plain wave
    # A lone guided request: every decode step carries one guided sequence.
    assert guided[2] == pytest.approx(1.0, rel=0.01) and guided[4] == pytest.approx(1.0, rel=0.01)


def test_expected_steps_match_the_emulator_for_waves_sent_together() -> None:
    spec = PointSpec("itl", 1000, 64, 16)
    # 32 seats: two waves of 32, each 32 x 1000 prompt tokens in 2048-token chunks.
    assert expected_steps(spec, 1000, _limits(KNOWN)) == 2 * (16 + 15)
    # Behind a blocker of 1,984 tokens: one more step.
    limits = _limits(KNOWN)
    assert blocker_tokens_for(limits) == 1984
    assert expected_steps(spec, 1000, limits, 1984) == 1 + 2 * (16 + 15)
    assert expected_steps(PointSpec("itl", 1000, 1, 16), 1000, limits, 1984) == 1 + 15


def test_without_guided_points_the_guided_term_stays_zero() -> None:
    specs = [PointSpec("ttft", 32), *(PointSpec("itl", 32, c, 32) for c in (1, 8))]
    fit = fit_step_model(emulate_points(KNOWN, specs), _limits(KNOWN))
    assert fit.terms["guided_seq_s"] == 0.0


def _brute_nnls(rows: list[list[float]], b: list[float]) -> float:
    """Best residual over a grid of non-negative x (a coarse reference)."""
    grid = [i / 20 for i in range(0, 61)]
    return min(
        sum((sum(r[k] * x[k] for k in range(2)) - t) ** 2 for r, t in zip(rows, b, strict=True))
        for x in itertools.product(grid, repeat=2)
    )


def test_nnls_recovers_exact_solutions_and_clamps_negative_ones() -> None:
    rows = [[1.0, 0.0, 2.0], [1.0, 1.0, 0.0], [1.0, 2.0, 1.0], [1.0, 3.0, 5.0]]
    x_true = [0.5, 0.0, 1.5]
    b = [sum(r[k] * x_true[k] for k in range(3)) for r in rows]
    assert nnls(rows, b) == pytest.approx(x_true, abs=1e-9)
    # The unconstrained least-squares answer has x[1] < 0: NNLS keeps x >= 0 and does at
    # least as well as any non-negative point of a grid.
    rows2 = [[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]]
    b2 = [3.0, 2.0, 1.0]
    x = nnls(rows2, b2)
    assert min(x) >= 0 and x[1] == 0.0
    residual = sum((r[0] * x[0] + r[1] * x[1] - t) ** 2 for r, t in zip(rows2, b2, strict=True))
    assert residual <= _brute_nnls(rows2, b2) + 1e-12
    assert x[0] == pytest.approx(2.0)


def test_fit_refuses_points_it_cannot_use() -> None:
    with pytest.raises(ValueError, match="no points"):
        fit_step_model([], _limits(KNOWN))
    bad = Point(PointSpec("itl", 32, 1, 8), 32, 8, 0.0, (0.0,), 0.0)
    with pytest.raises(ValueError, match="positive"):
        fit_step_model([bad], _limits(KNOWN))


def test_limits_need_a_kv_capacity() -> None:
    info = ServerInfo("m", 4096, None, None)
    with pytest.raises(ValueError, match="kv-cache-tokens"):
        limits_for(info)
    assert limits_for(info, kv_cache_tokens=65536).kv_cache_tokens == 65536


def test_the_step_model_over_the_engines_own_steps_gives_the_waves_time() -> None:
    """`wave_time_s` sums the step model over the steps the engine counted; on the emulator
    (whose /metrics counts its steps as vLLM's `vllm:iteration_tokens_total` does) it gives
    each wave's span."""
    specs = [PointSpec("itl", 32, c, 32) for c in (4, 64)]
    for point in emulate_points(KNOWN, specs):
        [sample] = point.samples
        assert isinstance(sample, WaveSample) and sample.iterations is not None
        predicted = wave_time_s(KNOWN, point.spec, sample)
        assert predicted == pytest.approx(sample.span_s, rel=0.005)
        # 32 seats: 64 requests are two waves, twice the steps.
        assert sample.iterations == (32 if point.spec.concurrency == 4 else 64)
