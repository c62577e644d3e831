"""Typed run configuration: what a caller may choose per run, and what only the server may.

`RunContext` is the LangGraph run context: a frozen pydantic model whose JSON schema (with
descriptions, bounds and the server's defaults) is the form LangGraph Studio shows, and which
refuses an unknown field or an out-of-range value with a message naming it. `ServerOptions`
holds the knobs no API caller may set: where files are written, and how review prompts are cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

# Longest request, in characters: one above it is refused before it reaches a checkpoint or a
# manifest (about 25k tokens, more than any planner prompt here has room for).
MAX_REQUEST_CHARS = 100_000
# Largest output cap a caller may ask for one stage (the biggest served context windows).
MAX_STAGE_TOKENS = 131_072
# With review_on="auto", the delay before a review's first token on the reasoning GPU that a run
# accepts before the coder may take the review: about what the 32B model takes to write a
# 1k-token review on an idle H100 (26 s in the h100-nvl-reasoning-32b profile), so a review
# moves only when load would at least double its time.
DEFAULT_REVIEW_DELAY_BUDGET_S = 30.0

Stage = Literal["plan", "code", "review"]
# How the agents are prompted: "full" for capable models; "small" for models such as
# SmolLM2-135M that copy an answer's shape better than they follow instructions (a short
# coder prompt with one worked example, plan and review text capped in the guided JSON).
PromptStyle = Literal["full", "small"]


class RequestTooLargeError(ValueError):
    """A request longer than `MAX_REQUEST_CHARS`."""


def check_request(request: str) -> str:
    """Return `request` if it is within `MAX_REQUEST_CHARS`.

    Raises:
        RequestTooLargeError: saying how long it is and what the limit is (never its text).
    """
    if len(request) > MAX_REQUEST_CHARS:
        raise RequestTooLargeError(
            f"request is {len(request):,} characters; the limit is {MAX_REQUEST_CHARS:,}"
        )
    return request


class TokenCaps(BaseModel):
    """Output token caps per stage; a stage left unset uses the server's default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    plan: int | None = Field(
        default=None, ge=1, le=MAX_STAGE_TOKENS, description="Most output tokens of the plan call."
    )
    code: int | None = Field(
        default=None,
        ge=1,
        le=MAX_STAGE_TOKENS,
        description="Most output tokens of each coder call.",
    )
    review: int | None = Field(
        default=None,
        ge=1,
        le=MAX_STAGE_TOKENS,
        description="Most output tokens of each review call.",
    )

    def get(self, stage: Stage) -> int | None:
        """The cap for `stage`, or None for the server's default."""
        cap: int | None = getattr(self, stage)
        return cap


class RunContext(BaseModel):
    """Per-run limits and choices. Pass as `context=` when invoking the graph.

    Any field left out takes the default the graph was built with (from `TANDEM_*` settings).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", title="Tandem run context")

    review_on: Literal["reasoning", "coder", "auto"] = Field(
        default="reasoning",
        description="Model that reviews: reasoning, coder, or auto (the reasoning model "
        "unless its estimated delay exceeds review_delay_budget_s and the coder would finish "
        "the review sooner).",
    )
    review_delay_budget_s: float = Field(
        default=DEFAULT_REVIEW_DELAY_BUDGET_S,
        ge=0,
        le=3600,
        description="With review_on=auto: seconds a review may wait on the reasoning GPU "
        "before its first token (the router's queue wait plus the measured time to first "
        "token) before it may move to the coder.",
    )
    max_parallel_agents: int = Field(
        default=25,
        ge=1,
        le=4096,
        description="Most coder agents of this session in flight at once.",
    )
    max_review_rounds: int = Field(
        default=2, ge=0, le=20, description="Fix rounds after the first review (0: review once)."
    )
    max_files: int = Field(
        default=40,
        ge=1,
        le=500,
        description="Most files a plan may have; paths beyond are refused.",
    )
    max_output_retries: int = Field(
        default=2, ge=0, le=10, description="Retries of a malformed or empty model answer."
    )
    max_tokens: TokenCaps = Field(default=TokenCaps(), description="Output token caps per stage.")
    prompt_style: PromptStyle = Field(
        default="full",
        description="Prompts: full, or small for small models (a short coder prompt with one "
        "worked example; plan and review text capped).",
    )

    def merged(self, override: RunContext | dict[str, Any] | None) -> RunContext:
        """This context with the fields that `override` sets explicitly.

        A field counts as set when the caller gave it, even at the class default; fields of
        `max_tokens` merge one by one.

        Raises:
            ValueError: an unknown field or a bad value, naming it.
        """
        if override is None:
            return self
        if isinstance(override, dict):
            override = parse_context(override)
        elif not isinstance(override, RunContext):
            raise TypeError(f"run context must be a RunContext or a dict, not {type(override)}")
        values: dict[str, Any] = {
            name: getattr(override, name) for name in override.model_fields_set
        }
        if "max_tokens" in values:
            caps = override.max_tokens
            values["max_tokens"] = self.max_tokens.model_copy(
                update={s: getattr(caps, s) for s in caps.model_fields_set}
            )
        return RunContext.model_validate({**self.model_dump(), **values})

    @classmethod
    def with_defaults(cls, defaults: RunContext) -> type[RunContext]:
        """A `RunContext` subclass whose schema shows `defaults` (e.g. the server's settings).

        LangGraph Studio draws its context form from the graph's context schema, so the form
        then shows what a run actually gets when it leaves a field out.
        """
        fields: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            field = Field(default=getattr(defaults, name), description=info.description)
            field.metadata = list(info.metadata)
            fields[name] = (info.annotation, field)
        schema: type[RunContext] = create_model(
            "RunContext", __base__=cls, __doc__=cls.__doc__, **fields
        )
        return schema


def parse_context(values: dict[str, Any]) -> RunContext:
    """A `RunContext` from untrusted values (an API request, a CLI flag).

    Raises:
        ValueError: one line per bad or unknown field, naming it.
    """
    try:
        return RunContext.model_validate(values)
    except ValidationError as exc:
        raise ValueError(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    """`run context: max_files: Input should be greater than or equal to 1 (got 0); ...`."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(context)"
        if err["type"] == "extra_forbidden":
            parts.append(f"{field}: unknown field (known: {', '.join(RunContext.model_fields)})")
        else:
            parts.append(f"{field}: {err['msg']} (got {err.get('input')!r:.80})")
    return "run context: " + "; ".join(parts)


@dataclass(frozen=True)
class ServerOptions:
    """Server-side knobs of a graph, set where it is built and never by a run's caller.

    Attributes:
        workspace: Folder under which each session writes its files and manifest.
        review_batch_chars: Most prompt characters per review call; files are split over
            several calls beyond it (and it is lowered to fit the reviewer's context window
            when the server reports one).
    """

    workspace: Path = Path("out")
    review_batch_chars: int = 60_000

    def __post_init__(self) -> None:
        if self.review_batch_chars < 1000:
            raise ValueError(
                f"review_batch_chars must be at least 1000, not {self.review_batch_chars}"
            )
        object.__setattr__(self, "workspace", Path(self.workspace))
