"""stage=eval: evaluate a model without training.

    rlhf-dist stage=eval model.path=runs/.../exports/step_00000200 [eval.sets=...] [rollout.num_engines=2]

    1. inputs   the model (an HF dir, an export, or a checkpoint: its policy/), the eval sets
                (held_out and eval.sets), every reward function imported: before Ray starts
    2. actors   rollout.num_engines vLLM engines (they split each set's prompts) and the reward
                actor; no learner, no reference
    3. eval     the harness RL runs use (rlhf_dist.rl.evaluation): same sets, same seeds, so an
                exported policy scores here what the run's eval of it logged
    4. report   run_dir/eval_report.json (its path printed), metrics.jsonl / W&B at step 0, a table
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_dist.errors import ConfigError
from rlhf_dist.session import make_monitor, open_run_dir, prepare, ray_session


def run_eval(dict_cfg: DictConfig) -> dict:
    from rlhf_dist.monitor import format_sets_table

    cfg = OmegaConf.to_object(dict_cfg)
    if cfg.model.path is None:
        raise ConfigError("stage=eval needs the model to evaluate: model.path=<an HF model dir, a run's "
                          "exports/step_N or final/, or a checkpoint dir step_N (its policy/ is used)>.")
    run_dir, config = open_run_dir(cfg, dict_cfg)
    inputs = prepare(cfg)
    with ray_session(cfg):
        monitor = make_monitor(cfg, config)
        try:
            report = evaluate_model(cfg, inputs, monitor)
        finally:
            monitor.finish({})
    path = run_dir / "eval_report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + format_sets_table({name: s["metrics"] for name, s in report["sets"].items()}), flush=True)
    print(f"[eval] report: {path}", flush=True)
    return report


def evaluate_model(cfg, inputs: dict, monitor) -> dict:
    """Start the engines and the reward actor, run every eval set, stop them; the report."""
    from rlhf_dist.models.hf import load_tokenizer
    from rlhf_dist.rl import launcher
    from rlhf_dist.rl.evaluation import EvalHarness
    from rlhf_dist.rl.generation import Generation
    from rlhf_dist.runtime.files import model_dir

    ro, cl = cfg.rollout, cfg.cluster
    model_path, sets = inputs["model_path"], inputs["eval_sets"]
    monitor.print(f"[start] stage=eval: {model_path} on {ro.num_engines} vLLM engine(s), "
                  f"{len(sets)} eval set(s) ({', '.join(s.name for s in sets)}), reward={inputs['reward_spec']}")
    start, groups = time.perf_counter(), []
    try:
        groups.append(launcher.start_engines(cfg, model_dir(model_path, cl.shared_dir, cl.ship_models)))
        groups.append(launcher.start_reward(cfg, inputs["reward_spec"]))
        engines, reward = groups
        launcher.wait_ready(engines, ro.init_timeout_s)
        launcher.wait_ready(reward, 120.0)
        monitor.print(f"[start] actors ready in {time.perf_counter() - start:.1f}s")
        generation = Generation(engines, load_tokenizer(model_path), None, ro.n_samples_per_prompt,
                                ro.temperature, ro.top_p, ro.max_new_tokens, ro.seed, ro.init_timeout_s,
                                recover=lambda phase, call: call(), engine_version=lambda: 0)
        harness = EvalHarness(generation, reward, cfg.eval.k, cfg.reward.timeout_s, log=monitor.print)
        metrics = harness.evaluate(sets)
    finally:
        launcher.kill_all(groups)
    monitor.log_eval(0, metrics, [k for k in metrics if k.count("/") == 1])  # the sets: run_eval's table
    return eval_report(cfg, model_path, sets, metrics, time.perf_counter() - start)


def eval_report(cfg, model_path: str, sets: list, metrics: dict[str, float], time_s: float) -> dict:
    """What eval_report.json holds: the model, each set's settings and statistics, every metric
    as the run's metrics.jsonl names it, and what reproduces it (seed, k, max_new_tokens)."""
    from rlhf_dist.evaluation import sets_table

    table = sets_table(metrics)
    return {
        "model": str(Path(model_path).absolute()),
        "sets": {s.name: {"file": s.spec.file or "held_out split (task.eval_file or the built-in task)",
                          "reward_fn": s.spec.reward_fn or "the run's reward", "n": s.spec.n,
                          "temperature": s.spec.temperature, "solved_threshold": s.spec.solved_threshold,
                          "metrics": table.get(s.name, {})} for s in sets},
        "metrics": metrics,
        "k": list(cfg.eval.k), "rollout_seed": cfg.rollout.seed, "max_new_tokens": cfg.rollout.max_new_tokens,
        "num_engines": cfg.rollout.num_engines, "time_s": time_s, "run_dir": str(cfg.trainer.run_dir),
    }
