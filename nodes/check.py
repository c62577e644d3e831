"""Cheap static checks of generated files, fed to the reviewer. Nothing is executed.

A file's content is untrusted model output: every check is bounded (size, nesting) and a
check that blows up (RecursionError, MemoryError, a parser's own bug) becomes a problem of
that file, never an error of the session.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import PurePosixPath

import yaml

# Larger files are not parsed (and fail the check): parsing is synchronous in the graph.
MAX_CHECK_BYTES = 1_000_000
# Bracket nesting allowed in JSON/TOML/YAML; deeper data makes the recursive parsers slow
# (PyYAML needs ~0.5 s to fail at 1,000 levels) before they raise RecursionError.
MAX_DATA_NESTING = 200
_DATA_SUFFIXES = (".json", ".toml", ".yaml", ".yml")


def check_file(path: str, content: str) -> list[str]:
    """Problems found in one file without running it: syntax of Python, JSON, TOML, YAML.

    Never raises: a check that cannot finish is reported as a problem.
    """
    if not content.strip():
        return ["file is empty"]
    try:
        size = len(content.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return [f"not valid Unicode: lone surrogate at offset {exc.start}"]
    if size > MAX_CHECK_BYTES:
        return [f"file is {size} bytes; at most {MAX_CHECK_BYTES} are checked"]
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in _DATA_SUFFIXES:
        depth = nesting_depth(content)
        if depth > MAX_DATA_NESTING:
            return [f"nested {depth} levels deep; at most {MAX_DATA_NESTING}"]
    try:
        return _parse(suffix, path, content)
    except (RecursionError, MemoryError) as exc:
        return [f"too deeply nested to check ({type(exc).__name__})"]
    except Exception as exc:  # a parser's own failure is this file's problem, not the session's
        return [f"check failed: {type(exc).__name__}: {_first_line(exc)}"]


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting in `text`, counting `[`, `{` and `(` (strings included)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]})" and depth:
            depth -= 1
    return deepest


def _parse(suffix: str, path: str, content: str) -> list[str]:
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
        return [f"{type(exc).__name__} line {exc.lineno}: {exc.msg}"]
    except (ValueError, yaml.YAMLError) as exc:
        return [f"{type(exc).__name__}: {_first_line(exc)}"]
    return []


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""
