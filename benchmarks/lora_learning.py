"""Learning on the default task: full fine-tuning against `experiment=lora` with merged and with
adapter sync, over sampling seeds (the model, the task and the warm-up stay those of seed 0, so
every run starts from the same policy and differs only in what it samples).

    python benchmarks/lora_learning.py                                   # full, lora, lora-adapter x seeds 0 1
    python benchmarks/lora_learning.py --variants lora-r128 --seeds 0    # LoRA at the width's full rank
    python benchmarks/lora_learning.py --from-json benchmarks/results/lora_learning_seeds.json

Per run (200 GRPO steps after the 50-step SFT warm-up, 96 prompts x 8 samples, the 0.44M model):
train reward of the first step and the mean of the last 10%, the greedy held-out eval (reward and
solved fraction) at the start and the end, the token entropy and KL (k3, per token) over the last
20 steps, the largest engine-learner logprob gap of any step (the engines sampling from the
learner's policy), and time. Prints a table, writes benchmarks/results/lora_learning_seeds.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_runs import REPO, add_run_args, metrics, print_saved, run_once, write_results  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
VARIANTS = {
    "full": [],
    "lora": ["experiment=lora"],
    "lora-adapter": ["experiment=lora", "model.lora.sync=adapter"],
    # rank 128 on a 128-wide model: no low-rank limit on the projections at all
    "lora-r128": ["experiment=lora", "model.lora.rank=128", "model.lora.alpha=128", "learner.optim.lr=5e-4"],
}


def run(out: Path, variant: str, seed: int, extra: list[str]) -> dict:
    run_dir = out / f"{variant}_s{seed}"
    run_once(run_dir, [*VARIANTS[variant], f"hydra.run.dir={run_dir}", f"trainer.run_dir={run_dir}",
                       f"trainer.seed={seed}", f"rollout.seed={seed}", "trainer.save_final=false",
                       "logger.wandb.mode=disabled", *extra])
    steps, evals, summary = metrics(run_dir)
    tail = steps[-20:]
    return {
        "variant": variant, "seed": seed, "steps": len(steps),
        "reward_first": steps[0]["reward/mean"],
        "reward_last10pct": statistics.mean(r["reward/mean"] for r in steps[-max(1, len(steps) // 10):]),
        "eval_reward_start": evals[0]["eval/reward_mean"], "eval_reward_end": evals[-1]["eval/reward_mean"],
        "eval_solved_start": evals[0]["eval/solved_frac"], "eval_solved_end": evals[-1]["eval/solved_frac"],
        "entropy_last20": statistics.mean(r["entropy/mean"] for r in tail),
        "kl_last20": statistics.mean(r["kl/mean"] for r in tail),
        "logprob_gap_max": max(r.get("sync/rollout_logprob_gap_max", 0.0) for r in steps),
        "step_s": summary.get("timing/step_s_mean"), "sync_frac": summary.get("timing/sync_frac"),
        "total_s": summary.get("total_s"),
        "reward_every_20": [round(steps[i]["reward/mean"], 3) for i in range(0, len(steps), 20)],
    }


def table(results: list[dict]) -> str:
    cols = ["run", "reward first -> last 10%", "eval reward", "eval solved", "entropy", "KL", "gap max",
            "s/step", "sync frac"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in results:
        lines.append(" | ".join([
            f"{r['variant']} s{r['seed']}", f"{r['reward_first']:.3f} -> {r['reward_last10pct']:.3f}",
            f"{r['eval_reward_start']:.3f} -> {r['eval_reward_end']:.3f}",
            f"{r['eval_solved_start']:.1%} -> {r['eval_solved_end']:.1%}", f"{r['entropy_last20']:.2f}",
            f"{r['kl_last20']:.3f}", f"{r['logprob_gap_max']:.1e}", f"{r['step_s']:.2f}", f"{r['sync_frac']:.3f}"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=["full", "lora", "lora-adapter"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--json", type=Path, default=RESULTS / "lora_learning_seeds.json")
    add_run_args(parser, "/tmp/rlhf_dist_lora_learning")
    args = parser.parse_args()
    if args.from_json:
        print_saved(args.from_json, table)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run(args.out, variant, seed, args.overrides) for seed in args.seeds for variant in args.variants]
    write_results(args.json, args.overrides, results, table)


if __name__ == "__main__":
    main()
