"""Launch profiles: validation and the exact command lines they turn into."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cli.app import main as tandem
from serving.launch import (
    PROFILES_DIR,
    Profile,
    build_command,
    build_env,
    load_profile,
    profile_path,
    shell_line,
)

OBSOLETE_V0_FLAGS = ("--enable-chunked-prefill", "--enable-prefix-caching")


def test_every_profile_file_validates() -> None:
    names = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    assert {"h100-pair", "cpu-tiny"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert set(profile.roles) == {"reasoning", "coder"}


def test_h100_pair_commands_are_vllm_serve_with_todays_flags() -> None:
    profile = load_profile("h100-pair")
    reasoning = build_command(profile, "reasoning")
    coder = build_command(profile, "coder")
    assert reasoning[:3] == ["vllm", "serve", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"]
    assert reasoning[reasoning.index("--port") + 1] == "8001"
    assert reasoning[reasoning.index("--reasoning-parser") + 1] == "deepseek_r1"
    assert reasoning[reasoning.index("--gpu-memory-utilization") + 1] == "0.9"
    assert coder[2] == "Qwen/Qwen2.5-Coder-7B-Instruct"
    assert coder[coder.index("--port") + 1] == "8002"
    assert coder[coder.index("--max-num-seqs") + 1] == "64"
    for flag in OBSOLETE_V0_FLAGS:
        assert flag not in reasoning and flag not in coder
    assert build_env(profile, "reasoning") == {"CUDA_VISIBLE_DEVICES": "0"}
    assert build_env(profile, "coder") == {"CUDA_VISIBLE_DEVICES": "1"}


def test_cpu_tiny_uses_the_module_entry_point_and_an_absolute_model_dir(tmp_path: Path) -> None:
    profile = load_profile("cpu-tiny")
    argv = build_command(profile, "coder", python="/venv/bin/python", repo_root=tmp_path)
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == str(tmp_path / "out" / "tiny-model")
    assert argv[argv.index("--served-model-name") + 1] == "tiny-coder"
    assert "--enforce-eager" in argv
    config = argv[argv.index("--structured-outputs-config") + 1]
    assert '"disable_any_whitespace":true' in config
    env = build_env(profile, "coder")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    line = shell_line(profile, "coder", python="/venv/bin/python")
    assert line.startswith("VLLM_CPU_KVCACHE_SPACE=1 ")
    assert '\'{"backend":"xgrammar","disable_any_whitespace":true}\'' in line  # quoted


def test_unknown_keys_are_rejected(tmp_path: Path) -> None:
    data = load_profile("cpu-tiny").model_dump()
    data["roles"]["coder"]["enable_chunked_prefill"] = True
    with pytest.raises(ValidationError):
        Profile.model_validate(data)


def test_profile_path_accepts_names_and_files(tmp_path: Path) -> None:
    assert profile_path("h100-pair") == PROFILES_DIR / "h100-pair.yaml"
    custom = tmp_path / "mine.yaml"
    assert profile_path(custom) == custom


def test_serve_print_checks_fit_then_prints_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert tandem(["serve", "--profile", "h100-pair", "--print"]) == 0
    out = capsys.readouterr().out
    assert "# fit check of profile h100-pair" in out
    assert "CUDA_VISIBLE_DEVICES=0 vllm serve deepseek-ai/DeepSeek-R1-Distill-Qwen-32B" in out
    assert "CUDA_VISIBLE_DEVICES=1 vllm serve Qwen/Qwen2.5-Coder-7B-Instruct" in out


def test_serve_print_fails_on_a_profile_that_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (PROFILES_DIR / "h100-pair.yaml").read_text()
    bad = tmp_path / "r1-full.yaml"
    bad.write_text(
        text.replace(
            "model: deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "model: deepseek-ai/DeepSeek-R1"
        )
    )
    assert tandem(["serve", "--profile", str(bad), "--print"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "vllm serve" not in out
