"""Entry points. `rlhf-dist [overrides...]` runs RL with the Hydra config in conf/.

    rlhf-dist                                    # the default job: tiny model, reverse task, CPU
    rlhf-dist trainer.total_steps=50 rollout.num_engines=2 learner.world_size=2
    rlhf-dist model.path=/models/my-sft cluster=gpu8 logger.wandb.mode=online
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

from rlhf_dist.console import quiet_actor_output, quiet_driver_logging, quiet_process_env

# Must be set before vLLM/transformers import anywhere in this process or its Ray workers.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
quiet_process_env()

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rlhf_dist.config import RLConfig, register_configs
from rlhf_dist.checkpoint import complete_checkpoints, resolve_resume
from rlhf_dist.redact import redact, redact_files, redact_text
from rlhf_dist.validation import check_override_keys, check_run_dir, check_tensor_parallel, validate
from rlhf_dist.errors import DatasetError, RlhfDistError


def conf_dir() -> str:
    """conf/ ships inside the wheel as rlhf_dist/conf; in a source checkout it is ../conf."""
    packaged = Path(__file__).parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).parent.parent / "conf")


register_configs()


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def _train_main(cfg: DictConfig) -> None:
    from rlhf_dist.monitor import check_wandb_credentials
    from rlhf_dist.stages.recipe import run_stage

    quiet_driver_logging()
    hydra_files = HydraConfig.get().runtime.output_dir, HydraConfig.get().output_subdir
    if hydra_files[1]:  # .hydra/config.yaml, overrides.yaml, hydra.yaml: overrides written as given
        redact_files(Path(*hydra_files).glob("*.yaml"))
    try:
        check_wandb_credentials(cfg.logger.wandb.mode)
        run_rl(cfg) if cfg.stage == "rl" else run_stage(cfg)
    except RlhfDistError as err:
        print(f"\nerror: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; actors are being shut down", file=sys.stderr, flush=True)
        sys.exit(130)


def train() -> None:
    """Console script `rlhf-dist`."""
    try:
        check_override_keys(sys.argv[1:])
    except RlhfDistError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if not {"--cfg", "-c", "--info", "-i"} & {arg.split("=", 1)[0] for arg in sys.argv[1:]}:
        return _train_main()
    shown = io.StringIO()  # Hydra prints the config itself: redact what it printed
    try:
        with contextlib.redirect_stdout(shown):
            _train_main()
    finally:
        sys.stdout.write(redact_text(shown.getvalue()))


def prepare(cfg: RLConfig) -> dict:
    """Everything that can fail on bad input, checked before any actor starts."""
    from rlhf_dist.data.prompts import load_prompt_records
    from rlhf_dist.data.reward_fn import check_reward_fn, load_reward_fn
    from rlhf_dist.data.tasks import get_task
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
        model_path = check_model_dir(cfg.model.path)
    check_tensor_parallel(json.loads((Path(model_path) / "config.json").read_text()),
                          cfg.rollout.tensor_parallel_size, str(model_path))
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
        from rlhf_dist.models.reward_model import check_reward_model_dir

        check_reward_model_dir(cfg.reward.model.path)
    reward_spec = cfg.reward.fn or task.reward_fn
    sample = train_records[:2]
    demos = [task.demonstration(r) if "target" in r else "" for r in sample]
    check_reward_fn(load_reward_fn(reward_spec), reward_spec, sample, demos)
    return {"task": task, "model_path": str(model_path), "train": train_records,
            "eval": eval_records, "reward_spec": reward_spec}


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


def run_rl(dict_cfg: DictConfig) -> dict:
    from rlhf_dist.monitor import RunMonitor, format_summary

    cfg: RLConfig = OmegaConf.to_object(dict_cfg)
    run_dir = Path(cfg.trainer.run_dir)
    check_run_dir(run_dir, cfg.trainer.resume, cfg.trainer.checkpoint_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = redact(OmegaConf.to_container(dict_cfg, resolve=True))  # what is saved and sent to W&B
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    inputs = prepare(cfg)
    resume = resolve_resume(cfg.trainer.resume, checkpoint_root(cfg))
    driver_state = torch_load_driver_state(resume) if resume else {}
    with ray_session(cfg):
        model_path = inputs["model_path"]
        if cfg.warmup.steps > 0:
            warm = run_dir / "warmup_model"
            # a resumed run's reference is the warm-up model its first part trained
            model_path = str(warm) if resume and warm.is_dir() else run_warmup(cfg, inputs, run_dir)
        monitor = RunMonitor(
            str(run_dir), cfg.logger.wandb.mode, cfg.logger.wandb.project, cfg.logger.wandb.entity,
            cfg.logger.wandb.name, cfg.logger.wandb.tags, config,
            cfg.trainer.total_steps, cfg.logger.console,
            resume_step=driver_state.get("step"), wandb_id=driver_state.get("wandb_id") or None)
        summary = run_with_ray(cfg, model_path, inputs, monitor, resume)
    monitor.finish(summary)
    monitor.print(format_summary(summary))
    return summary


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


def run_warmup(cfg: RLConfig, inputs: dict, run_dir: Path) -> str:
    """The SFT stage on the task's own demonstrations, on the policy's learner ranks."""
    from rlhf_dist.stages.recipe import stage_spec
    from rlhf_dist.stages.sft import run_sft

    task, records, warm = inputs["task"], inputs["train"], cfg.warmup
    print(f"[warmup] SFT stage: {warm.steps} steps on {len(records)} '{task.name}' demonstrations, "
          f"{cfg.learner.world_size} DeepSpeed rank(s)", flush=True)
    spec = stage_spec(cfg, warm.batch_size, warm.batch_size // cfg.learner.world_size, warm.lr,
                      warm.steps, "linear")
    out = run_dir / "warmup_model"
    demos = [(r["prompt"], task.demonstration(r)) for r in records]
    held_out = [(r["prompt"], task.demonstration(r)) for r in inputs["eval"] if "target" in r]
    run_sft(inputs["model_path"], str(out), demos, held_out, spec, warm.steps,
            eval_every=max(1, warm.steps), seed=warm.seed)
    return str(out)


def checkpoint_root(cfg: RLConfig) -> Path:
    return Path(os.path.expanduser(cfg.trainer.checkpoint_dir or Path(cfg.trainer.run_dir) / "checkpoints"))


def torch_load_driver_state(path: Path) -> dict:
    import torch

    return torch.load(Path(path) / "driver.pt", weights_only=True)


def resume_command(cfg: RLConfig) -> str:
    """The command line that continues this run from its newest checkpoint."""
    kept = [a for a in sys.argv[1:] if not a.startswith(("trainer.resume=", "trainer.run_dir="))]
    return " ".join(["rlhf-dist", *kept, f"trainer.run_dir={cfg.trainer.run_dir}", "trainer.resume=auto"])


def run_with_ray(cfg: RLConfig, model_path: str, inputs: dict, monitor, resume: Path | None = None) -> dict:
    from rlhf_dist.models.hf import load_tokenizer
    from rlhf_dist.trainer import RLTrainer

    trainer = None
    try:
        trainer = RLTrainer(cfg, model_path, load_tokenizer(model_path), inputs["train"],
                            inputs["eval"], inputs["reward_spec"], monitor)
        return fit(trainer, cfg, monitor, resume)
    except RlhfDistError as err:
        saved = complete_checkpoints(checkpoint_root(cfg))
        if saved:  # say how to continue: nothing before the last checkpoint is lost
            raise type(err)(f"{err}\nThe last complete checkpoint is step {saved[-1][0]} "
                            f"({saved[-1][1]}). Resume with:\n  {resume_command(cfg)}") from None
        raise
    finally:
        if trainer is not None:
            trainer.shutdown()


def fit(trainer, cfg: RLConfig, monitor, resume: Path | None = None) -> dict:
    """Start-up, eval at start, the RL steps with periodic eval and checkpoints, eval at the end,
    a summary. With `resume` the steps continue after the checkpoint's."""
    run_start = time.perf_counter()
    critic = (f", critic {cfg.critic.world_size} rank(s) (ZeRO-{cfg.critic.zero_stage})"
              if trainer.use_critic else "")
    monitor.print(f"[start] algo={cfg.algo.name}: {cfg.rollout.num_engines} vLLM engine(s), "
                  f"{cfg.learner.world_size} DeepSpeed rank(s) (ZeRO-{cfg.learner.zero_stage}){critic}, "
                  f"reference={'on' if trainer.use_reference else 'off'}, reward={trainer.reward_spec}")
    startup = trainer.start()
    monitor.print(f"[start] actors ready in {startup['startup/total_s']:.1f}s "
                  f"({trainer.num_params / 1e6:.2f}M parameters)")
    tr, done = cfg.trainer, 0
    if resume is not None:
        done = trainer.load_checkpoint(str(resume))
        logged = monitor.history()
        trainer.history = [r for r in logged if "reward/mean" in r]
        first_eval = next((r for r in logged if r["step"] == 0 and "eval/reward_mean" in r), None)
        monitor.print(f"[resume] from {resume}: step {done} of {tr.total_steps}")
    if resume is None or first_eval is None:
        first_eval = trainer.evaluate(0)
    for step in range(done + 1, tr.total_steps + 1):
        metrics = trainer.step(step)
        if "reward/mean" in metrics:  # not a step skipped for its rewards
            trainer.history.append(metrics)
        monitor.log(step, metrics)
        if tr.eval_every and step % tr.eval_every == 0 and step != tr.total_steps:
            trainer.evaluate(step)
        if tr.save_every and (step % tr.save_every == 0 or step == tr.total_steps):
            trainer.save_checkpoint(step, str(checkpoint_root(cfg)))
    last_eval = trainer.evaluate(tr.total_steps)
    if cfg.trainer.save_final:
        from rlhf_dist.runtime.files import bring_back

        final = str(Path(cfg.trainer.run_dir) / "final")
        trainer.learners.run("save_pretrained", final, timeout_s=600)
        bring_back(trainer.learners, final, cfg.cluster.shared_dir, cfg.cluster.ship_models)
    summary = summarize(trainer.history, first_eval, last_eval, startup,
                        time.perf_counter() - run_start, cfg.trainer.run_dir)
    return {"algo": cfg.algo.name, **summary}


def summarize(history: list[dict], first_eval: dict, last_eval: dict, startup: dict,
              total_s: float, run_dir: str) -> dict:
    if not history:  # every step was skipped (reward.fn raised with reward.fallback_score=null)
        return {"steps": 0, "eval/reward_start": first_eval["eval/reward_mean"],
                "eval/reward_end": last_eval["eval/reward_mean"], "startup_s": startup["startup/total_s"],
                "total_s": total_s, "run_dir": str(run_dir)}
    tail = history[-max(1, len(history) // 10):]
    mean = lambda key, rows: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    steps = history[1:] or history  # step 1 includes warm-up of kernels
    extra = {}
    for key in ("eval/rule_mean", "eval/model_mean"):  # with a reward model: gold and learned
        if key in last_eval:
            name = key[: -len("_mean")]
            extra.update({f"{name}_start": first_eval[key], f"{name}_end": last_eval[key]})
    return {
        **extra,
        "steps": len(history),
        "reward/first_step": history[0]["reward/mean"],
        "reward/last_10pct": mean("reward/mean", tail),
        "reward/gain": mean("reward/mean", tail) - history[0]["reward/mean"],
        "eval/reward_start": first_eval["eval/reward_mean"],
        "eval/reward_end": last_eval["eval/reward_mean"],
        "eval/solved_start": first_eval["eval/solved_frac"],
        "eval/solved_end": last_eval["eval/solved_frac"],
        "timing/step_s_mean": mean("timing/step_s", steps),
        "timing/sync_frac": mean("timing/sync_s", steps) / mean("timing/step_s", steps),
        "startup_s": startup["startup/total_s"],
        **{key: value for key, value in startup.items() if key != "startup/total_s"},
        "total_s": total_s,
        "run_dir": str(run_dir),
    }


if __name__ == "__main__":
    train()
