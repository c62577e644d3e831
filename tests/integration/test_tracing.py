"""Traces reach LangSmith with the attribution the dashboards filter on.

A loopback recorder stands in for LangSmith; the graph runs on fake chat models inside
`tracing_context(client=...)` (env lookups are cached, so a client is passed explicitly).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import langsmith
import pytest
from langsmith.run_helpers import tracing_context

from graph.graph import build_graph
from nodes.context import ServerOptions
from nodes.llm import StaticModels
from tests.fakes import standard_models
from tests.integration.langsmith_recorder import LangSmithRecorder, running_recorder

pytestmark = pytest.mark.integration

PATHS = ["a.py", "b.py", "c.py"]


@pytest.fixture(autouse=True)
def _offline_langsmith(monkeypatch: pytest.MonkeyPatch) -> None:
    # No traffic to smith.langchain.com from anything that reads the environment.
    monkeypatch.setenv("LANGSMITH_TEST_TRACKING", "false")
    monkeypatch.delenv("LANGSMITH_ENDPOINT", raising=False)
    monkeypatch.delenv("LANGCHAIN_ENDPOINT", raising=False)


@pytest.fixture(params=[False, True], ids=["multipart", "multipart-zstd"])
def recorder(request: pytest.FixtureRequest) -> Iterator[LangSmithRecorder]:
    with running_recorder(zstd=request.param) as rec:
        yield rec


async def test_runs_carry_session_stage_and_role(
    recorder: LangSmithRecorder, tmp_path: Path
) -> None:
    reasoning, coder = standard_models(PATHS)
    graph = build_graph(StaticModels(reasoning, coder), options=ServerOptions(workspace=tmp_path))
    client = langsmith.Client(api_url=recorder.url, api_key="test", auto_batch_tracing=True)
    try:
        with tracing_context(enabled=True, client=client, project_name="tandem-test"):
            out = await graph.ainvoke({"request": "write a.py, b.py, c.py", "session_id": "trace1"})
        client.flush()
    finally:
        client.cleanup()
    assert out["status"] == "ok"
    assert (tmp_path / "trace1" / "manifest.json").is_file()

    assert not recorder.errors, recorder.errors
    assert ("GET", "/info") in recorder.requests
    assert ("POST", "/runs/multipart") in recorder.requests
    runs = recorder.runs
    by_id = {r.id: r for r in runs}

    # The graph's root run, finished (its patch arrived) and in the project asked for.
    roots = [r for r in runs if r.parent_run_id is None]
    assert [r.name for r in roots] == ["tandem"], [(r.name, r.parent_run_id) for r in roots]
    root = roots[0]
    assert root.fields.get("end_time"), "root run never finished"
    assert root.fields.get("session_name") == "tandem-test"
    assert root.fields["outputs"]["status"] == "ok"
    assert all(r.fields.get("trace_id") == root.id for r in runs)

    # One LLM run per model call: plan, one coder per file, review.
    llm_runs = [r for r in runs if r.run_type == "llm"]
    stages = sorted(str(r.metadata.get("stage")) for r in llm_runs)
    assert stages == ["code", "code", "code", "plan", "review"], stages
    roles = {"plan": "reasoning", "code": "coder", "review": "reasoning"}
    for run in llm_runs:
        stage = run.metadata["stage"]
        assert run.metadata["session_id"] == "trace1"
        assert run.metadata["endpoint_role"] == roles[stage]
        assert f"stage:{stage}" in run.tags and f"role:{roles[stage]}" in run.tags, run.tags
        assert run.name == f"{stage}:{roles[stage]}"
        assert run.fields.get("end_time") and not run.fields.get("error")
        # Each LLM run hangs under the graph node that made it, and that node under the root.
        assert run.parent_run_id is not None
        node = by_id[run.parent_run_id]
        assert node.name == stage and node.parent_run_id == root.id
    coded_files = sorted(
        str(r.metadata.get("file")) for r in llm_runs if r.metadata["stage"] == "code"
    )
    assert coded_files == PATHS

    # The graph's nodes show up as chain runs under the root.
    node_names = {r.name for r in runs if r.parent_run_id == root.id}
    assert {"plan", "code", "check", "review", "finalize"} <= node_names, node_names


def test_recorder_accepts_batch_and_single_run_endpoints() -> None:
    # The client falls back to /runs/batch (and older code paths to /runs) when multipart
    # is refused; the recorder must merge posts and patches from those too.
    with running_recorder() as rec, httpx.Client(base_url=rec.url, trust_env=False) as http:
        run_a = "00000000-0000-0000-0000-00000000000a"
        run_b = "00000000-0000-0000-0000-00000000000b"
        http.post(
            "/runs/batch",
            json={
                "post": [
                    {"id": run_a, "name": "a", "run_type": "chain", "extra": {"metadata": {"k": 1}}}
                ]
            },
        ).raise_for_status()
        http.post("/runs", json={"id": run_b, "name": "b", "run_type": "llm"}).raise_for_status()
        http.patch(
            f"/runs/{run_b}", json={"end_time": "t", "extra": {"metadata": {"x": 2}}}
        ).raise_for_status()
        http.post(
            "/runs/batch", json={"patch": [{"id": run_a, "end_time": "t"}]}
        ).raise_for_status()
        assert http.get("/nope").status_code == 404
    runs = {r.id: r for r in rec.runs}
    assert runs[run_a].fields["end_time"] == "t" and runs[run_a].metadata == {"k": 1}
    assert runs[run_b].metadata == {"x": 2} and runs[run_b].name == "b"
    assert not rec.errors
