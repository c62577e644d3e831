"""Checks at submission for `langgraph dev` / LangGraph Server: bad runs are refused with 422.

The server itself drops unknown context fields silently and validates nothing until a run
starts in the background. `langgraph.json` names `app` below as its `http.app`, whose
middleware reads every request that creates a run, a cron or an assistant and answers
`422 {"detail": "..."}` naming the field when the `context` is not a valid `RunContext`, or
when the input's `request` is longer than `MAX_REQUEST_CHARS`. langgraph-sdk raises that as
`UnprocessableEntityError` with the message; nothing of a refused request is stored.

The same app serves the graph's `tandem_` metrics at GET /tandem/metrics for Prometheus.
"""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nodes.context import MAX_REQUEST_CHARS, check_request, parse_context

# Requests that carry a run's context or input: runs (with stream/wait/batch), crons, assistants.
_SUBMISSION_RE = re.compile(
    r"^/(?:(?:threads/[^/]+/)?runs(?:/stream|/wait|/batch|/crons)?|assistants(?:/[^/]+)?)/?$"
)
# A body larger than this cannot hold a valid request (JSON escaping at most ~6x) plus context.
MAX_BODY_BYTES = MAX_REQUEST_CHARS * 6 + 1_000_000


def submission_problem(payload: Any) -> str | None:
    """Why a run-creating payload must be refused, or None when it may go on.

    A batch (a list of payloads) is refused when any of its runs is.
    """
    if isinstance(payload, list):
        problems = (submission_problem(p) for p in payload)
        return next((p for p in problems if p), None)
    if not isinstance(payload, dict):
        return None
    context = payload.get("context")
    if context is not None:
        if not isinstance(context, dict):
            return f"run context must be an object, not {type(context).__name__}"
        try:
            parse_context(context)
        except ValueError as exc:
            return str(exc)
    inputs = payload.get("input")
    request = inputs.get("request") if isinstance(inputs, dict) else None
    if isinstance(request, str):
        try:
            check_request(request)
        except ValueError as exc:
            return str(exc)
    return None


class ValidateSubmission:
    """ASGI middleware: refuse bad run submissions before the server stores them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in ("POST", "PATCH")
            or not _SUBMISSION_RE.match(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                await _refuse(send, 413, f"request body over {MAX_BODY_BYTES:,} bytes")
                return
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None  # the server answers malformed JSON itself
        problem = submission_problem(payload)
        if problem:
            await _refuse(send, 422, problem)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, detail: str) -> None:
    content = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})


async def tandem_metrics(request: Request) -> Response:
    """GET /tandem/metrics: the server graph's `tandem_` metrics (503 before its first run)."""
    from graph.runtime import server_metrics_page

    page = server_metrics_page()
    if page is None:
        return Response("no run has started yet\n", status_code=503, media_type="text/plain")
    return Response(page, media_type=CONTENT_TYPE_LATEST)


app = Starlette(
    routes=[Route("/tandem/metrics", tandem_metrics, methods=["GET"])],
    middleware=[Middleware(ValidateSubmission)],
)
