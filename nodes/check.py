"""Cheap static checks of generated files, fed to the reviewer. Nothing is executed."""

from __future__ import annotations

import json
import tomllib
from pathlib import PurePosixPath

import yaml


def check_file(path: str, content: str) -> list[str]:
    """Problems found in one file without running it: syntax of Python, JSON, TOML, YAML."""
    if not content.strip():
        return ["file is empty"]
    suffix = PurePosixPath(path).suffix.lower()
    try:
        if suffix == ".py":
            # compile() parses and byte-compiles; it does not execute the module.
            compile(content, path, "exec", dont_inherit=True)
        elif suffix == ".json":
            json.loads(content)
        elif suffix == ".toml":
            tomllib.loads(content)
        elif suffix in (".yaml", ".yml"):
            list(yaml.safe_load_all(content))
    except SyntaxError as exc:
        return [f"SyntaxError line {exc.lineno}: {exc.msg}"]
    except (ValueError, yaml.YAMLError) as exc:
        return [f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"]
    return []
