"""Structured outputs of the agents, sent to vLLM as `response_format` json_schema.

The schemas are deliberately lenient about paths: path safety is checked in code
(`nodes.paths`), so that one bad path is reported and dropped instead of failing the plan.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class FileTask(BaseModel):
    """One file of the plan, written by one coder agent."""

    path: str = Field(
        description="Relative POSIX path of the file, e.g. pkg/util.py", max_length=400
    )
    purpose: str = Field(description="What this file does", max_length=2000)
    depends_on: list[str] = Field(
        default_factory=list, description="Paths of plan files this one imports or reads"
    )
    interface: str = Field(
        default="",
        description="The public interface other files may use: signatures, names, formats",
        max_length=4000,
    )


class Plan(BaseModel):
    """The planner's answer: the files to write."""

    summary: str = Field(description="One paragraph: what will be built", max_length=4000)
    files: list[FileTask] = Field(min_length=1, max_length=200)


class FileVerdict(BaseModel):
    """The reviewer's verdict on one file."""

    path: str = Field(max_length=400)
    verdict: Literal["ok", "needs-fix"]
    comments: str = Field(default="", description="What to fix, if anything", max_length=4000)


class Review(BaseModel):
    """The reviewer's answer: a verdict per file and a summary."""

    verdicts: list[FileVerdict]
    summary: str = Field(max_length=4000)


def bounded_text(model: type[BaseModel], names: tuple[str, ...], max_chars: int | None) -> Any:
    """`create_model` field arguments that cap `model`'s text fields `names` at `max_chars`
    in the JSON schema only (guided decoding); validation keeps the model's own bounds.

    A small model that starts repeating itself inside a string otherwise runs to max_tokens
    and leaves the JSON unterminated. None: no arguments (the schema is unchanged).
    """
    if max_chars is None:
        return {}
    fields = {}
    for name in names:
        info = model.model_fields[name]
        limits = [m.max_length for m in info.metadata if hasattr(m, "max_length")]
        field = Field(
            default=info.default,
            description=info.description,
            max_length=limits[0] if limits else None,
            json_schema_extra={"maxLength": max_chars},
        )
        fields[name] = (str, field)
    return fields
