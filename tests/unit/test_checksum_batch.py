"""Weight checksums, the HF -> engine fusion map, and rollout batch collation."""

from collections import OrderedDict

import torch

from rlhf_dist.data.batch import collate_sequences
from rlhf_dist.weights.checksum import checksums, diff_checksums, fuse_like_engine, tensor_checksum
from rlhf_dist.weights.plan import layer_key

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_checksum_sees_one_flipped_bit_and_a_permutation():
    weights = torch.randn(64, 32)
    flipped = weights.clone()
    flipped.view(-1).view(torch.int32)[100] ^= 1  # lowest mantissa bit of one element
    assert tensor_checksum(weights) == tensor_checksum(weights.clone())
    assert tensor_checksum(weights) != tensor_checksum(flipped)
    assert tensor_checksum(weights) != tensor_checksum(weights.flip(0))


def test_checksum_is_dtype_independent_for_exact_upcasts():
    weights = torch.randn(16, 16).to(torch.bfloat16)
    assert tensor_checksum(weights) == tensor_checksum(weights.float())


def test_fusion_concatenates_parts_in_engine_order():
    q, k, v = torch.ones(4, 2), 2 * torch.ones(2, 2), 3 * torch.ones(2, 2)
    named = OrderedDict([
        ("model.layers.0.self_attn.v_proj.weight", v),  # out of order on purpose
        ("model.layers.0.self_attn.q_proj.weight", q),
        ("model.layers.0.self_attn.k_proj.weight", k),
        ("model.layers.0.mlp.down_proj.weight", torch.zeros(2, 2)),
    ])
    fused = fuse_like_engine(named, PACKED)
    assert list(fused) == ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(fused["model.layers.0.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))


def test_diff_names_every_kind_of_mismatch():
    sent = checksums({"a": torch.ones(2), "b": torch.ones(2), "c": torch.ones(2)})
    held = dict(sent, b=sent["b"] + 1, d=5)
    del held["c"]
    problems = diff_checksums(sent, held)
    assert len(problems) == 3
    assert any(p.startswith("b: checksum") for p in problems)
    assert any("c: sent by the learner, absent" in p for p in problems)
    assert any("d: held by the engine, never sent" in p for p in problems)
    assert diff_checksums(sent, dict(sent)) == []


def test_layer_key_groups_whole_decoder_layers():
    assert layer_key("model.layers.12.self_attn.q_proj.weight") == "model.layers.12"
    assert layer_key("model.embed_tokens.weight") == "model.embed_tokens.weight"


def test_collate_left_pads_prompts_and_right_pads_responses():
    batch = collate_sequences([[5, 6, 7], [8]], [[9, 1], [10, 11, 1]], [[-0.5, -0.1], [-1.0, -2.0, -3.0]], pad_id=0)
    assert batch.prompt_width == 3
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 1, 0], [0, 0, 8, 10, 11, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["rollout_logprobs"][1].tolist() == [-1.0, -2.0, -3.0]
    trimmed = batch.select([0]).trimmed()
    assert trimmed["input_ids"].tolist() == [[5, 6, 7, 9, 1]]


def test_response_logprobs_ignore_padding(tiny_model_dir):
    """A left-padded row gets the same logprobs as the same sequence alone."""
    from rlhf_dist.models.hf import load_causal_lm, response_logprobs

    model = load_causal_lm(str(tiny_model_dir)).eval()
    batch = collate_sequences([[5, 6, 7, 8], [9, 10]], [[11, 12, 1], [13, 1]], [[0.0] * 3, [0.0] * 2], 0)
    with torch.no_grad():
        padded, entropy = response_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                            batch.prompt_width, temperature=0.7, with_entropy=True)
        alone = batch.select([1]).trimmed()
        alone_ids = alone["input_ids"][:, 2:]  # drop the two left-pad columns
        single, _ = response_logprobs(model, alone_ids, torch.ones_like(alone_ids), 2, temperature=0.7)
    torch.testing.assert_close(padded[1, :2], single[0, :2], rtol=1e-5, atol=1e-5)
    assert (entropy >= 0).all()


def test_engine_checksums_compare_only_the_unpadded_block():
    from rlhf_dist.weights.checksum import expected_checksums, held_checksums, narrow_to

    learner = torch.randn(98, 16)
    engine = torch.cat([learner, torch.zeros(30, 16)])  # vLLM pads vocab rows to 128
    assert torch.equal(narrow_to(engine, learner.shape), learner)
    assert narrow_to(torch.zeros(50, 16), learner.shape) is None
    layout = {"embed": [(0, 0, 0, 98)], "norm": [(0, 0, 0, 3)]}
    held = held_checksums({"embed": engine, "norm": torch.ones(3)}, layout)
    want = expected_checksums({"embed": learner, "norm": torch.ones(3), "extra": torch.ones(2)}, layout)
    assert held["embed"] == want["embed"] == [tensor_checksum(learner)]
    assert diff_checksums(want, held) == ["extra: sent by the learner, absent in the engine"]


def test_tensor_parallel_shards_are_checked_against_the_matching_slices():
    """Shards cut the way vLLM cuts them (per fused part for qkv, by columns for row-parallel)."""
    from rlhf_dist.weights.checksum import expected_checksums, held_checksums

    q, k, v = torch.randn(8, 4), torch.randn(4, 4), torch.randn(4, 4)
    down = torch.randn(4, 6)
    learner = {"qkv": torch.cat([q, k, v]), "down": down}
    for rank in range(2):
        shard = {"qkv": torch.cat([q[4 * rank:4 * rank + 4], k[2 * rank:2 * rank + 2], v[2 * rank:2 * rank + 2]]),
                 "down": down[:, 3 * rank:3 * rank + 3]}
        # (dim, local start, global start, length), as rlhf_dist.weights.vllm_worker.shard_layout makes them
        layout = {"qkv": [(0, 0, 4 * rank, 4), (0, 4, 8 + 2 * rank, 2), (0, 6, 12 + 2 * rank, 2)],
                  "down": [(1, 0, 3 * rank, 3)]}
        assert diff_checksums(expected_checksums(learner, layout), held_checksums(shard, layout)) == []
        swapped = dict(shard, qkv=torch.cat([shard["qkv"][:4], shard["qkv"][6:], shard["qkv"][4:6]]))
        problems = diff_checksums(expected_checksums(learner, layout), held_checksums(swapped, layout))
        assert len(problems) == 1 and problems[0].startswith("qkv")


def test_checksum_in_chunks_equals_the_one_shot_sum(monkeypatch):
    from rlhf_dist.weights import checksum

    def one_shot(tensor, modulus=65521):
        bits = tensor.reshape(-1).view(torch.int32).to(torch.int64)
        return int((bits * (torch.arange(bits.numel()) % modulus + 1)).sum())

    big = torch.randn(checksum._CHUNK + 1000)  # two chunks with the real constants
    assert checksum.tensor_checksum(big) == one_shot(big)
    weights = torch.randn(300, 7)
    # a small modulus and chunk: 150 chunks, the last one partial, one shared weight vector
    monkeypatch.setattr(checksum, "_MODULUS", 7)
    monkeypatch.setattr(checksum, "_CHUNK", 14)
    monkeypatch.setattr(checksum, "_WEIGHTS", {})
    assert checksum.tensor_checksum(weights) == one_shot(weights, 7)
    one_shot = one_shot(weights, 7)
    assert checksum.tensor_checksum(weights.t()) != one_shot  # a non-contiguous view is hashed in its own order
