"""Validation of file paths proposed by the planner (untrusted LLM output)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

MAX_PATH_CHARS = 200
MAX_PART_CHARS = 100
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_RESERVED = {"manifest.json"}


class UnsafePathError(ValueError):
    """A path that must not be written."""


@dataclass(frozen=True)
class Rejected:
    """A planned path that was refused, and why."""

    path: str
    reason: str


def check_relative_path(path: str) -> str:
    """Return `path` normalised if it is a safe relative POSIX path, else raise.

    Safe: relative, POSIX separators, no `..` or `.` parts, no empty parts, not absolute,
    not `~`-prefixed, no drive letter, no NUL or control characters, bounded length.

    Raises:
        UnsafePathError: naming what is wrong.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError("empty path")
    if len(path) > MAX_PATH_CHARS:
        raise UnsafePathError(f"longer than {MAX_PATH_CHARS} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in path):
        raise UnsafePathError("contains NUL or control characters")
    if "\\" in path:
        raise UnsafePathError("contains a backslash (only POSIX separators are allowed)")
    if path.startswith("/"):
        raise UnsafePathError("absolute path")
    if path.startswith("~"):
        raise UnsafePathError("home-relative path (~)")
    if _DRIVE_RE.match(path):
        raise UnsafePathError("drive-letter path")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePathError(f"path part {part!r} is not allowed")
        if len(part) > MAX_PART_CHARS:
            raise UnsafePathError(f"a path part is longer than {MAX_PART_CHARS} characters")
        if part != part.strip():
            raise UnsafePathError("a path part starts or ends with whitespace")
    normal = str(PurePosixPath(*parts))
    if normal.lower() in _RESERVED:
        raise UnsafePathError(f"{normal} is reserved for Tandem's own output")
    return normal


def partition_paths(paths: Iterable[str], max_files: int) -> tuple[list[str], list[Rejected]]:
    """Split planned paths into accepted (in order) and rejected with reasons.

    Duplicates are compared case-insensitively (two files that differ only by case collide on
    macOS and Windows checkouts); a path that is also a directory of another path collides too.
    """
    accepted: list[str] = []
    rejected: list[Rejected] = []
    seen: dict[str, str] = {}
    dirs: set[str] = set()
    for raw in paths:
        try:
            path = check_relative_path(raw)
        except UnsafePathError as exc:
            rejected.append(Rejected(str(raw)[: MAX_PATH_CHARS + 20], str(exc)))
            continue
        key = path.casefold()
        if key in seen:
            rejected.append(Rejected(path, f"duplicates {seen[key]} (case-insensitively)"))
            continue
        parents = {p.casefold() for p in _parents(path)}
        if key in dirs or parents & seen.keys():
            rejected.append(Rejected(path, "collides with a directory of another planned file"))
            continue
        if len(accepted) >= max_files:
            rejected.append(Rejected(path, f"over the limit of {max_files} files"))
            continue
        seen[key] = path
        dirs |= parents
        accepted.append(path)
    return accepted, rejected


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]
