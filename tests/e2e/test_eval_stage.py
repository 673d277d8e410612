"""stage=eval and trainer.export_every through the real `rlhf-dist` entry point: an exported policy
evaluated without training scores exactly what the run's own eval of the same weights logged."""

import json

import pytest

from helpers import REPO, run_cli

REWARD = f"{REPO / 'examples' / 'my_rewards.py'}:score"


def _eval_sets(tmp_path) -> str:
    """held_out with a threshold the tiny model sometimes reaches, and a set of its own: other
    prompts, its own exact-or-nothing reward, more samples."""
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"prompt": f"rev {w}="}) + "\n"
                                                  for w in ("ab", "bca", "dd", "cab", "abcd")))
    (tmp_path / "short_reward.py").write_text(
        "def score(prompts, completions, **fields):\n"
        "    return [float(0 < len(c.strip()) < 15) for c in completions]\n")
    return (f"eval.sets={{held_out: {{solved_threshold: 0.4}}, short: {{file: {tmp_path / 'short.jsonl'}, "
            f"reward_fn: '{tmp_path / 'short_reward.py'}:score', n: 6, temperature: 1.2}}}}")


@pytest.mark.slow
@pytest.mark.ray
def test_stage_eval_of_an_export_equals_the_runs_eval_of_it(tmp_path):
    """A 2-step run exports every step (keeping 1) and evaluates at the end; stage=eval on the
    export, its prompts split over 2 engines, gives the same greedy scores, mean@n and pass@k on
    both sets: same weights, same seeds."""
    common = ["experiment=smoke", "warmup.steps=0", f"reward.fn={REWARD}", _eval_sets(tmp_path), "eval.k=[1,2,4]"]
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    run = run_cli([f"hydra.run.dir={run_dir}", *common, "trainer.total_steps=2", "trainer.save_every=0",
                   "trainer.export_every=1", "trainer.keep_exports=1"], cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # exports: complete or absent, the newest keep_exports kept, an HF dir model.path accepts
    assert [p.name for p in (run_dir / "exports").iterdir()] == ["step_00000002"]
    export = run_dir / "exports" / "step_00000002"
    assert {"config.json", "model.safetensors", "tokenizer.json", "COMPLETE.json"} <= {p.name for p in export.iterdir()}
    assert "[export] step 1 ->" in run.stdout and "[export] step 2 ->" in run.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    in_run = [r for r in rows if "eval/reward_mean" in r][-1]
    assert in_run["step"] == 2
    assert in_run["eval/held_out/greedy"] == in_run["eval/reward_mean"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["eval_sets"]) == {"held_out", "short"} and "pass@4" in summary["eval_sets"]["short"]
    assert "eval set" in run.stdout and "mean@6" in run.stdout  # the end summary's table

    result = run_cli([f"hydra.run.dir={eval_dir}", "stage=eval", f"model.path={export}", *common,
                      "rollout.num_engines=2"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"[eval] report: {eval_dir / 'eval_report.json'}" in result.stdout
    assert "learner" not in result.stdout.split("[eval] report")[0].lower()  # engines and reward only
    report = json.loads((eval_dir / "eval_report.json").read_text())
    compared = {k: v for k, v in in_run.items() if k.startswith("eval/") and k != "eval/time_s"}
    assert {k: report["metrics"][k] for k in compared} == compared
    assert {"eval/held_out/pass@4", "eval/short/pass@4", "eval/short/mean@6", "eval/held_out/mean@4"} <= set(compared)
    for name in ("held_out", "short"):  # not a comparison of zeros, and every sample its own stream:
        # n copies of one response (a stream shared within a prompt) would give pass@4 = pass@1
        assert compared[f"eval/{name}/pass@4"] > compared[f"eval/{name}/pass@1"] > 0.0, compared
    assert report["sets"]["short"]["n"] == 6 and report["sets"]["short"]["metrics"]["prompts"] == 5


def _fails_early(args, tmp_path, needle):
    result = run_cli([f"hydra.run.dir={tmp_path}/run", *args], cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr, result.stderr
    assert "[start]" not in result.stdout and "Traceback" not in result.stderr
    return result.stderr


def test_a_missing_eval_set_file_is_refused_before_any_actor_starts(tmp_path):
    err = _fails_early(["eval.sets={math: {file: /no/such/math.jsonl}}"], tmp_path,
                       "eval set 'math': file='/no/such/math.jsonl' not found")
    assert "Fix:" in err


def test_stage_eval_without_a_model_says_what_to_pass(tmp_path):
    _fails_early(["stage=eval"], tmp_path, "stage=eval needs the model to evaluate: model.path=")
