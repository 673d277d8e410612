"""Per-sample random streams for the rollout engines.

Every sample a run draws (RL step, prompt position, child) gets a seed of its own, mixed from
(rollout.seed, stream, step, prompt, child) by numpy's SeedSequence (a hash, not a sum), so

- no two samples of a run, nor of two runs with different `rollout.seed`, share a random stream;
  (A CPU torch.Generator keys its Mersenne Twister on the low 32 bits of the seed, so on CPU two
  of the 768 samples of a default step share a stream with probability ~7e-5: a birthday bound,
  not a structure that repeats.)
- a sample's seed depends only on those five numbers (six with a multi-turn episode's turn): a resumed run, or a batch regenerated after
  an engine restart, draws what the uninterrupted run drew.

Why not `base + prompt` with `SamplingParams(n=G, seed=...)`: vLLM seeds child j of a request
with `seed + j` (vllm/v1/engine/parallel_sampling.py), so sample (i, j) got stream base + i + j
and the 64 samples of an 8 x 8 step shared 15 streams; with a near-uniform policy the same stream
picks the same tokens whatever the prompt. The engine therefore receives one seed per sample and
sends each as its own n=1 request (vLLM fans n > 1 out into such requests anyway).
"""

from __future__ import annotations

import hashlib

import numpy as np

# Independent families of streams within one run: RL training batches, evaluation sampling, and
# the keep_best selection prompts' sampling; "eval:<set>" is the family of one eval set (eval.sets).
STREAMS = {"train": 0, "eval": 1, "select": 2}
EVAL_SET_FAMILY = 3


def stream_key(stream: str) -> tuple[int, ...]:
    """The spawn-key prefix of a stream: (family,) or, for eval set `name`, (3, 64-bit hash of name)."""
    if stream in STREAMS:
        return (STREAMS[stream],)
    family, sep, name = stream.partition(":")
    if family != "eval" or not sep or not name:
        raise ValueError(f"unknown random stream {stream!r}: expected one of {list(STREAMS)} or 'eval:<set name>'")
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return (EVAL_SET_FAMILY, int.from_bytes(digest, "little"))


def sample_seed(run_seed: int, stream: str, step: int, prompt: int, child: int, turn: int = 0) -> int:
    """The seed of sample `child` of the `prompt`-th prompt of `step`: a 63-bit integer. In a
    multi-turn episode each policy turn after the first has its own (`turn` >= 1)."""
    key = stream_key(stream) + (step, prompt, child) + ((turn,) if turn else ())
    words = np.random.SeedSequence(run_seed, spawn_key=key).generate_state(2, np.uint32)
    return (int(words[0]) << 32 | int(words[1])) & (2**63 - 1)


def sample_seeds(run_seed: int, stream: str, step: int, num_prompts: int, n: int,
                 first_prompt: int = 0) -> list[list[int]]:
    """(num_prompts, n) seeds: row i holds the seeds of the n samples of the step's prompt
    `first_prompt + i`. A step that draws prompts in several rounds (algo.dynamic_sampling)
    numbers them across its rounds, so no round reuses another's streams."""
    if run_seed < 0 or step < 0:
        raise ValueError(f"seeds need a non-negative run seed and step, got rollout.seed={run_seed}, step={step}")
    return [[sample_seed(run_seed, stream, step, first_prompt + i, j) for j in range(n)] for i in range(num_prompts)]
