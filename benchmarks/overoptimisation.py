"""Reward over-optimisation (Gao et al. 2022): the hidden gold score against the policy's KL to the
SFT model, as RL climbs a learned reward, and what the recipe's guards do to it.

    python benchmarks/overoptimisation.py --case recipe --variants none guards --seeds 0 1 2
    python benchmarks/overoptimisation.py --case sort --variants none guards --seeds 0 1 2
    python benchmarks/overoptimisation.py --case recipe --variants kl0.01 kl0.1 kl0.3 kl1 klt --seeds 0
    python benchmarks/overoptimisation.py --from-json benchmarks/results/overoptimisation_recipe.json

Two cases:
  recipe  `experiment=full_recipe`: the built-in demonstrator with its systematic error, SFT ->
          reward model -> RL in one command.
  sort    a user's own task, run stage by stage as a user would: `examples/sort_case/make_data.py`
          writes noisy demonstrations, Bradley-Terry pairs labelled by a hidden gold function
          (`examples/sort_case/gold.py`) and prompts; then `stage=sft`, `stage=reward_model`, and
          `stage=rl` against the served reward model with the gold logged only (fn_weight=0).
          The SFT model and reward model(s) of a seed are trained once and shared by its variants.

Variants: `none` (a KL leash only: kl_coef 0.3 for sort, the experiment's for recipe), `guards`
(the recipe's default guards: 3 reward models served as mean - std, the SFT mix, keep_best on the
gold), each guard alone (`ensemble`, `sftmix`, `keepbest`), `klX` (kl_coef X, no other guard),
`klt` (adaptive KL, target 2 nats). Every eval (every 10
steps) logs the greedy gold on held-out prompts; every step logs the sampled gold and the KL. At the
end the exported policy (final/: the last one, or with keep_best the kept one) and the SFT model are
scored greedily on a third prompt set that no choice was made on (test gold), so keep_best's
selection on the eval prompts does not flatter it.

Prints a table over seeds, writes benchmarks/results/overoptimisation_<case>.{json,png}: the left
panel is greedy eval gold against KL to the SFT model, the right sampled gold against KL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SORT = REPO / "examples" / "sort_case"

# the recipe's default guards (conf/experiment/full_recipe.yaml sets the same), one by one
ENSEMBLE = {"reward.model.ensemble": "3", "reward.model.uncertainty_coef": "1.0"}
SFT_MIX = {"algo.sft_coef": "0.1"}
KEEP_BEST = {"trainer.keep_best": "eval/rule_mean"}
NO_GUARDS = {"reward.model.ensemble": "1", "reward.model.uncertainty_coef": "0", "algo.sft_coef": "0",
             "trainer.keep_best": "null", "trainer.save_final": "true"}
GUARDS = {**NO_GUARDS, **ENSEMBLE, **SFT_MIX, **KEEP_BEST}
SINGLE = {"none": {}, "guards": GUARDS, "ensemble": ENSEMBLE, "sftmix": SFT_MIX, "keepbest": KEEP_BEST,
          "klt": {"algo.kl_target": "2.0", "algo.kl_coef": "0.1"}}


def variant_overrides(name: str) -> list[str]:
    """none | guards | ensemble | sftmix | keepbest (one guard alone) | kl<coef> | klt (adaptive KL)."""
    if name in SINGLE:
        chosen = {**NO_GUARDS, **SINGLE[name]}
    elif name.startswith("kl"):
        chosen = {**NO_GUARDS, "algo.kl_coef": str(float(name[2:]))}
    else:
        raise SystemExit(f"unknown variant {name!r}: {' | '.join(SINGLE)} | kl<coef>")
    return [f"{key}={value}" for key, value in chosen.items()]


def cli(args: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "rlhf_dist.main", "logger.wandb.mode=disabled", *args]
    print("  $ rlhf-dist " + " ".join(args), flush=True)
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}); see {log}")


def run_recipe(out: Path, seed: int, variant: str, steps: int) -> Path:
    run_dir = out / f"recipe_{variant}_s{seed}"
    if not (run_dir / "summary.json").exists():
        cli([f"hydra.run.dir={run_dir}", "experiment=full_recipe", f"recipe.seed={seed}",
             f"trainer.seed={seed}", f"rollout.seed={seed}", f"trainer.total_steps={steps}",
             "trainer.eval_every=10", *variant_overrides(variant)], out / f"recipe_{variant}_s{seed}.log")
    return run_dir


def sort_stages(out: Path, seed: int, ensemble: int) -> tuple[Path, Path, Path]:
    """(data dir, SFT model, reward model) of a seed, each made once."""
    data = out / f"sort_data_s{seed}"
    if not (data / "demos.jsonl").exists():
        subprocess.run([sys.executable, str(SORT / "make_data.py"), str(data), "--seed", str(seed)], check=True)
    sft = out / f"sort_sft_s{seed}"
    if not (sft / "sft_model" / "config.json").exists():
        cli([f"hydra.run.dir={sft}", "stage=sft", f"sft.train_file={data / 'demos.jsonl'}", "sft.steps=2000",
             "sft.batch_size=64", "sft.micro_batch_size=32", "sft.eval_every=500"], out / f"sort_sft_s{seed}.log")
    rm = out / f"sort_rm{ensemble}_s{seed}"
    if not (rm / "reward_model").is_dir() or not (rm / "summary.json").exists():
        # from the base model, as the recipe does (recipe.rm_init=base: from the SFT model it stayed near chance)
        cli([f"hydra.run.dir={rm}", "stage=reward_model",
             f"reward_model.train_files=[{data / 'pairs.jsonl'}]", f"reward_model.eval_file={data / 'eval_pairs.jsonl'}",
             "reward_model.steps=600", "reward_model.eval_every=200", f"reward.model.ensemble={ensemble}"],
            out / f"sort_rm{ensemble}_s{seed}.log")
    return data, sft / "sft_model", rm / "reward_model"


def run_sort(out: Path, seed: int, variant: str, steps: int) -> Path:
    overrides = variant_overrides(variant)
    ensemble = next((int(o.split("=")[1]) for o in overrides if o.startswith("reward.model.ensemble=")), 1)
    data, sft_model, rm = sort_stages(out, seed, ensemble)
    run_dir = out / f"sort_{variant}_s{seed}"
    if not (run_dir / "summary.json").exists():
        cli([f"hydra.run.dir={run_dir}", f"model.path={sft_model}", f"reward.model.path={rm}",
             f"reward.fn={SORT / 'gold.py'}:score", "reward.fn_weight=0", "reward.normalize=true",
             f"task.prompts_file={data / 'prompts.jsonl'}", f"task.eval_file={data / 'eval_prompts.jsonl'}",
             f"sft.train_file={data / 'demos.jsonl'}", "algo.kl_coef=0.3", "warmup.steps=0",
             "rollout.max_new_tokens=8", f"trainer.total_steps={steps}", "trainer.eval_every=10",
             f"trainer.seed={seed}", f"rollout.seed={seed}", *overrides], out / f"sort_{variant}_s{seed}.log")
    return run_dir


def greedy_gold(model_dir: Path, prompts: list[str], targets: list[str] | None, case: str) -> float:
    """The mean gold of greedy answers of `model_dir` to `prompts` (transformers, on this process)."""
    import torch

    from rlhf_dist.data.records import render_prompt
    from rlhf_dist.data.tasks import position_match_score, clean_completion
    from rlhf_dist.models.hf import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir)).eval()
    texts = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(render_prompt(prompt, tokenizer), return_tensors="pt")["input_ids"]
            new = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    if case == "sort":
        sys.path.insert(0, str(SORT))
        from gold import score

        return statistics.mean(score(prompts, texts))
    return statistics.mean(position_match_score(clean_completion(t), target) for t, target in zip(texts, targets))


def test_prompts(case: str, out: Path, seed: int) -> tuple[list[str], list[str] | None]:
    if case == "sort":
        rows = [json.loads(line) for line in (out / f"sort_data_s{seed}" / "test_prompts.jsonl").read_text().splitlines()]
        return [r["prompt"] for r in rows], None
    from rlhf_dist.data.tasks import get_task

    records = get_task("reverse", min_len=4, max_len=4).make_records("eval", 256, seed + 1000)
    return [r["prompt"] for r in records], [r["target"] for r in records]


def measure(run_dir: Path, case: str, out: Path, seed: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/rule_mean" in r]
    evals = [r for r in rows if "eval/rule_mean" in r]
    kl_at = {r["step"]: r.get("kl/seq_mean", 0.0) for r in steps}
    summary = json.loads((run_dir / "summary.json").read_text())
    prompts, targets = test_prompts(case, out, seed)
    sft_dir = run_dir / "sft_model" if case == "recipe" else out / f"sort_sft_s{seed}" / "sft_model"
    tail = steps[-max(1, len(steps) // 10):]
    return {
        "run_dir": str(run_dir),
        "eval_curve": [(e["step"], kl_at.get(e["step"], 0.0), e["eval/rule_mean"], e.get("eval/model_mean"))
                       for e in evals],
        "sampled_curve": [(r["step"], r.get("kl/seq_mean", 0.0), r["reward/rule_mean"]) for r in steps],
        "sft_eval_gold": evals[0]["eval/rule_mean"],
        "last_eval_gold": evals[-1]["eval/rule_mean"],
        "peak_eval_gold": max(e["eval/rule_mean"] for e in evals),
        "peak_eval_step": max(evals, key=lambda e: e["eval/rule_mean"])["step"],
        "sampled_gold_first": steps[0]["reward/rule_mean"],
        "sampled_gold_last10": statistics.mean(r["reward/rule_mean"] for r in tail),
        "kl_last10": statistics.mean(r.get("kl/seq_mean", 0.0) for r in tail),
        "kept_step": (json.loads((run_dir / "best" / "choice.json").read_text())["step"]
                      if (run_dir / "best" / "choice.json").exists() else None),
        "sft_test_gold": greedy_gold(sft_dir, prompts, targets, case),
        "final_test_gold": greedy_gold(run_dir / "final", prompts, targets, case),
        "best_demo_gold": summary.get("best_demo_gold") if case == "recipe" else 0.75,
        "rl_s": summary.get("total_s") or summary.get("rl/total_s"),
    }


def table(results: dict[str, list[dict]]) -> None:
    keys = [("sft_test_gold", "SFT test"), ("final_test_gold", "final test"), ("sft_eval_gold", "SFT eval"),
            ("last_eval_gold", "last eval"), ("peak_eval_gold", "peak eval"), ("sampled_gold_first", "sampled 1st"),
            ("sampled_gold_last10", "sampled end"), ("kl_last10", "KL end")]
    print(f"{'variant':<8} {'seeds':>5} " + " ".join(f"{label:>18}" for _, label in keys))
    for variant, runs in results.items():
        cells = []
        for key, _ in keys:
            values = [r[key] for r in runs if r.get(key) is not None]
            cells.append(f"{statistics.mean(values):.3f} ({min(values):.2f}..{max(values):.2f})" if values else "-")
        print(f"{variant:<8} {len(runs):>5} " + " ".join(f"{c:>18}" for c in cells))
    for variant, runs in results.items():
        kept = [r["kept_step"] for r in runs if r.get("kept_step") is not None]
        peaks = [r["peak_eval_step"] for r in runs]
        print(f"{variant}: greedy eval gold peaked at steps {peaks}" + (f"; keep_best kept steps {kept}" if kept else ""))


def plot(results: dict[str, list[dict]], path: Path, case: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (variant, runs) in zip(colors, results.items()):
        for i, run in enumerate(runs):
            label = variant if i == 0 else None
            kl, gold = [c[1] for c in run["eval_curve"]], [c[2] for c in run["eval_curve"]]
            left.plot(kl, gold, "o-", color=color, alpha=0.7, ms=3, label=label)
            kl, gold = [c[1] for c in run["sampled_curve"]], [c[2] for c in run["sampled_curve"]]
            right.plot(kl, gold, color=color, alpha=0.5, lw=1, label=label)
    best = runs[0]["best_demo_gold"]
    for ax, title in ((left, "greedy gold on held-out prompts (every 10 steps)"), (right, "sampled gold (every step)")):
        if best is not None:
            ax.axhline(best, ls="--", color="gray", lw=1, label="best demonstration")
        ax.set_xlabel("KL to the SFT model (nats / sequence)")
        ax.set_ylabel("gold score")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"reward over-optimisation, case '{case}': gold against KL (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("recipe", "sort"), default="recipe")
    parser.add_argument("--variants", nargs="+", default=["none", "guards"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="/tmp/overoptimisation", help="run dirs (kept: re-runs reuse them)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--from-json", help="re-print and re-plot a result file")
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        table(data["results"])
        plot(data["results"], Path(args.from_json).with_suffix(".png"), data["case"])
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    for seed in args.seeds:
        for variant in args.variants:
            print(f"[{args.case}] seed {seed}, variant {variant}", flush=True)
            run_dir = (run_recipe if args.case == "recipe" else run_sort)(out, seed, variant, args.steps)
            results.setdefault(variant, []).append(measure(run_dir, args.case, out, seed))
    table(results)
    stem = f"overoptimisation_{args.case}{'_' + args.tag if args.tag else ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"case": args.case, "seeds": args.seeds, "steps": args.steps, "guards": variant_overrides("guards"),
         "wall_s": time.perf_counter() - start, "results": results}, indent=1))
    plot(results, RESULTS / f"{stem}.png", args.case)
    print(f"wrote {RESULTS / stem}.json and .png")


if __name__ == "__main__":
    main()
