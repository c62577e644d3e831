"""Settings: TANDEM_* environment, defaults, and a clear stop on invalid values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from graph.settings import SettingsError, load_settings, redact


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TANDEM_REASONING_URL", "TANDEM_CODER_URL", "TANDEM_MAX_PARALLEL_AGENTS"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings()
    assert s.max_parallel_agents == 25 and s.review_on == "reasoning"
    assert s.max_review_rounds == 2 and s.max_files == 40 and s.emulated
    ctx = s.run_context()
    assert ctx.max_files == 40 and s.workspace == Path("out")


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_REASONING_URL", "http://127.0.0.1:8001/v1/")
    monkeypatch.setenv("TANDEM_CODER_URL", "http://127.0.0.1:8002/v1")
    monkeypatch.setenv("TANDEM_REVIEW_ON", "coder")
    monkeypatch.setenv("TANDEM_MAX_PARALLEL_AGENTS", "64")
    s = load_settings()
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
        [sys.executable, "-m", "cli", "run", "x"],
        env={"TANDEM_MAX_REVIEW_ROUNDS": "-3", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "TANDEM_MAX_REVIEW_ROUNDS" in proc.stderr


@pytest.mark.parametrize(
    "value",
    [
        "http://127.0.0.1:1/v1 junk",
        "http://127.0.0.1:1/v1\n",
        " http://127.0.0.1:1/v1",
        "http://127.0.0.1:port/v1",
        "http:///v1",
        "127.0.0.1:8001/v1",
    ],
)
def test_urls_with_whitespace_or_junk_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("TANDEM_REASONING_URL", value)
    monkeypatch.setenv("TANDEM_CODER_URL", "http://127.0.0.1:8002/v1")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "TANDEM_REASONING_URL" in str(err.value.code)


def test_the_api_key_never_appears_in_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_API_KEY", "sk-LEAKME")
    monkeypatch.setenv("TANDEM_REASONING_URL", "http://127.0.0.1:1/v1")
    monkeypatch.delenv("TANDEM_CODER_URL", raising=False)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "TANDEM_CODER_URL" in str(err.value.code)
    assert "LEAKME" not in str(err.value.code)
    # The key pasted into the wrong variable is not shown either.
    monkeypatch.setenv("TANDEM_MAX_FILES", "sk-LEAKME")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "TANDEM_MAX_FILES" in str(err.value.code)
    assert "LEAKME" not in str(err.value.code)


def test_an_api_key_override_is_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_API_KEY", raising=False)
    with pytest.raises(SettingsError) as err:
        load_settings(api_key=SecretStr("sk-OVERRIDE"), reasoning_url="http://h:1/v1 sk-OVERRIDE")
    assert "TANDEM_REASONING_URL" in str(err.value.code)
    assert "OVERRIDE" not in str(err.value.code)


def test_credentials_in_urls_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_REASONING_URL", "http://user:hunter2@127.0.0.1:bad/v1")
    monkeypatch.setenv("TANDEM_CODER_URL", "http://127.0.0.1:1/v1?api_key=s3cr3t junk")
    with pytest.raises(SettingsError) as err:
        load_settings()
    text = str(err.value.code)
    assert "TANDEM_REASONING_URL" in text and "TANDEM_CODER_URL" in text
    assert "hunter2" not in text and "s3cr3t" not in text
    assert "***@127.0.0.1" in text


def test_redact() -> None:
    assert redact("http://u:p@h/v1?token=t&x=1", ["zz"]) == "http://***@h/v1?token=***&x=1"
    assert redact("got 'sk-1234'", ["sk-1234"]) == "got '***'"


def test_cli_never_prints_the_api_key() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "run", "a.py"],
        env={
            "TANDEM_API_KEY": "sk-LEAKME",
            "TANDEM_REASONING_URL": "http://127.0.0.1:1/v1",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "TANDEM_CODER_URL" in proc.stderr
    assert "LEAKME" not in proc.stderr + proc.stdout


def test_the_oldest_order_with_a_shared_budget_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TANDEM_ORDER", "oldest")
    assert load_settings().order == "oldest"
    monkeypatch.setenv("TANDEM_ADMISSION_URL", "redis://:hunter2@127.0.0.1:6379/0")
    with pytest.raises(SettingsError, match="TANDEM_ORDER=oldest is not available") as err:
        load_settings()
    assert "hunter2" not in str(err.value)
