"""Sampling statistics of the real rollout path: a vLLM engine in a Ray actor, driven by the
trainer's Generation (the seeds a training step uses), on tiny models.

Determinism (a resumed run repeats its samples) says nothing about what the seeds produce. These
tests measure it: samples of different prompts, of one group and of two runs must be independent,
and the empirical distribution of the tokens the engine draws must be the one the learner computes
for the same weights at the same temperature. The first three failed on the seeding before
rlhf_dist.seeding (prompt i got seed base + i and vLLM seeds child j with seed + j, so samples of
neighbouring prompts shared a random stream).

A random-init tiny model is close to uniform over its 98 tokens: two independent samples agree at
a position with probability ~1/98, while two samples that share a stream agree almost everywhere.
"""

import math
from itertools import combinations

import pytest
import torch

from rlhf_dist.runtime.group import ActorGroup
from rlhf_dist.actors.rollout import RolloutActor
from rlhf_dist.data.tasks import get_task
from rlhf_dist.models.hf import load_causal_lm, load_tokenizer, response_logprobs
from rlhf_dist.rl.generation import Generation

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKENS = 16  # every response exactly this long (ignore_eos)


def _engine(model_dir, ignore_eos: bool) -> ActorGroup:
    engines = ActorGroup("rollout", RolloutActor, 1, 0.5, 0.0, 60,
                         [dict(model_path=str(model_dir), ignore_eos=ignore_eos, max_model_len=128)])
    engines.wait(engines.call("ready"), "engine start", 600)
    return engines


def _pipeline(engines, model_dir, seed: int, max_new_tokens: int = TOKENS) -> Generation:
    """The trainer's phase 1 without a prompt sampler: `generate(records, n, T, step)` only."""
    return Generation(engines, load_tokenizer(str(model_dir)), sampler=None, n_samples=1,
                           temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed,
                           timeout_s=300, recover=lambda phase, call: call(), engine_version=lambda: 0)


def _records(num: int) -> list[dict]:
    records = get_task("reverse").make_records("train", 4 * num, 0)
    unique = list({r["prompt"]: r for r in records}.values())[:num]
    assert len(unique) == num
    return unique


def _agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two equally long responses hold the same token."""
    assert len(a) == len(b) == TOKENS
    return sum(x == y for x, y in zip(a, b)) / TOKENS


@pytest.fixture(scope="module")
def uniform_engine(local_ray, tiny_model_dir):
    engines = _engine(tiny_model_dir, ignore_eos=True)
    yield engines
    engines.kill()


@pytest.fixture(scope="module")
def one_step(uniform_engine, tiny_model_dir):
    """One training step's samples: 16 prompts x 8 samples x 16 tokens, grouped by prompt."""
    prompts, n = 16, 8
    samples, _ = _pipeline(uniform_engine, tiny_model_dir, seed=0).generate(_records(prompts), n, 1.0, step=1)
    return [[s.token_ids for s in samples[i * n:(i + 1) * n]] for i in range(prompts)]


def test_samples_of_different_prompts_agree_at_chance_level(one_step):
    cross = [_agreement(a, b) for g, h in combinations(range(len(one_step)), 2)
             for a in one_step[g] for b in one_step[h]]
    mean = sum(cross) / len(cross)
    # near-uniform over 98 tokens: ~0.01 per position; shared streams agreed on ~0.9 of positions
    assert mean < 0.03, f"samples of different prompts agree on {mean:.1%} of positions"
    high = sum(a > 0.5 for a in cross)
    assert high == 0, f"{high} of {len(cross)} cross-prompt pairs agree on more than half their tokens"


def test_samples_of_one_group_differ(one_step):
    within = [_agreement(a, b) for group in one_step for a, b in combinations(group, 2)]
    assert max(within) <= 0.5, f"two samples of one prompt agree on {max(within):.0%} of positions"
    assert sum(within) / len(within) < 0.03
    assert all(len({tuple(s) for s in group}) == len(group) for group in one_step)


def test_two_runs_with_different_seeds_share_no_streams(uniform_engine, tiny_model_dir):
    """rollout.seed=1 at step 1 against rollout.seed=0 at step 11: with seeds
    seed * 1_000_003 + step * 100_003 + prompt these overlapped at a prompt offset of 27."""
    records = _records(32)
    run_a, _ = _pipeline(uniform_engine, tiny_model_dir, seed=0).generate(records, 2, 1.0, step=11)
    run_b, _ = _pipeline(uniform_engine, tiny_model_dir, seed=1).generate(records, 2, 1.0, step=1)
    cross = [_agreement(a.token_ids, b.token_ids) for a in run_a for b in run_b]
    assert max(cross) <= 0.5, f"a sample of run A and one of run B agree on {max(cross):.0%} of positions"
    assert sum(cross) / len(cross) < 0.03


# ---------------------------------------------------------------------------- the distribution


@pytest.fixture(scope="module")
def peaked_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its final norm scaled up: logits spread enough that temperature 0.7 and
    1.0 give clearly different next-token distributions (a near-uniform model cannot tell them)."""
    model = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)  # logits x 3: entropy ~1.8 nats at T=0.7, ~3.5 at T=1
    out = tmp_path_factory.mktemp("models") / "tiny-peaked"
    model.save_pretrained(out)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(out)
    return out


def _learner_next_token_logprobs(model_dir, prompt_ids: list[int], temperature: float,
                                 banned_token_id: int | None = None) -> torch.Tensor:
    """(V,) log p(token | prompt) as the learner computes it (response_logprobs at `temperature`),
    every vocabulary entry scored as a one-token response."""
    model = load_causal_lm(str(model_dir)).eval()
    vocab = model.config.vocab_size
    input_ids = torch.tensor([prompt_ids + [token] for token in range(vocab)])  # (V, P + 1)
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, input_ids, torch.ones_like(input_ids), len(prompt_ids),
                                        temperature=temperature, banned_token_id=banned_token_id)
    return logprobs[:, 0]  # (V,)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, cells with expected count < 5 pooled."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return stat, int(keep.sum()) - 1


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("fixed_lengths", [False, True])
def test_engine_samples_the_learners_distribution_at_temperature(local_ray, peaked_model_dir, fixed_lengths):
    """4000 first tokens drawn by the engine at T=0.7 (each its own stream) against the learner's
    softmax(logits / 0.7) for the same weights: the chi-square test accepts it, and the same counts
    reject softmax(logits) (T=1), so the test can tell a temperature error. Every logprob the engine
    reports is the learner's for that token. With fixed lengths (rollout.ignore_eos) the engine masks
    EOS (min_tokens) and the learner must too (banned_token_id), or every ratio is off by 1 - p(EOS)."""
    temperature, n, copies = 0.7, 8, 500
    engines = _engine(peaked_model_dir, ignore_eos=fixed_lengths)
    try:
        tokenizer = load_tokenizer(str(peaked_model_dir))
        record = _records(1)[0]
        samples, _ = _pipeline(engines, peaked_model_dir, seed=3, max_new_tokens=1).generate(
            [record] * copies, n, temperature, step=1)
    finally:
        engines.kill()
    prompt_ids = tokenizer(record["prompt"])["input_ids"]
    banned = tokenizer.eos_token_id if fixed_lengths else None
    learner = _learner_next_token_logprobs(peaked_model_dir, prompt_ids, temperature, banned)  # (V,)
    untempered = _learner_next_token_logprobs(peaked_model_dir, prompt_ids, 1.0, banned)
    first = torch.tensor([s.token_ids[0] for s in samples])
    counts = torch.bincount(first, minlength=len(learner)).double()
    assert counts.sum() == copies * n
    entropy = -(learner.exp() * learner).sum().item()
    assert 0.5 < entropy < 4.0, f"the model should be peaked but not one-hot (entropy {entropy:.2f})"

    stat, df = _chi_square(counts, learner.double().exp())
    assert stat < _chi_square_critical(df), f"engine vs learner at T={temperature}: chi2 {stat:.1f}, df {df}"
    wrong, wrong_df = _chi_square(counts, untempered.double().exp())
    assert wrong > 3 * _chi_square_critical(wrong_df), "the test cannot tell T=0.7 from T=1"

    reported = torch.tensor([s.logprobs[0] for s in samples])
    gap = (reported - learner[first]).abs().max().item()
    assert gap < 1e-4, f"engine-reported logprobs differ from the learner's by {gap}"
    if fixed_lengths:
        assert counts[tokenizer.eos_token_id] == 0
        unmasked = _learner_next_token_logprobs(peaked_model_dir, prompt_ids, temperature)
        assert (reported - unmasked[first]).abs().max().item() > 10 * gap, "EOS carried no mass to tell"


def test_groups_stay_contiguous_and_seeded_by_prompt_across_uneven_engine_splits(local_ray, tiny_model_dir):
    """Two engines, 5 prompts (split 3 + 2) and 6 prompts (3 + 3, so prompt 3 moves to the other
    engine): every sample sits in its prompt's group of G, carries its prompt's ids, and is the same
    sample whichever engine drew it (its stream depends on (step, prompt, child), not the engine)."""
    engines = ActorGroup("rollout", RolloutActor, 2, 0.5, 0.0, 60,
                         [dict(model_path=str(tiny_model_dir), ignore_eos=True, max_model_len=128, seed=i)
                          for i in range(2)])
    try:
        engines.wait(engines.call("ready"), "engine start", 600)
        generation, records, n = _pipeline(engines, tiny_model_dir, seed=0), _records(6), 3
        five, five_records = generation.generate(records[:5], n, 1.0, step=4)
        six, six_records = generation.generate(records, n, 1.0, step=4)
    finally:
        engines.kill()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    for samples, sample_records, count in ((five, five_records, 5), (six, six_records, 6)):
        assert len(samples) == count * n
        for row, (sample, record) in enumerate(zip(samples, sample_records)):
            assert record is records[row // n], f"sample {row} is not in its prompt's group"
            assert sample.prompt_ids == tokenizer(record["prompt"])["input_ids"]
    assert [s.token_ids for s in five] == [s.token_ids for s in six[:15]]
    assert len({tuple(s.token_ids) for s in six}) == len(six)
