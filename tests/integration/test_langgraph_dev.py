"""The `tandem` graph served by `langgraph dev`, driven through langgraph-sdk.

The server runs as a subprocess from the repo root on a free loopback port, offline, with no
`TANDEM_*_URL` set (so the built-in in-process vLLM emulator serves both roles) and
`--n-jobs-per-worker 4` (without it, runs on different threads queue behind each other).
Its log goes to a temp dir outside the repo: a file the reloader watches would restart it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from langgraph_sdk import get_client
from langgraph_sdk.errors import UnprocessableEntityError

from bench.services import free_port
from nodes.context import MAX_REQUEST_CHARS

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 60.0
PATHS = ["a.py", "b.py", "c.py"]
REQUEST = "Write a tiny package: files a.py, b.py, c.py, each defining one constant."
# Short answers keep a run to a few seconds on the emulated H100s (the emulator's answers stay
# complete JSON and code whatever the token count); the plan stays long enough (~2-4 s of
# emulated decode) for two runs to overlap visibly.
MAX_TOKENS = {"plan": 200, "code": 100, "review": 100}
# A server setting that differs from RunContext's class default: Studio's form must show it.
SERVER_MAX_FILES = 12

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_API_RE = re.compile(r"API:\s*http://([\w.\-]+):(\d+)")


@dataclass
class DevServer:
    url: str
    port: int
    workspace: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return _ANSI_RE.sub("", self.log_path.read_text(errors="replace"))

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


def _langgraph_bin() -> Path:
    for candidate in (
        REPO_ROOT / ".venv" / "bin" / "langgraph",
        Path(sys.executable).parent / "langgraph",
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("no `langgraph` binary in .venv/bin: install the dev extras (langgraph-cli[inmem])")


def _server_env(workspace: Path) -> dict[str, str]:
    # Drop every TANDEM_* setting of the caller: no URL means the built-in emulator.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env.update(
        LANGGRAPH_CLI_NO_ANALYTICS="1",
        LANGGRAPH_NO_VERSION_CHECK="true",
        LANGSMITH_TRACING="false",
        LANGCHAIN_TRACING_V2="false",
        LANGSMITH_TEST_TRACKING="false",
        PYTHONUNBUFFERED="1",
        TANDEM_WORKSPACE=str(workspace),
        TANDEM_MAX_FILES=str(SERVER_MAX_FILES),
    )
    return env


def _wait_until_serving(server: DevServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    announced: int | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"langgraph dev exited with {server.process.returncode} before serving:\n"
                + server.log_tail()
            )
        match = _API_RE.search(server.log())
        if match:
            announced = int(match.group(2))
            if announced != server.port:
                # langgraph dev silently picks another port when the one asked for is taken.
                pytest.fail(
                    f"langgraph dev serves on port {announced}, not the {server.port} asked for "
                    "(port taken?):\n" + server.log_tail()
                )
        if announced is not None:
            try:
                if httpx.get(f"{server.url}/ok", timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    pytest.fail(
        f"langgraph dev not answering /ok after {START_TIMEOUT_S:.0f} s:\n" + server.log_tail()
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    # The CLI starts the API server as a child: end the whole process group.
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    try:  # children that outlived the leader
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    binary = _langgraph_bin()
    log_dir = tmp_path_factory.mktemp("langgraph-dev")
    assert not log_dir.resolve().is_relative_to(REPO_ROOT), "the log must live outside the repo"
    workspace = tmp_path_factory.mktemp("workspace")
    port = free_port()
    log_path = log_dir / "server.log"
    command = [str(binary), "dev", "--no-browser", "--no-reload", "--n-jobs-per-worker", "4"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=_server_env(workspace),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = DevServer(f"http://127.0.0.1:{port}", port, workspace, log_path, process)
    try:
        _wait_until_serving(server)
        yield server
    finally:
        _stop(process)


async def _start_run(client: Any, session_id: str, context: dict[str, Any]) -> tuple[str, str]:
    thread = await client.threads.create()
    run = await client.runs.create(
        thread["thread_id"],
        "tandem",
        input={"request": REQUEST, "session_id": session_id},
        context=context,
    )
    return thread["thread_id"], run["run_id"]


async def _finish(client: Any, server: DevServer, thread_id: str, run_id: str) -> dict[str, Any]:
    await asyncio.wait_for(client.runs.join(thread_id, run_id), RUN_TIMEOUT_S)
    run = await client.runs.get(thread_id, run_id)
    assert run["status"] == "success", f"run {run['status']}:\n{server.log_tail()}"
    state = await client.threads.get_state(thread_id)
    values: dict[str, Any] = state["values"]
    return values


def _assert_session_written(server: DevServer, values: dict[str, Any], paths: list[str]) -> None:
    session_id = values["session_id"]
    assert values["status"] in ("ok", "partial"), values.get("error")
    assert [f["path"] for f in values["plan"]["files"]] == paths
    assert sorted(values["files"]) == sorted(paths)
    out_dir = server.workspace / session_id
    assert Path(values["output_dir"]) == out_dir  # TANDEM_WORKSPACE reached the server
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["session_id"] == session_id and manifest["status"] == values["status"]
    assert sorted(manifest["files"]) == sorted(paths)
    for path in paths:
        if values["files"][path]["status"] == "written":
            assert (out_dir / path).read_text() == values["files"][path]["content"]
    if values["status"] == "ok":
        assert all((out_dir / p).is_file() for p in paths)


async def test_run_writes_planned_files(dev_server: DevServer) -> None:
    client = get_client(url=dev_server.url)
    assistants = await client.assistants.search(graph_id="tandem")
    assert assistants, "langgraph dev did not register the `tandem` graph"
    # Studio builds its input form and its context form from these schemas.
    schemas = await client.assistants.get_schemas(assistants[0]["assistant_id"])
    assert schemas["input_schema"] is not None, "Studio would show no input form"
    assert {"request", "session_id"} <= set(schemas["input_schema"]["properties"])
    assert "max_files" in (schemas.get("context_schema") or {}).get("properties", {})
    thread_id, run_id = await _start_run(
        client, "lgdev-one", {"max_files": 10, "max_tokens": MAX_TOKENS}
    )
    values = await _finish(client, dev_server, thread_id, run_id)
    assert values["session_id"] == "lgdev-one"
    assert values["rejected_paths"] == []
    _assert_session_written(dev_server, values, PATHS)
    assert values["usage"]["reasoning"]["calls"] >= 2  # plan and at least one review
    assert values["usage"]["coder"]["calls"] >= len(PATHS)
    assert "BlockingError" not in dev_server.log()


async def test_two_threads_run_at_once(dev_server: DevServer) -> None:
    client = get_client(url=dev_server.url)
    # Different per-run context on each thread: max_files=2 must cut the plan of run B only.
    runs = [
        await _start_run(client, "lgdev-a", {"max_files": 10, "max_tokens": MAX_TOKENS}),
        await _start_run(client, "lgdev-b", {"max_files": 2, "max_tokens": MAX_TOKENS}),
    ]
    # With one job per worker the second run would stay "pending" until the first is done.
    overlapped = False
    deadline = time.monotonic() + RUN_TIMEOUT_S
    statuses: list[str] = []
    while time.monotonic() < deadline:
        statuses = [(await client.runs.get(t, r))["status"] for t, r in runs]
        if statuses == ["running", "running"]:
            overlapped = True
            break
        if all(s not in ("pending", "running") for s in statuses):
            break
        await asyncio.sleep(0.05)
    assert overlapped, f"the two runs never ran at once (last statuses {statuses})"

    a, b = [await _finish(client, dev_server, t, r) for t, r in runs]
    _assert_session_written(dev_server, a, PATHS)
    _assert_session_written(dev_server, b, PATHS[:2])
    assert [r["path"] for r in b["rejected_paths"]] == ["c.py"]
    assert a["rejected_paths"] == []


async def test_context_form_shows_the_servers_defaults_and_no_internal_knobs(
    dev_server: DevServer,
) -> None:
    client = get_client(url=dev_server.url)
    assistant = (await client.assistants.search(graph_id="tandem"))[0]
    schema = (await client.assistants.get_schemas(assistant["assistant_id"]))["context_schema"]
    fields = schema["properties"]
    assert fields["max_files"]["default"] == SERVER_MAX_FILES  # TANDEM_MAX_FILES, not 40
    assert fields["max_files"]["minimum"] == 1 and fields["max_files"]["description"]
    assert all(field.get("description") for field in fields.values())
    assert "workspace" not in fields and "review_batch_chars" not in fields
    assert schema.get("additionalProperties") is False


@pytest.mark.parametrize(
    ("context", "request_text", "named"),
    [
        ({"max_files": 0}, REQUEST, "max_files"),
        ({"max_files": 3, "workspace": "/etc"}, REQUEST, "workspace: unknown field"),
        ({"max_tokens": {"code": "lots"}}, REQUEST, "max_tokens.code"),
        ({}, "x" * (MAX_REQUEST_CHARS + 1), f"the limit is {MAX_REQUEST_CHARS:,}"),
    ],
)
async def test_a_bad_submission_is_refused_naming_the_field(
    dev_server: DevServer, context: dict[str, Any], request_text: str, named: str
) -> None:
    client = get_client(url=dev_server.url)
    thread = await client.threads.create()
    with pytest.raises(UnprocessableEntityError, match=re.escape(named)):
        await client.runs.create(
            thread["thread_id"], "tandem", input={"request": request_text}, context=context
        )
    # runs.wait raises httpx's error, with the server's answer in its message.
    with pytest.raises(httpx.HTTPStatusError, match=re.escape(named)) as refused:
        await client.runs.wait(None, "tandem", input={"request": request_text}, context=context)
    assert refused.value.response.status_code == 422
    # Refused before the server stored anything: the thread has no run.
    assert await client.runs.list(thread["thread_id"]) == []


async def test_a_good_context_runs_and_streams_progress_events(dev_server: DevServer) -> None:
    client = get_client(url=dev_server.url)
    thread = await client.threads.create()
    events: list[dict[str, Any]] = []
    async for part in client.runs.stream(
        thread["thread_id"],
        "tandem",
        input={"request": REQUEST, "session_id": "lgdev-events"},
        context={"max_files": 3, "max_tokens": MAX_TOKENS},
        stream_mode="custom",
    ):
        if part.event == "custom":
            events.append(part.data)
    files_done = [e for e in events if e["event"] == "file_done"]
    first_round = [e for e in files_done if e["round"] == 0]
    assert sorted(e["file"] for e in first_round) == sorted(PATHS)
    assert sorted(e["done"] for e in first_round) == [1, 2, 3]
    assert {e["total"] for e in first_round} == {3}
    assert all(e["session_id"] == "lgdev-events" for e in events)
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages[0] == "plan" and stages[-1] == "finalize" and "review" in stages
    values = (await client.threads.get_state(thread["thread_id"]))["values"]
    _assert_session_written(dev_server, values, PATHS)
    # The server's own tandem_ metrics, mounted on its HTTP app.
    async with httpx.AsyncClient() as http:
        page = await http.get(f"{dev_server.url}/tandem/metrics")
    assert page.status_code == 200, page.text
    assert "tandem_endpoint_admitted_total{" in page.text and 'role="coder"' in page.text
