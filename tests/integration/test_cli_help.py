"""`tandem --help`, `--version` and every command's help: consistent, complete, documented."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer

from cli.app import app
from cli.app import main as tandem

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("run", "resume", "emulate", "serve", "bench", "calibrate", "worker", "submit")


def test_every_command_is_registered_and_in_the_readme() -> None:
    group = typer.main.get_command(app)
    assert sorted(group.commands) == sorted(COMMANDS)  # type: ignore[attr-defined]
    readme = (ROOT / "README.md").read_text()
    for name in COMMANDS:
        assert f"tandem {name}" in readme, name


def test_every_command_and_option_has_help() -> None:
    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        assert command.help, name
        for param in command.params:
            assert getattr(param, "help", None), f"tandem {name} {param.name}"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_names_itself_and_exits_0(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tandem([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"Usage: tandem {command} \[OPTIONS\]", out), out
    assert "--help" in out


def test_root_help_lists_commands_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert tandem(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    assert "130 interrupted" in out and "--version" in out


def test_version_as_a_console_script_would_print_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tandem {version('tandem')}"


def test_bench_keeps_its_option_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert tandem(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--workload", "--sessions", "--tasks", "--arrival-spread-s", "--policies", "--clock",
        "--endpoints", "--reasoning-profile", "--coder-profile", "--seed", "--seeds",
        "--max-tokens", "--json", "--plot", "--table", "--metrics-port", "--quiet",
    ):  # fmt: skip
        assert flag in out, flag
