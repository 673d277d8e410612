"""Scalar reward models: HF sequence-classification format with one label.

The same two functions build the inputs and read the score when the reward model is trained
(rlhf_dist.stages.reward_model) and when the reward actor serves it, so a served score is the
offline score. Text in, not token ids: the policy and the reward model may have different
tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf_dist.errors import ModelPathError
from rlhf_dist.models.hf import position_ids_from_mask
from rlhf_dist.models.tiny import check_model_dir


ENSEMBLE_FILE = "ensemble.json"  # in a reward-model dir: {"members": [subdir, ...]}


def ensemble_members(path: str) -> list[str]:
    """The model dirs a reward-model path stands for: the members its ensemble.json lists (the
    reward-model stage with reward.model.ensemble > 1 writes one), else the path itself."""
    return [member for member, _ in ensemble_scales(path)]


def ensemble_scales(path: str) -> list[tuple[str, tuple[float, float]]]:
    """(member dir, (offset, scale)) of each member: its score is served as (score - offset) /
    scale. A Bradley-Terry model's scores are defined up to a constant, so each member's offset is
    arbitrary; without this, the members' spread would measure their offsets, not their doubt."""
    manifest = Path(path) / ENSEMBLE_FILE
    if not manifest.is_file():
        return [(path, (0.0, 1.0))]
    try:
        spec = json.loads(manifest.read_text())
        names = spec["members"]
        scales = [tuple(map(float, pair)) for pair in spec.get("scales") or [(0.0, 1.0)] * len(names)]
    except (ValueError, KeyError, TypeError) as err:
        raise ModelPathError(f"reward model {path!r}: {manifest} is not {{\"members\": [subdir, ...]}} "
                             f"({err}). Fix: re-run the reward-model stage, or remove the file.") from None
    if (not isinstance(names, list) or not names or len(scales) != len(names)
            or any(len(pair) != 2 or not pair[1] > 0 for pair in scales)):
        raise ModelPathError(f"reward model {path!r}: {manifest} lists no members, or not one (offset, "
                             "scale > 0) per member. Fix: re-run the reward-model stage, or remove the file.")
    return [(str(Path(path) / name), scale) for name, scale in zip(names, scales)]


def write_ensemble(path: str, members: list[str], scales: list[tuple[float, float]] | None = None) -> None:
    """Make `path` an ensemble of the reward models in its subdirs `members`, member k's score
    served as (score - scales[k][0]) / scales[k][1]."""
    spec = {"members": members, "scales": [list(s) for s in scales] if scales else None}
    (Path(path) / ENSEMBLE_FILE).write_text(json.dumps(spec, indent=1) + "\n")


def check_reward_model_dir(path: str, ensemble: int | None = None) -> str:
    """A reward model dir (or each member of an ensemble) whose head, if it is a sequence
    classifier, is scalar (config only); with `ensemble`, that many members."""
    members = ensemble_members(path)
    if ensemble is not None and len(members) != ensemble:
        raise ModelPathError(
            f"reward.model.path={path!r} holds {len(members)} reward model(s), and "
            f"reward.model.ensemble={ensemble}. Fix: set reward.model.ensemble={len(members)}, or "
            "train that many with the reward-model stage (reward.model.ensemble=K there too).")
    for member in members:
        _check_scalar_head(member)
    return path


def _check_scalar_head(path: str) -> None:
    try:
        check_model_dir(path)
    except ModelPathError as err:
        raise ModelPathError(f"reward model (reward.model.path or a stage's model): {err}") from None
    config = json.loads((Path(path) / "config.json").read_text())
    architectures = config.get("architectures") or []
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
    if any(a.endswith("ForSequenceClassification") for a in architectures) and labels != 1:
        raise ModelPathError(
            f"reward model {path!r} is a sequence classifier with {labels} labels; a reward model "
            "needs a scalar head (num_labels=1). Fix: pass a reward model trained by the "
            "reward-model stage, or any single-label sequence-classification checkpoint.")


def load_reward_model(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A reward model from `path`: a trained one, or a causal LM that gets a fresh scalar head.

    A sequence-classification checkpoint with more than one label is refused: its score would
    not be a scalar reward.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    _check_scalar_head(path)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "newly initialized: score.weight" is expected from an LM
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.to(device)


def reward_model_inputs(tokenizer, prompts: list[str], completions: list[str],
                        width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + completion + eos, LEFT-padded so every row ends in the last column.

    Returns input_ids and attention_mask, (B, L) with L = max length (or `width`, if larger).
    """
    rows = [tokenizer(p + c)["input_ids"] + [tokenizer.eos_token_id] for p, c in zip(prompts, completions)]
    length = max([len(r) for r in rows] + [width or 0])
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row)
        attention_mask[i, length - len(row):] = 1
    return input_ids, attention_mask


def sequence_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar reward of each left-padded sequence, (B,) float32: the head at the last token."""
    outputs = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return outputs.logits[:, 0].float()
