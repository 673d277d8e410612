"""stage=rl: the RL stage from one config (rlhf-dist's default).

    run_rl        run dir, inputs, optional SFT warm-up, the Ray session, the monitor, then `fit`
    fit           start-up, eval, the RL steps (rlhf_dist.rl.trainer) with evals and checkpoints,
                  the final eval and the summary; resumes from a checkpoint
    run_with_ray  `fit` with a trainer that is always shut down, and a resume command on failure
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_dist import checkpoint
from rlhf_dist.checkpoint import complete_checkpoints, resolve_resume
from rlhf_dist.config import RLConfig
from rlhf_dist.errors import RlhfDistError
from rlhf_dist.evaluation import sets_table
from rlhf_dist.rl.keep_best import BestPolicy
from rlhf_dist.session import (checkpoint_root, make_monitor, open_run_dir, prepare, ray_session,
                               resume_command, torch_load_driver_state)


def run_rl(dict_cfg: DictConfig) -> dict:
    from rlhf_dist.monitor import format_summary

    cfg: RLConfig = OmegaConf.to_object(dict_cfg)
    run_dir, config = open_run_dir(cfg, dict_cfg)
    inputs = prepare(cfg)
    resume = resolve_resume(cfg.trainer.resume, checkpoint_root(cfg))
    if resume:  # full weights vs LoRA: refused before any actor starts
        from rlhf_dist.checkpoint import read_manifest
        from rlhf_dist.models.lora import check_resume

        check_resume(read_manifest(resume), cfg.model.lora, str(resume), cfg.critic.lora)
    driver_state = torch_load_driver_state(resume) if resume else {}
    with ray_session(cfg):
        model_path = inputs["model_path"]
        if cfg.warmup.steps > 0:
            warm = run_dir / "warmup_model"
            # a resumed run's reference is the warm-up model its first part trained
            model_path = str(warm) if resume and warm.is_dir() else run_warmup(cfg, inputs, run_dir)
        monitor = make_monitor(cfg, config, resume_step=driver_state.get("step"),
                               wandb_id=driver_state.get("wandb_id") or None)
        summary = run_with_ray(cfg, model_path, inputs, monitor, resume)
    monitor.finish(summary)
    monitor.print(format_summary(summary))
    return summary


def run_warmup(cfg: RLConfig, inputs: dict, run_dir: Path) -> str:
    """The SFT stage on the task's own demonstrations, on the policy's learner ranks."""
    from rlhf_dist.stages.loop import stage_spec
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


def reference_label(trainer, cfg: RLConfig) -> str:
    if not trainer.use_reference:
        return "off"
    if cfg.model.lora.rank > 0 and cfg.model.lora.reference_from_base:
        return f"the base model (LoRA rank {cfg.model.lora.rank} adapters off, on the learner ranks)"
    return "on"


def run_with_ray(cfg: RLConfig, model_path: str, inputs: dict, monitor, resume: Path | None = None) -> dict:
    from rlhf_dist.models.hf import load_tokenizer
    from rlhf_dist.rl.trainer import RLTrainer

    trainer = None
    try:
        trainer = RLTrainer(cfg, model_path, load_tokenizer(model_path), inputs["train"],
                            inputs["eval"], inputs["reward_spec"], monitor, inputs.get("sft_pairs"),
                            inputs.get("select"), inputs.get("eval_sets"))
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
    critic_lora = f", LoRA rank {cfg.critic.lora.rank}" if cfg.critic.lora.rank else ""
    critic = (f", critic {cfg.critic.world_size} rank(s) (ZeRO-{cfg.critic.zero_stage}{critic_lora})"
              if trainer.use_critic else "")
    monitor.print(f"[start] algo={cfg.algo.name}: {cfg.rollout.num_engines} vLLM engine(s), "
                  f"{cfg.learner.world_size} DeepSpeed rank(s) (ZeRO-{cfg.learner.zero_stage}){critic}, "
                  f"reference={reference_label(trainer, cfg)}, reward={trainer.reward_spec}")
    startup = trainer.start()
    lora = (f"; LoRA rank {cfg.model.lora.rank}, the engines get the "
            f"{'adapter' if trainer.lora_sync == 'adapter' else 'merged weights'} after each update"
            if trainer.lora_sync else "")
    monitor.print(f"[start] actors ready in {startup['startup/total_s']:.1f}s "
                  f"({trainer.num_params / 1e6:.2f}M parameters{lora})")
    tr, done = cfg.trainer, 0
    if resume is not None:
        done = trainer.load_checkpoint(str(resume))
        logged = monitor.history()
        trainer.history = [r for r in logged if "reward/mean" in r]
        first_eval = next((r for r in logged if r["step"] == 0 and "eval/reward_mean" in r), None)
        monitor.print(f"[resume] from {resume}: step {done} of {tr.total_steps}")
    best = BestPolicy(tr.keep_best, tr.kl_budget, tr.run_dir, resumed_at=done) if tr.keep_best else None
    if resume is None or first_eval is None:
        first_eval = trainer.evaluate(0)
        keep_if_best(trainer, best, 0, cfg)
    for step in range(done + 1, tr.total_steps + 1):
        metrics = trainer.step(step)
        if "reward/mean" in metrics:  # not a step skipped for its rewards
            trainer.history.append(metrics)
        monitor.log(step, metrics)
        if tr.eval_every and step % tr.eval_every == 0 and step != tr.total_steps:
            trainer.evaluate(step)
            keep_if_best(trainer, best, step, cfg)
        if tr.save_every and (step % tr.save_every == 0 or step == tr.total_steps):
            trainer.save_checkpoint(step, str(checkpoint_root(cfg)))
        if tr.export_every and (step % tr.export_every == 0 or step == tr.total_steps):
            export_policy(trainer, step, cfg, monitor)
    last_eval = trainer.evaluate(tr.total_steps)
    keep_if_best(trainer, best, tr.total_steps, cfg)
    final = Path(cfg.trainer.run_dir) / "final"
    if best is not None and best.best is not None:  # the kept policy is the one exported
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(best.dir, final)
        monitor.print(f"[keep_best] final/ is the policy of step {best.best.step} "
                      f"({best.metric} {best.best.value:.4f}, KL {best.best.kl:.3f})")
    elif cfg.trainer.save_final:
        save_policy(trainer, final, cfg)
    summary = summarize(trainer.history, first_eval, last_eval, startup,
                        time.perf_counter() - run_start, cfg.trainer.run_dir)
    return {"algo": cfg.algo.name, **summary, **(best.summary() if best else {}),
            "eval_sets": sets_table(last_eval)}


def export_policy(trainer, step: int, cfg: RLConfig, monitor) -> Path:
    """trainer.export_every: the policy in HF format to run_dir/exports/step_N, complete or absent
    (written aside, COMPLETE.json last, renamed into place: rlhf_dist/checkpoint.py), then all but
    the newest trainer.keep_exports removed. model.path and stage=eval take the directory."""
    root = Path(cfg.trainer.run_dir) / "exports"
    partial = checkpoint.begin(root, step)
    save_policy(trainer, partial, cfg)
    final = checkpoint.commit(partial, step, {"algo": cfg.algo.name, "kind": "hf_export"})
    checkpoint.prune(root, cfg.trainer.keep_exports)
    monitor.print(f"[export] step {step} -> {final}")
    return final


def save_policy(trainer, path: Path, cfg: RLConfig) -> None:
    """The learners' policy in HF format at `path` on the driver's node; with LoRA the adapter
    (PEFT format) and, with model.lora.export_merged, the merged full model in `path`/merged."""
    from rlhf_dist.runtime.files import bring_back

    trainer.learners.run("save_pretrained", str(path), timeout_s=600)
    if cfg.model.lora.rank > 0 and cfg.model.lora.export_merged:
        trainer.learners.run("save_merged", str(path / "merged"), timeout_s=600)
    bring_back(trainer.learners, str(path), cfg.cluster.shared_dir, cfg.cluster.ship_models)


def keep_if_best(trainer, best: BestPolicy | None, step: int, cfg: RLConfig) -> None:
    """trainer.keep_best: evaluate the policy on the selection prompts and save it if it is the best
    so far. KL: the last step's kl/seq_mean, the rollout KL of the policy before that step's update."""
    if best is None:
        return
    selected = trainer.evaluate(step, trainer.select_records, "select")
    selected = {f"eval/{k.split('/', 1)[1]}": v for k, v in selected.items()}  # the metric's eval/ name
    kl = trainer.history[-1].get("kl/seq_mean", 0.0) if step > 0 and trainer.history else 0.0
    if best.consider(selected, kl):
        tmp = best.dir.with_name(best.dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_policy(trainer, tmp, cfg)
        best.kept(step, selected, kl, tmp)


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
