"""An OpenAI chat completion event stream, read once: SSE framing and the answer it builds.

The chat model's streamed calls read their body here instead of through the OpenAI SDK,
which builds a typed object per event (most of a process's CPU at one token per event).
`SseDecoder` cuts the bytes into the data of each event; `StreamedAnswer` folds the parsed
events into one answer: content, reasoning (vLLM's `reasoning`, or `reasoning_content`
before 0.12), finish reason, usage and the model's name. Both are pure and synchronous,
so a chunk of bytes costs one call whatever the number of events in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The data of the stream's last event; anything after it is ignored.
DONE = b"[DONE]"


class StreamFormatError(ValueError):
    """An event stream that does not hold OpenAI chat completion chunks."""


class SseDecoder:
    """Cuts a byte stream into the `data` of each server-sent event.

    Events end at a blank line; a field line is `name: value` (one space after the colon is
    dropped); the data lines of one event are joined with newlines; comments (`:`) and other
    fields are skipped. Line ends may be LF, CRLF or CR, split anywhere across chunks.
    """

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event that `chunk` completes, in order."""
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:
            # A CR at the very end may be the first half of a CRLF: keep it for the next chunk.
            cut = len(data) - 1 if data.endswith(b"\r") else len(data)
            data, held = data[:cut], data[cut:]
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            held = b""
        *events, rest = data.split(b"\n\n")
        self._pending = rest + held
        out: list[bytes] = []
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                out.append(event[6:])  # the usual shape: one data line
                continue
            lines = [
                line[6:] if line.startswith(b"data: ") else line[5:]
                for line in event.split(b"\n")
                if line.startswith(b"data:")
            ]
            if lines:
                out.append(b"\n".join(lines))
        return out


class StreamedAnswer:
    """The answer a chat completion stream builds, one parsed event at a time.

    Only the first choice is read (a Tandem call asks for one).

    Attributes:
        finish_reason: Why the server stopped ("stop", "length"), None until it says.
        usage: The usage object of the stream's usage event, None without one.
        model: The model name the server reported.
        events: Events folded in.
    """

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.system_fingerprint: str | None = None
        self.service_tier: str | None = None
        self.events = 0

    def add(self, event: Any) -> str:
        """Fold one parsed event in; returns the content it adds ("" for none).

        Raises:
            StreamFormatError: the event is not a chat completion chunk.
        """
        if not isinstance(event, dict):
            raise StreamFormatError(
                f"event {self.events + 1} of the stream is a {type(event).__name__}, "
                "not a chat completion chunk object"
            )
        self.events += 1
        usage = event.get("usage")
        if usage:
            if not isinstance(usage, dict):
                raise StreamFormatError(f"event {self.events}: usage is not an object: {usage!r}")
            self.usage = usage
        choices = event.get("choices")
        if not choices:
            return ""
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise StreamFormatError(f"event {self.events}: choices is not a list of objects")
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
            self.model = event.get("model") or self.model
            self.system_fingerprint = event.get("system_fingerprint") or self.system_fingerprint
            self.service_tier = event.get("service_tier") or self.service_tier
        delta = choice.get("delta")
        if not delta:
            return ""
        if not isinstance(delta, dict):
            raise StreamFormatError(f"event {self.events}: delta is not an object: {delta!r}")
        reasoning = reasoning_of(delta)
        if reasoning:
            self._reasoning.append(reasoning)
        content = delta.get("content")
        if content:
            if not isinstance(content, str):
                raise StreamFormatError(f"event {self.events}: content is not text: {content!r}")
            self._content.append(content)
            return content
        return ""

    @property
    def content(self) -> str:
        """The answer's text so far."""
        return "".join(self._content)

    @property
    def reasoning(self) -> str:
        """The answer's reasoning text so far ("" for none)."""
        return "".join(self._reasoning)


def reasoning_of(fields: Mapping[str, Any]) -> str | None:
    """The reasoning text of a message or delta: vLLM >= 0.12 `reasoning`, else
    `reasoning_content`; None when neither is text."""
    value = fields.get("reasoning")
    if value is None:
        value = fields.get("reasoning_content")
    return value if isinstance(value, str) else None
