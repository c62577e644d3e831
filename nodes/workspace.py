"""Writing generated files under `<workspace>/<session_id>/` and nowhere else."""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from nodes.paths import MANIFEST_NAME, TEMP_PREFIX, UnsafePathError, check_relative_path

_SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_session_id(session_id: str) -> str:
    """A session id is used as a directory name: letters, digits, `._-`, at most 64.

    The whole string must match: `$` alone would let a trailing newline through.

    Raises:
        UnsafePathError: naming the id (as `repr`, so hidden characters show).
    """
    if (
        not isinstance(session_id, str)
        or not _SESSION_RE.fullmatch(session_id)
        or ".." in session_id
    ):
        raise UnsafePathError(f"session id {session_id!r} is not a safe directory name")
    return session_id


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class SessionDir:
    """The only directory a session writes into; refuses paths that would leave it."""

    def __init__(self, workspace: str | os.PathLike[str], session_id: str) -> None:
        self.workspace = Path(workspace).resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.root = self.workspace / check_session_id(session_id)
        if _is_link(self.root):
            raise UnsafePathError(f"{self.root} is a symlink; refusing to write through it")
        self.root.mkdir(exist_ok=True)

    def target(self, relative: str, *, deny_sensitive: bool | None = None) -> Path:
        """The absolute path for `relative`, after refusing unsafe names and symlinks.

        Args:
            relative: The path inside the session folder; the path policy is applied again.
            deny_sensitive: As in `nodes.paths.check_relative_path`.

        Raises:
            UnsafePathError: the path is unsafe or a symlink lies on the way.
            OSError: the filesystem refused a folder on the way.
        """
        clean = check_relative_path(relative, deny_sensitive=deny_sensitive)
        current = self.root
        for part in clean.split("/")[:-1]:
            current = current / part
            if _is_link(current):
                raise UnsafePathError(f"{relative}: {part!r} is a symlink")
            if current.exists() and not current.is_dir():
                raise UnsafePathError(f"{relative}: {part!r} is a file, not a directory")
            current.mkdir(exist_ok=True)
        final = current / clean.split("/")[-1]
        if _is_link(final):
            raise UnsafePathError(f"{relative} is a symlink")
        if final.is_dir():
            raise UnsafePathError(f"{relative} is a directory")
        if not str(final.resolve()).startswith(str(self.root.resolve()) + os.sep):
            raise UnsafePathError(f"{relative} resolves outside the session directory")
        return final

    def write_text(
        self, relative: str, content: str, *, deny_sensitive: bool | None = None
    ) -> Path:
        """Write one generated file atomically.

        Raises:
            UnsafePathError: the path policy or a symlink refused the path.
            OSError: the filesystem refused the write.
            UnicodeEncodeError: `content` is not valid Unicode (a lone surrogate).
        """
        final = self.target(relative, deny_sensitive=deny_sensitive)
        _atomic_write(final, content)
        return final

    def write_manifest(self, manifest: dict[str, Any]) -> Path:
        """Write `manifest.json` at the session root (atomically).

        Raises:
            UnsafePathError: a symlink or a folder stands where the manifest goes.
        """
        final = self.root / MANIFEST_NAME
        if _is_link(final):
            raise UnsafePathError(f"{final} is a symlink")
        if final.is_dir():
            raise UnsafePathError(f"{final} is a directory")
        _atomic_write(final, json.dumps(manifest, indent=2, default=str) + "\n")
        return final


def _atomic_write(final: Path, text: str) -> None:
    """Temp file + rename in the same directory: readers see the old or the new file, whole."""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
