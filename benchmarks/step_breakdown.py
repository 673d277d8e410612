"""Per-phase time of an RL step (generate / score / train / sync) for any config.

    python benchmarks/step_breakdown.py                       # the default job, 30 steps
    python benchmarks/step_breakdown.py --steps 20 -- rollout.num_engines=2 model=tiny_llama

Runs the real job (Ray, vLLM, DeepSpeed) through `run_rl`, skips the first step (kernel and
engine warm-up), and prints mean seconds per phase, its share of the step, response tokens per
second and the weight-sync share. Writes the same numbers as JSON (default:
bench_results/step_breakdown.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

PHASES = ("generate", "score", "train", "sync")


def run(steps: int, overrides: list[str]) -> tuple[list[dict], dict, dict]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf_dist.session import conf_dir
    from rlhf_dist.stages.rl import run_rl

    run_dir = tempfile.mkdtemp(prefix="step_breakdown_")
    base = [f"trainer.run_dir={run_dir}", f"trainer.total_steps={steps}", "trainer.eval_every=0",
            "logger.wandb.mode=disabled"]
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=base + overrides)
    summary = run_rl(cfg)
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "timing/step_s" in r], summary, OmegaConf.to_container(cfg, resolve=True)


def breakdown(rows: list[dict]) -> dict:
    measured = rows[1:] if len(rows) > 1 else rows
    mean = lambda key: sum(r[key] for r in measured) / len(measured)  # noqa: E731
    step_s = mean("timing/step_s")
    result = {"steps_measured": len(measured), "step_s": step_s,
              "tokens_per_s": mean("throughput/tokens_per_s")}
    for phase in PHASES:
        result[f"{phase}_s"] = mean(f"timing/{phase}_s")
        result[f"{phase}_frac"] = result[f"{phase}_s"] / step_s
    result["other_s"] = step_s - sum(result[f"{p}_s"] for p in PHASES)
    result["response_tokens_per_step"] = result["tokens_per_s"] * step_s
    result["sync_mb"] = measured[-1].get("sync/mb", 0.0)
    return result


def print_table(result: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"{'phase':<10}{'seconds':>10}{'share':>9}")
    for phase in PHASES:
        print(f"{phase:<10}{result[f'{phase}_s']:>10.3f}{result[f'{phase}_frac']:>9.1%}")
    print(f"{'other':<10}{result['other_s']:>10.3f}{result['other_s'] / result['step_s']:>9.1%}")
    print(f"{'step':<10}{result['step_s']:>10.3f}{1:>9.0%}")
    print(f"response tokens/step {result['response_tokens_per_step']:.0f}, "
          f"{result['tokens_per_s']:.0f} tokens/s, weights synced {result['sync_mb']:.2f} MB/step, "
          f"sync share {result['sync_frac']:.1%} ({'meets' if result['sync_frac'] < 0.05 else 'misses'} "
          "the < 5% target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="bench_results/step_breakdown.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, after --")
    args = parser.parse_args()
    rows, summary, cfg = run(args.steps, args.overrides)
    result = breakdown(rows)
    title = (f"step breakdown: {args.steps} steps, {cfg['rollout']['num_engines']} engine(s), "
             f"{cfg['learner']['world_size']} learner rank(s), "
             f"{cfg['trainer']['prompts_per_step']}x{cfg['rollout']['n_samples_per_prompt']} sequences/step")
    print_table(result, title)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "step_breakdown", "machine": platform.platform(),
                               "cpus": __import__("os").cpu_count(), "overrides": args.overrides,
                               "result": result, "summary": summary}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
