"""Sampling per role: settings -> RoutedModels -> the temperature and top-p on the wire."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from langchain_core.messages import HumanMessage

from graph.runtime import build_runtime
from graph.settings import load_settings
from nodes.llm import RoutedModels, Sampling, Usage, complete_text
from routing.calls import CallInfo, Role
from serving.launch import load_profile


class RecordingRouter:
    """A router whose clients answer every chat call with "ok" and keep the request bodies."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[dict[str, Any]]] = {"reasoning": [], "coder": []}

    def base_url(self, role: Role) -> str:
        return f"http://{role}.test/v1"

    def model(self, role: Role) -> str:
        return f"tandem-{role}"

    def client(self, role: Role) -> httpx.AsyncClient:
        def answer(request: httpx.Request) -> httpx.Response:
            self.bodies[role].append(json.loads(request.content))
            chunk = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": self.model(role),
                "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}],
            }
            body = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
            return httpx.Response(
                200, content=body.encode(), headers={"content-type": "text/event-stream"}
            )

        return httpx.AsyncClient(transport=httpx.MockTransport(answer))


async def _call(models: RoutedModels, role: Role) -> None:
    info = CallInfo(session_id="s1", stage="plan" if role == "reasoning" else "code", role=role)
    content, _ = await complete_text(
        models.for_role(role), [HumanMessage(content="hi")], info, Usage()
    )
    assert content == "ok"


async def test_each_role_sends_its_own_temperature_and_top_p() -> None:
    router = RecordingRouter()
    models = RoutedModels(
        router=router,
        sampling={"reasoning": Sampling(0.6, 0.95), "coder": Sampling(0.7, 0.8)},
    )
    await _call(models, "reasoning")
    await _call(models, "coder")
    (reasoning,) = router.bodies["reasoning"]
    (coder,) = router.bodies["coder"]
    assert (reasoning["temperature"], reasoning["top_p"]) == (0.6, 0.95)
    assert (coder["temperature"], coder["top_p"]) == (0.7, 0.8)
    assert reasoning["model"] == "tandem-reasoning" and coder["model"] == "tandem-coder"


async def test_a_role_without_sampling_leaves_the_servers_default() -> None:
    router = RecordingRouter()
    await _call(RoutedModels(router=router), "coder")
    (body,) = router.bodies["coder"]
    assert "temperature" not in body and "top_p" not in body


def test_settings_defaults_are_the_seed_models_recommendations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("TEMPERATURE", "TOP_P"):
        for role in ("REASONING", "CODER"):
            monkeypatch.delenv(f"TANDEM_{role}_{name}", raising=False)
    settings = load_settings()
    profile = load_profile("h100-pair")  # the seed's deployment
    reasoning, coder = profile.server("reasoning"), profile.server("coder")
    assert (settings.reasoning_temperature, settings.reasoning_top_p) == (0.6, 0.95)
    assert (reasoning.temperature, reasoning.top_p) == (0.6, 0.95)
    assert (settings.coder_temperature, settings.coder_top_p) == (coder.temperature, coder.top_p)


async def test_runtime_passes_the_settings_sampling_to_the_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TANDEM_CODER_TEMPERATURE", "0.3")
    monkeypatch.setenv("TANDEM_CODER_TOP_P", "0.9")
    monkeypatch.delenv("TANDEM_REASONING_TEMPERATURE", raising=False)
    runtime = build_runtime(load_settings())
    try:
        assert runtime.models.sampling["coder"] == Sampling(0.3, 0.9)
        assert runtime.models.sampling["reasoning"].temperature == 0.6
    finally:
        await runtime.aclose()


@pytest.mark.parametrize(
    ("name", "value"), [("TANDEM_CODER_TEMPERATURE", "3"), ("TANDEM_REASONING_TOP_P", "0")]
)
def test_out_of_range_sampling_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=name):
        load_settings()
