"""eval.* and trainer.export_*: every bad value refused by validation, naming the set, before
any actor starts; the CLI can set a whole eval.sets mapping."""

import pytest

from rlhf_dist.errors import ConfigError
from rlhf_dist.evaluation import eval_set_specs
from rlhf_dist.validation import check_override_keys, validate

from helpers import REPO, compose_config

REWARD = f"{REPO / 'examples' / 'my_rewards.py'}:score"


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "extra.jsonl"
    path.write_text('{"prompt": "rev ab="}\n{"prompt": "rev cd="}\n')
    return path


def test_default_is_one_set_the_held_out_split_with_the_runs_reward():
    cfg = compose_config([])
    validate(cfg)
    [spec] = eval_set_specs(cfg.eval, cfg.rollout.temperature)
    assert (spec.name, spec.file, spec.reward_fn, spec.n) == ("held_out", None, None, 4)
    assert spec.temperature == cfg.rollout.temperature and spec.solved_threshold == pytest.approx(1 - 1e-6)


def test_cli_sets_a_whole_mapping_and_fields_default_from_eval(prompts):
    overrides = [f"eval.sets={{extra: {{file: {prompts}, reward_fn: '{REWARD}', temperature: 0.7}}, "
                 "held_out: {n: 8}}", "eval.k=[1,2]", "eval.n=2"]
    check_override_keys(overrides)  # the CLI's own key check lets eval.sets' sub-keys through
    cfg = compose_config(overrides)
    validate(cfg)
    held_out, extra = eval_set_specs(cfg.eval, cfg.rollout.temperature)
    assert (held_out.name, held_out.n) == ("held_out", 8)
    assert (extra.name, extra.file, extra.reward_fn, extra.n, extra.temperature) == (
        "extra", str(prompts), REWARD, 2, 0.7)


@pytest.mark.parametrize("sets, extra, needle", [
    ("{extra: {file: FILE}}", ["eval.k=[1,8]"],
     "eval set 'held_out': eval.k=[1, 8] asks for pass@8 from n=4 samples per prompt; pass@k needs k <= n. "
     "Fix: eval.k=[1] or n >= 8"),
    ("{extra: {file: FILE, n: 2}}", [], "eval set 'extra': eval.k=[1, 4] asks for pass@4 from n=2"),
    ("{extra: {file: /no/such/prompts.jsonl}}", [], "eval set 'extra': file='/no/such/prompts.jsonl' not found"),
    ("{extra: {file: EMPTY}}", [], "is empty"),
    ("{extra: {file: FILE, reward_fn: no_such_module_xyz:score}}", [],
     "eval set 'extra': eval.sets.extra.reward_fn='no_such_module_xyz:score': importing module"),
    ("{extra: {file: FILE, reward_fn: BROKEN}}", [], "failed with ModuleNotFoundError"),
    ("{extra: {file: FILE, reward_fn: 'examples/my_rewards.py'}}", [], "is not a valid spec"),
    ("{extra: {}}", [], "eval.sets.extra has no file"),
    ("{held_out: {file: FILE}}", [], "Fix: task.eval_file="),
    ("{extra: {file: FILE, temp: 0.5}}", [], "eval.sets.extra.temp: unknown key. Did you mean 'temperature'?"),
    ("{extra: {file: FILE, n: 2.5}}", [], "eval.sets.extra.n=2.5: expected a finite whole number"),
    ("{extra: {file: FILE, temperature: 0}}", [], "eval set 'extra': temperature=0.0 must be > 0"),
    ("{episode: {file: FILE}}", [], "names become metric keys"),
    ("[a, b]", [], "expected a mapping"),
    ("null", ["eval.k=[0]"], "eval.k=[0]: expected a non-empty list of whole numbers >= 1"),
    ("null", ["eval.n=-1"], "eval.n=-1 must be >= 0"),
    ("null", ["trainer.export_every=-2"], "trainer.export_every=-2 must be >= 0"),
])
def test_bad_eval_sets_are_refused_naming_the_set(tmp_path, prompts, sets, extra, needle):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    sets = (sets.replace("FILE", str(prompts)).replace("EMPTY", str(tmp_path / "empty.jsonl"))
            .replace("BROKEN", f"'{tmp_path / 'broken.py'}:score'"))
    cfg = compose_config([f"eval.sets={sets}", *extra])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert needle in str(info.value)


def test_greedy_only_sets_need_no_k():
    cfg = compose_config(["eval.n=0", "eval.k=[16]"])
    validate(cfg)


def test_model_path_may_name_a_checkpoint_and_its_hf_weights_are_used(tmp_path, tiny_model_dir, prompts):
    """A checkpoint dir holds DeepSpeed state (policy_ds/, for trainer.resume) and the HF weights
    (policy/): model.path (stage=eval, or an RL run's start) takes the latter. prepare() also loads
    every eval set, held_out first."""
    import shutil

    from rlhf_dist import checkpoint
    from rlhf_dist.session import prepare

    partial = checkpoint.begin(tmp_path / "checkpoints", 5)
    shutil.copytree(tiny_model_dir, partial / "policy")
    (partial / "policy_ds").mkdir()
    step_dir = checkpoint.commit(partial, 5, {})
    cfg = compose_config([f"model.path={step_dir}", "experiment=smoke", f"reward.fn={REWARD}",
                          f"eval.sets={{extra: {{file: {prompts}}}}}"])
    inputs = prepare(cfg)
    assert inputs["model_path"] == str(step_dir / "policy")
    held_out, extra = inputs["eval_sets"]
    assert held_out.records == inputs["eval"] and held_out.stream == "eval:held_out"
    assert [r["prompt"] for r in extra.records] == ["rev ab=", "rev cd="]


def test_an_eval_sets_reward_fn_scores_in_the_reward_actor(tmp_path):
    """RewardActor.score_with (the actor class itself, outside Ray): the set's function gives the
    reward and the rule (gold) score; a sample it raises on gets reward.fallback_score, or with
    null the pass is refused (the harness then reports NaN for that set only)."""
    from rlhf_dist.actors.reward import RewardActor
    from rlhf_dist.errors import RewardSamplesFailedError

    (tmp_path / "exact.py").write_text(
        "def score(prompts, completions, answer=None, **fields):\n"
        "    return [float(int(c) == a) for c, a in zip(completions, answer)]\n")
    spec = f"{tmp_path / 'exact.py'}:score"
    records = [{"prompt": "1+1=", "answer": 2}, {"prompt": "2+2=", "answer": 4}]
    actor = RewardActor(REWARD, fallback_score=0.0)
    scores = actor.score_with(spec, records, ["2", "5"])
    assert scores.reward == scores.rule == [1.0, 0.0] and scores.model is None
    scores = actor.score_with(spec, records, ["2", "four"])  # int("four") raises: that sample alone
    assert scores.reward == [1.0, 0.0] and scores.metrics["reward/failed_samples"] == 1.0
    assert "raised on 1 of 2 samples" in scores.report
    with pytest.raises(RewardSamplesFailedError):
        RewardActor(REWARD, fallback_score=None).score_with(spec, records, ["2", "four"])
