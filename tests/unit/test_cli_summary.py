"""The final summary names each replica's URL with its credentials hidden."""

from __future__ import annotations

from cli.summary import summary_text
from graph.sessions import SessionResult


def test_router_table_hides_credentials_in_urls() -> None:
    stats = {
        "coder@gpu1": {
            "role": "coder",
            "url": "http://user:hunter2@10.0.0.2:8002/v1?api_key=sk-LEAK",
            "limit": 8,
            "in_flight": 0,
            "queued": 0,
        }
    }
    text = summary_text([SessionResult("s-1", "ok")], virtual=False, router_stats=stats)
    assert "10.0.0.2:8002/v1" in text
    assert "hunter2" not in text and "sk-LEAK" not in text
