"""Published (and derived) vLLM measurements the H100 emulator profiles are fitted to.

One YAML file per profile in this folder, named after the profile. It records where the
numbers come from (source, vLLM version, precision, GPU SKU), the card and model figures the
profile's bounds are checked against (HBM bandwidth, dense BF16 peak, weight bytes, memory
arithmetic), and a list of points. A point is one measured quantity at one shape:

- `itl_batch1`: inter-token latency of a lone request at a given context length;
- `prefill`: time to first token of a lone request with a given prompt length;
- `throughput`: output tokens/s of a closed loop of `concurrency` clients sending requests of
  one shape (as `vllm bench serve --max-concurrency` does).

A point marked `derived: true` is computed from other figures (its `note` says how), not
published. `predict` runs the real `Engine` on a virtual clock to say what a profile gives at
a point's shape, so a file's points double as the profile's acceptance test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.clock import run
from serving.emulator.engine import CHARS_PER_TOKEN, Engine
from serving.emulator.profiles import MiB, Profile, kv_tokens_from_memory

CALIBRATION_DIR = Path(__file__).resolve().parent


class _Point(BaseModel):
    model_config = ConfigDict(extra="forbid")

    derived: bool = False
    note: str = ""
    engine_gap: str = Field(
        default="",
        description="why the engine's step model cannot reproduce this point (empty: it can)",
    )


class ItlBatch1(_Point):
    """Inter-token latency of one request alone, at `context_tokens` of context."""

    kind: Literal["itl_batch1"]
    context_tokens: int = Field(gt=0)
    itl_ms: float = Field(gt=0)


class Prefill(_Point):
    """Time to first token of one request alone on an idle server (cold prefix cache).

    `frontend_ms` is the part of `ttft_ms` spent outside the engine (HTTP, tokenizing the
    prompt, detokenizing and streaming the token): the emulator's engine does not model it,
    so `predict` adds it to the engine's time to first token.
    """

    kind: Literal["prefill"]
    input_tokens: int = Field(gt=0)
    ttft_ms: float = Field(gt=0)
    frontend_ms: float = Field(default=0.0, ge=0)


class Throughput(_Point):
    """Output tokens/s with `concurrency` clients, each request `input_tokens` in and
    `output_tokens` out; `requests` in all (default: 3 x concurrency)."""

    kind: Literal["throughput"]
    concurrency: int = Field(gt=0)
    input_tokens: int = Field(gt=0)
    output_tokens: int = Field(gt=0)
    output_tok_s: float = Field(gt=0)
    requests: int | None = Field(default=None, gt=0)


Point = Annotated[ItlBatch1 | Prefill | Throughput, Field(discriminator="kind")]


class Calibration(BaseModel):
    """One profile's calibration file: provenance, card and model figures, and points."""

    model_config = ConfigDict(extra="forbid")

    profile: str
    model: str
    source: str
    vllm_version: str
    precision: str
    gpu: str
    hbm_bandwidth_tb_s: float = Field(gt=0)
    dense_bf16_tflops: float = Field(gt=0)
    params: float = Field(gt=0, description="parameter count, for 2 x params FLOPs per token")
    weight_bytes: float = Field(gt=0)
    card_memory_mib: float = Field(gt=0, description="total memory as nvidia-smi reports it")
    gpu_memory_utilization: float = Field(gt=0, le=1)
    reserve_gib: float = Field(ge=0, description="activations, CUDA graphs, non-torch memory")
    kv_bytes_per_token: int = Field(gt=0)
    block_size: int = Field(default=16, gt=0)
    points: list[Point] = Field(min_length=1)

    def weight_read_s(self) -> float:
        """Seconds to read the weights once from HBM: the floor of a decode step."""
        return self.weight_bytes / (self.hbm_bandwidth_tb_s * 1e12)

    def prefill_peak_fraction(self, prefill_token_s: float) -> float:
        """Fraction of dense BF16 peak that `prefill_token_s` implies (2 x params FLOPs)."""
        return 2 * self.params / prefill_token_s / (self.dense_bf16_tflops * 1e12)

    def kv_cache_tokens(self) -> int:
        """KV tokens from vLLM's memory arithmetic: utilization x card - weights - reserve."""
        free = (
            self.gpu_memory_utilization * self.card_memory_mib * MiB
            - self.weight_bytes
            - self.reserve_gib * 2**30
        )
        return kv_tokens_from_memory(free, self.kv_bytes_per_token, self.block_size)


def calibration_path(profile_name: str) -> Path:
    """Where the calibration file of `profile_name` lives (it may not exist)."""
    return CALIBRATION_DIR / f"{profile_name}.yaml"


def load_calibration(path: str | Path) -> Calibration:
    """Parse one calibration file.

    Raises:
        ValueError: unreadable YAML or a schema violation; the message names the file and
            the offending field.
    """
    origin = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read calibration file {origin}: {exc}") from None
    try:
        return Calibration.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"{origin}: {problems}") from None


def load_all() -> dict[str, Calibration]:
    """Every calibration file in this folder, by profile name.

    Raises:
        ValueError: a file fails to parse, or names a profile other than its file name.
    """
    out: dict[str, Calibration] = {}
    for path in sorted(CALIBRATION_DIR.glob("*.yaml")):
        cal = load_calibration(path)
        if cal.profile != path.stem:
            raise ValueError(f"{path}: profile {cal.profile!r} does not match the file name")
        out[cal.profile] = cal
    return out


def load_points(profile_name: str) -> list[ItlBatch1 | Prefill | Throughput]:
    """The points of `profile_name`'s calibration file."""
    return list(load_calibration(calibration_path(profile_name)).points)


def measured(point: ItlBatch1 | Prefill | Throughput) -> float:
    """The point's published (or derived) value, in its own unit."""
    if isinstance(point, ItlBatch1):
        return point.itl_ms
    if isinstance(point, Prefill):
        return point.ttft_ms
    return point.output_tok_s


def unit(point: ItlBatch1 | Prefill | Throughput) -> str:
    """The unit of `measured(point)`."""
    return "tok/s" if isinstance(point, Throughput) else "ms"


def shape(point: ItlBatch1 | Prefill | Throughput) -> str:
    """A short human description of the point's shape."""
    if isinstance(point, ItlBatch1):
        return f"ITL, batch 1, {point.context_tokens} ctx"
    if isinstance(point, Prefill):
        return f"TTFT, batch 1, {point.input_tokens} in"
    return f"c={point.concurrency}, {point.input_tokens} in / {point.output_tokens} out"


def _prompt(tag: str, tokens: int) -> str:
    # The tag leads, so no two requests share a first block and the prefix cache stays cold.
    chars = tokens * CHARS_PER_TOKEN
    return (f"{tag}: " + "x" * chars)[:chars]


async def _lone_request(
    profile: Profile, input_tokens: int, output_tokens: int
) -> tuple[float, float]:
    """TTFT and mean inter-token time of one request on an idle engine, in seconds."""
    engine = Engine(profile)
    record = await engine.submit(_prompt("solo", input_tokens), output_tokens).result()
    await engine.aclose()
    assert record.first_token_s is not None and record.finish_s is not None
    ttft_s = record.first_token_s - record.arrival_s
    itl_s = (record.finish_s - record.first_token_s) / max(1, output_tokens - 1)
    return ttft_s, itl_s


async def _closed_loop(profile: Profile, point: Throughput) -> float:
    """Output tok/s of `point.concurrency` clients sharing the point's requests."""
    engine = Engine(profile)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(point.concurrency)
    total = point.requests or 3 * point.concurrency

    async def one(i: int) -> None:
        async with gate:
            await engine.submit(_prompt(f"r{i}", point.input_tokens), point.output_tokens).result()

    start = loop.time()
    await asyncio.gather(*(one(i) for i in range(total)))
    elapsed = loop.time() - start
    await engine.aclose()
    return total * point.output_tokens / elapsed


def predict(profile: Profile, point: ItlBatch1 | Prefill | Throughput) -> float:
    """What `profile` gives at `point`'s shape, in the point's unit, from the real engine.

    The engine runs on a virtual clock: an `itl_batch1` point is the decode step of one
    request whose context is `context_tokens`; a `prefill` point the time to first token of
    one request plus the point's `frontend_ms`; a `throughput` point a closed loop of
    `concurrency` clients.
    """
    if isinstance(point, ItlBatch1):
        # Two tokens: the second is one decode step over context_tokens tokens of context.
        _, itl_s = run(_lone_request(profile, point.context_tokens - 1, 2), virtual=True)
        return itl_s * 1e3
    if isinstance(point, Prefill):
        ttft_s, _ = run(_lone_request(profile, point.input_tokens, 1), virtual=True)
        return ttft_s * 1e3 + point.frontend_ms
    return run(_closed_loop(profile, point), virtual=True)


@dataclass(frozen=True)
class Row:
    """One point of one profile with the emulator's prediction."""

    profile: str
    calibration: Calibration
    point: ItlBatch1 | Prefill | Throughput
    predicted: float

    @property
    def error(self) -> float:
        """Relative error of the prediction (+0.05: 5% above the published value)."""
        return self.predicted / measured(self.point) - 1


def rows(profiles: dict[str, Profile], calibrations: dict[str, Calibration]) -> list[Row]:
    """Predict every point of every profile that has a calibration file."""
    out: list[Row] = []
    for name, cal in calibrations.items():
        profile = profiles[name]
        out.extend(Row(name, cal, p, predict(profile, p)) for p in cal.points)
    return out


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def markdown_table(table_rows: Sequence[Row]) -> str:
    """The rows as a Markdown table: provenance, shape, published, predicted, error."""
    lines = [
        "| profile | source | vLLM | precision | GPU | shape | published | emulator | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table_rows:
        cal, p = r.calibration, r.point
        value = f"{_fmt(measured(p))} {unit(p)}" + (" (derived)" if p.derived else "")
        error = f"{r.error:+.1%}" + (" (engine gap)" if p.engine_gap else "")
        lines.append(
            f"| `{r.profile}` | {cal.source} | {cal.vllm_version} | {cal.precision} | "
            f"{cal.gpu} | {shape(p)} | {value} | {_fmt(r.predicted)} {unit(p)} | {error} |"
        )
    return "\n".join(lines)


def worst_error(table_rows: Sequence[Row]) -> float:
    """Largest absolute relative error among rows the engine should reproduce (0: none)."""
    return max((abs(r.error) for r in table_rows if not r.point.engine_gap), default=0.0)
