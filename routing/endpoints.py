"""Where each role's model is served: the replicas the router spreads calls over."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import yaml

from routing.calls import ROLES, Role

# `user:password@` in a URL, and query parameters that look like credentials.
_URL_CREDENTIALS_RE = re.compile(r"(?<=://)[^\s@]*@")
_QUERY_SECRET_RE = re.compile(
    r"([?&][^=&#\s]*(?:key|token|secret|passw|auth|sig)[^=&#\s]*=)[^&#\s]*", re.IGNORECASE
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with URL credentials, credential-like query values and `secrets` as `***`."""
    text = _URL_CREDENTIALS_RE.sub("***@", text)
    text = _QUERY_SECRET_RE.sub(r"\1***", text)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


@dataclass(frozen=True)
class Replica:
    """One OpenAI-compatible server (a vLLM instance) serving a role's model.

    Attributes:
        url: OpenAI base URL including `/v1`, e.g. `http://127.0.0.1:8001/v1`.
        model: The served model name sent in requests.
        gpu: A label for the GPU behind it, e.g. "gpu0".
        transport: An in-process transport (an emulator); None sends over the network.
        metrics_url: Its Prometheus page; None means the URL without `/v1` plus `/metrics`.
        priority: The server runs with `--scheduling-policy priority`: the router sends each
            call's program-level rank as vLLM's per-request `priority`. (Under vLLM's
            default `fcfs` policy a non-zero priority is refused, so this must match.)
    """

    url: str
    model: str
    gpu: str
    transport: httpx.AsyncBaseTransport | None = None
    metrics_url: str | None = None
    priority: bool = False

    def scrape_url(self) -> str:
        """The URL of the server's `/metrics` page."""
        if self.metrics_url is not None:
            return self.metrics_url
        base = self.url.rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        return f"{base}/metrics"

    @property
    def shown_url(self) -> str:
        """`url` with any credentials in it replaced by `***`, fit for messages and logs."""
        return redact(self.url)


Endpoints = Mapping[Role, Sequence[Replica]]


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, not {value!r}")
    return value


def load_endpoints_file(path: str | Path) -> dict[Role, list[Replica]]:
    """Read replicas from YAML: `reasoning: [{url, model, gpu}], coder: [...]`.

    Optional per replica: `metrics_url`, and `priority: true` for a server started with
    `--scheduling-policy priority`.

    Raises:
        ValueError: an unknown role, a missing field, or a role without replicas.
    """
    raw: Any = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of role -> list of replicas")
    out: dict[Role, list[Replica]] = {}
    for key, items in raw.items():
        if key not in ROLES:
            raise ValueError(f"{path}: unknown role {key!r} (expected one of {ROLES})")
        role: Role = key
        if not isinstance(items, list) or not items:
            raise ValueError(f"{path}: role {role!r} needs a non-empty list of replicas")
        replicas = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"{path}: {role}[{i}] must be a mapping")
            missing = [f for f in ("url", "model", "gpu") if f not in item]
            if missing:
                raise ValueError(f"{path}: {role}[{i}] lacks {', '.join(missing)}")
            replicas.append(
                Replica(
                    url=str(item["url"]),
                    model=str(item["model"]),
                    gpu=str(item["gpu"]),
                    metrics_url=str(item["metrics_url"]) if item.get("metrics_url") else None,
                    priority=_flag(item.get("priority", False), f"{path}: {role}[{i}].priority"),
                )
            )
        out[role] = replicas
    return out


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***` (user names kept, they help debugging)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
