"""A reward function that raises on some samples: those samples get reward.fallback_score, are
named in the result, and the step goes on; with fallback_score=null the batch is refused with
RewardSamplesFailedError (the trainer skips the step); raising on every sample stops the run.

The Ray tests run the real RewardActor in an ActorGroup on a local Ray (no engines), and read its
errors through the group's `run`, as the trainer does.
"""

import pytest

from rlhf_dist.data.reward_fn import format_failures, score_samples
from rlhf_dist.errors import RewardFnError, RewardSamplesFailedError

USER_REWARD = '''
def score(prompts, completions, **fields):
    """1.0 per completion, but cannot parse the completion "boom"."""
    rewards = []
    for completion in completions:
        if completion == "boom":
            raise ValueError(f"cannot parse {completion!r}\\nsecond line of the message")
        rewards.append(1.0)
    return rewards


def always_raises(prompts, completions, **fields):
    raise RuntimeError("judge endpoint unreachable")


def wrong_length(prompts, completions, **fields):
    if "boom" in completions:
        raise ValueError("boom")
    return [1.0, 2.0]
'''

RECORDS = [{"prompt": "rev ab=", "target": "ba"}, {"prompt": "rev cd=", "target": "dc"},
           {"prompt": "rev ef=", "target": "fe"}]
COMPLETIONS = ["ba", "boom", "fe"]


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "flaky_reward.py"
    path.write_text(USER_REWARD)
    return path


def test_score_samples_finds_the_failing_sample(reward_file):
    from rlhf_dist.data.reward_fn import load_reward_fn

    spec = f"{reward_file}:score"
    rewards, failures = score_samples(load_reward_fn(spec), spec, RECORDS, COMPLETIONS)
    assert rewards == [1.0, None, 1.0]
    assert len(failures) == 1 and failures[0]["index"] == 1
    assert failures[0]["prompt"] == "'rev cd='" and failures[0]["completion"] == "'boom'"
    assert failures[0]["error"].startswith("ValueError: cannot parse 'boom' (at ")
    assert "second line" not in failures[0]["error"]
    text = format_failures(failures * 12, spec, 3, 0.0)
    assert "raised on 12 of 3 samples; they get reward.fallback_score=0" in text
    assert text.count("sample 1: ValueError") == 10 and text.endswith("... and 2 more")
    # no failures: one batch call, the same rewards as before
    assert score_samples(load_reward_fn(spec), spec, RECORDS[:1], ["ba"]) == ([1.0], [])
    # a wrong return value is still an error, not a failed sample
    with pytest.raises(RewardFnError, match=r"returned 2 values for 1 completions: \[1.0, 2.0\]"):
        score_samples(load_reward_fn(f"{reward_file}:wrong_length"), "s", RECORDS, COMPLETIONS)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _reward_group(spec: str, fallback_score):
    from rlhf_dist.runtime.group import ActorGroup
    from rlhf_dist.actors.reward import RewardActor

    return ActorGroup("reward", RewardActor, 1, 0.1, 0.0, 60.0,
                      [dict(fn_spec=spec, fallback_score=fallback_score)])


@pytest.mark.ray
def test_failing_sample_gets_fallback_score_and_is_named(reward_file, local_ray):
    group = _reward_group(f"{reward_file}:score", -1.0)
    try:
        result = group.run("score", RECORDS, COMPLETIONS, timeout_s=60)[0]
    finally:
        group.kill()
    assert result.reward == [1.0, -1.0, 1.0] and result.rule == [1.0, -1.0, 1.0]
    assert result.metrics == {"reward/failed_samples": 1.0}
    (failure,) = result.failures
    assert failure["index"] == 1 and failure["completion"] == "'boom'"
    assert "raised on 1 of 3 samples; they get reward.fallback_score=-1" in result.report
    assert "sample 1: ValueError: cannot parse 'boom'" in result.report
    assert "prompt 'rev cd=' | completion 'boom'" in result.report


@pytest.mark.ray
def test_fallback_null_refuses_the_batch_with_the_skip_error(reward_file, local_ray):
    group = _reward_group(f"{reward_file}:score", None)
    try:
        with pytest.raises(RewardSamplesFailedError) as info:
            group.run("score", RECORDS, COMPLETIONS, timeout_s=60)
        # samples that all score are unaffected by fallback_score=null
        assert group.run("score", RECORDS[:1], ["ba"], timeout_s=60)[0].reward == [1.0]
    finally:
        group.kill()
    message = str(info.value)
    assert message.startswith("reward[0]: [reward] reward.fn=")
    assert "raised on 1 of 3 samples; reward.fallback_score=null: the step is skipped" in message
    assert "sample 1: ValueError: cannot parse 'boom'" in message


@pytest.mark.ray
def test_every_sample_raising_stops_with_the_first_failure_and_the_spec(reward_file, local_ray):
    spec = f"{reward_file}:always_raises"
    group = _reward_group(spec, 0.0)
    try:
        with pytest.raises(RewardFnError) as info:
            group.run("score", RECORDS, COMPLETIONS, timeout_s=60)
    finally:
        group.kill()
    assert not isinstance(info.value, RewardSamplesFailedError)  # not skippable: a bug in fn
    message = str(info.value)
    assert f"reward.fn={spec!r} raised on every one of the 3 samples" in message
    assert "First: RuntimeError: judge endpoint unreachable (at " in message
    assert "prompt='rev ab=', completion='ba'" in message
