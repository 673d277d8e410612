"""LoRA adapters on the policy (model.lora.*, docs/lora.md), with the `peft` library.

    W' = W + (alpha / rank) * B @ A        A: (rank, in), B: (out, rank), B = 0 at the start
                                           (Hu et al. 2021, "LoRA", eq. 3)

Only A and B train; the base weights W stay frozen, so the reference policy is the same model
with the adapters switched off (`reference_off`) and no second copy of the model is needed.
The engines serve the merged weights W' under the base model's own (HF) names
(`merged_named_weights`), so every weight transport and checksum works unchanged.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from rlhf_dist.errors import ConfigError

# peft's prefix of every parameter name of a wrapped causal LM, and the frozen original layer
PEFT_PREFIX = "base_model.model."
BASE_LAYER = ".base_layer."
ADAPTER = "default"

# what `model.lora.target_modules: []` means, by `config.json` model_type: every projection of
# attention and MLP (the QLoRA paper's finding: all linear layers, not only q/v, Dettmers et al. 2023)
DEFAULT_TARGETS = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@dataclass
class LoraSpec:
    """The plain values a learner rank needs to put adapters on its model."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # resolved: never empty
    path: str | None = None  # a trained PEFT adapter dir to start from
    sync: str = "merged"  # what the engines get: "merged" weights or the "adapter" (weights/adapter.py)
    # peft's task: CAUSAL_LM for the policy; TOKEN_CLS for the critic, whose value head (`score`)
    # then trains in full beside the adapters (peft's modules_to_save)
    task_type: str = "CAUSAL_LM"


def linear_module_names(model_path: str) -> list[str]:
    """The distinct leaf names of the model's linear layers ('q_proj', ...), from its config alone
    (built on the meta device: no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names - {"lm_head", "score"})


def resolve_lora(lora_cfg, model_path: str, prefix: str = "model.lora") -> LoraSpec:
    """Check model.lora (or `prefix`, e.g. critic.lora) against the model and the adapter it starts
    from; the spec the ranks get. Raises ConfigError (what was given, what was expected, the fix)."""
    model_type = json.loads((Path(model_path) / "config.json").read_text()).get("model_type", "?")
    targets = list(lora_cfg.target_modules)
    if not targets:
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(
                f"{prefix}.target_modules is empty and there is no default for model_type "
                f"{model_type!r} (defaults exist for {sorted(DEFAULT_TARGETS)}). Fix: name them, e.g. "
                f"{prefix}.target_modules=[{','.join(linear_module_names(model_path)[:4])}].")
        targets = DEFAULT_TARGETS[model_type]
    candidates = linear_module_names(model_path)
    unknown = [t for t in targets if t not in candidates]
    if unknown:
        raise ConfigError(f"{prefix}.target_modules has {unknown}, which the model at {model_path} "
                          f"({model_type}) does not have. Its linear layers: {candidates}. Fix: "
                          f"{prefix}.target_modules=[{','.join(c for c in candidates if c in targets) or candidates[0]}] "
                          "or leave it empty for the architecture's default.")
    path = getattr(lora_cfg, "path", None)  # the critic's config has none
    if path:
        adapter = _read_adapter_config(path)
        if int(adapter.get("r", -1)) != lora_cfg.rank:
            raise ConfigError(f"model.lora.path={path} holds a rank-{adapter.get('r')} adapter, but "
                              f"model.lora.rank={lora_cfg.rank}. Fix: model.lora.rank={adapter.get('r')}.")
        targets = sorted(adapter.get("target_modules") or targets)
        extra = _parts_beyond_a_and_b(adapter)
        if extra and getattr(lora_cfg, "sync", "merged") == "adapter":
            raise ConfigError(f"model.lora.path={path} holds an adapter with {', '.join(extra)}; "
                              "model.lora.sync=adapter sends only the A and B of each layer, so the engines "
                              "would serve a different policy than the learner trains. Fix: "
                              "model.lora.sync=merged (the engines get every trained tensor merged in).")
    return LoraSpec(lora_cfg.rank, float(lora_cfg.alpha), float(lora_cfg.dropout), targets, path)


def _parts_beyond_a_and_b(adapter: dict) -> list[str]:
    """What a PEFT adapter config trains besides one A and B per layer of rank r."""
    extra = []
    if adapter.get("bias", "none") != "none":
        extra.append(f"bias={adapter['bias']!r}")
    if adapter.get("modules_to_save"):
        extra.append(f"modules_to_save={adapter['modules_to_save']}")
    if adapter.get("use_dora"):
        extra.append("use_dora=true")
    if adapter.get("rank_pattern"):
        extra.append(f"rank_pattern={adapter['rank_pattern']}")
    return extra


def _read_adapter_config(path: str) -> dict:
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        raise ConfigError(f"model.lora.path={path} is not a PEFT adapter dir (no adapter_config.json). "
                          "Expected the final/ dir a LoRA run wrote (trainer.save_final=true) or any "
                          "PEFT LoRA adapter. Fix: point model.lora.path at such a dir, or unset it.")
    return json.loads(config.read_text())


def add_adapters(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """The model with LoRA adapters (fresh, or loaded from `spec.path`); only they train."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if spec.path:
        return PeftModel.from_pretrained(model, spec.path, is_trainable=True)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none", task_type=spec.task_type)
    return get_peft_model(model, config)


def hf_name(peft_name: str) -> str:
    """'base_model.model.model.layers.0.q_proj.base_layer.weight' -> 'model.layers.0.q_proj.weight'."""
    return peft_name.removeprefix(PEFT_PREFIX).replace(BASE_LAYER, ".")


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name


def base_params(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The frozen base parameters of a peft-wrapped model under their HF names."""
    return {hf_name(n): p for n, p in module.named_parameters() if not is_adapter_param(n)}


def lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """HF name of a base weight -> the peft LoRA layer that adds to it."""
    from peft.tuners.lora import LoraLayer

    return {hf_name(f"{name}.base_layer.weight"): layer for name, layer in module.named_modules()
            if isinstance(layer, LoraLayer)}


def adapter_params(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]


def merged_weight(base: torch.Tensor, layer: torch.nn.Module | None) -> torch.Tensor:
    """W' = W + scaling * B @ A (peft's own `get_delta_weight`, which handles fan-in-fan-out
    layers); `base` itself where no adapter adds to it. Full tensors: gather first under ZeRO-3."""
    if layer is None:
        return base
    return base + layer.get_delta_weight(ADAPTER).to(base.dtype)


@contextmanager
def reference_off(module: torch.nn.Module) -> Iterator[None]:
    """The base model: adapters switched off (peft `disable_adapter`) for the reference policy."""
    with module.disable_adapter():
        yield


def lora_signature(lora_cfg) -> dict:
    """What a checkpoint's adapters are (COMPLETE.json): a resume must build the same ones."""
    if lora_cfg.rank == 0:
        return {"rank": 0}
    return {"rank": int(lora_cfg.rank), "alpha": float(lora_cfg.alpha),
            "target_modules": sorted(lora_cfg.target_modules)}


def check_resume(manifest: dict, lora_cfg, checkpoint: str, critic_lora_cfg=None) -> None:
    """A checkpoint resumes only into a run of the same kind, for the policy and for the critic:
    full weights, or LoRA adapters of the same rank, alpha and targets (a full checkpoint holds no
    adapter; a LoRA one holds only adapters, the critic's value head, and their moments, and
    DeepSpeed restores them by position)."""
    for key, prefix, cfg in (("lora", "model.lora", lora_cfg), ("critic_lora", "critic.lora", critic_lora_cfg)):
        if cfg is None:
            continue
        saved = manifest.get(key) or {"rank": int(manifest.get(f"{key}_rank", 0))}  # older manifests: the rank
        asked = lora_signature(cfg)
        if saved["rank"] == asked["rank"] and (not asked["rank"] or "alpha" not in saved or saved == asked):
            continue
        kind = lambda sig: f"LoRA {sig}" if sig["rank"] else "full fine-tuning"  # noqa: E731
        who = "" if key == "lora" else " critic"
        fix = " ".join(f"{prefix}.{k}={v if not isinstance(v, list) else '[' + ','.join(v) + ']'}"
                       for k, v in saved.items() if k == "rank" or saved["rank"])
        start = " (a LoRA run can start from a merged export: model.path=<final/merged>)" if key == "lora" else ""
        raise ConfigError(f"trainer.resume: the checkpoint {checkpoint} is from a{who} {kind(saved)} run, but "
                          f"this run is{who} {kind(asked)}; its state cannot be loaded into this one. Fix: "
                          f"{fix} to continue that run, or start afresh without trainer.resume{start}.")
