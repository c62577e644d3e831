"""Planner paths are untrusted: the hostile corpus is refused, with reasons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodes.paths import UnsafePathError, check_relative_path, partition_paths
from nodes.workspace import SessionDir, check_session_id

HOSTILE = [
    "../x.py",
    "/tmp/x.py",
    "a/../../x.py",
    "~/x.py",
    "~root/x.py",
    "C:/x.py",
    "c:x.py",
    "a\\..\\x.py",
    "pkg\\mod.py",
    "a\x00b.py",
    "a\nb.py",
    "a\x1b[31m.py",
    "./x.py",
    "a//b.py",
    "a/./b.py",
    "a/",
    "",
    " lead.py",
    "x" * 201,
    "/".join(["d"] * 101),
    "a/" + "b" * 101 + ".py",
    "manifest.json",
]


@pytest.mark.parametrize("path", HOSTILE)
def test_hostile_paths_are_refused(path: str) -> None:
    with pytest.raises(UnsafePathError):
        check_relative_path(path)


@pytest.mark.parametrize(
    "path", ["a.py", "pkg/mod.py", "docs/README.md", "a-b_c.d/e.toml", "ünï/cödé.py"]
)
def test_ordinary_paths_pass(path: str) -> None:
    assert check_relative_path(path) == path


def test_duplicates_case_collisions_and_limit() -> None:
    accepted, rejected = partition_paths(
        ["a.py", "A.py", "a.py", "pkg", "pkg/x.py", "b.py", "c.py", "../d.py"], max_files=3
    )
    assert accepted == ["a.py", "pkg", "b.py"]
    reasons = {r.path: r.reason for r in rejected}
    assert "case-insensitively" in reasons["A.py"]
    assert "directory of another" in reasons["pkg/x.py"]
    assert "over the limit" in reasons["c.py"]
    assert "'..'" in reasons["../d.py"]


@pytest.mark.parametrize("sid", ["../up", "a/b", "", ".hidden", "x" * 65, "a\x00"])
def test_session_ids_are_directory_safe(sid: str) -> None:
    with pytest.raises(UnsafePathError):
        check_session_id(sid)


def test_preplanted_symlinks_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    ws = tmp_path / "ws"
    session = SessionDir(ws, "s1")
    os.symlink(outside, session.root / "evil")
    os.symlink(outside / "target.py", session.root / "link.py")
    with pytest.raises(UnsafePathError, match="symlink"):
        session.write_text("evil/x.py", "x = 1\n")
    with pytest.raises(UnsafePathError, match="symlink"):
        session.write_text("link.py", "x = 1\n")
    # A symlinked session directory is refused too.
    os.symlink(outside, ws / "s2")
    with pytest.raises(UnsafePathError, match="symlink"):
        SessionDir(ws, "s2")
    assert list(outside.iterdir()) == []


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    session = SessionDir(tmp_path, "s1")
    session.write_text("pkg/a.py", "A = 1\n")
    session.write_text("pkg/a.py", "A = 2\n")
    assert (session.root / "pkg/a.py").read_text() == "A = 2\n"
    assert [p.name for p in (session.root / "pkg").iterdir()] == ["a.py"]
