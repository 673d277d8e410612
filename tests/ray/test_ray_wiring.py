"""The real actors on a local Ray: vLLM engine, reference, reward, two DeepSpeed ranks (gloo).

One module-scoped start-up (about a minute on 2 cores) serves every test here.
"""

import pytest
import ray
import torch

from rlhf_dist.runtime.cluster import check_resources
from rlhf_dist.weights.checksum import diff_checksums, expected_checksums, fuse_like_engine, narrow_to
from rlhf_dist.errors import ActorDiedError, ClusterResourceError, WeightSyncError

from helpers import start_trainer, threads_and_cores

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    # the object-store transport end to end (the collective one: test_weight_transport.py)
    trainer = start_trainer(tmp_path_factory.mktemp("run"), tiny_model_dir, ["rollout.sync_transport=object_store"])
    yield trainer
    trainer.shutdown()
    ray.shutdown()


def _learner_weights_as_engine_sees_them(trainer):
    weights = trainer.learners.run("get_weights", timeout_s=60)
    return weights, fuse_like_engine(weights[0], trainer.weights.packed_modules)


def test_one_step_then_engine_weights_equal_learner_bit_for_bit(trainer):
    engine_before = trainer.engines.run("get_weights", timeout_s=60)[0]
    metrics = trainer.step(1)
    for key in ("reward/mean", "loss/policy", "kl/mean", "timing/sync_s", "sync/verified_tensors"):
        assert key in metrics
    assert metrics["sync/buckets"] > 1
    rank_weights, expected = _learner_weights_as_engine_sees_them(trainer)
    for name in rank_weights[0]:  # ZeRO-2 keeps identical replicas on every rank
        assert torch.equal(rank_weights[0][name], rank_weights[1][name]), name
    engine_after = trainer.engines.run("get_weights", timeout_s=60)[0]
    assert set(engine_after) == set(expected)
    changed = 0
    for name, tensor in expected.items():
        held = narrow_to(engine_after[name], tensor.shape)  # vLLM pads vocab rows to 64
        assert torch.equal(held, tensor), f"{name} differs from the learner's"
        changed += not torch.equal(narrow_to(engine_before[name], tensor.shape), tensor)
    assert changed == len(expected), "every tensor should have moved after one AdamW step"


def test_engine_samples_from_the_synced_weights(trainer, tiny_model_dir):
    """Bit-equal tensors are not enough: the engine's kernels must compute with them.

    (vLLM's CPU backend packs linear weights into oneDNN handles that an in-place reload does not
    rebuild; this test caught that.) Sample with the engine, then score the same tokens with an
    HF model holding the learner's weights: the logprobs must agree to float32 precision.
    """
    from rlhf_dist.models.hf import load_causal_lm, response_logprobs
    from rlhf_dist.data.batch import collate_sequences

    trainer.step(2)
    model = load_causal_lm(str(tiny_model_dir)).eval()
    model.load_state_dict(trainer.learners.run("get_weights", timeout_s=60)[0], strict=False)
    model.tie_weights()
    samples, _ = trainer.generate(trainer.eval_records[:4], 2, 1.0)
    batch = collate_sequences([s.prompt_ids for s in samples], [s.token_ids for s in samples],
                             [s.logprobs for s in samples], trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch.prompt_width)
    gap = ((logprobs - batch["rollout_logprobs"]).abs() * batch["response_mask"]).max().item()
    assert gap < 1e-3, f"engine logprobs differ from the learner's weights by {gap}"


def test_compute_actors_use_every_core_of_the_node(trainer):
    # Ray starts a fractional-CPU actor with OMP_NUM_THREADS=1; the lone engine must still decode
    # on all cores (rlhf_dist/runtime/cpu.py) and the 2 learner ranks share them
    from rlhf_dist.runtime.cpu import available_cores

    cores = available_cores()
    assert threads_and_cores(trainer.engines.actors[0]) == (len(cores), cores)
    for learner in trainer.learners.actors:
        assert threads_and_cores(learner) == (max(1, len(cores) // 2), cores)


def test_verification_catches_a_corrupted_bucket(trainer):
    weights = trainer.learners.run("get_weights", timeout_s=60)[0]
    expected = expected_checksums(fuse_like_engine(weights, trainer.weights.packed_modules), trainer.weights.layouts[0])
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = weights[name].clone()
    weights[name][0, 0] += 1e-3
    ref = ray.put(list(weights.items()))
    result = trainer.engines.run("weights_call", "object_store", "load", [ref], 30.0, True, timeout_s=60)[0]
    problems = diff_checksums(expected, result["checksums"][0])
    assert len(problems) == 1 and problems[0].startswith(name)
    trainer.sync_weights()  # put the right weights back


def test_sync_with_a_bucket_that_never_arrives_times_out(trainer):
    @ray.remote(num_cpus=0)
    def never():
        import time
        time.sleep(600)

    with pytest.raises(WeightSyncError, match="did not arrive within 2 s"):
        trainer.engines.run("weights_call", "object_store", "load", [never.remote()], 2.0, timeout_s=60)


def test_too_many_actors_for_the_cluster_is_a_clear_error(trainer):
    cfg = trainer.cfg
    big = type(cfg)(**{**cfg.__dict__})
    big.learner = type(cfg.learner)(**{**cfg.learner.__dict__, "world_size": 8})
    with pytest.raises(ClusterResourceError, match="8 learner rank"):
        check_resources(big)


def test_a_dead_engine_is_named(trainer):
    ray.kill(trainer.engines.actors[0], no_restart=True)
    with pytest.raises(ActorDiedError, match=r"rollout\[0\] died during generate"):
        trainer.generate(trainer.eval_records[:2], 1, 0.0)
