"""A tiny, randomly initialised Qwen2 model that real vLLM can serve on a CPU.

No weights can be downloaded here, so the model is made locally and deterministically:
a byte-level BPE tokenizer trained offline on generated text, and a `Qwen2ForCausalLM`
with random weights (fixed seed). Its answers are gibberish, but with guided decoding
(`response_format` json_schema) they are schema-valid JSON, so the real engine can drive
the whole graph and expose real scheduling, batching and `/metrics`.

Run inside the vLLM venv (it needs torch, transformers and tokenizers):

    .venv-vllm/bin/python -m serving.tiny_model --out out/tiny-model
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

SERVED_NAMES = ("tiny-reasoning", "tiny-coder")
SEED = 20261125
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# ChatML, as the Qwen family uses: every message framed by <|im_start|>role ... <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# An architecture the CPU attention backend accepts: head_dim 64 (16 is rejected).
MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,  # untied: the output bias below lives in lm_head only
    "vocab_size": VOCAB_SIZE,
}

# Random weights alone give near-uniform logits, so guided JSON strings would run to their
# maxLength (thousands of characters for the Plan schema) and past max_model_len. A constant
# component in every embedding (dimension BIAS_DIM) survives the two small random layers and
# the final RMSNorm, which turns one lm_head column into a per-token output bias: a mild
# preference for tokens that close a JSON string and for the end-of-turn token keeps
# answers short while their content stays random. Logit scale: about 1 (like a real model).
BIAS_DIM = 0
LOGIT_STD = 1.0
CLOSE_STRING_BOOST = 3.5
CLOSE_ARRAY_BOOST = 1.5
EOS_BOOST = 2.0

# Raw control characters are invalid inside JSON strings, and xgrammar 0.2.8's grammar for a
# string with maxLength (`[^"\\\r\n]{0,n}`) does not exclude them. Keeping them out of the
# vocabulary (tabs become spaces, the rest are dropped on input) makes that bug harmless.
CONTROL_CHARS = "".join(chr(c) for c in range(32) if chr(c) != "\n")

REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")

_WORDS = (
    "the plan lists files a coder writes each module with tests and a reviewer checks them "
    "for bugs style and missing cases an agent reads the task returns code GPU memory cache "
    "token request batch queue latency throughput server model session schedule parallel "
    "function class return value error path config settings metric counter gauge histogram "
    "build run start stop wait health ready stream chunk prompt answer reasoning review fix"
).split()

_PY_SNIPPETS = (
    "def {name}({arg}: int) -> int:\n    return {arg} * {n}\n",
    "class {Name}:\n    def __init__(self, {arg}: str) -> None:\n        self.{arg} = {arg}\n",
    "import asyncio\n\nasync def {name}() -> None:\n    await asyncio.sleep({n})\n",
    "for {arg} in range({n}):\n    if {arg} % 2 == 0:\n        print({arg})\n",
    "from pathlib import Path\n\n{name} = Path('{arg}/{name}.py').read_text()\n",
    "try:\n    {name}({n})\nexcept ValueError as exc:\n    raise RuntimeError(str(exc)) from exc\n",
)


def corpus_lines(n_lines: int = 600, seed: int = SEED) -> list[str]:
    """Deterministic training text: English sentences, Python snippets and JSON documents.

    Args:
        n_lines: How many lines/snippets to generate.
        seed: Seed of the generator; the same seed gives the same text.

    Returns:
        The generated lines.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(n_lines):
        kind = i % 3
        name = rng.choice(_WORDS) + "_" + rng.choice(_WORDS)
        arg = rng.choice(_WORDS)
        n = rng.randint(0, 999)
        if kind == 0:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
            lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
        elif kind == 1:
            snippet = rng.choice(_PY_SNIPPETS)
            lines.append(
                snippet.format(name=name, Name=name.title().replace("_", ""), arg=arg, n=n)
            )
        else:
            doc = {
                "summary": " ".join(rng.choice(_WORDS) for _ in range(8)),
                "files": [
                    {
                        "path": f"{arg}/{name}_{k}.py",
                        "purpose": " ".join(rng.choice(_WORDS) for _ in range(5)),
                        "depends_on": [],
                        "interface": f"def {name}() -> None",
                    }
                    for k in range(rng.randint(1, 3))
                ],
                "verdict": rng.choice(["ok", "needs-fix"]),
                "count": n,
                "ratio": round(rng.random(), 3),
                "flag": rng.choice([True, False, None]),
            }
            lines.append(json.dumps(doc, indent=rng.choice([None, 2])))
    return lines


def is_built(out: Path) -> bool:
    """Whether `out` already holds a complete tiny model."""
    return all((out / name).is_file() for name in REQUIRED_FILES)


def build_tokenizer(out: Path) -> None:
    """Train a byte-level BPE tokenizer on the generated corpus and save it with its config."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Replace("\t", "    "),
            normalizers.Replace(Regex("[\\x00-\\x08\\x0b-\\x1f]"), ""),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # The byte-level alphabet without the characters standing for control bytes (but \n).
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    control_chars = {_byte_level_char(ord(c)) for c in CONTROL_CHARS}
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 64,  # head-room so vocab_size of the model covers every id
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=sorted(set(byte_chars) - control_chars),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def _byte_level_char(byte: int) -> str:
    """The printable character GPT-2's byte-level BPE uses for `byte`."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def build_model(out: Path) -> None:
    """Save a randomly initialised Qwen2ForCausalLM (fixed seed) in safetensors format."""
    import torch
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos_id = tokenizer.token_to_id("<|im_end|>")
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    torch.manual_seed(SEED)
    config = Qwen2Config(
        **MODEL_CONFIG,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="bfloat16",
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, BIAS_DIM] = 1.0
        # Calibrate on real text: the final (normalised) state's BIAS_DIM value, and the
        # scale that gives the random part of the logits a standard deviation of LOGIT_STD.
        sample = [tokenizer.encode(line).ids[:64] for line in corpus_lines(32, seed=SEED + 1)]
        width = min(len(ids) for ids in sample)
        batch = torch.tensor([ids[:width] for ids in sample])
        states = (
            model(batch, output_hidden_states=True)
            .hidden_states[-1]
            .reshape(-1, MODEL_CONFIG["hidden_size"])
        )
        head = model.lm_head.weight
        head[:, BIAS_DIM] = 0.0
        head *= LOGIT_STD / float((states @ head.T).std())
        bias_unit = 1.0 / float(states[:, BIAS_DIM].mean())  # lm_head weight for a logit of +1
        boosts = {eos_id: EOS_BOOST}
        for token, token_id in tokenizer.get_vocab().items():
            if token.startswith('"'):
                boosts[token_id] = CLOSE_STRING_BOOST
            elif token.startswith("]"):
                boosts[token_id] = CLOSE_ARRAY_BOOST
        for token_id, boost in boosts.items():
            head[token_id, BIAS_DIM] = boost * bias_unit
        # Ids past the trained vocabulary (padding up to vocab_size) must never be sampled.
        head[tokenizer.get_vocab_size() :, BIAS_DIM] = -100.0 * bias_unit
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(
        str(out)
    )


def build(out: Path, force: bool = False) -> bool:
    """Build the tiny model into `out` unless it is already there.

    Args:
        out: Directory to write config, weights and tokenizer into.
        force: Rebuild even if the files exist.

    Returns:
        True if the model was built, False if it was already there.
    """
    if is_built(out) and not force:
        return False
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    build_model(out)
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m serving.tiny_model --out DIR [--force]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    built = build(args.out, force=args.force)
    state = "built" if built else "already present"
    print(f"tiny model {state} in {args.out} (served as {', '.join(SERVED_NAMES)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
