"""Does a launch profile fit its hardware? Weights + activations + KV cache vs GPU memory.

vLLM V1 gives a server `gpu_memory_utilization x total GPU memory`. From that it takes the
weights, the peak activations of one `max_num_batched_tokens` step, and non-torch memory
(CUDA context, CUDA graphs, NCCL); what is left becomes KV cache. A server refuses to start
when one `max_model_len` sequence does not fit, and serves fewer sequences than
`max_num_seqs` at once when their contexts do not fit (the rest queue or get preempted).

This module estimates the same budget from a small table of model architectures, so a
profile that cannot work is rejected before anyone waits for a 60 GB download. The
estimates are deliberately a little pessimistic (activations especially); vLLM's own
profiling run at startup is the final word.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.launch import Profile, RoleServer
from serving.roles import Role

GIB = 1024**3
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "auto": 2, "float32": 4, "fp8": 1}
# CUDA context, cuBLAS/NCCL workspaces and CUDA graphs: not torch tensors, but inside the budget.
NON_TORCH_OVERHEAD_GIB = 1.5


@dataclass(frozen=True)
class ModelSpec:
    """What the fit check needs to know about a model (from its config.json).

    Attributes:
        params: Total parameter count (all experts for MoE models).
        layers: num_hidden_layers.
        kv_heads: num_key_value_heads (ignored when mla_kv_dim is set).
        head_dim: Per-head dimension of K and V.
        hidden: hidden_size.
        intermediate: MLP width touched per token (for MoE: top-k x expert width).
        vocab: vocab_size.
        max_position: max_position_embeddings.
        mla_kv_dim: For multi-head latent attention, cached values per token per layer
            (kv_lora_rank + qk_rope_head_dim); K and V share this one latent.
        source: Where the figures come from.
    """

    params: float
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    max_position: int
    mla_kv_dim: int | None = None
    source: str = ""

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache bytes one token occupies across all layers."""
        per_layer = self.mla_kv_dim if self.mla_kv_dim else 2 * self.kv_heads * self.head_dim
        return self.layers * per_layer * dtype_bytes


def _hf(model_id: str) -> str:
    return f"https://huggingface.co/{model_id}/blob/main/config.json"


# fmt: off
MODELS: dict[str, ModelSpec] = {
    # Qwen2.5-32B architecture; 32.8B parameters (model card).
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": ModelSpec(
        params=32.76e9, layers=64, kv_heads=8, head_dim=128, hidden=5120,
        intermediate=27648, vocab=152064, max_position=131072,
        source=_hf("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"),
    ),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": ModelSpec(
        params=14.77e9, layers=48, kv_heads=8, head_dim=128, hidden=5120,
        intermediate=13824, vocab=152064, max_position=131072,
        source=_hf("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"),
    ),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-70B": ModelSpec(
        params=70.55e9, layers=80, kv_heads=8, head_dim=128, hidden=8192,
        intermediate=28672, vocab=128256, max_position=131072,
        source=_hf("deepseek-ai/DeepSeek-R1-Distill-Llama-70B"),
    ),
    # 671B total / 37B active MoE with MLA: kv_lora_rank 512 + qk_rope_head_dim 64 per layer;
    # 8 of 256 routed experts (2048 wide) + 1 shared expert per token.
    "deepseek-ai/DeepSeek-R1": ModelSpec(
        params=671e9, layers=61, kv_heads=128, head_dim=128, hidden=7168,
        intermediate=9 * 2048, vocab=129280, max_position=163840, mla_kv_dim=576,
        source=_hf("deepseek-ai/DeepSeek-R1"),
    ),
    "Qwen/Qwen2.5-Coder-7B-Instruct": ModelSpec(
        params=7.62e9, layers=28, kv_heads=4, head_dim=128, hidden=3584,
        intermediate=18944, vocab=152064, max_position=32768,
        source=_hf("Qwen/Qwen2.5-Coder-7B-Instruct"),
    ),
    "Qwen/Qwen3-8B": ModelSpec(
        params=8.19e9, layers=36, kv_heads=8, head_dim=128, hidden=4096,
        intermediate=12288, vocab=151936, max_position=40960,
        source=_hf("Qwen/Qwen3-8B"),
    ),
    # 30.5B total / 3.3B active MoE: 8 of 128 experts (768 wide) per token.
    "Qwen/Qwen3-Coder-30B-A3B-Instruct": ModelSpec(
        params=30.5e9, layers=48, kv_heads=4, head_dim=128, hidden=2048,
        intermediate=8 * 768, vocab=151936, max_position=262144,
        source=_hf("Qwen/Qwen3-Coder-30B-A3B-Instruct"),
    ),
    # serving/tiny_model.py (untied embeddings, vocab 2048): about 1.3 MB in BF16.
    "out/tiny-model": ModelSpec(
        params=0.92e6, layers=2, kv_heads=1, head_dim=64, hidden=128,
        intermediate=384, vocab=2048, max_position=4096, source="serving/tiny_model.py",
    ),
}
# fmt: on


@dataclass
class RoleFit:
    """The memory budget of one server, in GiB unless named otherwise."""

    role: str
    model: str
    budget_gib: float
    weights_gib: float
    activation_gib: float
    overhead_gib: float
    kv_budget_gib: float
    kv_bytes_per_token: int
    kv_tokens_fit: int
    kv_tokens_needed: int
    seqs_fit_at_expected: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing stops this server from working as the profile expects."""
        return not self.problems

    def summary(self) -> str:
        """One human-readable line of the numbers."""
        return (
            f"{self.role}: {self.model}: budget {self.budget_gib:.1f} GiB = weights"
            f" {self.weights_gib:.1f} + activations {self.activation_gib:.1f} + overhead"
            f" {self.overhead_gib:.1f} + KV {self.kv_budget_gib:.1f} GiB"
            f" ({self.kv_bytes_per_token:,} B/token: {self.kv_tokens_fit:,} tokens"
            f" fit, {self.kv_tokens_needed:,} expected, {self.seqs_fit_at_expected} sequences"
            f" at the expected context)"
        )


@dataclass
class FitReport:
    """The fit of a whole profile: one RoleFit per server plus profile-wide problems."""

    profile: str
    roles: list[RoleFit]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every server fits and the profile itself is consistent."""
        return not self.problems and all(r.ok for r in self.roles)

    def all_problems(self) -> list[str]:
        """Profile-wide problems, then each role's."""
        return self.problems + [p for r in self.roles for p in r.problems]

    def render(self) -> str:
        """A multi-line report: the numbers per role, then FIT or the problems."""
        lines = [f"fit check of profile {self.profile}:"]
        lines += [f"  {r.summary()}" for r in self.roles]
        if self.ok:
            lines.append("  FIT")
        else:
            lines += [f"  DOES NOT FIT: {p}" for p in self.all_problems()]
        return "\n".join(lines)


def _dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES.get(dtype.lower(), 2)


def check_role(
    role: str, server: RoleServer, budget_gib: float, models: dict[str, ModelSpec] = MODELS
) -> RoleFit:
    """Estimate one server's memory and say what does not fit.

    Args:
        role: Role name, for messages.
        server: The server's profile entry.
        budget_gib: Memory vLLM may use (GPU: utilisation x card; CPU: KV cache space).
        models: Architecture table.

    Returns:
        The estimate; `problems` is empty when it fits.
    """
    spec = models.get(server.model)
    if spec is None:
        known = ", ".join(sorted(models))
        fit = RoleFit(role, server.model, budget_gib, 0, 0, 0, 0, 0, 0, 0, 0)
        fit.problems.append(
            f"{role}: no architecture data for {server.model!r}; add it to serving.fit.MODELS"
            f" (known: {known})"
        )
        return fit
    nbytes = _dtype_bytes(server.dtype)
    weights_gib = spec.params * nbytes / GIB
    step_tokens = server.max_num_batched_tokens or max(server.max_model_len, 8192)
    # Peak of one forward step: residual + attention (~4 x hidden) and the MLP's gate/up
    # outputs (2 x intermediate) per scheduled token, plus FP32 logits for every sequence.
    activation_bytes = step_tokens * (4 * spec.hidden + 2 * spec.intermediate) * nbytes
    activation_bytes += server.max_num_seqs * spec.vocab * 4 * 2
    activation_gib = activation_bytes / GIB
    overhead_gib = NON_TORCH_OVERHEAD_GIB if server.gpu_memory_utilization is not None else 0.0
    kv_per_token = spec.kv_bytes_per_token(nbytes)
    needed = server.max_num_seqs * server.expected_context_tokens
    if server.gpu_memory_utilization is None:
        # CPU: weights and activations live in ordinary RAM; the budget is the KV space only.
        weights_gib = activation_gib = 0.0
    kv_budget_gib = budget_gib - weights_gib - activation_gib - overhead_gib
    kv_tokens = max(0, int(kv_budget_gib * GIB // kv_per_token))
    seqs_fit = kv_tokens // server.expected_context_tokens
    fit = RoleFit(
        role,
        server.model,
        budget_gib,
        weights_gib,
        activation_gib,
        overhead_gib,
        kv_budget_gib,
        kv_per_token,
        kv_tokens,
        needed,
        seqs_fit,
    )
    if kv_budget_gib <= 0:
        fit.problems.append(
            f"{role}: {server.model} needs {weights_gib:.1f} GiB of {server.dtype} weights"
            f" + {activation_gib:.1f} GiB activations + {overhead_gib:.1f} GiB overhead ="
            f" {weights_gib + activation_gib + overhead_gib:.1f} GiB, more than the"
            f" {budget_gib:.1f} GiB budget: no room for any KV cache"
        )
        return fit
    if server.max_model_len > spec.max_position:
        fit.problems.append(
            f"{role}: max_model_len {server.max_model_len} exceeds {server.model}'s"
            f" max_position_embeddings {spec.max_position}"
        )
    if kv_tokens < server.max_model_len:
        fit.problems.append(
            f"{role}: KV cache holds {kv_tokens:,} tokens ({kv_budget_gib:.1f} GiB), less"
            f" than one max_model_len sequence ({server.max_model_len:,}): vLLM would refuse"
            f" to start"
        )
    elif kv_tokens < needed:
        fit.problems.append(
            f"{role}: max_num_seqs {server.max_num_seqs} x expected context"
            f" {server.expected_context_tokens:,} = {needed:,} tokens of KV cache"
            f" ({needed * kv_per_token / GIB:.1f} GiB) but only {kv_tokens:,} tokens"
            f" ({kv_budget_gib:.1f} GiB) fit: {seqs_fit} sequences at that context"
        )
    return fit


def check_profile(profile: Profile, models: dict[str, ModelSpec] = MODELS) -> FitReport:
    """Check every server of a profile against its hardware.

    Args:
        profile: The launch profile.
        models: Architecture table.

    Returns:
        The report; `report.ok` is False when the profile cannot work as written.
    """
    report = FitReport(profile.name, [])
    hardware = profile.hardware
    per_gpu_share: dict[int, float] = {}
    roles: list[Role] = list(profile.roles)
    for role in roles:
        server = profile.roles[role]
        if profile.backend == "gpu":
            if hardware.gpu_memory_gib is None or server.gpu_memory_utilization is None:
                report.problems.append(
                    f"{role}: a GPU profile needs hardware.gpu_memory_gib and"
                    f" gpu_memory_utilization"
                )
                continue
            gpu = server.gpu if server.gpu is not None else 0
            if gpu >= hardware.gpus:
                report.problems.append(
                    f"{role}: GPU index {gpu} but the profile has {hardware.gpus} GPU(s)"
                )
            share = per_gpu_share.get(gpu, 0.0) + server.gpu_memory_utilization
            per_gpu_share[gpu] = share
            budget = server.gpu_memory_utilization * hardware.gpu_memory_gib
        else:
            budget = hardware.kv_cache_gib or 0.0
            server = server.model_copy(update={"gpu_memory_utilization": None})
        report.roles.append(check_role(role, server, budget, models))
    for gpu, share in sorted(per_gpu_share.items()):
        if share > 1.0:
            report.problems.append(
                f"GPU {gpu}: servers on it ask for {share:.2f} of its memory in total (> 1.0)"
            )
    return report
