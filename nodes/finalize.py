"""Finalize: write the session's files and `manifest.json` under the workspace."""

from __future__ import annotations

from typing import Any

from nodes.context import RunContext
from nodes.paths import UnsafePathError
from nodes.workspace import SessionDir


def run_finalize(state: dict[str, Any], session_id: str, ctx: RunContext) -> dict[str, Any]:
    """Write every written file, then the manifest. Unsafe paths are refused and reported."""
    session_dir = SessionDir(ctx.workspace, session_id)
    files = state.get("files", {})
    verdicts = state.get("verdicts", {})
    checks = state.get("checks", {})
    rejected = list(state.get("rejected_paths", []))
    per_file: dict[str, dict[str, Any]] = {}
    for path, result in sorted(files.items()):
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
        if result.get("status") == "written":
            try:
                session_dir.write_text(path, result.get("content", ""))
            except UnsafePathError as exc:
                entry["status"] = "refused"
                entry["error"] = str(exc)
                rejected.append({"path": path, "reason": str(exc)})
        per_file[path] = entry
    planned = [f["path"] for f in state.get("plan", {}).get("files", [])]
    for path in planned:
        per_file.setdefault(path, {"status": "missing", "round": state.get("round", 0)})
    written = sum(1 for e in per_file.values() if e["status"] == "written")
    failing = [
        p
        for p, e in per_file.items()
        if e["status"] != "written" or e.get("verdict") == "needs-fix"
    ]
    status = state.get("status") or "running"
    if status != "failed":
        status = "ok" if per_file and not failing and not state.get("error") else "partial"
    if not per_file and status != "failed":
        status = "failed"
    manifest = {
        "session_id": session_id,
        "status": status,
        "error": state.get("error"),
        "request": state.get("request"),
        "plan": state.get("plan"),
        "rejected_paths": rejected,
        "review_rounds": state.get("round", 0),
        "review_summary": state.get("review_summary", ""),
        "files": per_file,
        "files_written": written,
        "files_failed": len(per_file) - written,
        "usage": state.get("usage", {}),
        "timings_s": state.get("timings_s", {}),
        "review_on": ctx.review_on,
    }
    manifest_path = session_dir.write_manifest(manifest)
    out: dict[str, Any] = {
        "status": status,
        "output_dir": str(session_dir.root),
        "manifest_path": str(manifest_path),
    }
    if len(rejected) != len(state.get("rejected_paths", [])):
        out["rejected_paths"] = rejected[len(state.get("rejected_paths", [])) :]
    return out
