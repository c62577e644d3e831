"""The path policy: which relative paths proposed by the planner (untrusted LLM output) a
session may write. One place; the workspace applies it again right before each write.

A path is refused, with a reason, when it:

- is not a plain relative POSIX path: empty, absolute, `~`-prefixed, a drive letter, a
  backslash, an empty, `.` or `..` component;
- holds characters that are not plain text: NUL and other control or format characters
  (bidi overrides, zero-width joiners), lone surrogates, unassigned code points;
- holds a lookalike of `.`, `/` or `\\` (fullwidth full stop U+FF0E, two dot leader
  U+2025, fullwidth solidus U+FF0F, division slash U+2215, ...): these read as path syntax
  to a person or, after NFKC normalisation, to a tool; the NFKC form of the path must pass
  every rule too (U+FF0E U+FF0E U+FF0F `x.py` normalises to `../x.py`);
- has a component that starts or ends with whitespace or ends with a dot (Windows drops
  them, so `x.py.` and `x.py` are one file there);
- is too long: over `MAX_PART_BYTES` per component, `MAX_PATH_BYTES` in all (UTF-8 bytes,
  what the filesystem counts), or `MAX_DEPTH` components;
- is reserved by Tandem: `manifest.json` at the session root and anything under it, and the
  atomic writer's temporary names (`.tandem-*`) anywhere;
- has a `.git` component (any case, anywhere; `git~1` too, its Windows short name): a
  planted `.git/config` or hook runs commands when the user later runs git there;
- is sensitive, while `DENY_SENSITIVE` is on (the default): see `SENSITIVE_NAMES`,
  `SENSITIVE_DIRS`, `.env.*` and `.pth` files.

Two accepted paths must also differ after NFKC normalisation and case folding, and no path
may be a directory of another (`partition_paths`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

# NAME_MAX of ext4, XFS, APFS, NTFS.
MAX_PART_BYTES = 255
# Well under PATH_MAX (4096), so that the workspace and session folder still fit before it.
MAX_PATH_BYTES = 1024
MAX_DEPTH = 32
MANIFEST_NAME = "manifest.json"
# Prefix of the atomic writer's temporary files (nodes.workspace).
TEMP_PREFIX = ".tandem-"

# The sensitive-name deny-list, on by default. Switch it off for a whole process with
# `nodes.paths.DENY_SENSITIVE = False`, or per call with `deny_sensitive=False`.
DENY_SENSITIVE = True
# Files other tools read or run on their own: secrets and environment (`.env`, direnv's
# `.envrc`), credentials (`.netrc`, `.pypirc`, `.npmrc`, `.pgpass`), shell start-up files,
# Python start-up hooks (`sitecustomize.py`, `usercustomize.py`; `*.pth` below), and git
# submodule definitions.
SENSITIVE_NAMES = frozenset(
    {
        ".env",
        ".envrc",
        ".netrc",
        ".pypirc",
        ".npmrc",
        ".pgpass",
        ".bashrc",
        ".bash_profile",
        ".bash_login",
        ".profile",
        ".zshrc",
        ".zshenv",
        ".zprofile",
        "sitecustomize.py",
        "usercustomize.py",
        ".gitmodules",
    }
)
# Folders of keys and credential helpers: nothing may be written under them.
SENSITIVE_DIRS = frozenset({".ssh", ".gnupg", ".aws", ".kube", ".docker"})

_DRIVE_RE = re.compile(r"^[A-Za-z]:")
# `git~1` is the 8.3 short name Windows gives `.git`.
_GIT_NAMES = frozenset({".git", "git~1"})
# Characters shown as, but not equal to, `.` `/` `\` that NFKC leaves alone; those that
# NFKC maps onto `.` `/` `\` (U+FF0E, U+2025, U+FF0F, U+2100, ...) are found by normalising.
_LOOKALIKES = frozenset(
    "\u2215\u2044\u29f8\u2571\u2572\u29f5\u2216\u0337\u0338"  # slashes and overlays
    "\u3002\uff61\u06d4\u0701\u0702\u2e3c\ua4f8"  # full stops
)
# Control, format, line/paragraph separators, surrogates, unassigned.
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Cn"})
_SHOWN_CHARS = 300


class UnsafePathError(ValueError):
    """A path that must not be written."""


@dataclass(frozen=True)
class Rejected:
    """A planned path that was refused, and why."""

    path: str
    reason: str


def check_relative_path(path: str, *, deny_sensitive: bool | None = None) -> str:
    """Return `path` if the path policy (module docstring) accepts it, else raise.

    Args:
        path: A planned path, relative to the session folder.
        deny_sensitive: Refuse sensitive names too; None follows `DENY_SENSITIVE`.

    Raises:
        UnsafePathError: naming the rule the path breaks.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError("empty path")
    # Characters first: everything after this may encode the path as UTF-8.
    _check_characters(path)
    normal = unicodedata.normalize("NFKC", path)
    for form in dict.fromkeys((path, normal)):
        _check_shape(form)
    folded = path_key(path).split("/")
    _check_reserved(folded)
    if DENY_SENSITIVE if deny_sensitive is None else deny_sensitive:
        _check_sensitive(folded)
    return path


def path_key(path: str) -> str:
    """The identity of a path for collisions: NFKC-normalised and case-folded.

    Two paths with one key are one file on a case-insensitive or normalising filesystem
    (macOS, Windows) or look the same to a person.
    """
    once = unicodedata.normalize("NFKC", path).casefold()
    return unicodedata.normalize("NFKC", once)


def partition_paths(
    paths: Iterable[str], max_files: int, *, deny_sensitive: bool | None = None
) -> tuple[list[str], list[Rejected]]:
    """Split planned paths into accepted (in order) and rejected with reasons.

    Duplicates are compared by `path_key`; a path that is also a directory of another path
    collides too. Every path is judged alone: one bad path never stops the others.
    """
    accepted: list[str] = []
    rejected: list[Rejected] = []
    seen: dict[str, str] = {}
    dirs: set[str] = set()
    for raw in paths:
        try:
            path = check_relative_path(raw, deny_sensitive=deny_sensitive)
        except UnsafePathError as exc:
            rejected.append(Rejected(shown(raw), str(exc)))
            continue
        key = path_key(path)
        if key in seen:
            reason = f"duplicates {shown(seen[key])} (after case folding and NFKC)"
            rejected.append(Rejected(path, reason))
            continue
        parents = _parents(key)
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


def shown(text: object) -> str:
    """`text` safe to store, print and serialise: lone surrogates escaped, length bounded."""
    value = text if isinstance(text, str) else repr(text)
    value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "…"


def _check_characters(path: str) -> None:
    for ch in path:
        category = unicodedata.category(ch)
        if category in _BAD_CATEGORIES:
            what = {"Cs": "a lone surrogate", "Cn": "an unassigned code point"}.get(
                category, "a control or format character"
            )
            raise UnsafePathError(f"contains {what} (U+{ord(ch):04X})")
        if ch not in "./\\" and (
            ch in _LOOKALIKES or any(c in "./\\" for c in unicodedata.normalize("NFKC", ch))
        ):
            raise UnsafePathError(
                f"contains U+{ord(ch):04X} ({unicodedata.name(ch, '?')}), "
                "a lookalike of '.', '/' or '\\'"
            )


def _check_shape(path: str) -> None:
    if "\\" in path:
        raise UnsafePathError("contains a backslash (only POSIX separators are allowed)")
    if path.startswith("/"):
        raise UnsafePathError("absolute path")
    if path.startswith("~"):
        raise UnsafePathError("home-relative path (~)")
    if _DRIVE_RE.match(path):
        raise UnsafePathError("drive-letter path")
    size = len(path.encode("utf-8"))
    if size > MAX_PATH_BYTES:
        raise UnsafePathError(f"{size} bytes long; at most {MAX_PATH_BYTES} (UTF-8)")
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise UnsafePathError(f"{len(parts)} components deep; at most {MAX_DEPTH}")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePathError(f"path part {part!r} is not allowed")
        part_size = len(part.encode("utf-8"))
        if part_size > MAX_PART_BYTES:
            raise UnsafePathError(
                f"a path part is {part_size} bytes long; at most {MAX_PART_BYTES} (UTF-8)"
            )
        if part != part.strip():
            raise UnsafePathError("a path part starts or ends with whitespace")
        if part.endswith("."):
            raise UnsafePathError("a path part ends with a dot")


def _check_reserved(folded: list[str]) -> None:
    if folded[0] == MANIFEST_NAME:
        raise UnsafePathError(f"{MANIFEST_NAME} is reserved for Tandem's own output")
    for part in folded:
        if part.startswith(TEMP_PREFIX):
            raise UnsafePathError(f"{TEMP_PREFIX}* names are reserved for Tandem's temp files")
        if part in _GIT_NAMES:
            raise UnsafePathError("a .git component is not allowed (git would run its config)")


def _check_sensitive(folded: list[str]) -> None:
    for part in folded[:-1]:
        if part in SENSITIVE_DIRS:
            raise UnsafePathError(f"{part}/ is a sensitive folder (keys and credentials)")
    for part in folded:
        if part in SENSITIVE_NAMES or part.startswith(".env."):
            raise UnsafePathError(
                f"{part} is a sensitive name (secrets, credentials or start-up files)"
            )
    if folded[-1].endswith(".pth"):
        raise UnsafePathError(".pth files are sensitive (Python runs them at start-up)")
    if folded[-1] in SENSITIVE_DIRS:
        raise UnsafePathError(f"{folded[-1]} is a sensitive name (keys and credentials)")


def _parents(key: str) -> set[str]:
    parts = key.split("/")
    return {"/".join(parts[:i]) for i in range(1, len(parts))}
