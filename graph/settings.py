"""The one settings object: `TANDEM_*` environment variables, checked at start."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nodes.context import PromptStyle, RunContext
from routing.limits import make_limit

# `user:password@` in a URL, and query parameters that look like credentials.
_URL_CREDENTIALS_RE = re.compile(r"(?<=://)[^\s@]*@")
_QUERY_SECRET_RE = re.compile(
    r"([?&][^=&#\s]*(?:key|token|secret|passw|auth|sig)[^=&#\s]*=)[^&#\s]*", re.IGNORECASE
)
# Fields whose values are never shown, not even redacted.
_SECRET_FIELDS = frozenset({"api_key"})


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
    max_review_rounds: int = Field(2, ge=0, le=20)
    max_files: int = Field(40, ge=1, le=500)
    max_output_retries: int = Field(2, ge=0, le=10)
    prompt_style: PromptStyle = "full"
    workspace: Path = Path("out")
    request_timeout_s: float = Field(600.0, gt=0)
    limit: str = Field(
        "adaptive", description="Admission limit per GPU: adaptive | unlimited | fixed-N"
    )
    order: Literal["fifo", "las"] = "las"
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

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: str) -> str:
        make_limit(value)  # raises, naming the allowed forms
        return value

    @model_validator(mode="after")
    def _both_or_neither(self) -> Settings:
        if (self.reasoning_url is None) != (self.coder_url is None) and self.endpoints_file is None:
            raise ValueError(
                "set both TANDEM_REASONING_URL and TANDEM_CODER_URL, or neither (built-in emulator)"
            )
        return self

    @property
    def emulated(self) -> bool:
        """True when no real endpoint is configured: the built-in emulator serves both roles."""
        return self.reasoning_url is None and self.endpoints_file is None

    def run_context(self) -> RunContext:
        """Default run context from these settings (the workspace is a server option)."""
        return RunContext(
            review_on=self.review_on,
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


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with URL credentials, credential-like query values and `secrets` as `***`."""
    text = _URL_CREDENTIALS_RE.sub("***@", text)
    text = _QUERY_SECRET_RE.sub(r"\1***", text)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


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
