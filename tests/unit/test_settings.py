"""Settings: TANDEM_* environment, defaults, and a clear stop on invalid values."""

from __future__ import annotations

import subprocess
import sys

import pytest

from graph.settings import Settings, SettingsError, load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TANDEM_REASONING_URL", "TANDEM_CODER_URL", "TANDEM_MAX_PARALLEL_AGENTS"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings()
    assert s.max_parallel_agents == 25 and s.review_on == "reasoning"
    assert s.max_review_rounds == 2 and s.max_files == 40 and s.emulated
    ctx = s.run_context()
    assert ctx.max_files == 40 and ctx.workspace == "out"


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_REASONING_URL", "http://127.0.0.1:8001/v1/")
    monkeypatch.setenv("TANDEM_CODER_URL", "http://127.0.0.1:8002/v1")
    monkeypatch.setenv("TANDEM_REVIEW_ON", "coder")
    monkeypatch.setenv("TANDEM_MAX_PARALLEL_AGENTS", "64")
    s = Settings()
    assert s.reasoning_url == "http://127.0.0.1:8001/v1" and not s.emulated
    assert s.review_on == "coder" and s.max_parallel_agents == 64


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TANDEM_MAX_PARALLEL_AGENTS", "0"),
        ("TANDEM_REVIEW_ON", "gpu7"),
        ("TANDEM_MAX_FILES", "many"),
        ("TANDEM_LIMIT", "fixed-0"),
        ("TANDEM_REQUEST_TIMEOUT_S", "-1"),
        ("TANDEM_REASONING_URL", "ftp://x"),
    ],
)
def test_invalid_values_stop_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert name in str(err.value.code)


def test_one_url_without_the_other_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_REASONING_URL", "http://127.0.0.1:8001/v1")
    monkeypatch.delenv("TANDEM_CODER_URL", raising=False)
    with pytest.raises(SettingsError, match="TANDEM_CODER_URL"):
        load_settings()


def test_cli_stops_at_start_on_a_bad_value() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "graph.cli", "run", "x"],
        env={"TANDEM_MAX_REVIEW_ROUNDS": "-3", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "TANDEM_MAX_REVIEW_ROUNDS" in proc.stderr
