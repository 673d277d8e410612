"""Runs of the default task side by side (GRPO vs PPO, or synchronous vs overlapped rollout):
reward against wall time and against samples.

    python benchmarks/learning_curves.py                      # GRPO (default job) and experiment=ppo
    python benchmarks/learning_curves.py --steps 100 -- task=copy
    python benchmarks/learning_curves.py --variants sync,async --steps 60 -- learner.mini_batch_size=768
    python benchmarks/learning_curves.py --from-runs runs/a runs/b   # plot finished runs only

Each variant runs the real job (Ray, vLLM, DeepSpeed, warm-up included) through `run_rl` in a
subprocess. Wall time on the x axis is seconds since the first RL step started (the sum of step
times: actor start-up and evals are left out, and reported separately). Prints a table (first-step
reward, last-10% reward, gain, time to +0.3, step time, start-up) and writes JSON and a PNG
(default: bench_results/learning_curves.{json,png}).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"grpo": [], "ppo": ["experiment=ppo"], "sync": [], "async": ["trainer.async_rollout=true"]}
GAIN_TARGET = 0.3


def run(name: str, steps: int, overrides: list[str]) -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix=f"curve_{name}_"))
    cmd = [sys.executable, "-m", "rlhf_dist.main", f"hydra.run.dir={run_dir}",
           f"trainer.total_steps={steps}", "logger.wandb.mode=disabled", *VARIANTS[name], *overrides]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True)
    return run_dir


def curve(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    config = (run_dir / "config.yaml").read_text()
    per_step = 0
    for line in config.splitlines():  # sequences per step, from the resolved config
        if line.strip().startswith(("prompts_per_step:", "n_samples_per_prompt:")):
            per_step = int(line.split(":")[1]) * (per_step or 1)
    wall, elapsed = [], 0.0
    for r in steps:
        elapsed += r["timing/step_s"]
        wall.append(elapsed)
    rewards = [r["reward/mean"] for r in steps]
    first = rewards[0]
    reached = next((t for t, r in zip(wall, _smooth(rewards)) if r >= first + GAIN_TARGET), None)
    return {"run_dir": str(run_dir), "wall_s": wall, "samples": [per_step * (i + 1) for i in range(len(steps))],
            "reward": rewards, "first": first, "last_10pct": summary["reward/last_10pct"],
            "gain": summary["reward/gain"], "eval_start": summary["eval/reward_start"],
            "eval_end": summary["eval/reward_end"], "time_to_gain_s": reached,
            "step_s": summary["timing/step_s_mean"], "startup_s": summary["startup_s"],
            "total_s": summary["total_s"]}


def _smooth(values: list[float], window: int = 5) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def print_table(curves: dict[str, dict]) -> None:
    head = (f"{'run':<6}{'first':>8}{'last10%':>9}{'gain':>8}{'eval':>14}{f'to +{GAIN_TARGET}':>10}"
            f"{'step s':>8}{'start s':>9}{'total s':>9}")
    print("\n" + head + "\n" + "-" * len(head))
    for name, c in curves.items():
        reach = f"{c['time_to_gain_s']:.0f}s" if c["time_to_gain_s"] is not None else "never"
        print(f"{name:<6}{c['first']:>8.3f}{c['last_10pct']:>9.3f}{c['gain']:>+8.3f}"
              f"{c['eval_start']:>7.3f}->{c['eval_end']:.3f}{reach:>10}{c['step_s']:>8.2f}"
              f"{c['startup_s']:>9.1f}{c['total_s']:>9.0f}")
    print(f"(to +{GAIN_TARGET}: RL wall time until the 5-step mean reward is {GAIN_TARGET} above step 1)")


def plot(curves: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, c in curves.items():
        axes[0].plot(c["wall_s"], _smooth(c["reward"]), label=name)
        axes[1].plot(c["samples"], _smooth(c["reward"]), label=name)
    axes[0].set_xlabel("RL wall time (s, 2 CPU cores)")
    axes[1].set_xlabel("sampled responses")
    axes[0].set_ylabel("train reward (5-step mean)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="bench_results/learning_curves.json")
    parser.add_argument("--variants", default="grpo,ppo", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--from-runs", nargs="+", metavar="RUN_DIR", help="one finished run per variant")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs, after --")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or (args.from_runs and len(args.from_runs) != len(names)):
        parser.error(f"--variants {args.variants}: expected names from {', '.join(VARIANTS)}"
                     + (", and one --from-runs dir per variant" if args.from_runs else ""))
    run_dirs = ([Path(p) for p in args.from_runs] if args.from_runs
                else [run(name, args.steps, args.overrides) for name in names])
    curves = {name: curve(run_dir) for name, run_dir in zip(names, run_dirs)}
    print_table(curves)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "learning_curves", "variants": names, "overrides": args.overrides,
                               "curves": curves}, indent=2) + "\n")
    plot(curves, out.with_suffix(".png"), f"{' vs '.join(names)} on the default task (tiny Qwen2, reverse)"
         + (f": {' '.join(args.overrides)}" if args.overrides else ""))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    sys.exit(main())
