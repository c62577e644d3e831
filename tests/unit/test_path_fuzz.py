"""Fuzzed plans, good paths mixed with hostile ones, through plan → finalize.

For every generated plan: nothing is written outside the session folder, the session ends
without an exception, every good file is written with its content, and every planned path
is either in the manifest's files or in its rejected paths. Symlinks pointing outside are
planted in the session folder before each run.

Most plans go through the plan node and then finalize directly (cheap); some go through the
whole compiled graph on scripted models. Hostile paths are also handed to finalize straight,
as a checkpoint written before the path policy existed would.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graph.graph import build_graph
from nodes.context import RunContext, ServerOptions
from nodes.finalize import run_finalize
from nodes.llm import StaticModels, strip_code_fence
from nodes.paths import path_key, shown
from nodes.plan import run_plan
from tests.fakes import python_file, standard_models

FINALIZE_PLANS = 1000
GRAPH_PLANS = 60
SESSION = "s1"
OUTSIDE = "{OUTSIDE}"  # replaced by the per-run folder that must stay untouched
# Planted in the session folder before each run, pointing outside.
PLANTED = {"evil_dir": "dir", "evil_link.py": "file", "link_up": "parent"}

FIXED_HOSTILE = [
    "../x.py",
    "../../escape.py",
    "a/../../x.py",
    "./x.py",
    "~/x.py",
    "C:/x.py",
    "a\\..\\x.py",
    f"{OUTSIDE}/abs.py",
    "manifest.json",
    "manifest.json/x.py",
    "MANIFEST.JSON/a/b.py",
    ".tandem-tmp",
    "pkg/.tandem-x.py",
    ".git/config",
    ".git/hooks/pre-commit",
    "sub/.GIT/config",
    "git~1/config",
    ".env",
    ".env.local",
    ".ssh/id_rsa",
    "sitecustomize.py",
    "lib/usercustomize.py",
    "evil.pth",
    "x.py.",
    "x.py ",
    " x.py",
    "\u2025/x.py",
    "\uff0e\uff0e\uff0fx.py",
    "a\u2215b.py",
    "\u2100.py",
    "\U0001d51e" * 70,
    "x" * 256,
    "/".join(["d"] * 60) + "/x.py",
    "a\x00b.py",
    "a\u202eb.py",
    "evil_dir/x.py",
    "evil_dir/deeper/x.py",
    "evil_link.py",
    "link_up/x.py",
    "",
    "a//b.py",
]
LOOKALIKES = ["\uff0e", "\u2024", "\u2025", "\ufe52", "\uff0f", "\u2215", "\u2044", "\uff3c"]
SAFE_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-\u00e9\u00fc\u00df\u4e2d\u0436"
)
EXTENSIONS = [".py", ".json", ".toml", ".md", ".txt", ""]
# The test is bound by file creation and removal: use tmpfs where there is one.
_FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _not_good(path: str) -> bool:
    """Hostile paths never share a prefix with the good ones (`ok<i>/`)."""
    return not path_key(path).startswith("ok")


_safe_text = st.text(alphabet=SAFE_CHARS, min_size=1, max_size=12)


@st.composite
def good_path(draw: st.DrawFn, index: int) -> str:
    dirs = draw(st.lists(_safe_text.map(lambda t: "d" + t), max_size=4))
    name = "m" + draw(_safe_text) + draw(st.sampled_from(EXTENSIONS))
    return "/".join([f"ok{index}", *dirs, name])


@st.composite
def long_utf8(draw: st.DrawFn) -> str:
    char = draw(st.sampled_from(["\U0001d51e", "\u4e2d", "\u00e9", "\U0001f600"]))
    count = draw(st.integers(min_value=60, max_value=140))
    return char * count + draw(st.sampled_from(EXTENSIONS))


@st.composite
def with_surrogate(draw: st.DrawFn) -> str:
    base = draw(_safe_text)
    cut = draw(st.integers(min_value=0, max_value=len(base)))
    surrogate = chr(draw(st.integers(min_value=0xD800, max_value=0xDFFF)))
    return base[:cut] + surrogate + base[cut:] + ".py"


@st.composite
def with_lookalike(draw: st.DrawFn) -> str:
    path = draw(st.sampled_from(["../x.py", "a/b.py", "../../etc/passwd", "x.py", ".git/config"]))
    look = draw(st.sampled_from(LOOKALIKES))
    target = "/" if look in "\uff0f\u2215\u2044" else "."
    return path.replace(target, look) if target in path else look + path


@st.composite
def nested(draw: st.DrawFn) -> str:
    depth = draw(st.integers(min_value=30, max_value=70))
    return "/".join(["d"] * depth) + "/x.py"


@st.composite
def traversal(draw: st.DrawFn) -> str:
    ups = "../" * draw(st.integers(min_value=1, max_value=6))
    prefix = draw(st.sampled_from(["", "a/", "evil_dir/", "x/y/"]))
    return prefix + ups + draw(st.sampled_from(["escape.py", "outside/abs.py", ".bashrc"]))


@st.composite
def through_symlink(draw: st.DrawFn) -> str:
    planted = draw(st.sampled_from(sorted(PLANTED)))
    below = draw(st.lists(st.sampled_from(["deeper", "ws", SESSION, "x.py", "sub"]), max_size=3))
    return "/".join([planted, *below])


@st.composite
def case_variant(draw: st.DrawFn) -> str:
    path = draw(st.sampled_from([".git/config", "manifest.json", ".env", ".ssh/id_rsa"]))
    return "".join(c.upper() if draw(st.booleans()) else c for c in path)


def _encodable(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# What a plan can carry. Lone surrogates never pass the Plan schema (pydantic refuses the
# whole answer, which is retried with the error fed back), so they go to finalize directly.
hostile_path = st.one_of(
    st.sampled_from(FIXED_HOSTILE),
    through_symlink(),
    long_utf8(),
    with_lookalike(),
    nested(),
    traversal(),
    case_variant(),
    st.text(max_size=40).filter(_not_good).filter(_encodable),
)
injected_path = st.one_of(hostile_path, with_surrogate(), st.text(max_size=40).filter(_not_good))


@dataclass(frozen=True)
class FuzzPlan:
    """A plan in order, which of its paths are good, and hostile files for finalize."""

    paths: list[str]
    good: list[str]
    injected: list[str]


@st.composite
def fuzz_plans(draw: st.DrawFn) -> FuzzPlan:
    count = draw(st.integers(min_value=1, max_value=8))
    good = [draw(good_path(i)) for i in range(count)]
    hostile = draw(st.lists(hostile_path, min_size=1, max_size=12))
    mixed = list(good)
    for path in hostile:
        mixed.insert(draw(st.integers(min_value=0, max_value=len(mixed))), path)
    # Case and NFKC variants of good paths come last: the good one is planned first.
    dupes = [p.upper() for p in good if draw(st.booleans())]
    injected = draw(st.lists(injected_path, max_size=6))
    return FuzzPlan(paths=mixed + dupes, good=good, injected=injected)


@contextmanager
def _arena() -> Iterator[tuple[Path, Path, Path]]:
    """A fresh workspace, a folder outside it with one sentinel, and symlinks planted."""
    with tempfile.TemporaryDirectory(prefix="tandem-fuzz-", dir=_FAST_TMP) as base:
        root = Path(base)
        outside = root / "outside"
        (outside / "sub").mkdir(parents=True)
        (outside / "sentinel.txt").write_text("untouched\n")
        session = root / "ws" / SESSION
        session.mkdir(parents=True)
        for name, kind in PLANTED.items():
            target = {"dir": outside / "sub", "file": outside / "target.py", "parent": root}
            os.symlink(target[kind], session / name)
        yield root, outside, session


def _resolve(paths: list[str], outside: Path) -> list[str]:
    return [p.replace(OUTSIDE, str(outside)) for p in paths]


def _assert_contained(root: Path, outside: Path, session: Path) -> None:
    """Only the sentinel outside; every other file lies in the session folder."""
    found = sorted(str(p.relative_to(outside)) for p in outside.rglob("*"))
    assert found == ["sentinel.txt", "sub"], found
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path == outside / "sentinel.txt":
                continue
            assert path.parent == session or session in path.parents, path
    assert sorted(p.name for p in (root / "ws").iterdir()) == [SESSION]


def _assert_session(plan: FuzzPlan, planned: list[str], session: Path, contents: Any) -> None:
    manifest = json.loads((session / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] in ("ok", "partial"), manifest["error"]
    for path in plan.good:
        assert manifest["files"][path]["status"] == "written", manifest["files"][path]
        assert (session / path).read_text(encoding="utf-8") == contents(path)
    rejected = {r["path"] for r in manifest["rejected_paths"]}
    for path in planned:
        assert path in manifest["files"] or shown(path) in rejected, path
    # Every file on disk is one the manifest lists as written; none under a .git folder.
    written = {p for p, e in manifest["files"].items() if e["status"] == "written"}
    for file in session.rglob("*"):
        if file.is_file() and not file.is_symlink() and file.name != "manifest.json":
            relative = str(file.relative_to(session))
            assert relative in written, relative
            assert ".git" not in path_key(relative).split("/"), relative


def _plan_models(paths: list[str]) -> StaticModels:
    reasoning, coder = standard_models(paths)
    return StaticModels(reasoning, coder)


def _finalize_one(plan: FuzzPlan) -> None:
    with _arena() as (root, outside, session):
        planned = _resolve(plan.paths, outside)
        ctx = RunContext(max_files=200)
        update = asyncio.run(run_plan(_plan_models(planned), SESSION, "fuzz", ctx))
        accepted = [f["path"] for f in update["plan"]["files"]]
        files = {p: {"path": p, "content": f"# {p}\n", "status": "written"} for p in accepted}
        # Hostile paths as an old checkpoint might hold them: finalize must refuse them.
        for path in _resolve(plan.injected, outside):
            files.setdefault(path, {"path": path, "content": "# x\n", "status": "written"})
        state = {**update, "request": "fuzz", "session_id": SESSION, "files": files}
        out = run_finalize(state, SESSION, root / "ws", ctx)
        assert out["status"] in ("ok", "partial") and out["manifest_path"]
        _assert_session(plan, planned, session, lambda p: f"# {p}\n")
        _assert_contained(root, outside, session)


def _graph_one(plan: FuzzPlan) -> None:
    with _arena() as (root, outside, session):
        planned = _resolve(plan.paths, outside)
        ctx = RunContext(max_files=200, max_review_rounds=0)
        options = ServerOptions(workspace=root / "ws")
        graph = build_graph(_plan_models(planned), defaults=ctx, options=options)
        out = asyncio.run(graph.ainvoke({"request": "fuzz", "session_id": SESSION}))
        assert out["status"] in ("ok", "partial"), out.get("error")
        _assert_session(plan, planned, session, lambda p: strip_code_fence(python_file(p)))
        _assert_contained(root, outside, session)


def _fuzz(count: int, check: Any) -> int:
    runs: list[int] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(plan=fuzz_plans())
    def one(plan: FuzzPlan) -> None:
        check(plan)
        runs.append(1)

    one()
    return len(runs)


def test_fuzzed_plans_through_plan_and_finalize() -> None:
    assert _fuzz(FINALIZE_PLANS, _finalize_one) >= FINALIZE_PLANS


def test_fuzzed_plans_through_the_whole_graph() -> None:
    assert _fuzz(GRAPH_PLANS, _graph_one) >= GRAPH_PLANS
