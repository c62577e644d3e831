"""What the emulator answers: deterministic text good enough for the workflow to complete.

- `response_format` json_schema named "Plan": the files the user message mentions.
- named "Review": one verdict per `### FILE: <path>` section, "needs-fix" 15% of the time.
- any other schema: a minimal instance that validates.
- no `response_format`: a coder answer, one fenced file whose syntax fits its extension.

Everything random is drawn from a hash of the seed and the request, never from global state.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import re
from collections.abc import Mapping, Sequence
from typing import Any

NEEDS_FIX_PROBABILITY = 0.15

_PATH_RE = re.compile(
    # A leading "/" or "~/" is kept: like a real model, the emulator echoes hostile paths.
    r"(?<![\w/.~-])((?:~/|/)?(?:[\w.-]+/)*[\w-][\w.-]*\.(?:py|json|toml|yaml|yml|md|txt|cfg))(?![\w/-])"
)
_REVIEW_HEADER_RE = re.compile(r"^### FILE: *(\S.*?)\s*$", re.MULTILINE)
_CODER_FILE_RE = re.compile(r"^FILE: *(\S.*?)\s*$", re.MULTILINE)

DEFAULT_PLAN_FILES = ("app/__init__.py", "app/core.py", "app/main.py")


def unit_hash(*parts: object) -> float:
    """A deterministic float in [0, 1) from `parts` (seed first, then request data)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "big") / 2**64


def short_hash(*parts: object) -> str:
    """Eight hex characters from `parts`."""
    return f"{int(unit_hash(*parts) * 2**32):08x}"


def message_text(message: Mapping[str, Any]) -> str:
    """The text of one chat message (string content or a list of text parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def render_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt as a Qwen-style chat template renders it, with the generation prompt."""
    parts = [
        f"<|im_start|>{m.get('role', 'user')}\n{message_text(m)}<|im_end|>\n" for m in messages
    ]
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def messages_key(messages: Sequence[Mapping[str, Any]]) -> str:
    """A canonical string of the messages, for seeding."""
    return json.dumps(list(messages), sort_keys=True, default=str)


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """Text of the last user message ('' if none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""


def output_token_count(
    seed: int, messages: Sequence[Mapping[str, Any]], max_tokens: int, min_output_frac: float
) -> int:
    """`max(1, round(max_tokens * u))`, u uniform in [min_output_frac, 1] from the request."""
    u = min_output_frac + (1.0 - min_output_frac) * unit_hash(seed, "len", messages_key(messages))
    return max(1, round(max_tokens * u))


# -- structured answers ---------------------------------------------------------------------


def plan_answer(user_text: str) -> dict[str, Any]:
    """A Plan: the file paths the request mentions, in order, or a small default package."""
    paths = list(dict.fromkeys(m.group(1) for m in _PATH_RE.finditer(user_text)))
    paths = [p for p in paths if len(p) <= 400][:200] or list(DEFAULT_PLAN_FILES)
    files: list[dict[str, Any]] = [
        {
            "path": path,
            "purpose": f"Implement {path} as the request describes.",
            "depends_on": [],
            "interface": _interface_of(path),
        }
        for path in paths
    ]
    return {
        "summary": f"Build {len(files)} files: {', '.join(paths[:10])}"[:4000],
        "files": files,
    }


def _interface_of(path: str) -> str:
    if path.endswith(".py"):
        return f"def {_identifier(path)}(value: int) -> int"
    return f"{path}: a {path.rsplit('.', 1)[-1]} document"


def review_answer(seed: int, user_text: str) -> dict[str, Any]:
    """A Review: a verdict per `### FILE:` section, 'needs-fix' with probability 0.15."""
    headers = list(_REVIEW_HEADER_RE.finditer(user_text))
    verdicts = []
    for i, header in enumerate(headers):
        path = header.group(1)[:400]
        end = headers[i + 1].start() if i + 1 < len(headers) else len(user_text)
        text = user_text[header.end() : end]
        needs_fix = unit_hash(seed, "review", path, text) < NEEDS_FIX_PROBABILITY
        verdicts.append(
            {
                "path": path,
                "verdict": "needs-fix" if needs_fix else "ok",
                "comments": (
                    "Handle empty input and add a docstring to the public function."
                    if needs_fix
                    else "Looks correct."
                ),
            }
        )
    fixes = sum(v["verdict"] == "needs-fix" for v in verdicts)
    return {
        "verdicts": verdicts,
        "summary": f"Reviewed {len(verdicts)} files; {fixes} need fixes.",
    }


def schema_instance(schema: Mapping[str, Any], root: Mapping[str, Any] | None = None) -> Any:
    """A minimal instance of a JSON schema (the common keywords; first option of unions)."""
    root = schema if root is None else root
    if "$ref" in schema:
        return schema_instance(_resolve_ref(root, str(schema["$ref"])), root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if options:
            non_null = [o for o in options if o.get("type") != "null"]
            return schema_instance((non_null or options)[0], root)
    if schema.get("allOf"):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(_resolve_ref(root, part["$ref"]) if "$ref" in part else part)
        return schema_instance(merged, root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        props: Mapping[str, Any] = schema.get("properties", {})
        return {
            name: schema_instance(props.get(name, {}), root) for name in schema.get("required", [])
        }
    if kind == "array":
        item = schema.get("items", {})
        return [schema_instance(item, root) for _ in range(int(schema.get("minItems", 0)))]
    if kind == "integer":
        return int(_number(schema, 1))
    if kind == "number":
        return float(_number(schema, 1))
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return _string(schema)


def _resolve_ref(root: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    node: Any = root
    for part in ref.lstrip("#/").split("/"):
        if part:
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node if isinstance(node, Mapping) else {}


def _number(schema: Mapping[str, Any], fallback: float) -> float:
    if "minimum" in schema:
        return float(schema["minimum"])
    if "exclusiveMinimum" in schema:
        return float(schema["exclusiveMinimum"]) + 1
    if "maximum" in schema:
        return min(fallback, float(schema["maximum"]))
    if "exclusiveMaximum" in schema:
        return min(fallback, float(schema["exclusiveMaximum"]) - 1)
    return fallback


_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00",
    "email": "dev@example.com",
    "uri": "https://example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
_PATTERN_CANDIDATES = ("x", "a", "example", "a1", "0", "1", "A", "Ab1", "x.py", "a_b", "a-b")


def _string(schema: Mapping[str, Any]) -> str:
    min_len = int(schema.get("minLength", 0))
    max_len = int(schema.get("maxLength", 1 << 30))
    candidates: list[str] = []
    if schema.get("format") in _FORMATS:
        candidates.append(_FORMATS[schema["format"]])
    candidates.extend(_PATTERN_CANDIDATES)
    pattern = schema.get("pattern")
    for text in candidates:
        text = text * max(1, -(-min_len // len(text)))
        if not min_len <= len(text) <= max_len:
            text = text[:max_len]
        if len(text) < min_len:
            continue
        if pattern is None or re.search(pattern, text):
            return text
    return "x" * min_len


def structured_answer(seed: int, name: str, schema: Mapping[str, Any], user_text: str) -> str:
    """Compact JSON for a `response_format` json_schema request."""
    if name == "Plan":
        value: Any = plan_answer(user_text)
    elif name == "Review":
        value = review_answer(seed, user_text)
    else:
        value = schema_instance(schema)
    return json.dumps(value, separators=(",", ":"))


# -- coder answers --------------------------------------------------------------------------


def coder_path(messages: Sequence[Mapping[str, Any]], header_path: str | None) -> str:
    """The file a coder request is for: the `x-tandem-file` header, or a `FILE:` line."""
    if header_path:
        return header_path
    match = _CODER_FILE_RE.search(last_user_text(messages))
    return match.group(1) if match else "main.py"


def _identifier(path: str) -> str:
    stem = path.rsplit("/", 1)[-1].split(".", 1)[0]
    name = re.sub(r"\W", "_", stem).strip("_").lower() or "module"
    if name[0].isdigit() or name == "init" or keyword.iskeyword(name):
        name = f"f_{name}"
    return name


def file_body(path: str, revision: str) -> str:
    """A small file whose syntax fits the extension of `path`."""
    ext = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    name = _identifier(path)
    if ext == "py":
        return (
            f'"""{name}: generated by the Tandem vLLM emulator (revision {revision})."""\n'
            "\n"
            "from __future__ import annotations\n"
            "\n"
            f'REVISION = "{revision}"\n'
            "\n"
            "\n"
            f"def {name}(value: int) -> int:\n"
            '    """Return `value` shifted by this module\'s offset."""\n'
            f"    return value + {int(revision, 16) % 97}\n"
        )
    if ext == "json":
        return json.dumps({"name": name, "revision": revision, "enabled": True}, indent=2) + "\n"
    if ext == "toml":
        return f'[{name}]\nrevision = "{revision}"\nenabled = true\n'
    if ext in ("yaml", "yml"):
        return f'name: {name}\nrevision: "{revision}"\nenabled: true\n'
    if ext == "md":
        return f"# {name}\n\nGenerated by the Tandem vLLM emulator (revision {revision}).\n"
    if ext == "cfg":
        return f"[{name}]\nrevision = {revision}\n"
    return f"{name}: generated by the Tandem vLLM emulator (revision {revision}).\n"


_FENCE_LANG = {"py": "python", "json": "json", "toml": "toml", "yaml": "yaml", "yml": "yaml",
               "md": "markdown"}  # fmt: skip


def coder_answer(seed: int, messages: Sequence[Mapping[str, Any]], path: str) -> str:
    """One fenced file for `path`; the revision changes whenever the request does."""
    revision = short_hash(seed, "code", messages_key(messages))
    ext = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    return f"```{_FENCE_LANG.get(ext, 'text')}\n{file_body(path, revision)}```\n"


_THOUGHTS = (
    "Let me restate what is asked and what the output has to look like.",
    "I should check which parts depend on each other before deciding the order.",
    "The constraints matter here, so I will keep the answer within the schema.",
    "Edge cases: empty input, missing files, and names that collide.",
    "That seems consistent; let me double-check the details once more.",
)


def reasoning_text(seed: int, messages: Sequence[Mapping[str, Any]], tokens: int) -> str:
    """Filler reasoning of about `tokens` tokens (capped: it is only streamed, never parsed)."""
    if tokens <= 0:
        return ""
    start = int(unit_hash(seed, "think", messages_key(messages)) * len(_THOUGHTS))
    want = min(tokens * 4, 32_000)
    out: list[str] = ["Okay, "]
    size = len(out[0])
    i = start
    while size < want:
        sentence = _THOUGHTS[i % len(_THOUGHTS)] + " "
        out.append(sentence)
        size += len(sentence)
        i += 1
    return "".join(out)[:want].rstrip() or "Okay."
