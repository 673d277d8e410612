"""GRPO vs GRPO + DAPO's dynamic sampling and overlong shaping on the chain reasoning task
(experiment=reasoning), at the same number of generated samples.

    python benchmarks/reasoning.py                          # 1 seed, 60 DAPO steps
    python benchmarks/reasoning.py --seeds 0,1,2 --steps 80 -- rollout.num_engines=2
    python benchmarks/reasoning.py --from-runs dapo:runs/a grpo:runs/b   # tabulate finished runs

Same compute = same generated samples: the DAPO run goes first for --steps steps; dynamic
sampling generates more than it trains on, so the GRPO run then gets as many steps as it takes to
generate as many samples (prompts_per_step x n_samples_per_prompt each). Both start from the same
warm-up (same seed, same demonstrations), so "solved before" is the same policy. Per run: greedy
solved (eval/solved_frac: right and in the format) before and after, samples generated per sample
trained, truncation rate of what was trained on, steps, RL wall time. Prints a table and writes
JSON (default: benchmarks/results/reasoning.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "dapo": ["experiment=reasoning"],
    "grpo": ["experiment=reasoning", "algo.dynamic_sampling=false", "algo.overlong_buffer=0"],
}


def run(name: str, seed: int, steps: int, overrides: list[str]) -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix=f"reasoning_{name}_s{seed}_"))
    cmd = [sys.executable, "-m", "rlhf_dist.main", f"hydra.run.dir={run_dir}", "logger=none",
           f"trainer.total_steps={steps}", f"trainer.seed={seed}", f"rollout.seed={seed}",
           f"warmup.seed={seed}", *VARIANTS[name], *overrides]
    print(f"[{name} seed {seed}] {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True)
    return run_dir


def summarize(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "timing/step_s" in r or "dynamic/rounds" in r]
    trained = [r for r in steps if "reward/mean" in r]
    evals = [r for r in rows if "eval/solved_frac" in r]
    per_step = _sequences_per_step(run_dir)
    generated = sum(r.get("dynamic/generated_samples", per_step) for r in steps)
    trained_samples = sum(r.get("dynamic/kept_groups", per_step / _group_size(run_dir)) * _group_size(run_dir)
                          for r in trained)
    passes = {k: v for k, v in evals[-1].items() if "/pass@" in k} if evals else {}
    return {
        "run_dir": str(run_dir), "steps": len(steps), "updates": len(trained),
        "solved_before": evals[0]["eval/solved_frac"], "solved_after": evals[-1]["eval/solved_frac"],
        "eval_reward_before": evals[0]["eval/reward_mean"], "eval_reward_after": evals[-1]["eval/reward_mean"],
        "generated_samples": generated, "trained_samples": trained_samples,
        "generated_per_trained": generated / max(trained_samples, 1),
        "truncated_frac": _mean([r["response/truncated_frac"] for r in trained]),
        # share of the trained groups whose rewards were all equal (zero advantage): 0 with dynamic sampling
        "all_equal_frac": _mean([r["reward/frac_groups_all_equal"] for r in trained]),
        "eval_length_after": evals[-1]["eval/length_mean"],
        "correct_generated": _mean([r.get("dynamic/generated_reward_mean", r["reward/mean"]) for r in trained]),
        "rounds_mean": _mean([r.get("dynamic/rounds", 1.0) for r in steps]),
        "short_steps": max([r.get("dynamic/short_steps", 0.0) for r in steps] or [0.0]),
        "empty_steps": max([r.get("dynamic/empty_steps", 0.0) for r in steps] or [0.0]),
        "rl_wall_s": sum(r.get("timing/step_s", 0.0) for r in steps),
        "eval_pass_at_k": passes,  # eval/<set>/pass@k, once the eval harness (issue 22) logs them
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _config_int(run_dir: Path, key: str) -> int:
    for line in (run_dir / "config.yaml").read_text().splitlines():
        if line.strip().startswith(f"{key}:"):
            return int(line.split(":")[1])
    raise KeyError(key)


def _group_size(run_dir: Path) -> int:
    return _config_int(run_dir, "n_samples_per_prompt")


def _sequences_per_step(run_dir: Path) -> int:
    return _config_int(run_dir, "prompts_per_step") * _group_size(run_dir)


def print_table(results: list[dict]) -> None:
    head = (f"{'run':<6}{'seed':>5}{'steps':>6}{'solved before':>15}{'after':>7}{'gen/trained':>12}"
            f"{'no-signal':>10}{'truncated':>10}{'rounds':>7}{'short':>6}{'generated':>10}{'RL s':>7}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        print(f"{r['variant']:<6}{r['seed']:>5}{r['steps']:>6}{r['solved_before']:>15.3f}{r['solved_after']:>7.3f}"
              f"{r['generated_per_trained']:>12.2f}{r['all_equal_frac']:>10.3f}{r['truncated_frac']:>10.3f}"
              f"{r['rounds_mean']:>7.2f}"
              f"{r['short_steps']:>6.0f}{r['generated_samples']:>10.0f}{r['rl_wall_s']:>7.0f}")
    print("(same generated samples per seed; solved = greedy eval, right and in the format; no-signal: share of "
          "trained groups with all-equal rewards; truncated: share of trained responses cut at max_new_tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="DAPO steps; GRPO gets the same samples")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default="benchmarks/results/reasoning.json")
    parser.add_argument("--from-runs", nargs="+", metavar="VARIANT[@SEED]:RUN_DIR")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, after --")
    args = parser.parse_args()
    results = []
    if args.from_runs:
        for spec in args.from_runs:
            label, run_dir = spec.split(":", 1)
            variant, _, seed = label.partition("@")
            results.append({"variant": variant, "seed": int(seed or 0), **summarize(Path(run_dir))})
    else:
        for seed in map(int, args.seeds.split(",")):
            dapo = summarize(run("dapo", seed, args.steps, args.overrides))
            grpo_steps = round(dapo["generated_samples"] / _sequences_per_step(Path(dapo["run_dir"])))
            grpo = summarize(run("grpo", seed, grpo_steps, args.overrides))
            results += [{"variant": "dapo", "seed": seed, **dapo}, {"variant": "grpo", "seed": seed, **grpo}]
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "reasoning", "same": "generated samples", "dapo_steps": args.steps,
                               "overrides": args.overrides, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
