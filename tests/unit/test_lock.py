"""requirements.lock pins a version of every dependency that pyproject.toml's ranges accept."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def _locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert "==" in line and "@" not in line and not line.startswith("-"), line
        name, _, version = line.partition("==")
        pins[canonicalize_name(name)] = version
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [Requirement(spec) for spec in specs]


def test_every_declared_dependency_is_locked_within_its_range() -> None:
    pins = _locked()
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock has {requirement.name}=={pins[name]}, outside {requirement}"
        )


def test_runtime_dependencies_are_ranges_and_tools_are_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        assert "==" not in spec, f"{spec}: a range, so that server images can bring their pins"
    for spec in project["optional-dependencies"]["dev"]:
        assert "==" in spec, f"{spec}: linters and test tools stay pinned exactly"
