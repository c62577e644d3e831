"""Planner paths are untrusted: the hostile corpus is refused, with reasons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodes import paths as path_policy
from nodes.paths import (
    MAX_PART_BYTES,
    UnsafePathError,
    check_relative_path,
    partition_paths,
    path_key,
)
from nodes.workspace import SessionDir, check_session_id

# (path, a fragment of the reason it is refused)
HOSTILE = [
    ("../x.py", "'..'"),
    ("/tmp/x.py", "absolute"),
    ("a/../../x.py", "'..'"),
    ("~/x.py", "~"),
    ("~root/x.py", "~"),
    ("C:/x.py", "drive"),
    ("c:x.py", "drive"),
    ("a\\..\\x.py", "backslash"),
    ("pkg\\mod.py", "backslash"),
    ("a\x00b.py", "control"),
    ("a\nb.py", "control"),
    ("a\x1b[31m.py", "control"),
    ("a\u202eyp.txt", "format"),
    ("./x.py", "'.'"),
    ("a//b.py", "''"),
    ("a/./b.py", "'.'"),
    ("a/", "''"),
    ("", "empty"),
    (" lead.py", "whitespace"),
    ("trail.py ", "whitespace"),
    ("a/ b/c.py", "whitespace"),
    ("x.py.", "ends with a dot"),
    ("dir./x.py", "ends with a dot"),
    ("...", "ends with a dot"),
    # 70 x U+1D51E is 70 characters and 280 bytes.
    ("\U0001d51e" * 70, "280 bytes"),
    ("x" * (MAX_PART_BYTES + 1), "256 bytes"),
    ("/".join(["\u00e9" * 120] * 5), "bytes long; at most 1024"),
    ("/".join(["d"] * 60) + "/x.py", "61 components"),
    ("a\ud800.py", "lone surrogate"),
    ("\udcff/x.py", "lone surrogate"),
    ("\u0378.py", "unassigned"),
    ("\u2025/x.py", "lookalike"),
    ("\uff0e\uff0e\uff0fx.py", "lookalike"),
    ("a\uff0fb.py", "lookalike"),
    ("a\u2215b.py", "lookalike"),
    ("a\u2044b.py", "lookalike"),
    ("x\uff0epy", "lookalike"),
    ("\u2100.py", "lookalike"),
    ("manifest.json", "reserved"),
    ("MANIFEST.JSON", "reserved"),
    ("manifest.json/x.py", "reserved"),
    ("Manifest.json/a/b.py", "reserved"),
    (".tandem-abc123", "temp files"),
    ("pkg/.TANDEM-x.py", "temp files"),
    (".git/config", ".git"),
    (".git/hooks/pre-commit", ".git"),
    ("sub/.GIT/config", ".git"),
    (".Git", ".git"),
    ("GIT~1/config", ".git"),
    (".env", "sensitive"),
    (".env.local", "sensitive"),
    ("app/.ENV", "sensitive"),
    (".envrc", "sensitive"),
    (".ssh/id_rsa", "sensitive"),
    ("home/.ssh/authorized_keys", "sensitive"),
    (".aws", "sensitive"),
    ("sitecustomize.py", "sensitive"),
    ("lib/usercustomize.py", "sensitive"),
    ("evil.pth", "sensitive"),
    (".bashrc", "sensitive"),
    (".netrc", "sensitive"),
]


@pytest.mark.parametrize(("path", "reason"), HOSTILE)
def test_hostile_paths_are_refused_with_their_reason(path: str, reason: str) -> None:
    with pytest.raises(UnsafePathError) as err:
        check_relative_path(path)
    assert reason in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "path",
    [
        "a.py",
        "pkg/mod.py",
        "docs/README.md",
        "a-b_c.d/e.toml",
        "\u00fcn\u00ef/c\u00f6d\u00e9.py",
        ".gitignore",
        ".github/workflows/ci.yml",
        "environment.py",
        ".envy",
        "docs/manifest.json",
        "x" * MAX_PART_BYTES,
        "\u00e9" * 126 + ".py",  # 255 bytes
        "/".join(["d"] * 31) + "/x.py",
    ],
)
def test_ordinary_paths_pass(path: str) -> None:
    assert check_relative_path(path) == path


def test_sensitive_names_are_switchable_but_hard_rules_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert check_relative_path(".env", deny_sensitive=False) == ".env"
    monkeypatch.setattr(path_policy, "DENY_SENSITIVE", False)
    assert check_relative_path("sitecustomize.py") == "sitecustomize.py"
    for hard in (".git/config", "manifest.json/x.py", "\uff0e\uff0e\uff0fx.py"):
        with pytest.raises(UnsafePathError):
            check_relative_path(hard)


def test_duplicates_case_collisions_and_limit() -> None:
    accepted, rejected = partition_paths(
        ["a.py", "A.py", "a.py", "pkg", "pkg/x.py", "b.py", "c.py", "../d.py"], max_files=3
    )
    assert accepted == ["a.py", "pkg", "b.py"]
    reasons = {r.path: r.reason for r in rejected}
    assert "case folding" in reasons["A.py"]
    assert "directory of another" in reasons["pkg/x.py"]
    assert "over the limit" in reasons["c.py"]
    assert "'..'" in reasons["../d.py"]


def test_paths_that_normalise_to_one_name_collide() -> None:
    nfc, nfd = "caf\u00e9.py", "cafe\u0301.py"
    ligature, plain = "\ufb01le.py", "file.py"
    sharp, upper = "stra\u00dfe.py", "STRASSE.py"
    accepted, rejected = partition_paths(
        [nfc, nfd, ligature, plain, sharp, upper, "Pkg/a.py", "pkg/A.py"], max_files=40
    )
    assert accepted == [nfc, ligature, sharp, "Pkg/a.py"]
    assert [r.path for r in rejected] == [nfd, plain, upper, "pkg/A.py"]
    assert all("NFKC" in r.reason for r in rejected)
    assert path_key(nfd) == path_key(nfc)


def test_rejected_paths_are_safe_to_store_and_print() -> None:
    _, rejected = partition_paths(["a\ud800.py", "x" * 5000], max_files=40)
    for r in rejected:
        r.path.encode("utf-8")  # no lone surrogate survives
        assert len(r.path) <= 301
    assert rejected[0].path == "a\\ud800.py"


@pytest.mark.parametrize(
    "sid", ["../up", "a/b", "", ".hidden", "x" * 65, "a\x00", "s-1\n", "../../etc"]
)
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


def test_the_workspace_applies_the_policy_again(tmp_path: Path) -> None:
    session = SessionDir(tmp_path, "s1")
    for path in (".git/config", "manifest.json/x.py", ".env", "a\ud800.py"):
        with pytest.raises(UnsafePathError):
            session.write_text(path, "x\n")
    session.write_text(".env", "X=1\n", deny_sensitive=False)
    assert sorted(p.name for p in session.root.iterdir()) == [".env"]


def test_a_folder_or_file_in_the_way_is_refused(tmp_path: Path) -> None:
    session = SessionDir(tmp_path, "s1")
    session.write_text("a.py", "A = 1\n")
    with pytest.raises(UnsafePathError, match="not a directory"):
        session.write_text("a.py/b.py", "B = 1\n")
    (session.root / "manifest.json").mkdir()
    with pytest.raises(UnsafePathError, match="directory"):
        session.write_manifest({"status": "ok"})


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    session = SessionDir(tmp_path, "s1")
    session.write_text("pkg/a.py", "A = 1\n")
    session.write_text("pkg/a.py", "A = 2\n")
    assert (session.root / "pkg/a.py").read_text() == "A = 2\n"
    assert [p.name for p in (session.root / "pkg").iterdir()] == ["a.py"]
    with pytest.raises(UnicodeEncodeError):
        session.write_text("pkg/b.py", "B = '\ud800'\n")
    assert [p.name for p in (session.root / "pkg").iterdir()] == ["a.py"]
