"""The collective weight transport and tensor-parallel engines, on real Ray/vLLM/DeepSpeed (gloo).

Two trainers, one per test class (one at a time fits on 2 cores): two engines fed by a ZeRO-3
learner over two ranks, and one engine with tensor_parallel_size=2 (one process per shard).
"""

import time

import pytest
import ray
import torch

from rlhf_dist.weights.checksum import diff_checksums, expected_checksums, fuse_like_engine, narrow_to
from rlhf_dist.errors import WeightSyncError

from helpers import start_trainer

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="class")
def zero3_two_engines(tiny_model_dir, tmp_path_factory):
    trainer = start_trainer(tmp_path_factory.mktemp("run"), tiny_model_dir, [
        "rollout.sync_transport=collective", "rollout.num_engines=2", "learner.zero_stage=3"])
    yield trainer
    trainer.shutdown()
    ray.shutdown()


class TestCollectiveZero3TwoEngines:
    def test_collective_step_leaves_both_engines_bit_equal_to_zero3_learner(self, zero3_two_engines):
        trainer = zero3_two_engines
        before = trainer.engines.run("get_weights", timeout_s=60)[0]
        metrics = trainer.step(1)
        assert metrics["sync/buckets"] > 1 and metrics["sync/verified_tensors"] > 0
        expected = fuse_like_engine(trainer.learners.run("get_weights", timeout_s=60)[0], trainer.weights.packed_modules)
        held_by = trainer.engines.run("get_weights", timeout_s=60)
        assert len(held_by) == 2
        for held in held_by:
            assert set(held) == set(expected)
            for name, tensor in expected.items():
                assert torch.equal(narrow_to(held[name], tensor.shape), tensor), name
        assert all(not torch.equal(narrow_to(before[n], t.shape), t) for n, t in expected.items())
        assert trainer.step(2)["sync/rollout_logprob_gap_max"] < 1e-3  # engines sample from them


    def test_stalled_broadcast_fails_every_side_within_the_deadline_then_recovers(self, zero3_two_engines):
        """Engine 1 never joins the broadcast: learner rank 0 and engine 0 both stop at the deadline,
        the other learner rank is not left in a ZeRO-3 gather, and a fresh group syncs again."""
        trainer, ro = zero3_two_engines, zero3_two_engines.cfg.rollout
        deadline = 3.0
        start = time.perf_counter()
        sends = [r.weights_call.remote("collective", "send", trainer.weights.plan, ro.dtype, deadline)
                 for r in trainer.learners.actors]
        receive = trainer.engines.actors[0].weights_call.remote(
            "collective", "receive", trainer.weights.plan, ro.dtype, deadline, False)
        with pytest.raises(ray.exceptions.RayTaskError) as sender:
            ray.get(sends[0], timeout=60)
        with pytest.raises(ray.exceptions.RayTaskError) as receiver:
            ray.get(receive, timeout=60)
        assert ray.get(sends[1], timeout=60) is None  # rank 1 finished its gathers
        elapsed = time.perf_counter() - start
        assert elapsed < 10 * deadline, f"took {elapsed:.1f} s"
        assert isinstance(sender.value.cause, WeightSyncError) and "learner rank 0" in str(sender.value)
        assert isinstance(receiver.value.cause, WeightSyncError) and "engine worker rank 1" in str(receiver.value)
        trainer.weights.connect()
        assert trainer.sync_weights()["sync/verified_tensors"] > 0


@pytest.fixture(scope="class")
def tensor_parallel(tiny_model_dir, tmp_path_factory):
    trainer = start_trainer(tmp_path_factory.mktemp("run"), tiny_model_dir, [
        "rollout.sync_transport=collective", "rollout.tensor_parallel_size=2"])
    yield trainer
    trainer.shutdown()
    ray.shutdown()


class TestTensorParallelEngine:
    def test_tensor_parallel_engine_syncs_and_verifies_every_shard(self, tensor_parallel):
        trainer = tensor_parallel
        assert len(trainer.weights.layouts) == 2
        layout = trainer.weights.layouts[1]
        assert layout["model.layers.0.self_attn.o_proj.weight"][0][0] == 1  # row-parallel: columns
        assert len(layout["model.layers.0.self_attn.qkv_proj.weight"]) == 3  # q, k, v slices
        trainer.step(1)
        metrics = trainer.step(2)
        assert metrics["sync/verified_tensors"] > 0
        assert metrics["sync/rollout_logprob_gap_max"] < 1e-3  # both shards compute with the new weights


    def test_tensor_parallel_verification_names_a_corrupted_shard(self, tensor_parallel):
        trainer = tensor_parallel
        name = "model.layers.1.self_attn.o_proj.weight"

        def corrupt(actor, name):  # runs in the rollout actor; the function reaches the worker processes
            def flip(worker, name):
                from rlhf_dist.weights.vllm_worker import WorkerExtension

                if WorkerExtension.rlhf_tp_rank(worker) == 1:
                    dict(worker.model_runner.model.named_parameters())[name].data[0, 0] += 1.0
            actor.llm.collective_rpc(flip, args=(name,))

        ray.get(trainer.engines.actors[0].__ray_call__.remote(corrupt, name))
        learner = trainer.learners.run("get_weights", timeout_s=60)[0]
        fused = fuse_like_engine(learner, trainer.weights.packed_modules)
        held = trainer.engines.run("weight_checksums", timeout_s=60)[0]
        assert diff_checksums(expected_checksums(fused, trainer.weights.layouts[0]), held[0]) == []
        problems = diff_checksums(expected_checksums(fused, trainer.weights.layouts[1]), held[1])
        assert len(problems) == 1 and problems[0].startswith(name)
        trainer.sync_weights()  # a full sync repairs it
