"""Every rough edge of the command line ends in one clean message and a documented exit code.

Exit codes: 0 ok, 1 some sessions failed, 2 usage or configuration error, 130 interrupted.
Each case runs the real `tandem` entry point in this process and checks that the message
names the thing that is wrong, that no traceback is printed, and that nothing ran.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from cli.app import main as tandem
from graph.graph import build_graph
from graph.sessions import run_session
from nodes.context import MAX_REQUEST_CHARS, RunContext, ServerOptions
from nodes.llm import StaticModels
from routing.fanout import FanoutPolicy
from tests.fakes import standard_models

pytestmark = pytest.mark.integration


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean environment: no TANDEM_* but the workspace."""
    for name in list(os.environ):
        if name.upper().startswith("TANDEM_"):
            monkeypatch.delenv(name)
    ws = tmp_path / "ws"
    monkeypatch.setenv("TANDEM_WORKSPACE", str(ws))
    return ws


def _fails(
    capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2, *needles: str
) -> str:
    assert tandem(argv) == code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_request_file_is_named(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = workspace.parent / "nope.md"
    _fails(capsys, ["run", "--request-file", str(missing)], 2, str(missing), "no such file")
    assert not workspace.exists()


def test_binary_request_file_is_refused(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = workspace.parent / "blob.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    _fails(capsys, ["run", "--request-file", str(binary)], 2, str(binary), "not UTF-8 text")


def test_a_request_over_the_limit_is_refused_before_anything_is_written(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fails(capsys, ["run", "x" * (MAX_REQUEST_CHARS + 1)], 2, f"limit is {MAX_REQUEST_CHARS}")
    assert not workspace.exists()


def test_no_request_or_two_requests(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["run"], 2, "give one of REQUEST, --request-file FILE or --demo")
    _fails(capsys, ["run", "x", "--demo"], 2, "REQUEST and --demo")


@pytest.mark.parametrize("session_id", ["../../etc", "s-1\n", "a/b"])
def test_resume_refuses_an_unsafe_session_id(
    workspace: Path, capsys: pytest.CaptureFixture[str], session_id: str
) -> None:
    _fails(capsys, ["resume", session_id], 2, repr(session_id), "not a safe directory name")


def test_unknown_emulator_profile_is_named_with_the_known_ones(
    workspace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fails(capsys, ["emulate", "--profile", "h900", "--port", "1"], 2, "'h900'", "known:")
    monkeypatch.setenv("TANDEM_EMULATOR_CODER_PROFILE", "h900-coder")
    _fails(
        capsys,
        ["run", "x"],
        2,
        "TANDEM_EMULATOR_CODER_PROFILE",
        "unknown emulator profile 'h900-coder'",
        "h100-nvl-coder-8b",
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such file"),
        ("reasoning: [\n", "not valid YAML"),
        ("reasoning: []\ncoder: []\n", "needs a non-empty list of replicas"),
        ("gpu0: [{url: http://h:1/v1, model: m, gpu: g}]\n", "unknown role 'gpu0'"),
    ],
)
def test_a_bad_endpoints_file_is_named_with_its_problem(
    workspace: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    content: str | None,
    problem: str,
) -> None:
    path = workspace.parent / "endpoints.yaml"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("TANDEM_ENDPOINTS_FILE", str(path))
    _fails(capsys, ["run", "x", "--clock", "real"], 2, str(path), problem)


def test_an_unwritable_workspace_is_named(
    tmp_path: Path,
    workspace: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TANDEM_WORKSPACE", str(blocker / "ws"))
    _fails(capsys, ["run", "x"], 2, f"workspace {blocker / 'ws'} is not writable")


def test_a_metrics_port_in_use_is_named(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _fails(
            capsys, ["run", "x", "--metrics-port", str(port)], 2, f"metrics port {port} is in use"
        )


def test_virtual_clock_against_real_servers_is_refused(
    workspace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_REASONING_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("TANDEM_CODER_URL", "http://127.0.0.1:2/v1")
    _fails(capsys, ["run", "x", "--clock", "virtual"], 2, "--clock virtual", "real vLLM servers")
    assert not workspace.exists()


def test_settings_errors_name_the_variable_without_a_traceback(
    workspace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_MAX_REVIEW_ROUNDS", "-3")
    monkeypatch.setenv("TANDEM_API_KEY", "sk-LEAKME")
    err = _fails(capsys, ["run", "x"], 2, "TANDEM_MAX_REVIEW_ROUNDS")
    assert "LEAKME" not in err


def test_bad_option_values_are_usage_errors(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fails(capsys, ["run", "x", "--limit", "fixed-0"], 2, "--limit")
    _fails(capsys, ["run", "x", "--max-tokens", "plan=0"], 2, "--max-tokens", "plan=0")
    _fails(capsys, ["run", "x", "--sessions", "0"], 2, "--sessions")
    _fails(capsys, ["serve"], 2, "choose --backend vllm-cpu")


async def _finished_failed_session(workspace: Path, session_id: str) -> str:
    """A session that ran to its end as `failed` (a plan with no files), checkpointed."""
    reasoning, coder = standard_models([])
    ctx = RunContext()
    async with AsyncSqliteSaver.from_conn_string(str(workspace / "checkpoints.db")) as saver:
        graph = build_graph(
            StaticModels(reasoning, coder),
            defaults=ctx,
            options=ServerOptions(workspace=workspace),
            checkpointer=saver,
        )
        result = await run_session(
            graph,
            "build nothing",
            session_id,
            context=ctx,
            fanout=FanoutPolicy(max_parallel=2),
            workspace=workspace,
        )
    return result.status


def test_resume_of_a_failed_session_exits_1(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    workspace.mkdir(parents=True)
    assert asyncio.run(_finished_failed_session(workspace, "s-failed")) == "failed"
    assert tandem(["resume", "s-failed"]) == 1
    assert "already finished (failed)" in capsys.readouterr().out


def test_servers_that_do_not_answer_are_named_before_anything_runs(
    workspace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TANDEM_REASONING_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("TANDEM_CODER_URL", f"http://user:hunter2@127.0.0.1:{port}/v1")
    err = _fails(
        capsys, ["run", "x", "--no-checkpoint"], 2, "not ready", f"127.0.0.1:{port}/v1", "coder"
    )
    assert "hunter2" not in err
    assert not (workspace / "checkpoints.db").exists()
