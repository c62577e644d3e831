"""What the emulator answers, sized to the tokens it charges.

Token spec, the engine's one rule (`engine.count_tokens`): a text of n characters is
ceil(n / CHARS_PER_TOKEN) tokens, CHARS_PER_TOKEN = 4, and token k of a text is its characters
[4k, 4k + 4). An answer has two parts, reasoning then content; each part rounds up on its own
and an empty part is 0 tokens, so

    completion_tokens = part_tokens(reasoning) + part_tokens(content)

is what the engine is submitted, generates and times, what `usage` reports and what the stream
sends: engine token j is reasoning token j for j < R = part_tokens(reasoning), else content
token j - R (`Answer.deltas`).

Sizes: the drawn count (`output_token_count`, at most the request's max_tokens) is a target.
Reasoning models give round(target x reasoning_frac) tokens to reasoning, content the rest, and
each part is built to exactly 4 characters per token:

- `response_format` json_schema "Plan": the files the task mentions (the last user message
  that is not retry feedback, `task_text`); "Review": one verdict per `### FILE: <path>`
  section, "needs-fix" 15% of the time (these names and markers are `serving.protocol`'s,
  shared with the prompts); any other schema: a minimal valid instance. Free-text fields
  (Plan summary and purposes, then interfaces; Review comments and summary; unconstrained
  strings of other schemas) are padded evenly with prose within their maxLength to reach
  the target (shorter only when they are all full).
- no `response_format`: a coder answer, one fenced file whose syntax fits its extension
  (Python compiles, JSON/TOML/YAML parse) with as many small documented units as fit, padded
  with comment or text lines to the exact size.

Content wins over reasoning: when the smallest valid content is longer than its share (a Plan
of many files; a coder target under the 6-13 tokens of the smallest fenced file), it is sent
whole and the reasoning shrinks. `max_tokens` (already within the context window) bounds the
whole answer, as it bounds vLLM's: content longer than the cap is cut there with
finish_reason "length", unterminated JSON included (`fit_to_cap`).

Everything random is drawn from a hash of the seed and the request, never from global state;
no work is done per token (strings are built by joins, slices and repetition).
"""

from __future__ import annotations

import functools
import hashlib
import json
import keyword
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from serving.emulator.engine import CHARS_PER_TOKEN
from serving.protocol import (
    CODER_FILE_RE,
    PLAN_SCHEMA,
    RETRY_FEEDBACK_PREFIX,
    REVIEW_FILE_RE,
    REVIEW_SCHEMA,
)

NEEDS_FIX_PROBABILITY = 0.15

_PATH_RE = re.compile(
    # A leading "/" or "~/" is kept: like a real model, the emulator echoes hostile paths.
    r"(?<![\w/.~-])((?:~/|/)?(?:[\w.-]+/)*[\w-][\w.-]*\.(?:py|json|toml|yaml|yml|md|txt|cfg))(?![\w/-])"
)

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


def task_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The user message a structured answer works from: the last that is not feedback on an
    earlier answer (a retry goes on the conversation with feedback, which names no file; a
    model answers the task before it)."""
    texts = [message_text(m) for m in messages if m.get("role") == "user"]
    for text in reversed(texts):
        if not text.startswith(RETRY_FEEDBACK_PREFIX):
            return text
    return texts[-1] if texts else ""


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


# -- the token spec -------------------------------------------------------------------------


def part_tokens(text: str) -> int:
    """Tokens of one answer part: ceil(len / CHARS_PER_TOKEN), 0 for an empty part."""
    return -(-len(text) // CHARS_PER_TOKEN)


@dataclass(frozen=True)
class Answer:
    """The full text of one answer, in the token spec's terms.

    Attributes:
        reasoning: What a reasoning parser returns as `reasoning` ('' for none).
        content: The message content.
        finish_reason: "length" when `max_tokens` cut the content, else "stop".
    """

    reasoning: str
    content: str
    finish_reason: Literal["stop", "length"] = "stop"

    @property
    def reasoning_tokens(self) -> int:
        """Tokens of the reasoning part."""
        return part_tokens(self.reasoning)

    @property
    def content_tokens(self) -> int:
        """Tokens of the content part."""
        return part_tokens(self.content)

    @property
    def tokens(self) -> int:
        """Completion tokens: reasoning then content, each rounded up on its own."""
        return self.reasoning_tokens + self.content_tokens

    def deltas(self, start: int, end: int) -> list[dict[str, str]]:
        """Streaming deltas for engine tokens [start, end): 4-character token boundaries."""
        r = self.reasoning_tokens
        out: list[dict[str, str]] = []
        think = self.reasoning[start * CHARS_PER_TOKEN : min(end, r) * CHARS_PER_TOKEN]
        if think:
            out.append({"reasoning": think})
        said = self.content[max(start - r, 0) * CHARS_PER_TOKEN : max(end - r, 0) * CHARS_PER_TOKEN]
        if said:
            out.append({"content": said})
        return out


def fit_to_cap(reasoning: str, text: str, max_tokens: int) -> Answer:
    """An Answer of at most `max_tokens` tokens: reasoning shrinks first, then the content is
    cut there ("length"), as vLLM stops at `max_tokens` whatever the answer's format (a
    structured answer cut there is unterminated JSON)."""
    room = max(max_tokens, 1)
    content_tokens = part_tokens(text)
    if content_tokens > room:
        return Answer("", text[: room * CHARS_PER_TOKEN], "length")
    keep = min(part_tokens(reasoning), room - content_tokens)
    return Answer(reasoning[: keep * CHARS_PER_TOKEN], text)


# -- filler ---------------------------------------------------------------------------------

_PROSE = (
    "The emulator writes this text so that the answer has the size a real model would give. "
    "It reads like notes on the design: inputs are checked, errors are reported with their "
    "cause, and every public name keeps the interface that the plan describes. "
)
_LINE_CHARS = 80


@functools.lru_cache(maxsize=8)
def _prose(min_chars: int) -> str:
    """At least `min_chars` characters of JSON-safe prose (no quotes, backslashes or newlines)."""
    return _PROSE * (min_chars // len(_PROSE) + 1)


def prose(size: int) -> str:
    """Exactly `size` characters of prose."""
    if size <= 0:
        return ""
    return _prose(_bucket(size))[:size]


def _bucket(n: int) -> int:
    """`n` rounded up to a power of two, so the filler cache holds few sizes."""
    return 1 << max(n - 1, 1).bit_length()


def pad_lines(size: int, lead: str) -> str:
    """Exactly `size` characters of whole lines of prose, each starting with `lead`."""
    if size <= 0:
        return ""
    full, rest = divmod(size, _LINE_CHARS)
    return _line(_LINE_CHARS, lead) * full + _line(rest, lead)


def _line(size: int, lead: str) -> str:
    """One line of exactly `size` characters, newline included ('' for 0)."""
    if size <= 0:
        return ""
    return (lead + prose(size))[: size - 1] + "\n"


# -- structured answers ---------------------------------------------------------------------

# A free-text slot of a JSON value: (the container, its key, the most characters it may hold).
Slot = tuple[Any, Any, int]


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


def _plan_slots(plan: dict[str, Any]) -> list[list[Slot]]:
    """Summary and purposes first; interfaces only when those are full."""
    purposes: list[Slot] = [(f, "purpose", 2000) for f in plan["files"]]
    interfaces: list[Slot] = [(f, "interface", 4000) for f in plan["files"]]
    return [[(plan, "summary", 4000), *purposes], interfaces]


def _interface_of(path: str) -> str:
    if path.endswith(".py"):
        return f"def {_identifier(path)}(value: int) -> int"
    return f"{path}: a {path.rsplit('.', 1)[-1]} document"


def review_answer(seed: int, user_text: str) -> dict[str, Any]:
    """A Review: a verdict per `### FILE:` section, 'needs-fix' with probability 0.15."""
    headers = list(REVIEW_FILE_RE.finditer(user_text))
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


def _review_slots(review: dict[str, Any]) -> list[list[Slot]]:
    comments: list[Slot] = [(v, "comments", 4000) for v in review["verdicts"]]
    return [[*comments, (review, "summary", 4000)]]


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


_FREE_TEXT_BLOCKERS = ("pattern", "format", "enum", "const")


def schema_slots(holder: list[Any], schema: Mapping[str, Any]) -> list[Slot]:
    """The free-text strings of `holder[0]`, an instance of `schema` built by `schema_instance`.

    A string is free text when nothing but its length constrains it. The value sits in a
    one-item list so that a bare string can be padded in place too.
    """
    slots: list[Slot] = []
    _collect_slots(holder, 0, schema, schema, slots)
    return slots


def _collect_slots(
    parent: Any, key: Any, schema: Mapping[str, Any], root: Mapping[str, Any], out: list[Slot]
) -> None:
    schema = _effective_schema(schema, root)
    value = parent[key]
    if isinstance(value, dict):
        props: Mapping[str, Any] = schema.get("properties", {})
        for name in value:
            _collect_slots(value, name, props.get(name, {}), root, out)
    elif isinstance(value, list):
        for i in range(len(value)):
            _collect_slots(value, i, schema.get("items", {}), root, out)
    elif isinstance(value, str) and not any(k in schema for k in _FREE_TEXT_BLOCKERS):
        out.append((parent, key, int(schema.get("maxLength", 1 << 30))))


def _effective_schema(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """The branch `schema_instance` builds from: refs resolved, the first union option taken."""
    for _ in range(64):  # bounded: a self-referencing $ref must not loop forever
        if "$ref" in schema:
            schema = _resolve_ref(root, str(schema["$ref"]))
            continue
        options = schema.get("anyOf") or schema.get("oneOf")
        if options and not any(k in schema for k in ("const", "enum", "default")):
            non_null = [o for o in options if o.get("type") != "null"]
            schema = (non_null or options)[0]
            continue
        if schema.get("allOf"):
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                merged.update(_resolve_ref(root, part["$ref"]) if "$ref" in part else part)
            schema = merged
            continue
        break
    return schema


def pad_slots(slots: Sequence[Slot], extra_chars: int) -> int:
    """Add up to `extra_chars` characters of prose across `slots`, evenly, within each slot's
    limit. Returns how many were added (fewer only when the slots are full)."""
    added = 0
    open_slots = [s for s in slots if len(s[0][s[1]]) < s[2]]
    while added < extra_chars and open_slots:
        share = max(1, (extra_chars - added) // len(open_slots))
        still_open = []
        for parent, key, limit in open_slots:
            room = min(limit - len(parent[key]), share, extra_chars - added)
            if room > 0:
                text = parent[key]
                # A space first, so that padding reads as a new sentence.
                parent[key] = text + (" " + prose(room - 1) if text else prose(room))
                added += room
            if len(parent[key]) < limit:
                still_open.append((parent, key, limit))
        open_slots = still_open
    return added


def structured_answer(
    seed: int, name: str, schema: Mapping[str, Any], user_text: str, tokens: int = 0
) -> str:
    """Compact JSON for a `response_format` json_schema request, padded toward `tokens`.

    The result is exactly `tokens` tokens long when free-text fields can hold the padding;
    longer when the minimal valid JSON is (content wins); shorter when the fields are full.
    """
    holder: list[Any]
    tiers: list[list[Slot]]
    if name == PLAN_SCHEMA:
        plan = plan_answer(user_text)
        holder, tiers = [plan], _plan_slots(plan)
    elif name == REVIEW_SCHEMA:
        review = review_answer(seed, user_text)
        holder, tiers = [review], _review_slots(review)
    else:
        holder = [schema_instance(schema)]
        tiers = [schema_slots(holder, schema)]
    text = json.dumps(holder[0], separators=(",", ":"))
    extra = tokens * CHARS_PER_TOKEN - len(text)
    added = 0
    for tier in tiers:
        if added < extra:
            added += pad_slots(tier, extra - added)
    if added:
        # Prose is plain ASCII without quotes or backslashes: each character adds one.
        text = json.dumps(holder[0], separators=(",", ":"))
    return text


# -- coder answers --------------------------------------------------------------------------


def coder_path(messages: Sequence[Mapping[str, Any]], header_path: str | None) -> str:
    """The file a coder request is for: the `x-tandem-file` header, or a `FILE:` line."""
    if header_path:
        return header_path
    match = CODER_FILE_RE.search(last_user_text(messages))
    return match.group(1) if match else "main.py"


def _identifier(path: str) -> str:
    stem = path.rsplit("/", 1)[-1].split(".", 1)[0]
    # ASCII only: the name is also a TOML key and a Python identifier.
    name = re.sub(r"[^0-9A-Za-z_]", "_", stem).strip("_").lower() or "module"
    if name[0].isdigit() or name == "init" or keyword.iskeyword(name):
        name = f"f_{name}"
    return name


@dataclass(frozen=True)
class _FileKind:
    """How a file of one extension is laid out: head, fixed-width units, then padding.

    A full body is `head(name, revision) + units + mid + pad(n) + end`; a target too small for
    the head gets `tiny(revision)[0] + pad(n) + tiny(revision)[1]` instead.
    """

    fence: str
    head: Callable[[str, str], str]
    unit: Callable[[int], str]  # every unit has the same length
    mid: str
    end: str
    pad: Callable[[int], str]
    tiny: Callable[[str], tuple[str, str]]


def _comment_pad(size: int) -> str:
    return pad_lines(size, "# ")


def _text_pad(size: int) -> str:
    return pad_lines(size, "")


_PY_HEAD = '''"""{name}: generated by the Tandem vLLM emulator (revision {rev})."""

from __future__ import annotations

REVISION = "{rev}"


def {name}(value: int) -> int:
    """Return `value` shifted by this module's offset."""
    return value + {offset}
'''
_PY_UNIT = '''

def step_{i:05d}(value: int) -> int:
    """Return `value` times 3 plus step {i:05d}'s constant."""
    return value * 3 + 0x{i:05x}
'''

_KINDS: dict[str, _FileKind] = {
    "py": _FileKind(
        "python",
        lambda name, rev: _PY_HEAD.format(name=name, rev=rev, offset=int(rev, 16) % 97),
        lambda i: _PY_UNIT.format(i=i),
        "",
        "",
        _comment_pad,
        lambda rev: (f"# {rev}\n", ""),
    ),
    "json": _FileKind(
        "json",
        lambda name, rev: (
            f'{{\n  "name": "{name}",\n  "revision": "{rev}",\n  "enabled": true,\n  "entries": [\n'
        ),
        lambda i: f'    {{"id": "e{i:05d}", "weight": {i % 97:2d}}},\n',
        '    {"id": "end", "weight": 0}\n  ],\n  "notes": "',
        '"\n}\n',
        prose,
        lambda rev: (f'{{"revision": "{rev}", "notes": "', '"}\n'),
    ),
    "toml": _FileKind(
        "toml",
        lambda name, rev: f'[module]\nname = "{name}"\nrevision = "{rev}"\nenabled = true\n',
        lambda i: f'\n[[entries]]\nid = "e{i:05d}"\nweight = {i % 97:2d}\n',
        "",
        "",
        _comment_pad,
        lambda rev: (f'revision = "{rev}"\n', ""),
    ),
    "yaml": _FileKind(
        "yaml",
        lambda name, rev: f'name: "{name}"\nrevision: "{rev}"\nenabled: true\nentries:\n',
        lambda i: f"  - id: e{i:05d}\n    weight: {i % 97:2d}\n",
        "",
        "",
        _comment_pad,
        lambda rev: (f'revision: "{rev}"\n', ""),
    ),
    "cfg": _FileKind(
        "text",
        lambda name, rev: f"[module]\nname = {name}\nrevision = {rev}\n",
        lambda i: f"entry_{i:05d} = {i % 97:2d}\n",
        "",
        "",
        _comment_pad,
        lambda rev: (f"# {rev}\n", ""),
    ),
    "md": _FileKind(
        "markdown",
        lambda name, rev: f"# {name}\n\nGenerated by the Tandem vLLM emulator (revision {rev}).\n",
        lambda i: (
            f"\n## Part {i:05d}\n\nThis part describes step {i:05d}: its inputs and checks.\n"
        ),
        "\n",
        "",
        _text_pad,
        lambda rev: (f"{rev}\n", ""),
    ),
    "text": _FileKind(
        "text",
        lambda name, rev: f"{name}: generated by the Tandem vLLM emulator (revision {rev}).\n",
        lambda i: f"step {i:05d}: check the input, then write the result.\n",
        "",
        "",
        _text_pad,
        lambda rev: (f"{rev}\n", ""),
    ),
}
_KINDS["yml"] = _KINDS["yaml"]
# Units are numbered from a revision-dependent start below this, so files differ.
_UNIT_STARTS = 1000
# Unit numbers wrap here, which keeps every unit the same width.
_UNIT_WRAP = 100_000


def _kind_of(path: str) -> _FileKind:
    ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    return _KINDS.get(ext, _KINDS["text"])


@functools.lru_cache(maxsize=64)
def _unit_pool(kind: _FileKind, count: int) -> str:
    """Units 0..count-1 of `kind`, built once per size bucket and sliced per request."""
    return "".join(kind.unit(i % _UNIT_WRAP) for i in range(count))


def _units(kind: _FileKind, first: int, count: int) -> str:
    if count <= 0:
        return ""
    width = len(kind.unit(0))
    return _unit_pool(kind, _bucket(first + count))[first * width : (first + count) * width]


def file_body(path: str, revision: str, size_chars: int = 0) -> str:
    """A file whose syntax fits the extension of `path`, exactly `size_chars` characters long
    when that is at least its smallest valid form (else that form)."""
    kind = _kind_of(path)
    head = kind.head(_identifier(path), revision)
    fixed = len(head) + len(kind.mid) + len(kind.end)
    if size_chars < fixed:
        before, after = kind.tiny(revision)
        return before + kind.pad(size_chars - len(before) - len(after)) + after
    count, pad = divmod(size_chars - fixed, len(kind.unit(0)))
    first = int(revision, 16) % _UNIT_STARTS
    return head + _units(kind, first, count) + kind.mid + kind.pad(pad) + kind.end


def coder_answer(
    seed: int, messages: Sequence[Mapping[str, Any]], path: str, tokens: int = 0
) -> str:
    """One fenced file for `path`, exactly `tokens` tokens when that is at least its smallest
    valid form; the revision changes whenever the request does."""
    revision = short_hash(seed, "code", messages_key(messages))
    opening = f"```{_kind_of(path).fence}\n"
    closing = "```\n"
    size = tokens * CHARS_PER_TOKEN - len(opening) - len(closing)
    return opening + file_body(path, revision, size) + closing


# -- reasoning and the whole answer ---------------------------------------------------------

_THOUGHTS = (
    "Let me restate what is asked and what the output has to look like.",
    "I should check which parts depend on each other before deciding the order.",
    "The constraints matter here, so I will keep the answer within the schema.",
    "Edge cases: empty input, missing files, and names that collide.",
    "That seems consistent; let me double-check the details once more.",
)


def reasoning_text(seed: int, messages: Sequence[Mapping[str, Any]], tokens: int) -> str:
    """Filler reasoning of exactly `tokens` tokens (4 characters each)."""
    if tokens <= 0:
        return ""
    start = int(unit_hash(seed, "think", messages_key(messages)) * len(_THOUGHTS))
    cycle = " ".join(_THOUGHTS[start:] + _THOUGHTS[:start]) + " "
    size = tokens * CHARS_PER_TOKEN
    return ("Okay, " + cycle * (size // len(cycle) + 1))[:size]


# `response_format` {"type": "json_object"} has no schema: one free-text field.
_JSON_OBJECT_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
}


def content_text(
    seed: int,
    messages: Sequence[Mapping[str, Any]],
    response_format: Any,
    file_header: str | None,
    tokens: int,
) -> str:
    """The content part of an answer, sized toward `tokens` (see the module docstring)."""
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema") or {}
        return structured_answer(
            seed,
            str(spec.get("name", "")),
            spec.get("schema") or {},
            task_text(messages),
            tokens,
        )
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_object":
        return structured_answer(seed, "", _JSON_OBJECT_SCHEMA, "", tokens)
    return coder_answer(seed, messages, coder_path(messages, file_header), tokens)


def build_answer(
    seed: int,
    messages: Sequence[Mapping[str, Any]],
    *,
    response_format: Any,
    file_header: str | None,
    target_tokens: int,
    reasoning_frac: float,
    max_tokens: int,
) -> Answer:
    """The whole answer to one request: reasoning of round(target x reasoning_frac) tokens,
    content sized to the rest (a structured answer may need more), then fitted to the
    request's `max_tokens` (already within the context window left)."""
    reasoning_tokens = round(target_tokens * reasoning_frac)
    text = content_text(
        seed, messages, response_format, file_header, target_tokens - reasoning_tokens
    )
    return fit_to_cap(reasoning_text(seed, messages, reasoning_tokens), text, max_tokens)
