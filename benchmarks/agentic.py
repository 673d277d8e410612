"""`experiment=agentic` measured: the guessing game (rlhf_dist/envs/guess.py) learned by GRPO, over
seeds (the model, the games, the warm-up and the sampling all follow the seed), beside its control, the same game with the answers hidden (GuessBlind).

    python benchmarks/agentic.py --seeds 0 1 2 --blind-seeds 0
    python benchmarks/agentic.py --from-json benchmarks/results/agentic.json

A policy that does not read the environment's answers finds the secret in at most 40% of games
(4 guesses of 0..9; tests/unit/test_guess_env.py checks this by brute force), so success above
0.40 is the feedback used. Per run: greedy success on 64 held-out games at step 0 (after the
warm-up) and at the end, sampled success over the first and the last 10 steps (768 episodes a
step), guesses per episode, the first step whose 10-step mean of sampled success passes 0.5, and
wall time. Prints a table, writes benchmarks/results/agentic.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_runs import REPO, add_run_args, metrics, print_saved, run_once, write_results  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BLIND_CEILING = 0.4  # 4 guesses of 10 numbers, answers unread


def run(out: Path, seed: int, blind: bool, extra: list[str]) -> dict:
    run_dir = out / f"{'blind' if blind else 'game'}_s{seed}"
    run_once(run_dir, ["experiment=agentic", f"hydra.run.dir={run_dir}", f"trainer.seed={seed}", f"rollout.seed={seed}",
                       f"warmup.seed={seed}", f"task.seed={seed}", f"model.tiny.seed={seed}",
                       "logger.wandb.mode=disabled", *(["rollout.env=rlhf_dist.envs.guess:GuessBlind"] if blind else []),
                       *extra])
    steps, evals, summary = metrics(run_dir)
    success = [r["reward/mean"] for r in steps]
    moving = [statistics.mean(success[max(0, i - 9): i + 1]) for i in range(len(success))]
    return {
        "seed": seed, "blind": blind, "steps": len(steps),
        "greedy_start": evals[0]["eval/solved_frac"], "greedy_end": evals[-1]["eval/solved_frac"],
        "greedy_best": max(r["eval/solved_frac"] for r in evals),
        "sampled_first10": statistics.mean(success[:10]), "sampled_last10": statistics.mean(success[-10:]),
        "guesses_first10": statistics.mean(r["episode/tool_calls_mean"] for r in steps[:10]),
        "guesses_last10": statistics.mean(r["episode/tool_calls_mean"] for r in steps[-10:]),
        "greedy_turns_start": evals[0]["eval/episode/turns_mean"], "greedy_turns_end": evals[-1]["eval/episode/turns_mean"],
        "step_to_0.5": next((r["step"] for r, m in zip(steps, moving) if m >= 0.5), None),
        "step_s": summary.get("timing/step_s_mean"), "total_s": summary.get("total_s"),
    }


def table(results: list[dict]) -> str:
    cols = ["run", "greedy start", "greedy end", "sampled first 10", "sampled last 10", "guesses first->last",
            "step to 0.5", "s/step", "total s"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in results:
        lines.append(" | ".join([
            f"{'blind' if r['blind'] else 'game'} s{r['seed']}", f"{r['greedy_start']:.3f}", f"{r['greedy_end']:.3f}",
            f"{r['sampled_first10']:.3f}", f"{r['sampled_last10']:.3f}",
            f"{r['guesses_first10']:.2f} -> {r['guesses_last10']:.2f}", str(r["step_to_0.5"]),
            f"{r['step_s']:.1f}", f"{r['total_s']:.0f}"]))
    return "\n".join(lines) + f"\n(a policy that ignores the answers: success <= {BLIND_CEILING})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--blind-seeds", type=int, nargs="*", default=[0])
    add_run_args(parser, "/tmp/rlhf_dist_agentic")
    args = parser.parse_args()
    if args.from_json:
        print_saved(args.from_json, table)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run(args.out, seed, False, args.overrides) for seed in args.seeds]
    results += [run(args.out, seed, True, args.overrides) for seed in args.blind_seeds]
    write_results(RESULTS / "agentic.json", args.overrides, results, table)


if __name__ == "__main__":
    main()
