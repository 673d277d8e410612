"""Model builders (including a tiny one made offline), value head and logprob helpers."""

from rlhf_dist.models.tiny import (
    NUM_TOKENS,
    build_char_tokenizer,
    build_tiny_model,
    check_model_dir,
    ensure_tiny_model,
)

__all__ = [
    "NUM_TOKENS",
    "build_char_tokenizer",
    "build_tiny_model",
    "check_model_dir",
    "ensure_tiny_model",
]
