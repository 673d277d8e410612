"""A tiny causal LM built offline: a character-level tokenizer plus a randomly initialised
Qwen2 or Llama model, saved as an ordinary HF-format directory.

Nothing here downloads anything. The directory it writes is loaded by the same
`from_pretrained(path)` / `vllm.LLM(model=path)` calls that load a hub checkpoint on a cluster,
so the tiny model exercises the real loading path.

Token ids: 0 "<pad>", 1 "<eos>", 2 "<unk>", then printable ASCII chr(32)..chr(126) as ids 3..97
(id = ord(char) - 29; inside the vocab the space token is spelled "Ġ"). No BOS is added on
encode. The model's embedding table has exactly these 98 rows by default: an id without a meaning
would decode to "" (in vLLM and HF alike), so RL that pushes probability off sampled tokens could
drift into invisible output that the reward cannot see.

Run `python -m rlhf_dist.models.tiny OUT_DIR [qwen2|llama]` to build a model and check that
vLLM loads it and detokenizes exactly like the HF tokenizer.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlhf_dist.errors import ConfigError, ModelPathError

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARS = tuple(chr(code) for code in range(32, 127))  # printable ASCII, space included
# The same characters as byte-level BPE spells them: GPT-2's byte-to-unicode table maps "!".."~"
# to themselves and the space byte to "\u0120" ("Ġ").
BYTE_LEVEL_CHARS = tuple("\u0120" if char == " " else char for char in CHARS)
NUM_TOKENS = len(SPECIAL_TOKENS) + len(CHARS)  # 98 ids with a meaning; the rest are padding
MODEL_MAX_LENGTH = 512
MIN_HEAD_DIM = 32  # vLLM's CPU attention failed at head_dim 16 and worked at 64

# arch name -> (config class, model class)
ARCHS = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}

WEIGHT_GLOBS = ("*.safetensors", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer where `decode(encode(s)) == s` for printable ASCII `s`.

    A byte-level BPE with no merges, so every character is its own token. Byte-level (rather
    than WordLevel + a fusing decoder) because `AutoTokenizer` on a qwen2 directory ignores the
    saved pipeline and rebuilds one as byte-level BPE from the saved vocab and merges; this
    vocab gives the same ids and text under that rebuild and under the saved pipeline (llama).
    Characters outside printable ASCII become <unk> (llama) or are dropped (qwen2's rebuild).
    """
    vocab = {token: idx for idx, token in enumerate(SPECIAL_TOKENS + BYTE_LEVEL_CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def _make_config(
    arch: str,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None,
    intermediate_size: int | None,
    vocab_size: int,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
):
    """Validate the shape arguments and return the HF config (ConfigError on bad values)."""
    if arch not in ARCHS:
        raise ConfigError(
            f"tiny model arch={arch!r} is not supported. Expected one of {sorted(ARCHS)}. "
            f"Fix: set the tiny model's arch to 'qwen2' or 'llama'."
        )
    if num_heads <= 0 or hidden_size % num_heads != 0:
        raise ConfigError(
            f"tiny model hidden_size={hidden_size} is not divisible by num_heads={num_heads}. "
            f"Fix: choose num_heads that divides hidden_size."
        )
    head_dim = hidden_size // num_heads
    if head_dim < MIN_HEAD_DIM:
        raise ConfigError(
            f"tiny model head_dim = hidden_size/num_heads = {hidden_size}/{num_heads} = "
            f"{head_dim}, "
            f"expected >= {MIN_HEAD_DIM} (vLLM's CPU attention fails on small heads). "
            f"Fix: use fewer heads or a larger hidden_size, e.g. hidden_size=128, num_heads=2."
        )
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
        raise ConfigError(
            f"tiny model num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}. "
            f"Fix: use num_kv_heads equal to num_heads or one of its divisors."
        )
    if vocab_size < NUM_TOKENS:
        raise ConfigError(
            f"tiny model vocab_size={vocab_size} is smaller than the character tokenizer's "
            f"{NUM_TOKENS} tokens. Fix: use vocab_size >= {NUM_TOKENS} (the default)."
        )
    config_cls, _ = ARCHS[arch]
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
    )


def build_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = NUM_TOKENS,
    max_position_embeddings: int = MODEL_MAX_LENGTH,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    overwrite: bool = True,
) -> Path:
    """Build a randomly initialised float32 model + char tokenizer into `out_dir`.

    `intermediate_size` defaults to 3 * hidden_size (about 0.44M parameters at the defaults).
    The model is written into a temporary directory beside `out_dir` and renamed into place,
    so a crash never leaves a half-written model behind. A non-empty `out_dir` is replaced,
    or with `overwrite=False` left alone and FileExistsError raised.
    """
    out_dir = Path(out_dir).absolute()
    config = _make_config(
        arch, hidden_size, num_layers, num_heads, num_kv_heads,
        intermediate_size, vocab_size, max_position_embeddings, tie_word_embeddings,
    )
    _, model_cls = ARCHS[arch]
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        build_char_tokenizer().save_pretrained(tmp_dir)
        _move_into_place(tmp_dir, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _move_into_place(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename `tmp_dir` to `out_dir`; a non-empty `out_dir` is renamed aside first."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty")
        old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old_dir / "model")
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)  # rename(2) may replace an empty directory


def ensure_tiny_model(out_dir: str | os.PathLike, **kwargs) -> Path:
    """Return `out_dir`, building the tiny model there first if it has no config.json.

    Safe when several processes call it at once: a builder that loses the race finds the
    winner's model in place and keeps it.
    """
    out_dir = Path(out_dir).absolute()
    if (out_dir / "config.json").is_file():
        return out_dir
    try:
        return build_tiny_model(out_dir, overwrite=False, **kwargs)
    except OSError as exc:  # FileExistsError, or rename(2) onto a directory another process filled
        if (out_dir / "config.json").is_file():
            return out_dir
        raise ModelPathError(
            f"cannot build the tiny model in {out_dir}: it holds other files and no config.json "
            f"({exc}). Expected a new or empty directory. Fix: choose another directory or "
            f"empty this one."
        ) from exc


def check_model_dir(path: str | os.PathLike) -> Path:
    """Return `path` as an absolute Path if it looks like a loadable HF model directory.

    Raises ModelPathError when it does not exist, is not a directory, or lacks config.json,
    weights (*.safetensors / *.bin) or tokenizer files.
    """
    given = str(path)
    model_dir = Path(path).expanduser().absolute()
    expected = "Expected an HF-format model directory (config.json, weights, tokenizer)."
    fix = ("Fix: pass model.path=/path/to/model, or leave model.path unset to build the tiny "
           "built-in model.")
    if not model_dir.exists():
        raise ModelPathError(
            f"model.path={given!r} does not exist (looked at {model_dir}). {expected} "
            f"Hub ids are not downloaded: point at a local copy. {fix}"
        )
    if not model_dir.is_dir():
        raise ModelPathError(f"model.path={given!r} is a file, not a directory. {expected} {fix}")
    present = sorted(p.name for p in model_dir.iterdir())
    missing = []
    if not (model_dir / "config.json").is_file():
        missing.append("config.json")
    if not any(any(model_dir.glob(pattern)) for pattern in WEIGHT_GLOBS):
        missing.append("weights (*.safetensors or *.bin)")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ModelPathError(
            f"model.path={given!r} has no {'; no '.join(missing)}. It contains: "
            f"{present[:20] if present else 'nothing'}. {expected} {fix}"
        )
    return model_dir


def _check_with_vllm(model_dir: Path) -> None:
    """Load `model_dir` in vLLM (CPU), generate, and compare its text with the HF decode."""
    import time

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    start = time.time()
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True,
              gpu_memory_utilization=0.1, seed=0)
    print(f"vLLM engine ready in {time.time() - start:.1f} s")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["rev abc=", "copy hello world=", "add 3+4="]
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=0,
                            allowed_token_ids=list(range(NUM_TOKENS)))
    start = time.time()
    outputs = llm.generate(prompts, params)
    print(f"generate took {time.time() - start:.1f} s")
    # A random model rarely samples a space: force spaces (id 3) among a few letters.
    spaces = SamplingParams(temperature=1.0, max_tokens=24, seed=0,
                            allowed_token_ids=tokenizer.encode(" ab"))
    outputs += llm.generate(prompts[:1], spaces)
    for output in outputs:
        completion = output.outputs[0]
        hf_text = tokenizer.decode(list(completion.token_ids), skip_special_tokens=True)
        same_text = "same" if hf_text == completion.text else "DIFFERENT"
        same_ids = output.prompt_token_ids == tokenizer.encode(output.prompt)
        print(f"{output.prompt!r} -> {completion.text!r} ids={list(completion.token_ids)} "
              f"HF decode {same_text}: {hf_text!r}; prompt ids same as HF: {same_ids}")


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/rlhf_dist_tiny_model")
    print("built", build_tiny_model(target, arch=sys.argv[2] if len(sys.argv) > 2 else "qwen2"))
    _check_with_vllm(check_model_dir(target))
