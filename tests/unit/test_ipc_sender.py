"""The CUDA-IPC transport's learner-side logic, separable from the GPU: the buffer is sized from the
plan, a replaced engine gets a new sender, and a failed send leaves the engine out of its update.
vLLM's sender is replaced by a recorder: its GPU half cannot run here (tests/gpu covers it)."""

from types import SimpleNamespace

import pytest
import torch

from rlhf_dist.weights.plan import WeightPublisher
from rlhf_dist.weights.transports import ipc

QWEN_05B_EMBED = [["model.embed_tokens.weight", [151936, 896]]]  # 272 MB in bf16


def test_the_buffer_holds_the_largest_tensor_of_the_plan():
    plan = [QWEN_05B_EMBED, [["model.layers.0.mlp.up_proj.weight", [4864, 896]]]]
    assert ipc.buffer_bytes(plan, "bfloat16", 64) == 151936 * 896 * 2  # > 64 MiB: vLLM would refuse it
    assert ipc.buffer_bytes(plan[1:], "bfloat16", 64) == 64 * 2**20  # every tensor fits the bucket size
    assert ipc.buffer_bytes(plan, "float32", 1024) == 1024 * 2**20


class RecordingSender:
    made = []

    def __init__(self, info, client, source, fail=False):
        self.info, self.client, self.source, self.fail = info, client, source, fail
        self.sent = 0
        RecordingSender.made.append(self)

    def send_weights(self):
        self.client.calls.append("start_weight_update")
        if self.fail:
            raise ValueError("tensor exceeds buffer_size_bytes")
        self.sent += 1
        self.client.calls.append("finish_weight_update")


@pytest.fixture
def fake_vllm(monkeypatch):
    from vllm.distributed.weight_transfer import clients, ipc_engine

    failing = {"next": False}

    class Client:
        def __init__(self, handles):
            self.handles, self.calls = handles, []

        def finish_weight_update(self):
            self.calls.append("finish_weight_update")

    def trainer_init(info, client, source):
        return RecordingSender(info, client, source, fail=failing["next"])

    monkeypatch.setattr(clients, "RayVLLMWeightSyncClient", Client)
    monkeypatch.setattr(ipc_engine.IPCTrainerWeightTransferEngine, "trainer_init", staticmethod(trainer_init))
    RecordingSender.made.clear()
    return failing


def _publisher():
    return WeightPublisher(torch.nn.Linear(2, 2), rank=0, zero_stage=0)


def test_a_sender_is_kept_between_syncs_and_rebuilt_for_a_replaced_engine(fake_vllm):
    publisher, plan = _publisher(), [[["weight", [2, 2]]], [["bias", [2]]]]
    ipc.send(publisher, ["engine-a"], plan, "float32", 64)
    ipc.send(publisher, ["engine-a"], plan, "float32", 64)
    assert len(RecordingSender.made) == 1 and RecordingSender.made[0].sent == 2
    assert RecordingSender.made[0].info.packed_buffer_size_bytes == 64 * 2**20
    ipc.send(publisher, ["engine-b"], plan, "float32", 64)  # engine recovery replaced the engine
    assert len(RecordingSender.made) == 2 and RecordingSender.made[1].client.handles == ["engine-b"]


def test_a_failed_send_ends_the_engines_update_and_drops_the_sender(fake_vllm):
    publisher, plan = _publisher(), [[["weight", [2, 2]]]]
    fake_vllm["next"] = True
    with pytest.raises(ValueError, match="exceeds buffer"):
        ipc.send(publisher, ["engine-a"], plan, "float32", 64)
    assert RecordingSender.made[0].client.calls == ["start_weight_update", "finish_weight_update"]
    assert ipc.NAME not in publisher.transport_state
    fake_vllm["next"] = False
    ipc.send(publisher, ["engine-a"], plan, "float32", 64)  # the next sync starts afresh
    assert len(RecordingSender.made) == 2 and RecordingSender.made[1].sent == 1
