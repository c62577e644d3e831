"""Finalize: write the session's files and `manifest.json` under the workspace.

Every failure here is per file: a path the policy or a symlink refuses, a write the
filesystem refuses, content that is not valid Unicode. The file is marked with the reason,
the others are written, the session ends `partial` and the manifest is written. Finalize
does not raise for anything a model sent, so `tandem resume` cannot hit the same error again.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from nodes.context import RunContext
from nodes.paths import UnsafePathError, shown
from nodes.plan import named_paths
from nodes.review import UNREVIEWED, is_done, review_calls, review_share
from nodes.workspace import SessionDir

# Roles whose models produce a session's files, in the order the manifest lists them.
BACKEND_ROLES = ("reasoning", "coder")


def write_one(session_dir: SessionDir, path: str, content: str) -> tuple[str, str]:
    """Write one file; return its status (written, refused, failed) and the reason if not."""
    try:
        session_dir.write_text(path, content)
    except UnsafePathError as exc:
        return "refused", shown(str(exc))
    except UnicodeEncodeError as exc:
        return "failed", f"content is not valid Unicode: {shown(exc.reason)} at {exc.start}"
    except OSError as exc:
        # ENAMETOOLONG, ENOSPC, EACCES, ...: the reason without the (long) absolute path.
        code = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        return "failed", f"write failed: {exc.strerror or shown(str(exc))} ({code})"
    except ValueError as exc:
        return "failed", f"write failed: {shown(str(exc))}"
    return "written", ""


def describe_backend(models: Any) -> dict[str, Any]:
    """Which servers produce the files: per role, the served model and its host.

    In-process replicas are the built-in emulator, whose files are placeholders. Models
    without a router (test doubles) are "unknown".
    """
    lanes = getattr(getattr(models, "router", None), "lanes", None)
    if lanes is None:
        return {"kind": "unknown", "roles": {}, "placeholder_content": False}
    roles: dict[str, list[dict[str, str]]] = {}
    for role in BACKEND_ROLES:
        roles[role] = [
            {
                "model": lane.replica.model,
                "host": "emulator"
                if lane.replica.transport is not None
                else urlsplit(lane.replica.url).hostname or lane.replica.url,
            }
            for lane in lanes(role)
        ]
    emulated = all(r["host"] == "emulator" for replicas in roles.values() for r in replicas)
    return {
        "kind": "emulator" if emulated else "served",
        "roles": roles,
        "placeholder_content": emulated,
    }


def backend_line(backend: dict[str, Any]) -> str:
    """One line for the summary, e.g. `reasoning smollm2-reasoning@127.0.0.1, coder ...`."""
    roles = backend.get("roles") or {}
    parts = [
        f"{role} " + ", ".join(f"{r['model']}@{r['host']}" for r in roles.get(role, []))
        for role in BACKEND_ROLES
        if roles.get(role)
    ]
    text = "; ".join(parts) or "unknown models"
    if backend.get("placeholder_content"):
        text += " (emulator: placeholder content, not real code)"
    return text


def plan_warnings(state: dict[str, Any]) -> list[str]:
    """Warnings about the plan: files the request names that the plan left out."""
    named = named_paths(str(state.get("request") or ""))
    planned = _planned(state)
    left_out = [p for p in named if p not in planned]
    if not left_out:
        return []
    return [
        f"the request names {len(named)} files, the plan has {len(planned)}; "
        f"not planned: {', '.join(shown(p) for p in left_out)}"
    ]


def run_finalize(
    state: dict[str, Any],
    session_id: str,
    workspace: Path,
    ctx: RunContext,
    backend: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every written file, then the manifest. Each refusal or failure stays per file.

    Args:
        state: The session's state.
        session_id: Its id (the folder name under `workspace`).
        workspace: The server's workspace folder.
        ctx: The run context.
        backend: `describe_backend(models)`: which servers produced the files.
    """
    session_dir = SessionDir(workspace, session_id)
    before = list(state.get("rejected_paths", []))
    rejected = list(before)
    per_file = _write_files(session_dir, state, rejected, write_all=True)
    for path in _planned(state):
        per_file.setdefault(path, {"status": "missing", "round": state.get("round", 0)})
    failing = [p for p, e in per_file.items() if e["status"] != "written" or not is_done(p, state)]
    status = state.get("status") or "running"
    if status != "failed":
        status = "ok" if per_file and not failing and not state.get("error") else "partial"
    if not per_file and status != "failed":
        status = "failed"
    backend = backend or describe_backend(None)
    warnings = plan_warnings(state) + [
        f"{shown(p)} trimmed: {e['trimmed']}" for p, e in per_file.items() if e.get("trimmed")
    ]
    out: dict[str, Any] = {
        "status": status,
        "output_dir": str(session_dir.root),
        "produced_by": backend_line(backend),
        "warnings": warnings,
    }
    try:
        out["manifest_path"] = str(
            write_manifest(
                session_dir,
                state,
                status=status,
                error=state.get("error"),
                per_file=per_file,
                rejected=rejected,
                review_on=ctx.review_on,
                backend=backend,
                warnings=warnings,
            )
        )
    except (UnsafePathError, OSError) as exc:
        # The files are on disk; say why their manifest is not, and end the session.
        out["error"] = f"manifest not written: {shown(str(exc))}"
        out["status"] = "failed" if status == "failed" else "partial"
    if len(rejected) != len(before):
        out["rejected_paths"] = rejected[len(before) :]
    return out


def write_interrupted(
    state: dict[str, Any],
    session_id: str,
    workspace: Path,
    error: str,
    *,
    status: Literal["error", "interrupted"] = "error",
) -> Path:
    """After an error (or Ctrl-C) ends a session: write its done files and the manifest.

    The checkpoint keeps everything for `tandem resume`; this puts the files that are done
    (`nodes.review.is_done`) on disk meanwhile, through the same path policy as finalize.
    Files written but not done are listed as `checkpointed`.

    Args:
        state: The session's last known state (may be empty).
        session_id: Its id (the folder name under `workspace`).
        workspace: The server's workspace folder.
        error: Why the session ended, for the manifest.
        status: `error` (a failure) or `interrupted` (stopped by the user).

    Raises:
        UnsafePathError: the manifest's place is taken by a symlink or a folder.
        OSError: the session folder cannot be written.
    """
    session_dir = SessionDir(workspace, session_id)
    rejected = list(state.get("rejected_paths", []))
    per_file = _write_files(session_dir, state, rejected, write_all=False)
    return write_manifest(
        session_dir,
        state,
        status=status,
        error=error,
        per_file=per_file,
        rejected=rejected,
        review_on=None,
        backend=None,
        warnings=plan_warnings(state),
        resume=f"tandem resume {session_id}",
    )


def write_manifest(
    session_dir: SessionDir,
    state: dict[str, Any],
    *,
    status: str,
    error: str | None,
    per_file: dict[str, dict[str, Any]],
    rejected: list[dict[str, str]],
    review_on: str | None,
    backend: dict[str, Any] | None,
    warnings: list[str],
    resume: str | None = None,
) -> Path:
    """Write `manifest.json`: the one place its shape is defined.

    Raises:
        UnsafePathError: the manifest's place is taken by a symlink or a folder.
        OSError: the session folder cannot be written.
    """
    written = sum(1 for e in per_file.values() if e["status"] == "written")
    calls = review_calls(state.get("usage", {}))
    manifest: dict[str, Any] = {
        "session_id": session_dir.root.name,
        "status": status,
        "error": error,
        "request": state.get("request"),
        "plan": state.get("plan"),
        "rejected_paths": rejected,
        "review_rounds": state.get("round", 0),
        "review_summary": state.get("review_summary", ""),
        "files": per_file,
        "files_written": written,
        "files_failed": len(per_file) - written,
        "files_unreviewed": sorted(
            p for p, e in per_file.items() if e.get("verdict") == UNREVIEWED
        ),
        "usage": state.get("usage", {}),
        "timings_s": state.get("timings_s", {}),
        "review_on": review_on,
        "review_calls": calls,
        "review_share": review_share(calls),
        "backend": backend,
        "produced_by": backend_line(backend) if backend else None,
        "warnings": warnings,
    }
    if resume:
        manifest["resume"] = resume
    return session_dir.write_manifest(manifest)


def _write_files(
    session_dir: SessionDir,
    state: dict[str, Any],
    rejected: list[dict[str, str]],
    *,
    write_all: bool,
) -> dict[str, dict[str, Any]]:
    """Per-file manifest entries; writes every written file, or (not `write_all`) done ones."""
    verdicts = state.get("verdicts", {})
    checks = state.get("checks", {})
    per_file: dict[str, dict[str, Any]] = {}
    for path, result in sorted(state.get("files", {}).items()):
        entry: dict[str, Any] = {
            "status": result.get("status", "failed"),
            "round": result.get("round", 0),
            "attempts": result.get("attempts", 0),
            "verdict": verdicts.get(path, {}).get("verdict"),
            "comments": verdicts.get(path, {}).get("comments", ""),
            "checks": checks.get(path, []),
        }
        if result.get("error"):
            entry["error"] = result["error"]
        if result.get("trimmed"):
            entry["trimmed"] = result["trimmed"]
        if entry["status"] == "written" and not write_all and not is_done(path, state):
            # Kept in the checkpoint for `tandem resume`, not on disk yet.
            entry["status"] = "checkpointed"
        if entry["status"] == "written":
            entry["status"], reason = write_one(session_dir, path, result.get("content", ""))
            if reason:
                entry["error"] = reason
            if entry["status"] == "refused":
                rejected.append({"path": shown(path), "reason": reason})
        per_file[path] = entry
    return per_file


def _planned(state: dict[str, Any]) -> list[str]:
    return [f["path"] for f in (state.get("plan") or {}).get("files", [])]
