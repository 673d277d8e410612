"""What every stage does before and around its actors: the config directory, the run directory,
the job's inputs (model, tokenizer, prompts, reward function), the Ray session, resume helpers.

Imported by main.py and by every stage (rl, sft, reward_model, full_recipe); imports no stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from rlhf_dist.console import quiet_actor_output, quiet_process_env

# Must be set before vLLM/transformers import anywhere in this process or its Ray workers.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
quiet_process_env()

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from rlhf_dist.config import RLConfig, register_configs  # noqa: E402
from rlhf_dist.errors import DatasetError  # noqa: E402
from rlhf_dist.redact import redact  # noqa: E402
from rlhf_dist.validation import check_run_dir, check_tensor_parallel, validate  # noqa: E402


def conf_dir() -> str:
    """conf/ ships inside the wheel as rlhf_dist/conf; in a source checkout it is ../conf."""
    packaged = Path(__file__).parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).parent.parent / "conf")


register_configs()  # the structured schema, before anything composes a config


def open_run_dir(cfg: RLConfig, dict_cfg: DictConfig) -> tuple[Path, dict]:
    """Check and create trainer.run_dir and save the resolved config there (secrets redacted);
    returns (run_dir, that config as a dict: what W&B gets too)."""
    run_dir = Path(cfg.trainer.run_dir)
    check_run_dir(run_dir, cfg.trainer.resume, cfg.trainer.checkpoint_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = redact(OmegaConf.to_container(dict_cfg, resolve=True))
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    return run_dir, config


def prepare(cfg: RLConfig) -> dict:
    """Everything that can fail on bad input, checked before any actor starts."""
    from rlhf_dist.data.prompts import load_prompt_records
    from rlhf_dist.data.reward_fn import check_reward_fn, load_reward_fn
    from rlhf_dist.data.tasks import episode_text, get_task
    from rlhf_dist.models.hf import load_tokenizer
    from rlhf_dist.models.tiny import check_model_dir, ensure_tiny_model

    validate(cfg)
    task = get_task(cfg.task.name, **cfg.task.options)
    if cfg.model.path is None:
        tiny = cfg.model.tiny
        name = f"tiny-{tiny.arch}-h{tiny.hidden_size}-l{tiny.num_layers}-a{tiny.num_heads}-v98-s{tiny.seed}"
        model_path = ensure_tiny_model(
            Path(os.path.expanduser(tiny.cache_dir)) / name, arch=tiny.arch,
            hidden_size=tiny.hidden_size, num_layers=tiny.num_layers, num_heads=tiny.num_heads,
            seed=tiny.seed)
    else:
        from rlhf_dist.checkpoint import policy_model_dir

        model_path = check_model_dir(policy_model_dir(cfg.model.path))
    check_tensor_parallel(json.loads((Path(model_path) / "config.json").read_text()),
                          cfg.rollout.tensor_parallel_size, str(model_path))
    from rlhf_dist.models.lora import resolve_lora

    if cfg.model.lora.rank > 0:  # target modules against the model, an adapter's rank
        resolve_lora(cfg.model.lora, str(model_path))
    if cfg.critic.lora.rank > 0:  # the critic's targets against its model (the policy's by default)
        resolve_lora(cfg.critic.lora, str(check_model_dir(cfg.critic.model_path) if cfg.critic.model_path
                                          else model_path), "critic.lora")
    train_records = (load_prompt_records(cfg.task.prompts_file) if cfg.task.prompts_file
                     else task.make_records("train", cfg.task.num_train, cfg.task.seed))
    eval_records = (load_prompt_records(cfg.task.eval_file) if cfg.task.eval_file
                    else task.make_records("eval", cfg.task.num_eval, cfg.task.seed))
    tokenizer = load_tokenizer(str(model_path))
    train_records = fit_prompts(cfg, train_records, tokenizer, "train")
    eval_records = fit_prompts(cfg, eval_records, tokenizer, "eval")
    if not train_records:
        raise DatasetError("the train prompt set is empty (task.num_train or task.prompts_file).")
    if len(train_records) < cfg.trainer.prompts_per_step:
        raise DatasetError(
            f"the train prompt set has {len(train_records)} prompts, fewer than "
            f"trainer.prompts_per_step={cfg.trainer.prompts_per_step}. Add prompts or lower it.")
    if cfg.reward.model.path:
        from rlhf_dist.models.scalar_reward import check_reward_model_dir

        check_reward_model_dir(cfg.reward.model.path, cfg.reward.model.ensemble)
    reward_spec = cfg.reward.fn or task.reward_fn
    sample = train_records[:2]
    demos = [episode_text(task.demonstration(r)) if "target" in r else "" for r in sample]
    check_reward_fn(load_reward_fn(reward_spec), reward_spec, sample, demos)
    sft_pairs = sft_mix_pairs(cfg, task, train_records, tokenizer) if cfg.algo.sft_coef > 0 else None
    select_records = None
    if cfg.trainer.keep_best:
        eval_records, select_records = selection_prompts(cfg, task, eval_records, tokenizer)
    return {"task": task, "model_path": str(model_path), "train": train_records,
            "eval": eval_records, "reward_spec": reward_spec, "sft_pairs": sft_pairs,
            "select": select_records, "eval_sets": load_eval_sets(cfg, eval_records, tokenizer)}


def load_eval_sets(cfg: RLConfig, held_out: list[dict], tokenizer) -> list:
    """eval.sets with their prompts: held_out (the eval prompts) first, then each set's file, held
    to task.max_prompt_len like every prompt (rlhf_dist.evaluation.sets)."""
    from rlhf_dist.data.prompts import load_prompt_records
    from rlhf_dist.evaluation import EvalSet, eval_set_specs

    sets = []
    for spec in eval_set_specs(cfg.eval, cfg.rollout.temperature):
        records = held_out if spec.file is None else fit_prompts(
            cfg, load_prompt_records(spec.file), tokenizer, f"eval set '{spec.name}'")
        if not records:
            raise DatasetError(f"eval set '{spec.name}' has no prompts left ({spec.file or 'the held-out split'}). "
                               "Fix: give it prompts that fit task.max_prompt_len, or drop it from eval.sets.")
        sets.append(EvalSet(spec, records))
    return sets


def selection_prompts(cfg: RLConfig, task, eval_records: list[dict], tokenizer) -> tuple[list[dict], list[dict]]:
    """(eval prompts, keep_best's selection prompts), disjoint: the selection is made on prompts the
    reported eval does not use. A built-in task draws task.num_eval more from its held-out split;
    a task.eval_file is cut in two halves (the second half selects)."""
    if cfg.task.eval_file:
        if len(eval_records) < 2:
            raise DatasetError(f"trainer.keep_best needs selection prompts besides the eval prompts, and "
                               f"task.eval_file={cfg.task.eval_file} has {len(eval_records)}. Add prompts.")
        half = len(eval_records) // 2
        return eval_records[:half], eval_records[half:]
    seen = {task.problem(r) for r in eval_records}
    drawn = task.make_records("eval", 2 * cfg.task.num_eval, cfg.task.seed + 1)
    select = [r for r in drawn if task.problem(r) not in seen][: cfg.task.num_eval]
    return eval_records, fit_prompts(cfg, select, tokenizer, "keep_best selection")


def sft_mix_pairs(cfg: RLConfig, task, records: list[dict], tokenizer) -> list[tuple[str, str]]:
    """algo.sft_coef's demonstrations, (rendered prompt, completion): sft.train_file, else the
    built-in task's answers to the train prompts. (The full recipe passes its own SFT data.)"""
    from rlhf_dist.data.preferences import load_sft_records
    from rlhf_dist.data.records import render_prompt

    if cfg.sft.train_file:
        rows, _ = load_sft_records(cfg.sft.train_file, cfg.sft.on_bad)
        return [(render_prompt(r["prompt"], tokenizer), r["completion"]) for r in rows]
    if records and all("target" in r for r in records):
        return [(render_prompt(r["prompt"], tokenizer), task.demonstration(r)) for r in records]
    raise DatasetError(f"algo.sft_coef={cfg.algo.sft_coef} needs demonstrations: the prompts have no targets "
                       "to demonstrate. Fix: sft.train_file=<{prompt, completion} records>, or algo.sft_coef=0.")


def fit_prompts(cfg: RLConfig, records: list[dict], tokenizer, split: str) -> list[dict]:
    """Hold every prompt to task.max_prompt_len tokens (the engines' budget), before Ray starts."""
    from rlhf_dist.data.records import fit_prompt_length

    policy = "drop" if cfg.task.long_prompts == "error" else cfg.task.long_prompts
    kept, dropped, truncated = fit_prompt_length(records, tokenizer, cfg.task.max_prompt_len, policy)
    if dropped and cfg.task.long_prompts == "error":
        raise DatasetError(
            f"{dropped} of {len(records)} {split} prompts are longer than task.max_prompt_len="
            f"{cfg.task.max_prompt_len} tokens. Fix: raise task.max_prompt_len (the engines then "
            "reserve more), or task.long_prompts=truncate|drop.")
    if dropped or truncated:
        print(f"[data] {split}: {truncated} prompts truncated and {dropped} dropped to fit "
              f"task.max_prompt_len={cfg.task.max_prompt_len}", flush=True)
    return kept


@contextlib.contextmanager
def ray_session(cfg: RLConfig):
    """Local Ray (or `cluster.address`) for the whole job, checked to fit every actor."""
    import ray

    from rlhf_dist.runtime.cluster import check_resources, init_ray

    if cfg.cluster.device == "cpu":  # DeepSpeed need not guess the device (and warn about it)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_ray(cfg.cluster)
    quiet_actor_output()
    try:
        check_resources(cfg)
        yield
    finally:
        ray.shutdown()


def checkpoint_root(cfg: RLConfig) -> Path:
    return Path(os.path.expanduser(cfg.trainer.checkpoint_dir or Path(cfg.trainer.run_dir) / "checkpoints"))


def torch_load_driver_state(path: Path) -> dict:
    import torch

    return torch.load(Path(path) / "driver.pt", weights_only=True)


def resume_command(cfg: RLConfig) -> str:
    """The command line that continues this run from its newest checkpoint."""
    kept = [a for a in sys.argv[1:] if not a.startswith(("trainer.resume=", "trainer.run_dir="))]
    return " ".join(["rlhf-dist", *kept, f"trainer.run_dir={cfg.trainer.run_dir}", "trainer.resume=auto"])


def make_monitor(cfg: RLConfig, config: dict, resume_step: int | None = None, wandb_id: str | None = None):
    """The run's monitor (console, metrics.jsonl, W&B) as logger.* configures it."""
    from rlhf_dist.monitor import RunMonitor

    wb = cfg.logger.wandb
    return RunMonitor(str(cfg.trainer.run_dir), wb.mode, wb.project, wb.entity, wb.name, wb.tags, config,
                      cfg.trainer.total_steps, cfg.logger.console, resume_step=resume_step, wandb_id=wandb_id)
