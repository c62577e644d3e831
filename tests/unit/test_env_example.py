"""`.env.example` lists every `TANDEM_*` setting at its default, and `.env` stays out of images."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import SecretStr

from graph.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^# (TANDEM_[A-Z0-9_]+)=(.*)$")


def _example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text(encoding="utf-8").splitlines()
    return {m.group(1): m.group(2) for line in lines if (m := LINE.match(line))}


def test_every_setting_is_listed() -> None:
    listed = set(_example())
    expected = {f"TANDEM_{name.upper()}" for name in Settings.model_fields}
    assert listed == expected, (sorted(expected - listed), sorted(listed - expected))


def test_listed_defaults_are_the_defaults() -> None:
    defaults = Settings.model_construct()
    for name, value in _example().items():
        field = name.removeprefix("TANDEM_").lower()
        default = getattr(defaults, field)
        if default is None:
            continue  # an example value for a setting that is unset by default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if isinstance(default, bool):
            default = str(default).lower()
        assert str(default) == value or float(value) == default, (name, value, default)


def test_env_files_stay_out_of_docker_images() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert ".env" in ignored and "!.env.example" in ignored
