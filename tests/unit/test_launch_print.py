"""`tandem serve --print`: the printed servers answer to the names Tandem asks for, the
exports point Tandem at them, the API key stays a variable, the vLLM floor is stated."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cli.app import main as tandem
from graph.settings import load_settings
from serving.launch import (
    PROFILES_DIR,
    ROLES,
    Profile,
    Role,
    launch_script,
    load_profile,
    min_vllm_version,
)

PROFILES = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
SECRET = "sk-do-not-print-3f9a"
_ENV_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@pytest.fixture(autouse=True)
def _clean_tandem_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("TANDEM_"):
            monkeypatch.delenv(name)


def _parse(lines: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Commands by served model name, and every exported variable."""
    commands: dict[str, list[str]] = {}
    exports: dict[str, str] = {}
    for line in lines:
        if line.startswith("#"):
            continue
        words = shlex.split(line)
        if words[0] == "export":
            exports.update(word.split("=", 1) for word in words[1:])  # type: ignore[misc]
            continue
        while _ENV_WORD.match(words[0]):  # leading NAME=value assignments
            words.pop(0)
        argv = words
        commands[argv[argv.index("--served-model-name") + 1]] = argv
    return commands, exports


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _names(settings_names: dict[Role, str] | None = None) -> dict[Role, str]:
    settings = load_settings()
    return settings_names or {"reasoning": settings.reasoning_model, "coder": settings.coder_model}


@pytest.mark.parametrize("profile_name", PROFILES)
def test_printed_servers_and_exports_agree_with_settings(
    profile_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = load_profile(profile_name)
    names = _names()
    assert names == {"reasoning": "tandem-reasoning", "coder": "tandem-coder"}
    commands, exports = _parse(launch_script(profile, served_names=names))
    assert set(commands) == set(names.values())

    # Settings read from exactly the printed exports send each role to its server by name.
    for name, value in exports.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    for role in ROLES:
        argv = commands[names[role]]
        url = urlsplit(getattr(settings, f"{role}_url"))
        assert getattr(settings, f"{role}_model") == names[role]
        assert (url.hostname, url.port, url.path) == (
            _flag(argv, "--host"),
            int(_flag(argv, "--port")),
            "/v1",
        )
        server = profile.server(role)
        if server.temperature is not None:
            assert getattr(settings, f"{role}_temperature") == server.temperature
        if server.top_p is not None:
            assert getattr(settings, f"{role}_top_p") == server.top_p
    for name, value in profile.run_env.items():
        assert exports[name] == value


@pytest.mark.parametrize("profile_name", PROFILES)
def test_model_names_from_the_environment_are_served(
    profile_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_REASONING_MODEL", "r1-32b")
    monkeypatch.setenv("TANDEM_CODER_MODEL", "coder-7b")
    commands, exports = _parse(launch_script(load_profile(profile_name), served_names=_names()))
    assert set(commands) == {"r1-32b", "coder-7b"}
    assert exports["TANDEM_REASONING_MODEL"] == "r1-32b"
    assert exports["TANDEM_CODER_MODEL"] == "coder-7b"


def test_cli_print_serves_settings_names_with_the_key_as_a_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TANDEM_API_KEY", SECRET)
    monkeypatch.setenv("TANDEM_CODER_MODEL", "my-coder")
    assert tandem(["serve", "--profile", "h100-pair", "--print"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    servers = [line for line in out.splitlines() if " vllm serve " in line]
    assert len(servers) == 2
    for line in servers:
        assert line.endswith(' --api-key "$TANDEM_API_KEY"')
        # The shell expands it: the command gets the key from the variable.
        assert shlex.split(line, posix=True)[-1] == "$TANDEM_API_KEY"
    commands, exports = _parse(out.splitlines())
    assert set(commands) == {"tandem-reasoning", "my-coder"}
    assert exports["TANDEM_CODER_MODEL"] == "my-coder"
    assert "TANDEM_API_KEY" not in exports
    assert "# needs vLLM >= 0.29.0" in out


def test_no_api_key_flag_without_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert tandem(["serve", "--profile", "h100-pair", "--print"]) == 0
    assert "--api-key" not in capsys.readouterr().out


def test_minimum_vllm_version_follows_the_newest_flag() -> None:
    h100 = min_vllm_version(load_profile("h100-pair"))
    assert h100.text == "0.29.0"
    assert [reason.split(":")[0] for reason in h100.because] == ["--max-num-queued-reqs"]
    cpu = min_vllm_version(load_profile("cpu-tiny"))
    assert cpu.text == "0.12.0" and cpu.because[0].startswith("--stream-interval")
    # Without the two recent flags only the structured-outputs flag remains.
    data = load_profile("h100-pair").model_dump()
    for role in ROLES:
        args = data["roles"][role]["extra_args"]
        index = args.index("--max-num-queued-reqs")
        del args[index : index + 2]
    older = min_vllm_version(Profile.model_validate(data))
    assert older.text == "0.10.2"


def test_a_flag_of_unknown_age_stops_print(tmp_path: Path) -> None:
    text = (PROFILES_DIR / "h100-pair.yaml").read_text()
    custom = tmp_path / "custom.yaml"
    custom.write_text(text.replace("      - --max-num-queued-reqs\n", "      - --brand-new-flag\n"))
    with pytest.raises(ValueError, match="--brand-new-flag"):
        min_vllm_version(load_profile(custom))


def test_api_key_variable_name_is_checked() -> None:
    with pytest.raises(ValueError, match="environment variable name"):
        launch_script(
            load_profile("h100-pair"),
            served_names={"reasoning": "r", "coder": "c"},
            api_key_env="KEY; rm -rf /",
        )
