"""Run checkpoints on disk: a checkpoint directory is complete or absent.

Layout under the checkpoint root (`trainer.checkpoint_dir`, default <run_dir>/checkpoints):

    step_00000010/          a complete checkpoint: COMPLETE.json is written last, then the
        COMPLETE.json       directory is renamed into place, so a reader never sees a partial one
        driver.pt           step, prompt sampler, minibatch RNG, KL controller, reward normaliser,
                            W&B run id (tensors and plain values: loads with weights_only=True)
        policy/             HF weights + tokenizer (the model to use or to serve); with LoRA
                            (model.lora / critic.lora) a PEFT adapter over the run's base model
        policy_ds/          DeepSpeed model, optimizer and scheduler state of every rank
        critic/, critic_ds/ the same for the critic (PPO)
    .step_00000020.partial-<id>/   being written; ignored, removed by the next save

`save` writes one (`begin`, every group's files, driver.pt, `commit`, `prune`) and `load` reads one
back; a group is a DeepSpeed ActorGroup whose ranks save_state/load_state and save_pretrained.
`prune` removes old complete checkpoints only after a newer one is complete (`trainer.keep_last`).
On several nodes the root must be storage every learner rank can write (each rank writes its own
DeepSpeed shard files).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from rlhf_dist.errors import ConfigError

COMPLETE = "COMPLETE.json"
DRIVER_STATE = "driver.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def begin(root: Path, step: int) -> Path:
    """A fresh partial directory for the checkpoint of `step` (renamed by `commit`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".step_{step:08d}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    return partial


def commit(partial: Path, step: int, manifest: dict[str, Any]) -> Path:
    """Mark `partial` complete and move it into place as step_<step>; returns the final path."""
    partial = Path(partial)
    marker = partial / COMPLETE
    with open(marker, "w") as out:
        json.dump({"step": step, "time": time.time(), **manifest}, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    final = step_dir(partial.parent, step)
    if final.exists():  # the same step saved again (e.g. the end of a resumed run): replace it
        stale = partial.parent / f".{final.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(partial, final)
    return final


def save(root: Path, step: int, groups: list[tuple[str, Any]], driver_state: Callable[[], dict[str, Any]],
         manifest: dict[str, Any], keep_last: int, timeout_s: float) -> Path:
    """Write the checkpoint of `step` under `root`: every rank of each (name, group) its DeepSpeed
    state (weights, optimizer moments, LR schedule) to <name>_ds/, rank 0 also the HF weights to
    <name>/; then `driver_state()` to driver.pt. Returns the final path."""
    import torch

    partial = begin(root, step)
    for name, group in groups:
        group.run("save_state", str(partial / f"{name}_ds"), timeout_s=timeout_s)
        group.run("save_pretrained", str(partial / name), timeout_s=timeout_s)
    torch.save(driver_state(), partial / DRIVER_STATE)
    final = commit(partial, step, {**manifest, "groups": [n for n, _ in groups]})
    prune(root, keep_last)
    return final


def load(path: Path, groups: list[tuple[str, Any]], timeout_s: float) -> dict[str, Any]:
    """Load each (name, group)'s DeepSpeed state from the checkpoint at `path`; returns the
    driver's state (tensors and plain values: weights_only)."""
    import torch

    path = Path(path)
    for name, group in groups:
        group.run("load_state", str(path / f"{name}_ds"), timeout_s=timeout_s)
    return torch.load(path / DRIVER_STATE, weights_only=True)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def prune(root: Path, keep_last: int) -> list[Path]:
    """Remove partial directories and all but the newest `keep_last` complete checkpoints."""
    root, removed = Path(root), []
    if not root.is_dir():
        return removed
    for child in root.iterdir():
        if child.name.startswith(".step_") and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    complete = complete_checkpoints(root)
    for _, path in complete[: max(0, len(complete) - keep_last)] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """The checkpoint `trainer.resume` names: None, "auto" (the newest complete one, or None when
    there is none yet) or a path to a complete checkpoint directory."""
    if not resume:
        return None
    if resume == "auto":
        complete = complete_checkpoints(root)
        return complete[-1][1] if complete else None
    path = Path(os.path.expanduser(resume)).absolute()
    if not path.is_dir():
        raise ConfigError(
            f"trainer.resume={resume!r}: no such directory. Expected a checkpoint directory "
            f"(step_NNNNNNNN under {root}) or 'auto' for the newest one.")
    if not is_complete(path):
        newest = complete_checkpoints(path.parent)
        hint = f" The newest complete one there is {newest[-1][1]}." if newest else ""
        raise ConfigError(
            f"trainer.resume={resume!r} is not a complete checkpoint (no {COMPLETE}: it was being "
            f"written when the run stopped).{hint} Fix: pass that one or trainer.resume=auto.")
    return path


def policy_model_dir(path: str | Path) -> str:
    """`path`, or the HF weights inside it when it is a complete checkpoint (its policy/): what
    model.path may name. A checkpoint's DeepSpeed state (policy_ds/) is for trainer.resume only."""
    expanded = Path(os.path.expanduser(str(path)))
    for adapter in (expanded, expanded / "policy"):
        if (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").is_file():
            from rlhf_dist.errors import ConfigError

            merged = expanded / "merged"
            hint = (f"model.path={merged} (the merged model written beside it)" if (merged / "config.json").is_file()
                    else "a LoRA run with model.lora.export_merged=true writes final/merged/, a full HF model")
            raise ConfigError(f"model.path={path} holds a LoRA adapter ({adapter / 'adapter_config.json'}), not a "
                              f"full model: an engine needs the base weights too. Fix: {hint}; or resume the run "
                              "with trainer.resume.")
    if is_complete(expanded) and (expanded / "policy" / "config.json").is_file():
        print(f"[model] {path} is a checkpoint: using its HF weights {expanded / 'policy'}", flush=True)
        return str(expanded / "policy")
    return str(path)


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / COMPLETE).read_text())
