"""The import layers hold: `lint-imports` keeps every contract in pyproject.toml.

The contracts say that nothing imports upward (cli > bench > graph > nodes > routing > serving).
The second test breaks one on purpose, in a copy of the packages, to show the check bites.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """Run `lint-imports` on the packages under `tree` with the repository's contracts."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(CONFIG)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _root_packages() -> list[str]:
    """The packages the contracts cover, as pyproject.toml lists them."""
    config = tomllib.loads(CONFIG.read_text())
    packages: list[str] = config["tool"]["importlinter"]["root_packages"]
    return packages


def test_every_layer_contract_is_kept() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_its_contract(tmp_path: Path) -> None:
    for package in _root_packages():
        shutil.copytree(
            ROOT / package,
            tmp_path / package,
            ignore=shutil.ignore_patterns("__pycache__", "results"),
        )
    upward = tmp_path / "routing" / "fanout.py"
    upward.write_text(upward.read_text() + "\nimport nodes.paths  # noqa: E402\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "routing imports neither nodes, graph, bench nor cli BROKEN" in result.stdout
    assert "routing.fanout -> nodes.paths" in result.stdout
