"""Helpers whose output is a statistic: rank merging, micro-batch accumulation, the running reward
normalisation, mini-batch sharding. Each test states the quantity it must equal."""

import random
from collections import defaultdict

import pytest
import torch

from rlhf_dist.runtime.ds_group import merge_rank_metrics
from rlhf_dist.actors.ds_rank import _accumulate
from rlhf_dist.runtime.ds_group import STATS_WEIGHT
from rlhf_dist.actors.reward import RewardActor, RunningNorm
from rlhf_dist.data.batch import collate_sequences, shard_minibatches
from rlhf_dist.errors import ModelPathError


def test_rank_stats_are_weighted_by_tokens():
    """clip_frac is a mean over tokens: rank 0 clips 5 of 10 tokens, rank 1 none of 30, so the
    batch's clip_frac is 5 / 40, not the mean of 0.5 and 0.0."""
    ranks = [{"policy/clip_frac": 0.5, "loss/policy": 0.2, "policy/ratio_max": 1.3, STATS_WEIGHT: 10.0,
              "perf/forwards_per_rank": 2.0},
             {"policy/clip_frac": 0.0, "loss/policy": 0.1, "policy/ratio_max": 1.1, STATS_WEIGHT: 30.0,
              "perf/forwards_per_rank": 4.0}]
    merged = merge_rank_metrics(ranks, ("loss/",))
    assert merged["policy/clip_frac"] == pytest.approx(5 / 40)
    assert merged["loss/policy"] == pytest.approx(0.3)  # additive: each rank's share of one sum
    assert merged["policy/ratio_max"] == 1.3
    assert merged["perf/forwards_per_rank"] == 3.0  # a per-rank figure: plain mean
    # critic ranks prefix their keys; without a weight ranks count equally
    critic = [{"critic/value_clip_frac": 1.0, f"critic/{STATS_WEIGHT}": 1.0},
              {"critic/value_clip_frac": 0.0, f"critic/{STATS_WEIGHT}": 3.0}]
    assert merge_rank_metrics(critic, ())["critic/value_clip_frac"] == pytest.approx(0.25)
    assert merge_rank_metrics([{"sft/acc": 1.0}, {"sft/acc": 0.0}], ())["sft/acc"] == 0.5


def test_micro_batch_stats_accumulate_to_the_token_mean():
    """A rank's pass over micro-batches of 2 and 6 tokens with clip fractions 1.0 and 0.5: 2 + 3 of
    8 tokens clipped (the unweighted mean of the two would say 0.75)."""
    sums, counts, extremes = defaultdict(float), defaultdict(int), {}
    _accumulate(sums, counts, extremes, {"loss/policy": 0.1}, {"clip_frac": torch.tensor(1.0)}, 2)
    _accumulate(sums, counts, extremes, {"loss/policy": 0.2}, {"clip_frac": torch.tensor(0.5)}, 6)
    assert sums["clip_frac"] / counts["clip_frac"] == pytest.approx(5 / 8)
    assert sums["loss/policy"] == pytest.approx(0.3)


def test_running_norm_merged_in_batches_equals_the_statistics_of_all_scores():
    gen = random.Random(0)
    scores = [gen.gauss(3.0, 2.0) for _ in range(1000)]
    norm = RunningNorm()
    start = 0
    for size in (1, 7, 64, 128, 300, 500):  # uneven batches, one of a single score
        norm.update(scores[start:start + size])
        start += size
    assert start == len(scores) == norm.count
    every = torch.tensor(scores, dtype=torch.float64)
    assert norm.mean == pytest.approx(every.mean().item(), rel=1e-12)
    assert norm.m2 / (norm.count - 1) == pytest.approx(every.var(unbiased=True).item(), rel=1e-10)
    normalized = torch.tensor(norm.normalize(scores))
    assert normalized.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert normalized.std().item() == pytest.approx(1.0, rel=1e-6)
    restored = RunningNorm()
    restored.load_state_dict(norm.state_dict())
    assert restored.normalize([1.0, 5.0]) == norm.normalize([1.0, 5.0])


def test_eval_scoring_leaves_the_reward_normalisation_unchanged(tiny_model_dir, tmp_path):
    """A real (tiny, untrained) reward model served with reward.normalize=true."""
    from transformers import AutoTokenizer

    from rlhf_dist.models.scalar_reward import load_reward_model

    load_reward_model(str(tiny_model_dir)).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(tmp_path / "rm")
    actor = RewardActor(None, model_path=str(tmp_path / "rm"), normalize=True)
    records = [{"prompt": p} for p in ("rev abc=", "rev hello=", "rev xy=")]
    train = actor.score(records, ["cba", "olleh", "yx"])
    before = actor.norm.state_dict()
    assert before["count"] == 3
    evaluated = actor.score(records, ["zzz", "q", "yx"], update_stats=False)
    assert actor.norm.state_dict() == before
    assert evaluated.model[2] == pytest.approx(train.model[2], abs=1e-5)  # same text, same raw score
    assert evaluated.reward[2] == pytest.approx(train.reward[2], abs=1e-4)  # same statistics applied
    # what an eval logs: the raw score, the same before and after the statistics move
    raw_first = actor.score(records, ["zzz", "q", "yx"], update_stats=False, normalized=False)
    actor.score(records * 4, ["a", "bb", "ccc", "dddd"] * 3)  # training moves the normaliser
    assert actor.norm.state_dict() != before
    raw_later = actor.score(records, ["zzz", "q", "yx"], update_stats=False, normalized=False)
    assert raw_first.reward == pytest.approx(raw_first.model, abs=1e-6)
    assert raw_later.reward == pytest.approx(raw_first.reward, abs=1e-5)
    assert actor.score(records, ["zzz", "q", "yx"], update_stats=False).reward != pytest.approx(raw_first.reward)


@pytest.mark.parametrize("rows,mini,ranks,epochs", [(24, 8, 2, 1), (24, 12, 4, 2), (16, 16, 1, 3)])
def test_every_row_is_trained_once_per_epoch_in_equal_shards(rows, mini, ranks, epochs):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 6, (rows,), generator=gen).tolist()
    batch = collate_sequences([[5, 6]] * rows, [[7 + i] * n for i, n in enumerate(lengths)],
                             [[0.0] * n for n in lengths], pad_id=0)
    batch["row"] = torch.arange(rows, dtype=torch.float32)
    orders = [torch.randperm(rows, generator=gen) for _ in range(epochs)]
    per_rank = shard_minibatches(batch, ["row", "response_mask"], orders, mini, ranks)
    assert len(per_rank) == ranks and all(len(r) == epochs * rows // mini for r in per_rank)
    for epoch in range(epochs):
        seen = []
        for m in range(rows // mini):
            index = epoch * (rows // mini) + m
            shards = [per_rank[r][index] for r in range(ranks)]
            assert {len(shard) for shard, _, _ in shards} == {mini // ranks}
            tokens = sum(int(shard["response_mask"].sum()) for shard, _, _ in shards)
            assert all(num_tokens == tokens and num_seqs == mini for _, num_tokens, num_seqs in shards)
            seen += [int(v) for shard, _, _ in shards for v in shard["row"]]
        assert sorted(seen) == list(range(rows)), f"epoch {epoch}: rows missing or repeated"


def _reward_models(tiny_model_dir, root, seeds):
    """Untrained scalar reward models with different head initialisations, as member dirs."""
    from transformers import AutoTokenizer

    from rlhf_dist.models.scalar_reward import load_reward_model

    names = []
    for seed in seeds:
        torch.manual_seed(seed)
        load_reward_model(str(tiny_model_dir)).save_pretrained(root / f"m{seed}")
        AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(root / f"m{seed}")
        names.append(f"m{seed}")
    return names


def test_an_ensemble_serves_the_uncertainty_penalised_mean(tiny_model_dir, tmp_path):
    """reward = mean - coef * std over the members, each member scored on its own; the raw mean is
    what eval reports, the spread is logged."""
    from rlhf_dist.models.scalar_reward import write_ensemble

    names = _reward_models(tiny_model_dir, tmp_path, (1, 2, 3))
    write_ensemble(str(tmp_path), names)
    records = [{"prompt": p} for p in ("rev abcd=", "rev hello=", "rev xy=")]
    texts = ["dcba", "olleh", "zz"]
    each = torch.tensor([RewardActor(None, model_path=str(tmp_path / n)).score(records, texts).model
                         for n in names])  # (3 members, 3 texts)
    served = RewardActor(None, model_path=str(tmp_path), ensemble=3, uncertainty_coef=0.5).score(records, texts)
    mean, std = each.mean(0), each.std(0, unbiased=False)
    assert std.min() > 1e-4  # the members do disagree, so the penalty is not a no-op
    torch.testing.assert_close(torch.tensor(served.model), mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(served.reward), mean - 0.5 * std, atol=1e-5, rtol=0)
    assert served.metrics["reward/model_std_mean"] == pytest.approx(std.mean().item(), abs=1e-5)
    with pytest.raises(ModelPathError, match="holds 3 reward model.*reward.model.ensemble=1"):
        RewardActor(None, model_path=str(tmp_path), ensemble=1)


def test_ensemble_members_are_put_on_one_scale_before_their_spread_is_read(tiny_model_dir, tmp_path):
    """A Bradley-Terry score is defined up to a constant: each member is served as (score - offset)
    / scale from ensemble.json, so members that differ only by an offset show no disagreement."""
    from rlhf_dist.models.scalar_reward import write_ensemble

    names = _reward_models(tiny_model_dir, tmp_path, (1, 2))
    records = [{"prompt": p} for p in ("rev abcd=", "rev hello=", "rev xy=")]
    texts = ["dcba", "olleh", "zz"]
    raw = torch.tensor([RewardActor(None, model_path=str(tmp_path / n)).score(records, texts).model for n in names])
    scales = [(raw[0].mean().item(), 2.0), (raw[1].mean().item(), 0.5)]
    write_ensemble(str(tmp_path), names, scales)
    served = RewardActor(None, model_path=str(tmp_path), ensemble=2).score(records, texts)
    standard = torch.stack([(raw[k] - scales[k][0]) / scales[k][1] for k in range(2)])
    torch.testing.assert_close(torch.tensor(served.model), standard.mean(0), atol=1e-5, rtol=0)
    assert served.metrics["reward/model_std_mean"] == pytest.approx(
        standard.std(0, unbiased=False).mean().item(), abs=1e-5)


def test_member_scales_and_ensemble_accuracy_from_one_scoring():
    """The members' raw scores of the held-out pairs (scored once) give both their scales and the
    ensemble's accuracy: members that differ by an offset and a scale rank exactly as one does."""
    from rlhf_dist.stages.reward_model import ensemble_accuracy, member_scales

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 50, generator=gen)  # row 0: chosen texts' scores, row 1: rejected's
    base[0] += 0.5
    flat = torch.cat([base[0], base[1]])  # (2N,) chosen then rejected
    raw = torch.stack([flat, 3.0 * flat + 7.0, 0.5 * flat - 2.0])
    scales = member_scales(raw, most=50)
    assert scales[1][0] == pytest.approx(3.0 * flat.mean().item() + 7.0, abs=1e-5)
    assert scales[1][1] == pytest.approx(3.0 * flat.std().item(), rel=1e-5)
    single = (base[0] > base[1]).float().mean().item()
    assert ensemble_accuracy(raw, scales) == pytest.approx(single)
    assert 0.6 < single < 1.0
    # one member with the opposite ranking among three: the mean keeps the majority's order;
    # one of two: every pair ties, chance
    flipped = torch.stack([flat, -flat, flat])
    assert ensemble_accuracy(flipped, member_scales(flipped, 50)) == pytest.approx(single)
    assert ensemble_accuracy(flipped[:2], member_scales(flipped[:2], 50)) == pytest.approx(0.5)
