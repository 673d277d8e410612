"""The `rlhf-dist` entry point on bad input: a clear message, a non-zero exit, no actor started."""

import json
from pathlib import Path

import pytest
import torch

from rlhf_dist.models.scalar_reward import ensemble_members

from helpers import REPO, assert_rises, run_cli

STARTED = "[start]"  # printed just before actors are created


def _fails_early(args, tmp_path, needle, code=2):
    result = run_cli([f"hydra.run.dir={tmp_path}/run", *args], cwd=tmp_path, timeout=300)
    assert result.returncode == code, result.stdout + result.stderr
    assert needle in result.stderr, result.stderr
    assert STARTED not in result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_missing_model_path(tmp_path):
    err = _fails_early(["model.path=/no/such/model"], tmp_path, "does not exist")
    assert "/no/such/model" in err and "model.path" in err


def test_unknown_key_suggests_the_right_one(tmp_path):
    _fails_early(["trainer.total_step=5"], tmp_path, "Did you mean 'trainer.total_steps'?")


def test_unknown_group_option_lists_valid_ones(tmp_path):
    err = _fails_early(["algo=nope"], tmp_path, "Available options", code=1)
    assert "grpo" in err


def test_unknown_experiment_lists_the_ones_that_exist(tmp_path):
    err = _fails_early(["experiment=nosuch"], tmp_path, "Could not find 'experiment/nosuch'", code=1)
    assert "smoke" in err and "ppo" in err


def test_ppo_without_critic_ranks_says_what_is_missing(tmp_path):
    _fails_early(["algo=ppo", "critic.world_size=0"], tmp_path, "needs state values from a critic, but critic.world_size=0")


def test_ppo_critic_that_does_not_fit_the_cluster(tmp_path):
    err = _fails_early(["algo=ppo", "cluster.cpus_per_critic=1"], tmp_path, "the actors need")
    assert "2 critic rank(s): 2" in err


def test_bad_algo_values_fail_before_ray(tmp_path):
    _fails_early(["algo.gamma=1.2"], tmp_path, "algo.gamma=1.2 is out of range")
    _fails_early(["algo.clip_ratio_c=0.5"], tmp_path, "algo.clip_ratio_c=0.5")


def test_an_environment_that_does_not_load_fails_before_ray(tmp_path):
    (tmp_path / "envs.py").write_text("import no_such_module_here\n")
    err = _fails_early([f"rollout.env={tmp_path / 'envs.py'}:Env"], tmp_path, "failed with ModuleNotFoundError")
    assert f"rollout.env='{tmp_path / 'envs.py'}:Env'" in err
    (tmp_path / "plain.py").write_text("class Env:\n    pass\n")
    _fails_early([f"rollout.env={tmp_path / 'plain.py'}:Env"], tmp_path, "Env has no step(conversation) method")


def test_reward_model_path_that_is_not_a_model(tmp_path):
    err = _fails_early(["reward.model.path=/no/such/rm"], tmp_path, "reward model")
    assert "/no/such/rm" in err and "does not exist" in err


def test_reward_model_with_a_non_scalar_head_is_refused(tmp_path, tiny_model_dir):
    import shutil

    rm = tmp_path / "two_label_rm"
    shutil.copytree(tiny_model_dir, rm)
    config = json.loads((rm / "config.json").read_text())
    config.update(architectures=["Qwen2ForSequenceClassification"], id2label={"0": "a", "1": "b"})
    (rm / "config.json").write_text(json.dumps(config))
    _fails_early([f"reward.model.path={rm}"], tmp_path, "sequence classifier with 2 labels")


def test_sft_stage_without_data_says_what_to_pass(tmp_path):
    _fails_early(["stage=sft", "warmup.steps=0"], tmp_path, "stage=sft needs sft.train_file=")


def test_bad_preference_record_is_reported_with_file_and_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "rev ab=", "chosen": "ba", "rejected": "ab"}\n'
                     '{"prompt": "rev cd=", "chosen": "dc", "rejected": "dc"}\n')
    err = _fails_early(["stage=reward_model", "warmup.steps=0", f"reward_model.train_files=[{pairs}]"],
                       tmp_path, f"{pairs}:2")
    assert "on_bad" in err


def test_prompt_longer_than_the_engine_budget_is_caught_before_ray(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "rev " + "ab" * n + "="}) + "\n" for n in (2, 40)) * 8)
    _fails_early([f"task.prompts_file={prompts}", "task.max_prompt_len=16", "task.long_prompts=error",
                  "experiment=smoke", "warmup.steps=0",
                  f"reward.fn={REPO / 'examples' / 'my_rewards.py'}:score"],
                 tmp_path, "8 of 16 train prompts are longer than task.max_prompt_len=16")


def test_reward_fn_that_cannot_be_imported(tmp_path):
    _fails_early(["reward.fn=no_such_module_xyz:score"], tmp_path, "no_such_module_xyz")


def test_reward_fn_that_raises_shows_the_sample(tmp_path):
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def score(prompts, completions, **fields):\n    raise KeyError('answer')\n")
    err = _fails_early([f"reward.fn={bad}:score"], tmp_path, "raised KeyError")
    assert "First sample: prompt=" in err


def test_grpo_with_one_sample_per_prompt(tmp_path):
    _fails_early(["rollout.n_samples_per_prompt=1"], tmp_path, "n_samples_per_prompt=1")


def test_batch_that_does_not_split_over_ranks(tmp_path):
    _fails_early(["learner.world_size=3"], tmp_path, "does not split evenly")


def test_empty_prompt_file(tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    _fails_early([f"task.prompts_file={empty}"], tmp_path, "empty")


def test_more_learner_ranks_than_the_cluster_has(tmp_path):
    err = _fails_early(["learner.world_size=8", "learner.micro_batch_size=8", "cluster.num_cpus=2"],
                       tmp_path, "the actors need")
    assert "8 learner rank(s)" in err


@pytest.mark.slow
@pytest.mark.ray
def test_smoke_run_end_to_end(tmp_path):
    """A short real run: warm-up, Ray actors, vLLM, DeepSpeed, sync, eval, logs, W&B offline."""
    run_dir = tmp_path / "run"
    result = run_cli([f"hydra.run.dir={run_dir}", "experiment=smoke", "logger.wandb.mode=offline"],
                     cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run summary" in result.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert len(evals) == 2  # start and end
    required = {"step", "reward/mean", "reward/std", "kl/mean", "loss/policy", "response/length_mean",
                "timing/generate_s", "timing/score_s", "timing/train_s", "timing/sync_s",
                "timing/step_s", "throughput/tokens_per_s"}
    assert required <= set(steps[0]), required - set(steps[0])
    assert all(r["sync/verified_tensors"] > 0 for r in steps)
    assert (run_dir / "config.yaml").exists() and (run_dir / "summary.json").exists()
    assert (run_dir / "samples.jsonl").read_text().strip()
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run directory missing"


@pytest.mark.slow
@pytest.mark.ray
def test_nan_loss_skips_updates_then_stops_the_run_with_the_batch_saved(tmp_path):
    """An absurd learning rate blows the weights up; every later loss is NaN: each update is
    skipped (and its batch saved) until trainer.max_bad_steps in a row stop the run."""
    result = run_cli([f"hydra.run.dir={tmp_path}/run", "experiment=smoke", "learner.optim.lr=1e12",
                      "trainer.total_steps=8", "trainer.max_bad_steps=2",
                      f"reward.fn={REPO / 'examples' / 'my_rewards.py'}:score"], cwd=tmp_path, timeout=900)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "non-finite learner loss" in result.stderr and "learner.optim.lr" in result.stderr
    assert "2 steps in a row had to be skipped (trainer.max_bad_steps=2)" in result.stderr
    assert "[skip] step" in result.stdout and "(1/2 in a row)" in result.stdout
    saved = sorted((tmp_path / "run" / "bad_batches").glob("step_*.pt"))
    assert len(saved) == 2
    batch = torch.load(saved[-1], weights_only=True)
    assert batch["tensors"]["input_ids"].shape[0] == 64  # 8 prompts x 8 samples


@pytest.mark.slow
@pytest.mark.ray
def test_default_job_learns(tmp_path):
    """The README's default job, unchanged: reward and held-out eval must rise (about 4 min)."""
    run_dir = tmp_path / "run"
    result = run_cli([f"hydra.run.dir={run_dir}", "logger.wandb.mode=disabled"], cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reward/last_10pct"] >= summary["reward/first_step"] + 0.3, summary
    assert summary["eval/reward_end"] > summary["eval/reward_start"] + 0.1, summary
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/std" in r]
    assert_rises([r["reward/mean"] for r in steps], head=10, tail=20,
                 within_sd=[r["reward/std"] for r in steps], batch=768)
    assert summary["timing/sync_frac"] < 0.1, summary


@pytest.mark.slow
@pytest.mark.ray
def test_ppo_learns(tmp_path):
    """experiment=ppo, shortened to 40 steps: policy and critic (2 ranks each) must both learn.

    The full 200-step run (docs/algorithms.md, benchmarks/learning_curves.py) gains about +0.6; here the
    reward must rise by 0.2 and the critic must come to explain part of the returns' variance.
    """
    run_dir = tmp_path / "run"
    result = run_cli([f"hydra.run.dir={run_dir}", "experiment=ppo", "trainer.total_steps=40",
                      "trainer.eval_every=0", "logger.wandb.mode=disabled"], cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reward/last_10pct"] >= summary["reward/first_step"] + 0.2, summary
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewarded = [r for r in rows if "reward/std" in r]
    assert_rises([r["reward/mean"] for r in rewarded], head=5, tail=5,
                 within_sd=[r["reward/std"] for r in rewarded], batch=768)
    steps = [r for r in rows if "critic/explained_variance" in r]
    assert len(steps) == 40
    late = sum(r["critic/explained_variance"] for r in steps[-5:]) / 5
    early = sum(r["critic/explained_variance"] for r in steps[:3]) / 3
    assert late > early and late > 0.0, (early, late)


@pytest.mark.slow
@pytest.mark.ray
def test_full_recipe_short(tmp_path):
    """experiment=full_recipe, shortened: every stage must learn what it is trained on.

    SFT lowers the held-out loss, the reward model ranks held-out pairs above chance, RL raises
    the learned reward, and the gold score is logged beside it (docs/algorithms.md has the full run
    and its KL sweep).
    """
    run_dir = tmp_path / "run"
    result = run_cli([f"hydra.run.dir={run_dir}", "experiment=full_recipe", "recipe.num_prompts=1500",
                      "recipe.num_pairs=3000", "sft.steps=300", "reward_model.steps=300",
                      "trainer.total_steps=20", "trainer.eval_every=0", "logger.wandb.mode=disabled"],
                     cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sft/eval_loss_end"] < summary["sft/eval_loss_start"] - 1.5, summary
    # 750 held-out pairs: a reward model at chance (0.5; 22% of pairs are gold ties) scores
    # 0.5 +- 0.018, so 0.58 is 4.4 standard errors above it
    assert summary["rm/eval_accuracy"] >= 0.58, summary
    # the demonstrator's systematic error (recipe.bias=0.8): the best demonstration scores ~0.8
    # and the SFT policy imitates the error, so its greedy gold is below it
    assert 0.78 < summary["best_demo_gold"] < 0.83, summary
    assert summary["sft_policy/eval_gold"] < summary["best_demo_gold"], summary
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    learned = [r["reward/model_mean"] for r in rows if "reward/model_mean" in r]
    gold = [r["reward/rule_mean"] for r in rows if "reward/rule_mean" in r]
    assert len(learned) == len(gold) == 20
    assert_rises(gold, head=5, tail=5)  # the sampled policy improves on the true objective
    assert sum(learned[-5:]) > sum(learned[:5]), learned  # by climbing the learned reward
    # RL's own gain: from the preferences alone, the greedy policy goes past the SFT policy and
    # the best demonstration (64 held-out prompts x 4 letters: +0.05 is 13 more right letters)
    assert summary["final_policy/eval_gold"] > summary["sft_policy/eval_gold"] + 0.05, summary
    assert summary["final_policy/eval_gold"] > summary["best_demo_gold"], summary
    assert summary["rm/ensemble_eval_accuracy"] >= 0.58, summary  # the recipe's 3 reward models
    assert (run_dir / "final" / "config.json").exists()  # keep_best exported the kept policy
    assert (run_dir / "recipe.png").stat().st_size > 10_000
    assert (run_dir / "sft_model" / "config.json").exists()
    for member in ensemble_members(str(run_dir / "reward_model")):  # 3 reward models and ensemble.json
        assert Path(member, "config.json").exists()
    assert len(ensemble_members(str(run_dir / "reward_model"))) == 3
