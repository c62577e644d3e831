"""The one settings object: `TANDEM_*` environment variables, checked at start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nodes.context import DEFAULT_REVIEW_DELAY_BUDGET_S, PromptStyle, RunContext
from routing.endpoints import redact
from routing.limits import make_limit
from routing.orders import SHARED_ORDERS, OrderName
from routing.transport import REQUEST_TIMEOUT_S

__all__ = ["Settings", "SettingsError", "check_url", "load_settings", "redact"]

# Fields whose values are never shown, not even redacted.
_SECRET_FIELDS = frozenset({"api_key", "admission_url", "checkpoint_url"})


class SettingsError(SystemExit):
    """Raised at start when a `TANDEM_*` value is invalid; its text names the variable."""


class Settings(BaseSettings):
    """Tandem's configuration. Every field is `TANDEM_<NAME>` in the environment.

    With neither URL set, the built-in vLLM emulator serves both roles in-process.
    """

    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    reasoning_url: str | None = Field(
        None, description="OpenAI base URL of the reasoning vLLM, e.g. http://gpu0:8001/v1"
    )
    reasoning_model: str = "tandem-reasoning"
    coder_url: str | None = Field(None, description="OpenAI base URL of the coder vLLM")
    coder_model: str = "tandem-coder"
    api_key: SecretStr = SecretStr("EMPTY")
    # Sampling per role, defaults recommended for the seed's models (h100-pair profile):
    # DeepSeek-R1 distills 0.6 / 0.95 (model card: 0.5-0.7, lower loops while thinking),
    # Qwen2.5-Coder-Instruct 0.7 / 0.8 (its generation_config.json).
    reasoning_temperature: float = Field(0.6, ge=0, le=2)
    reasoning_top_p: float = Field(0.95, gt=0, le=1)
    coder_temperature: float = Field(0.7, ge=0, le=2)
    coder_top_p: float = Field(0.8, gt=0, le=1)
    endpoints_file: Path | None = Field(None, description="YAML listing several replicas per role")
    max_parallel_agents: int = Field(25, ge=1, le=4096)
    review_on: Literal["reasoning", "coder", "auto"] = "reasoning"
    review_delay_budget_s: float = Field(
        DEFAULT_REVIEW_DELAY_BUDGET_S,
        ge=0,
        le=3600,
        description="With review_on=auto: delay on the reasoning GPU before a review may move",
    )
    max_review_rounds: int = Field(2, ge=0, le=20)
    max_files: int = Field(40, ge=1, le=500)
    max_output_retries: int = Field(2, ge=0, le=10)
    prompt_style: PromptStyle = "full"
    workspace: Path = Path("out")
    request_timeout_s: float = Field(
        REQUEST_TIMEOUT_S,
        gt=0,
        description="Outer bound on one model call, from admission to its last byte",
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Most seconds to open a connection")
    first_token_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Most seconds from sending a streamed call to its first chunk; the router "
        "raises it per replica to 10x the time to first token it measures there",
    )
    stream_idle_timeout_s: float = Field(
        60.0, gt=0, description="Most seconds of silence between chunks of a streamed answer"
    )
    retries: int = Field(
        3, ge=0, le=20, description="Extra attempts of a model call after a transport failure"
    )
    retry_base_s: float = Field(0.5, gt=0, description="Back-off before the first retry (at most)")
    retry_cap_s: float = Field(8.0, gt=0, description="Longest back-off between attempts")
    limit: str = Field(
        "adaptive", description="Admission limit per GPU: adaptive | unlimited | fixed-N"
    )
    order: OrderName = "las"
    admission_url: SecretStr | None = Field(
        None,
        description="Redis URL (redis://host:6379/0) shared by every Tandem process: one "
        "admission budget per GPU across them; unset: this process's own budget",
    )
    checkpoint_url: SecretStr | None = Field(
        None,
        description="Postgres URL (postgresql://user:pw@host/db) for checkpoints any worker "
        "can resume from; unset: a SQLite file in the workspace",
    )
    engine_priority: bool = Field(
        False,
        description="The vLLM servers at TANDEM_*_URL run with --scheduling-policy priority: "
        "each call carries its session's rank as vLLM's per-request priority",
    )
    metrics_port: int | None = Field(None, ge=0, le=65535)
    emulator_reasoning_profile: str = "h100-nvl-reasoning-32b"
    emulator_coder_profile: str = "h100-nvl-coder-8b"
    emulator_seed: int = 0

    @field_validator("reasoning_url", "coder_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        check_url(value)
        return value.rstrip("/")

    @field_validator("admission_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("checkpoint_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: str) -> str:
        make_limit(value)  # raises, naming the allowed forms
        return value

    @model_validator(mode="after")
    def _timeouts_within_request(self) -> Settings:
        for name in ("connect_timeout_s", "first_token_timeout_s", "stream_idle_timeout_s"):
            if getattr(self, name) > self.request_timeout_s:
                raise ValueError(
                    f"TANDEM_{name.upper()} must not exceed TANDEM_REQUEST_TIMEOUT_S "
                    f"({getattr(self, name):g} > {self.request_timeout_s:g})"
                )
        if self.retry_base_s > self.retry_cap_s:
            raise ValueError("TANDEM_RETRY_BASE_S must not exceed TANDEM_RETRY_CAP_S")
        return self

    @model_validator(mode="after")
    def _both_or_neither(self) -> Settings:
        if (self.reasoning_url is None) != (self.coder_url is None) and self.endpoints_file is None:
            raise ValueError(
                "set both TANDEM_REASONING_URL and TANDEM_CODER_URL, or neither (built-in emulator)"
            )
        return self

    @model_validator(mode="after")
    def _order_the_shared_budget_can_keep(self) -> Settings:
        if self.admission_url is not None and self.order not in SHARED_ORDERS:
            raise ValueError(
                f"TANDEM_ORDER={self.order} is not available with TANDEM_ADMISSION_URL (the "
                f"shared budget ranks waiters in Redis): use one of {', '.join(SHARED_ORDERS)}"
            )
        return self

    @property
    def emulated(self) -> bool:
        """True when no real endpoint is configured: the built-in emulator serves both roles."""
        return self.reasoning_url is None and self.endpoints_file is None

    def checkpoint_store(self) -> str | Path:
        """Where checkpoints go: the Postgres URL, else the workspace's SQLite file."""
        if self.checkpoint_url is not None:
            return self.checkpoint_url.get_secret_value()
        return self.workspace / "checkpoints.db"

    def run_context(self) -> RunContext:
        """Default run context from these settings (the workspace is a server option)."""
        return RunContext(
            review_on=self.review_on,
            review_delay_budget_s=self.review_delay_budget_s,
            max_parallel_agents=self.max_parallel_agents,
            max_review_rounds=self.max_review_rounds,
            max_files=self.max_files,
            max_output_retries=self.max_output_retries,
            prompt_style=self.prompt_style,
        )


def check_url(value: str) -> None:
    """Refuse anything but a plain http(s) URL with a host (messages never echo the value).

    Raises:
        ValueError: saying what is wrong.
    """
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError("must be one http(s) URL, without whitespace or control characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL such as http://127.0.0.1:8001/v1")
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ValueError("has an invalid port") from None


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; an invalid value stops with a message naming it.

    The message never shows the API key or credentials in URLs.

    Raises:
        SettingsError: (a SystemExit) listing each bad `TANDEM_*` variable and why.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        secrets = _secret_values(overrides)
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            if not field:
                # A cross-field check: its input is every setting, the API key included.
                lines.append(f"  TANDEM_* settings: {err['msg']}")
                continue
            shown = "***" if field in _SECRET_FIELDS else repr(err.get("input"))
            lines.append(f"  TANDEM_{field.upper()}: {err['msg']} (got {shown})")
        text = "invalid Tandem settings:\n" + "\n".join(lines)
        raise SettingsError(redact(text, secrets)) from None


def _secret_values(overrides: dict[str, object]) -> list[str]:
    """The API key as given in `overrides` or the environment (read case-insensitively)."""
    values = [v for k, v in os.environ.items() if k.upper() == "TANDEM_API_KEY"]
    given = overrides.get("api_key")
    if isinstance(given, SecretStr):
        given = given.get_secret_value()
    if isinstance(given, str):
        values.append(given)
    return values
