"""rollout.sleep_level > 0: engines sleep after generating and must be awake before the next
generation on every way out of a step: a full step, a step skipped after scoring, a sync that fails
half-way. The state is kept by WeightSync (rlhf_dist/weights/sync.py); the engines here only record
the calls they get (vLLM's CPU build has no sleep mode to run for real)."""

from types import SimpleNamespace

import pytest

from rlhf_dist.weights import sync as sync_module
from rlhf_dist.weights.sync import WeightSync


class RecordingEngines:
    names = ["rollout-0"]

    def __init__(self):
        self.calls = []

    def call(self, verb, *args):
        self.calls.append((verb, *args))
        return []

    def wait(self, refs, what, timeout_s):
        return []


def _sync(sleep_level=1):
    learners = SimpleNamespace(actors=["rank0"], names=["learner-0"])
    cfg = SimpleNamespace(sleep_level=sleep_level, sync_timeout_s=5.0)
    return WeightSync(learners, RecordingEngines(), cfg, "cuda", 0)


def test_a_step_skipped_after_scoring_leaves_nothing_asleep_for_the_next_generation():
    weights = _sync()
    weights.sleep_engines()  # phase 1 done: memory to the learner
    assert weights.engines.calls == [("sleep", 1)]
    # the reward failed: the step returns before the sync; the next generate wakes everything
    weights.wake_engines()
    assert weights.engines.calls[-1] == ("wake_up", None) and weights.asleep is None
    weights.wake_engines()  # awake: nothing more to do
    assert len(weights.engines.calls) == 2


def test_a_sync_that_fails_after_waking_the_weights_leaves_the_kv_cache_to_the_next_generation(monkeypatch):
    weights = _sync()
    weights.sleep_engines()

    class Broken:
        def start(self, *args):
            raise RuntimeError("bucket 3 timed out")

    monkeypatch.setattr(sync_module, "get_transport", lambda name: Broken())
    weights.cfg.sync_transport, weights.cfg.verify_sync, weights.device = "collective", False, "cuda"
    with pytest.raises(RuntimeError, match="bucket 3"):
        weights.sync()
    assert weights.engines.calls[-1] == ("wake_up", ["weights"]) and weights.asleep == ["kv_cache"]
    weights.wake_engines()
    assert weights.engines.calls[-1] == ("wake_up", ["kv_cache"]) and weights.asleep is None


def test_level_2_sends_the_weights_again_before_generating(monkeypatch):
    """Level 2 dropped the weights: after a skipped step the engines get them again, not garbage."""
    weights = _sync(sleep_level=2)
    weights.sleep_engines()
    sent = []

    class Recording:
        def start(self, sync, verify):
            sent.append(sync.engines.calls[-1])  # what the engines had been told just before
            raise RuntimeError("stop after the send started")

    monkeypatch.setattr(sync_module, "get_transport", lambda name: Recording())
    weights.cfg.sync_transport, weights.cfg.verify_sync = "collective", False
    with pytest.raises(RuntimeError, match="send started"):
        weights.wake_engines()
    assert weights.engines.calls == [("sleep", 2), ("wake_up", ["weights"])] and sent == [("wake_up", ["weights"])]


def test_without_sleep_mode_nothing_is_called():
    weights = _sync(sleep_level=0)
    weights.sleep_engines()
    weights.wake_engines()
    assert weights.engines.calls == [] and weights.asleep is None
