"""The fit check: weights + activations + KV cache against the memory budget."""

from __future__ import annotations

import pytest

from serving.fit import GIB, MODELS, check_profile, check_role
from serving.launch import Profile, RoleServer, load_profile


def _server(model: str, **overrides: object) -> RoleServer:
    fields: dict[str, object] = {
        "model": model,
        "served_name": "m",
        "port": 8001,
        "gpu": 0,
        "gpu_memory_utilization": 0.9,
        "max_model_len": 32768,
        "max_num_seqs": 16,
        "max_num_batched_tokens": 16384,
        "expected_context_tokens": 4096,
    }
    fields.update(overrides)
    return RoleServer.model_validate(fields)


def test_h100_pair_fits_with_the_numbers_in_the_report() -> None:
    report = check_profile(load_profile("h100-pair"))
    assert report.ok, report.render()
    reasoning, coder = report.roles
    assert reasoning.weights_gib == pytest.approx(32.76e9 * 2 / GIB)  # BF16: 2 bytes/param
    # Qwen2.5-32B: 64 layers x 2 (K, V) x 8 KV heads x 128 x 2 bytes = 256 KiB per token.
    assert reasoning.kv_bytes_per_token == 64 * 2 * 8 * 128 * 2
    assert reasoning.kv_tokens_fit >= reasoning.kv_tokens_needed == 16 * 4096
    assert coder.seqs_fit_at_expected >= 64
    assert "FIT" in report.render()


def test_full_deepseek_r1_on_one_card_is_refused_naming_the_numbers() -> None:
    fit = check_role("reasoning", _server("deepseek-ai/DeepSeek-R1"), budget_gib=0.9 * 93.5)
    assert not fit.ok
    assert fit.kv_tokens_fit == 0
    message = fit.problems[0]
    assert "1249.8 GiB" in message and "84.2 GiB" in message  # 671e9 x 2 bytes vs 0.9 x 93.5


def test_too_many_sequences_for_the_kv_cache_reports_what_fits() -> None:
    fit = check_role(
        "reasoning",
        _server("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", expected_context_tokens=32768),
        budget_gib=0.9 * 93.5,
    )
    assert not fit.ok
    assert 0 < fit.seqs_fit_at_expected < 16
    assert f"{fit.kv_tokens_fit:,} tokens" in fit.problems[0]
    assert f"{fit.seqs_fit_at_expected} sequences" in fit.problems[0]


def test_kv_cache_smaller_than_one_max_model_len_sequence_is_refused() -> None:
    fit = check_role(
        "reasoning",
        _server("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", gpu_memory_utilization=0.72),
        budget_gib=0.72 * 93.5,
    )
    assert not fit.ok
    assert "refuse to start" in fit.problems[0]


def test_mla_kv_cache_is_one_latent_per_layer() -> None:
    # DeepSeek-R1 caches kv_lora_rank 512 + rope 64 per layer, not 2 x heads x head_dim.
    assert MODELS["deepseek-ai/DeepSeek-R1"].kv_bytes_per_token(2) == 61 * 576 * 2


def test_unknown_model_and_bad_gpu_layout_are_reported() -> None:
    profile = load_profile("h100-pair")
    data = profile.model_dump()
    data["roles"]["coder"]["model"] = "Qwen/Qwen3-8B-Coder"  # the seed's id: not a real model
    data["roles"]["coder"]["gpu"] = 0  # both servers on GPU 0: 0.9 + 0.95 > 1
    report = check_profile(Profile.model_validate(data))
    problems = " | ".join(report.all_problems())
    assert not report.ok
    assert "no architecture data for 'Qwen/Qwen3-8B-Coder'" in problems
    assert "GPU 0" in problems and "1.85" in problems


def test_max_model_len_beyond_the_model_is_refused() -> None:
    fit = check_role(
        "coder", _server("Qwen/Qwen2.5-Coder-7B-Instruct", max_model_len=65536), 0.95 * 93.5
    )
    assert any("max_position_embeddings 32768" in p for p in fit.problems)


def test_cpu_profile_checks_kv_space_only() -> None:
    report = check_profile(load_profile("cpu-tiny"))
    assert report.ok, report.render()
    tiny = report.roles[0]
    assert tiny.weights_gib == 0.0
    assert tiny.kv_bytes_per_token == 2 * 2 * 1 * 64 * 2  # layers x (K, V) x heads x dim x 2
    assert tiny.kv_tokens_fit == GIB // tiny.kv_bytes_per_token
