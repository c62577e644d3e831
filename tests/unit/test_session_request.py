"""What a queued session request may hold: the same limits as `tandem run`, checked again
when a worker claims it (the queue is untrusted input)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from graph.queue import MAX_REQUEST_JSON_BYTES, QueueState, SessionRequest, parse_request
from nodes.context import MAX_REQUEST_CHARS, RunContext


def test_a_valid_request_round_trips_through_its_json() -> None:
    request = SessionRequest(
        session_id="s-1", request="Create a.py", context={"max_tokens": {"code": 64}}
    )
    back = parse_request(request.model_dump_json(), "s-1")
    assert back == request
    merged = back.run_context(RunContext(max_files=7))
    assert merged.max_files == 7 and merged.max_tokens.code == 64


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"session_id": "../etc", "request": "x"}, "session_id"),
        ({"session_id": "s-1\n", "request": "x"}, "session_id"),
        ({"session_id": "s-1", "request": "   "}, "empty"),
        ({"session_id": "s-1", "request": "x" * (MAX_REQUEST_CHARS + 1)}, "limit"),
        ({"session_id": "s-1", "request": "x", "context": {"max_files": 0}}, "max_files"),
        ({"session_id": "s-1", "request": "x", "context": {"nope": 1}}, "nope"),
        ({"session_id": "s-1", "request": "x", "priority": 1}, "priority"),
    ],
)
def test_a_bad_request_is_refused_naming_what_is_wrong(
    fields: dict[str, object], named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        SessionRequest.model_validate(fields)
    with pytest.raises(ValueError, match=named):
        parse_request(json.dumps(fields), "s-1")


def test_a_stored_request_must_be_json_of_its_own_session_and_bounded() -> None:
    with pytest.raises(ValueError, match="s-1: invalid request"):
        parse_request("{not json", "s-1")
    other = SessionRequest(session_id="s-2", request="x").model_dump_json()
    with pytest.raises(ValueError, match="names 's-2'"):
        parse_request(other, "s-1")
    huge = " " * (MAX_REQUEST_JSON_BYTES + 1)
    with pytest.raises(ValueError, match="bytes"):
        parse_request(huge, "s-1")


def test_the_queue_is_drained_only_when_nothing_waits_or_runs() -> None:
    assert QueueState(0, 0, 0, 5, 5, 2).drained
    assert not QueueState(0, 1, 0, 4, 5, 2).drained
    assert not QueueState(0, 0, 1, 4, 5, 2).drained
