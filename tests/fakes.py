"""Fake chat models for socket-free tests: scripted answers, real LangChain plumbing."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr

Responder = Callable[[list[BaseMessage], dict[str, Any]], str]


class ScriptedChatModel(BaseChatModel):
    """Answers each call with `responder(messages, kwargs)`; records every call.

    `kwargs` holds what the caller passed (e.g. `extra_body.response_format`, `max_tokens`),
    so structured-output calls can be answered per schema.
    """

    responder: Any
    delay_s: float = 0.0
    _calls: list[dict[str, Any]] = PrivateAttr(default_factory=list)

    @property
    def calls(self) -> list[dict[str, Any]]:
        return self._calls

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        raise NotImplementedError("use the async API")

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self._calls.append({"messages": messages, "kwargs": kwargs})
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        text = self.responder(messages, kwargs)
        if isinstance(text, BaseException):
            raise text
        # A responder may give a whole message, e.g. with `response_metadata.finish_reason`.
        message = (
            text
            if isinstance(text, AIMessage)
            else AIMessage(
                content=text,
                usage_metadata={"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
            )
        )
        return ChatResult(generations=[ChatGeneration(message=message)])


def schema_name(kwargs: dict[str, Any]) -> str | None:
    fmt = (kwargs.get("extra_body") or {}).get("response_format") or {}
    return (fmt.get("json_schema") or {}).get("name")


def file_of(messages: Sequence[BaseMessage]) -> str:
    for message in reversed(messages):
        match = re.search(r"^FILE: (.+)$", str(message.content), re.MULTILINE)
        if match:
            return match.group(1).strip()
    raise AssertionError("no FILE: line in the coder prompt")


def reviewed_paths(messages: Sequence[BaseMessage]) -> list[str]:
    return re.findall(r"^### FILE: (.+)$", str(messages[-1].content), re.MULTILINE)


def plan_json(paths: Sequence[str]) -> str:
    return json.dumps(
        {
            "summary": "test plan",
            "files": [
                {"path": p, "purpose": f"module {p}", "depends_on": [], "interface": ""}
                for p in paths
            ],
        }
    )


def review_json(paths: Sequence[str], needs_fix: Sequence[str] = ()) -> str:
    return json.dumps(
        {
            "summary": "reviewed",
            "verdicts": [
                {
                    "path": p,
                    "verdict": "needs-fix" if p in needs_fix else "ok",
                    "comments": "fix it" if p in needs_fix else "",
                }
                for p in paths
            ],
        }
    )


def python_file(path: str) -> str:
    """A small valid file for the path's extension, fenced as a coder answers."""
    if path.endswith(".json"):
        return f'```json\n{{"name": "{path}"}}\n```'
    if path.endswith(".md"):
        return f"```markdown\n# {path}\n```"
    if path.endswith(".toml"):
        return f'```toml\nname = "{path}"\n```'
    return f'```python\n"""{path}"""\n\nVALUE = 1\n```'


def standard_models(
    paths: Sequence[str],
    *,
    needs_fix_once: Sequence[str] = (),
    coder: Callable[[str, list[BaseMessage]], str] | None = None,
) -> tuple[ScriptedChatModel, ScriptedChatModel]:
    """A reasoning fake (plans `paths`, reviews; `needs_fix_once` fail their first review)
    and a coder fake (writes a small valid Python file per path)."""
    reviewed_once: set[str] = set()

    def reasoning(messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        name = schema_name(kwargs)
        if name == "Plan":
            return plan_json(paths)
        if name == "Review":
            files = reviewed_paths(messages)
            bad = [p for p in files if p in needs_fix_once and p not in reviewed_once]
            reviewed_once.update(files)
            return review_json(files, bad)
        raise AssertionError(f"unexpected reasoning call {kwargs}")

    def coding(messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        if schema_name(kwargs) is not None:  # review_on="coder"
            return reasoning(messages, kwargs)
        path = file_of(messages)
        return coder(path, messages) if coder else python_file(path)

    return ScriptedChatModel(responder=reasoning), ScriptedChatModel(responder=coding)
