"""The shareable prefix of each prompt and the share of it served from the prefix cache."""

from __future__ import annotations

import asyncio

from bench.runner import RequestSpan, prefix_shareable_hit_share, shareable_prefix_tokens
from serving.clock import run
from serving.emulator.engine import CHARS_PER_TOKEN, Engine, prompt_block_hashes
from serving.emulator.profiles import PROFILES

BLOCK = 16
SPAN = BLOCK * CHARS_PER_TOKEN  # characters per KV block


def _text(*blocks: str) -> str:
    """A prompt of whole blocks, each filled with its letter."""
    return "".join(b * SPAN for b in blocks)


def _prompt(session_id: str, text: str) -> tuple[str, list[int], int]:
    return (session_id, prompt_block_hashes(text, BLOCK), len(text) // CHARS_PER_TOKEN)


def test_shareable_prefix_is_the_longest_block_run_shared_with_an_earlier_prompt() -> None:
    prompts = [
        _prompt("s1", _text("a", "b", "c", "d")),
        _prompt("s1", _text("a", "b", "c", "e")),  # 3 blocks as the first
        _prompt("s1", _text("a", "b", "x", "d")),  # 2 blocks (its 4th reads as the first's)
        _prompt("s1", _text("z", "b", "c", "d")),  # differs in block 1: nothing
    ]
    assert shareable_prefix_tokens(prompts, BLOCK) == [0, 3 * BLOCK, 2 * BLOCK, 0]


def test_other_sessions_prompts_are_not_shareable() -> None:
    prompts = [_prompt("s1", _text("a", "b", "c")), _prompt("s2", _text("a", "b", "c"))]
    assert shareable_prefix_tokens(prompts, BLOCK) == [0, 0]


def test_the_last_prompt_token_is_never_shareable() -> None:
    # An identical prompt of whole blocks: the server computes its last token again.
    text = _text("a", "b", "c")
    prompts = [_prompt("s1", text), _prompt("s1", text)]
    assert shareable_prefix_tokens(prompts, BLOCK) == [0, 2 * BLOCK]


def _span(role: str, shareable: int, cached: int) -> RequestSpan:
    return RequestSpan(role, "s1", "code", 0.0, 0.0, 1.0, 400, 10, cached, False, shareable)


def test_hit_share_counts_cached_tokens_within_the_shareable_prefix() -> None:
    spans = [
        _span("coder", 0, 64),  # cached from elsewhere: not within a shareable prefix
        _span("coder", 320, 320),
        _span("coder", 320, 0),
        _span("coder", 160, 320),  # more cached than shareable: counts up to the prefix
    ]
    share = prefix_shareable_hit_share(spans)
    assert share == {"reasoning": None, "coder": round((320 + 160) / 800, 4)}
    assert prefix_shareable_hit_share([]) is None


def test_the_engine_serves_exactly_the_shareable_prefix_of_a_later_prompt() -> None:
    profile = PROFILES["h100-coder-8b"]
    shared = "plan " * 1000

    async def serve() -> Engine:
        engine = Engine(profile)
        for i in range(3):
            handle = engine.submit(shared + f"file {i}", 5, session_id="s1", stage="code")
            await handle.result()
            await asyncio.sleep(0.1)
        await engine.aclose()
        return engine

    engine = run(serve(), virtual=True)
    records = engine.records
    counts = shareable_prefix_tokens(
        [(r.session_id, r.block_hashes, r.prompt_tokens) for r in records], profile.block_size
    )
    assert counts[0] == 0 and counts[1] > 1000
    assert [r.cached_tokens for r in records] == counts
