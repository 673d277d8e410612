"""Soak: a long run on the tiny model with every actor's resident memory logged, to show that
memory does not grow (and that checkpoints, evals and syncs do not leak).

    python benchmarks/soak.py                      # the default job, 1000 steps (~20 min on 2 cores)
    python benchmarks/soak.py --steps 300 -- rollout.num_engines=2

Runs the real job with logger.memory_every=10 and a checkpoint every 100 steps, then prints, per
process, the RSS after the first 10% of the steps (warm-up allocations done), at the end, and the
slope of a least-squares line over the second half in MB per 100 steps. Writes JSON (default
bench_results/soak.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def slope_per_100(points: list[tuple[int, float]]) -> float:
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 100 * sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default="bench_results/soak.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from rlhf_dist.session import conf_dir
    from rlhf_dist.stages.rl import run_rl

    run_dir = tempfile.mkdtemp(prefix="soak_")
    base = [f"trainer.run_dir={run_dir}", f"trainer.total_steps={args.steps}", "trainer.save_every=100",
            "trainer.eval_every=100", "logger.memory_every=10", "logger.wandb.mode=disabled"]
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=base + args.overrides)
    summary = run_rl(cfg)
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if any(k.startswith("memory/") for k in r)]
    keys = sorted({k for r in rows for k in r if k.startswith("memory/")})
    early = max(10, args.steps // 10)
    result = {}
    print(f"\nsoak: {args.steps} steps, {summary['timing/step_s_mean']:.2f} s/step")
    print(f"{'process':<28}{'RSS @' + str(early):>12}{'RSS @end':>11}{'MB/100 steps (2nd half)':>26}")
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        at_early = next((v for s, v in points if s >= early), points[0][1])
        second = [(s, v) for s, v in points if s >= args.steps // 2]
        result[key] = {"rss_early_mb": at_early, "rss_end_mb": points[-1][1],
                       "slope_mb_per_100_steps": slope_per_100(second), "points": points}
        name = key[len("memory/"):-len("_rss_mb")]
        print(f"{name:<28}{at_early:>12.0f}{points[-1][1]:>11.0f}{result[key]['slope_mb_per_100_steps']:>26.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "summary": summary, "memory": result}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
