"""What a Tandem request carries for the server to read: headers, prompt markers, schema names.

The agents (nodes/) write these and the emulator (serving.emulator) reads them to answer as
the workflow expects, so both sides import them from here: a prompt edited on one side
cannot silently change what the emulator answers (and the benchmark figures with it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Who made a call, set by the routing transport from `routing.calls.CallInfo`.
SESSION_HEADER = "x-tandem-session"
STAGE_HEADER = "x-tandem-stage"
FILE_HEADER = "x-tandem-file"

# `response_format` json_schema names of the planner's and the reviewer's answers.
PLAN_SCHEMA = "Plan"
REVIEW_SCHEMA = "Review"

# A structured call's retry goes on the conversation with a user message that starts with
# this: feedback on the answer before it, not a new task.
RETRY_FEEDBACK_PREFIX = "That answer "

# A review prompt gives each file as a section that starts with this line and its path.
REVIEW_FILE_MARKER = "### FILE: "
# A coder prompt names its file on a line that starts with this.
CODER_FILE_MARKER = "FILE: "


def _marker_line(marker: str) -> re.Pattern[str]:
    """A whole line `<marker><path>`, the path in group 1 (spaces after the marker optional)."""
    return re.compile(rf"^{re.escape(marker.rstrip())} *(\S.*?)\s*$", re.MULTILINE)


REVIEW_FILE_RE = _marker_line(REVIEW_FILE_MARKER)
CODER_FILE_RE = _marker_line(CODER_FILE_MARKER)


# Request fields that put a chat completion under structured output in vLLM: the OpenAI
# `response_format` (json_schema, json_object) and vLLM's own `structured_outputs` and the
# older `guided_*` parameters.
_GUIDED_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice")


def is_guided(body: Mapping[str, Any]) -> bool:
    """True when a chat-completion request body asks for structured (guided) output."""
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") in (
        "json_schema",
        "json_object",
    ):
        return True
    return any(body.get(name) for name in _GUIDED_FIELDS)
