"""Learning per step and time to a reward, rlhf_dist against TRL's GRPOTrainer, over seeds.

    python benchmarks/vs_trl_learning.py                          # 113M, fixed lengths, 3 seeds x 8 steps
    python benchmarks/vs_trl_learning.py --seeds 0,1 --steps 6 -- learner.world_size=1 learner.zero_stage=0

The same job as benchmarks/vs_trl.py (same model, prompts, reward, schedule, precision; see its
docstring), run once per seed and side, each in its own process, one after the other. The seed
sets the prompts, TRL's generation seed, and our trainer.seed and rollout.seed. A fast step that
learns less is not faster, so this reports, per step, the mean and spread (min..max) over seeds of
the batch reward and of the KL to the reference (ours: kl/mean, k3 under the sampling policy;
TRL: its logged kl, the same estimator), and the wall-clock time (sum of step times) each side
needs to reach a target reward: the largest reward that the seed-mean curves of both sides reach,
times 0.8. Prints a table and writes JSON and a PNG (benchmarks/results/vs_trl_learning_*.{json,png}).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict
from pathlib import Path

from vs_trl import MODELS, RESULTS, Settings, job_arguments, run_side, save_figure

SIDES = ("ours", "trl")
TARGET_FRACTION = 0.8


def per_step(runs: list[dict], key: str) -> list[dict]:
    """[{mean, min, max}] per step over the seeds' runs (steps every run has)."""
    steps = min(len(r["steps"]) for r in runs)
    rows = []
    for t in range(steps):
        values = [r["steps"][t][key] for r in runs if r["steps"][t].get(key) is not None]
        rows.append({"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
                    if values else {"mean": None, "min": None, "max": None})
    return rows


def time_to(run: dict, target: float) -> float | None:
    """Seconds of steps until the first step whose batch reward reaches `target` (None: never)."""
    elapsed = 0.0
    for row in run["steps"]:
        elapsed += row["step_s"]
        if row["reward"] >= target:
            return elapsed
    return None


def summarize(results: dict[str, list[dict]]) -> dict:
    summary = {name: {"reward": per_step(runs, "reward"), "kl": per_step(runs, "kl"),
                      "step_s": statistics.fmean(r["step_s"] for run in runs for r in run["steps"][1:]),
                      "startup_s": statistics.fmean(run["startup_s"] for run in runs)}
               for name, runs in results.items()}
    reachable = min(max(row["mean"] for row in summary[name]["reward"]) for name in summary)
    summary["target_reward"] = target = TARGET_FRACTION * reachable
    for name, runs in results.items():
        times = [time_to(run, target) for run in runs]
        summary[name]["time_to_target_s"] = times
        reached = [t for t in times if t is not None]
        every = len(reached) == len(times)
        summary[name]["time_to_target_mean_s"] = statistics.fmean(reached) if every else None
        # the same with each run's start-up (actors ready / trainer built) added
        summary[name]["time_to_target_with_startup_mean_s"] = (
            statistics.fmean(t + run["startup_s"] for t, run in zip(times, runs)) if every else None)
    for key in ("time_to_target_mean_s", "time_to_target_with_startup_mean_s"):
        if all(summary[n][key] for n in SIDES):
            summary[key.replace("_mean_s", "_ratio")] = summary["trl"][key] / summary["ours"][key]
    summary["step_s_ratio"] = summary["trl"]["step_s"] / summary["ours"]["step_s"]
    # per step, is our seed-mean reward inside TRL's min..max over seeds?
    summary["ours_within_trl_spread"] = [
        t["min"] <= o["mean"] <= t["max"] for o, t in zip(summary["ours"]["reward"], summary["trl"]["reward"])]
    return summary


def fmt(row: dict, digits: int = 3) -> str:
    if row["mean"] is None:
        return "-"
    return f"{row['mean']:.{digits}f} ({row['min']:.{digits}f}..{row['max']:.{digits}f})"


def print_table(summary: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"{'step':>4}  {'reward ours':>24}  {'reward TRL':>24}  {'KL ours':>24}  {'KL TRL':>24}")
    for t, (o, r) in enumerate(zip(summary["ours"]["reward"], summary["trl"]["reward"])):
        print(f"{t + 1:>4}  {fmt(o):>24}  {fmt(r):>24}  {fmt(summary['ours']['kl'][t], 4):>24}  "
              f"{fmt(summary['trl']['kl'][t], 4):>24}")
    print(f"s/step (steps 2+): ours {summary['ours']['step_s']:.1f}, TRL {summary['trl']['step_s']:.1f} "
          f"(TRL / ours {summary['step_s_ratio']:.2f}x)")
    target = summary["target_reward"]
    for name in SIDES:
        times = ", ".join("never" if x is None else f"{x:.0f}" for x in summary[name]["time_to_target_s"])
        print(f"time to reward {target:.3f}, {name}: {times} s")
    if "time_to_target_ratio" in summary:
        print(f"time to reward {target:.3f}, TRL / ours: {summary['time_to_target_ratio']:.2f}x "
              f"(with start-up: {summary.get('time_to_target_with_startup_ratio', float('nan')):.2f}x)")
    inside = summary["ours_within_trl_spread"]
    print(f"our seed-mean reward inside TRL's seed range at {sum(inside)} of {len(inside)} steps")


def plot(summary: dict, results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, color in zip(SIDES, ("#4C72B0", "#999999")):
        rows = summary[name]["reward"]
        steps = range(1, len(rows) + 1)
        by_step.plot(steps, [r["mean"] for r in rows], "-o", color=color, label=name)
        by_step.fill_between(steps, [r["min"] for r in rows], [r["max"] for r in rows], color=color, alpha=0.2)
        for i, run in enumerate(results[name]):
            elapsed, times = 0.0, []
            for row in run["steps"]:
                elapsed += row["step_s"]
                times.append(elapsed)
            by_time.plot(times, [r["reward"] for r in run["steps"]], "-o", color=color,
                         label=name if i == 0 else None, alpha=0.8)
    for axis in (by_step, by_time):
        axis.axhline(summary["target_reward"], color="k", ls=":", lw=1)
        axis.set_ylabel("batch reward")
        axis.legend()
    by_step.set_xlabel("step (mean over seeds; band: min..max)")
    by_time.set_xlabel("seconds of steps (each seed)")
    save_figure(fig, title, path)


def main() -> None:
    parser = job_arguments(__doc__, "100m", 8)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tag", default="")
    parser.add_argument("--from-json", help="summarize the raw runs a previous call wrote (its .json)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for our side, after --")
    args = parser.parse_args()

    from rlhf_dist.models.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model(Path("~/.cache/rlhf_dist/models").expanduser() / f"vs_trl_{args.model}",
                                  **MODELS[args.model])
    seeds = [int(x) for x in args.seeds.split(",")]
    stem = f"vs_trl_learning_{args.model}_{args.lengths}_{args.dtype}" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    settings = asdict(Settings(model_dir=str(model_dir), lengths=args.lengths, steps=args.steps,
                               dtype=args.dtype, overrides=args.overrides))
    record = {"settings": {**settings, "seeds": seeds},
              "machine": {"cores": os.cpu_count(), "platform": platform.platform()}}
    results: dict[str, list[dict]] = {name: [] for name in SIDES}
    if args.from_json:  # the file's own settings name the output (not this call's flags)
        record = json.loads(Path(args.from_json).read_text())
        results, seeds = record["results"], record["settings"]["seeds"]
        stem, args.seeds = Path(args.from_json).stem, ",".join(map(str, seeds))
        args.lengths, args.dtype = record["settings"]["lengths"], record["settings"]["dtype"]
    for seed in seeds if not args.from_json else []:
        s = Settings(model_dir=str(model_dir), lengths=args.lengths, steps=args.steps, dtype=args.dtype,
                     seed=seed, overrides=args.overrides)
        for name in SIDES:
            result = run_side(name, s)
            if "steps" not in result:
                raise SystemExit(f"{name} (seed {seed}) failed: {result.get('error')}")
            results[name].append(result)
            # every finished run is on disk at once: a failure later loses nothing (--from-json)
            (RESULTS / f"{stem}.json").write_text(json.dumps({**record, "results": results}, indent=1))
    summary = summarize(results)
    title = (f"learning vs TRL: {args.model} model, 8 prompts x 8 completions, <= 64 new tokens "
             f"({args.lengths} lengths), {args.dtype}, seeds {args.seeds}, {os.cpu_count()} cores"
             + (f", ours: {' '.join(args.overrides)}" if args.overrides else ""))
    print_table(summary, title)
    (RESULTS / f"{stem}.json").write_text(json.dumps({**record, "summary": summary, "results": results}, indent=1))
    plot(summary, results, RESULTS / f"{stem}.png", title)
    print(f"wrote {RESULTS / stem}.json and .png")


if __name__ == "__main__":
    main()
