"""The emulator served by uvicorn on a loopback port, reached over real HTTP."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from bench.services import free_port
from serving.emulator.app import create_app

pytestmark = pytest.mark.integration


async def test_emulator_serves_over_http() -> None:
    port = free_port()
    app = create_app("cpu-tiny", served_model_name="tiny", max_coalesced_steps=1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(500):  # uvicorn offers no started event
            if server.started:
                break
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert (await client.get("/health")).status_code == 200
            request = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "FILE: a.json\nWrite it."}],
                "max_tokens": 16,
            }
            plain = (await client.post("/v1/chat/completions", json=request)).json()
            assert plain["usage"]["completion_tokens"] >= 8
            body = plain["choices"][0]["message"]["content"]
            json.loads(body.split("\n", 1)[1].rsplit("```", 1)[0])

            chunks = []
            stream_request = {**request, "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=stream_request) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:])
            assert chunks[-1] == "[DONE]"
            assert json.loads(chunks[-2])["choices"][0]["finish_reason"] == "stop"

            assert (
                await client.post("/v1/chat/completions", json={**request, "model": "x"})
            ).status_code == 404
            metrics = (await client.get("/metrics")).text
            names = {f.name for f in text_string_to_metric_families(metrics)}
            assert "vllm:generation_tokens" in names
    finally:
        server.should_exit = True
        await serving
