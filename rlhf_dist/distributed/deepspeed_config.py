"""Build the DeepSpeed config dict from the few plain values it depends on."""

from __future__ import annotations


def build_deepspeed_config(
    zero_stage: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    grad_clip: float,
    bf16: bool,
) -> dict:
    """A DeepSpeed config for data-parallel training with ZeRO `zero_stage`.

    The optimizer and LR schedule are passed to `deepspeed.initialize` as torch objects (the
    same code path on CPU and GPU, no compiled DeepSpeed ops needed).
    """
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        # Gather on demand for weight broadcast; keep the whole (small) model's params together.
        zero.update({"stage3_gather_16bit_weights_on_model_save": True})
    return {
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(scheduler: str, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Multiplier of the base LR at optimizer step `s`: linear warm-up, then constant/linear/cosine."""
    import math

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if scheduler == "linear":
            return 1.0 - (1.0 - min_lr_ratio) * progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
