"""Typed run configuration: the LangGraph run context, with defaults from settings."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal


@dataclass(frozen=True)
class RunContext:
    """Per-run limits and choices. Pass as `context=` when invoking the graph.

    Any field left out takes the default the graph was built with (from `TANDEM_*` settings).
    """

    # "auto": the router picks, per review call, the model that would finish it first.
    review_on: Literal["reasoning", "coder", "auto"] = "reasoning"
    max_parallel_agents: int = 25
    max_review_rounds: int = 2
    max_files: int = 40
    max_output_retries: int = 2
    workspace: str = "./out"
    # Most prompt characters per review call; files are split over several calls beyond it
    # (and it is lowered to fit the reviewer's context window when the server reports one).
    review_batch_chars: int = 60_000
    # Output token caps per stage (None: the server's default). The benchmark sets them.
    max_tokens: dict[str, int] = field(default_factory=dict)

    def merged(self, override: Any) -> RunContext:
        """This context with the fields that `override` (a RunContext or mapping) sets."""
        if override is None:
            return self
        if isinstance(override, RunContext):
            values = {f.name: getattr(override, f.name) for f in fields(override)}
            defaults = RunContext()
            values = {k: v for k, v in values.items() if v != getattr(defaults, k)}
        elif isinstance(override, dict):
            names = {f.name for f in fields(self)}
            unknown = set(override) - names
            if unknown:
                raise ValueError(f"unknown run context fields: {sorted(unknown)}")
            values = dict(override)
        else:
            raise TypeError(f"run context must be a RunContext or a dict, not {type(override)}")
        ctx = replace(self, **values)
        ctx.validate()
        return ctx

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        if self.review_on not in ("reasoning", "coder", "auto"):
            raise ValueError(
                f"review_on must be 'reasoning', 'coder' or 'auto', not {self.review_on!r}"
            )
        for name, low in (
            ("max_parallel_agents", 1),
            ("max_review_rounds", 0),
            ("max_files", 1),
            ("max_output_retries", 0),
            ("review_batch_chars", 1000),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
