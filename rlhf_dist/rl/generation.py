"""Phase 1 seen from the driver: a step's prompts drawn, sampling launched on the rollout engines,
its results collected, and (trainer.async_rollout) the next step's batch held until that step.

Launching and collecting are separate calls so that the engines can generate batch k+1 while the
trainer scores and trains on batch k. The trainer's step only sees two calls:

    batch = generation.for_step(step)                # phase 1: the step's batch (prefetched, or
                                                     # drawn, launched, collected now)
    more = generation.another_round(step, first)     # algo.dynamic_sampling: further rounds, if any
    generation.launch_ahead(step, launch_next)       # async: the next step's batch is launched here
    ...                                              # phases 2-4
    hidden_s = generation.end_step()                 # before phase 5: the next batch collected
                                                     # (the engines must be idle for the sync)
"""

from __future__ import annotations

import concurrent.futures as futures
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rlhf_dist.runtime.group import ActorGroup, wait_all
from rlhf_dist.data.batch import split_evenly
from rlhf_dist.data.messages import Sample
from rlhf_dist.errors import RlhfDistError
from rlhf_dist.data.prompts import PromptSampler
from rlhf_dist.rl.episodes import EpisodeRunner
from rlhf_dist.seeding import sample_seed, sample_seeds


@dataclass
class GenerationBatch:
    """One step's batch on its way: prompts drawn, generation launched, then collected."""

    step: int
    records: list[dict]
    sampler_state: dict  # the sampler before these prompts were drawn (what a checkpoint saves)
    version: int  # the engines' weight version (RLTrainer.policy_version) when it was launched
    launched: dict | None  # launch_generate's refs; None once collected
    samples: list[Sample] = field(default_factory=list)
    sample_records: list[dict] = field(default_factory=list)  # the record each sample answers
    engine_s: float = 0.0  # seconds the slowest engine spent generating it
    first_prompt: int = 0  # the index of its first prompt among those its step drew (seeds)


class Generation:
    """Generation on `engines`, launched and collected separately; holds at most one prefetched
    batch (`prefetched`).

    RL steps draw `sampler.batch_size` prompts and sample `n_samples` responses each at
    `temperature`. `recover(phase, call)` runs `call` and, if an engine has died, replaces it, gives
    it the learner's current weights and runs `call` again (RLTrainer.with_engine_recovery);
    `engine_version()` is the weight version the engines hold at the moment it is called.
    `timeout_s` bounds the wait for one generation (rollout.init_timeout_s).
    """

    def __init__(self, engines: ActorGroup, tokenizer, sampler: PromptSampler, n_samples: int,
                 temperature: float, top_p: float, max_new_tokens: int, seed: int, timeout_s: float,
                 recover: Callable[[str, Callable[[], Any]], Any], engine_version: Callable[[], int],
                 episodes: EpisodeRunner | None = None, wake: Callable[[], None] = lambda: None) -> None:
        self.engines, self.tokenizer, self.sampler = engines, tokenizer, sampler
        self.episodes = episodes  # rollout.env: multi-turn episodes instead of single completions
        self.wake = wake  # engines asleep (rollout.sleep_level > 0) are woken before every launch
        self.n_samples, self.temperature, self.top_p = n_samples, temperature, top_p
        self.max_new_tokens, self.seed, self.timeout_s = max_new_tokens, seed, timeout_s
        self.recover, self.engine_version = recover, engine_version
        self.prefetched: GenerationBatch | None = None  # async_rollout: the next step's batch, generated
        self.ahead: GenerationBatch | None = None  # async_rollout: the next step's batch, in flight

    # ------------------------------------------------------------------ one generation
    def generate(self, records: list[dict], n: int, temperature: float, step: int | None = None,
                 stream: str = "train") -> tuple[list[Sample], list[dict]]:
        """Split prompts across engines; returns (samples, the record each sample answers)."""
        launched = self.launch_generate(records, n, temperature, step, stream)
        samples, sample_records, _ = self.collect_generate(launched)
        return samples, sample_records

    def launch_generate(self, records: list[dict], n: int, temperature: float, step: int | None = None,
                        stream: str = "train", first_prompt: int = 0) -> dict[str, Any]:
        """Start sampling on the engines (prompts split across them); `collect_generate` waits.

        With a `step`, sample j of the i-th prompt draws from its own random stream, seeded from
        (rollout.seed, stream, step, first_prompt + i, j) (rlhf_dist.seeding): no two samples of a
        run share one, and a step's samples do not depend on the engine's history (a resumed run
        repeats them). `first_prompt`: how many prompts the step drew before these (dynamic sampling).
        """
        self.wake()  # asleep if the last step ended early (a skipped step, a failed sync)
        prompt_ids = [self.tokenizer(r["prompt"])["input_ids"] for r in records]
        if self.episodes is not None:
            return self._launch_episodes(records, prompt_ids, n, temperature, step, stream, first_prompt)
        parts = split_evenly(list(range(len(records))), len(self.engines))
        seeds = sample_seeds(self.seed, stream, step, len(records), n, first_prompt) if step is not None else None
        refs = self.engines.call_each("generate", [
            ([prompt_ids[i] for i in part], n, temperature, self.top_p, self.max_new_tokens,
             [seeds[i] for i in part] if seeds else None) for part in parts])
        refs += self.engines.call_each("last_generate_s", [() for _ in parts])  # queued behind generate
        return {"records": records, "n": n, "prompt_ids": prompt_ids, "parts": parts, "refs": refs}

    def collect_generate(self, launched: dict[str, Any]) -> tuple[list[Sample], list[dict], float]:
        """Wait for `launch_generate`: (samples, the record each sample answers, seconds the
        slowest engine spent generating)."""
        if "episodes" in launched:  # rollout.env: the episode loop's thread
            limits = self.episodes.limits
            wait_s = (self.timeout_s + limits.tool_timeout_s) * limits.max_turns
            try:
                samples, took_s = launched["episodes"].result(timeout=wait_s)
            except futures.TimeoutError:
                raise RlhfDistError(f"multi-turn episodes not done within {wait_s:.0f} s "
                                    "((rollout.init_timeout_s + rollout.tool_timeout_s) x rollout.max_turns)") from None
            return samples, [launched["records"][i] for i in launched["order"]], took_s
        parts, n, prompt_ids = launched["parts"], launched["n"], launched["prompt_ids"]
        names = self.engines.names[: len(parts)]
        results = wait_all(launched["refs"], names * 2, "generate", self.timeout_s)
        samples = [s for engine_samples in results[: len(parts)] for s in engine_samples]
        order = [i for part in parts for i in part for _ in range(n)]  # prompt-major, G contiguous
        for sample, i in zip(samples, order):
            sample.prompt_ids = prompt_ids[i]
        return samples, [launched["records"][i] for i in order], max(results[len(parts):])

    def _launch_episodes(self, records: list[dict], prompt_ids: list[list[int]], n: int, temperature: float,
                         step: int | None, stream: str, first_prompt: int = 0) -> dict[str, Any]:
        """Start `n` multi-turn episodes per prompt (rlhf_dist.rl.episodes); every turn of every
        episode has its own seed, from (rollout.seed, stream, step, first_prompt + prompt, child, turn)."""
        order = [i for i in range(len(records)) for _ in range(n)]  # prompt-major, G contiguous
        seeds = ([sample_seed(self.seed, stream, step, first_prompt + i, k % n) for k, i in enumerate(order)]
                 if step is not None else [None] * len(order))  # no step: the engine's own generator, as single-turn

        def seed_of(k: int, turn: int) -> int:
            return sample_seed(self.seed, stream, step, first_prompt + order[k], k % n, turn)

        def generate_turn(contexts: list[list[int]], turn_seeds: list[int], limits: list[int]) -> list[Sample]:
            parts = split_evenly(list(range(len(contexts))), len(self.engines))
            refs = self.engines.call_each("generate", [
                ([contexts[i] for i in part], 1, temperature, self.top_p, [limits[i] for i in part],
                 [[turn_seeds[i]] for i in part] if turn_seeds[0] is not None else None) for part in parts])
            results = wait_all(refs, self.engines.names[: len(parts)], "generate", self.timeout_s)
            return [sample for engine_samples in results for sample in engine_samples]

        future = self.episodes.submit([records[i] for i in order], [prompt_ids[i] for i in order], seeds,
                                      seed_of, generate_turn)
        return {"records": records, "order": order, "episodes": future}

    # ------------------------------------------------------------------ one RL step's batch
    def launch_ahead(self, step: int, launch_next: bool) -> None:
        """After `step`'s own generation: with `launch_next` (async rollout, not the last step) the
        engines start on the next step's batch at once, with the weights they hold. (After every
        round of the step, so the sampler hands out prompts in step order: a checkpoint's sampler
        state, taken before the next batch was drawn, is one a resumed run continues from.)"""
        self.ahead = self.launch(step + 1) if launch_next else None

    def end_step(self) -> float:
        """Before the weight sync: wait for the batch launched ahead (if any) and keep it for its
        step. Returns the seconds of its generation that the step's scoring and training hid."""
        if self.ahead is None:
            return 0.0
        start = time.perf_counter()
        self.prefetched, self.ahead = self.collect(self.ahead), None
        return max(0.0, self.prefetched.engine_s - (time.perf_counter() - start))

    def for_step(self, step: int) -> GenerationBatch:
        """The step's batch: the one prefetched for it, or drawn, launched and collected now."""
        return self.take_prefetched(step) or self.collect(self.launch(step))

    def another_round(self, step: int, first_prompt: int) -> GenerationBatch:
        """A further round of `step` (algo.dynamic_sampling): fresh prompts, generated now with the
        engines' current weights; `first_prompt`: prompts the step drew before these."""
        return self.collect(self.launch(step, first_prompt))

    def launch(self, step: int, first_prompt: int = 0) -> GenerationBatch:
        """Draw the step's prompts and start generating them with the engines' current weights;
        `first_prompt`: prompts the step drew before these (a further dynamic-sampling round)."""
        sampler_state = self.sampler.state_dict()
        records = self.sampler.next_batch()
        launched = self.launch_generate(records, self.n_samples, self.temperature, step, first_prompt=first_prompt)
        return GenerationBatch(step, records, sampler_state, self.engine_version(), launched,
                               first_prompt=first_prompt)

    def collect(self, rollout: GenerationBatch) -> GenerationBatch:
        """Wait for its generation. A dead engine is replaced and given the learner's current weights
        (`recover`), and the generation relaunched with them: same prompts, same seeds."""

        def collect():
            if rollout.launched is None:  # after an engine restart
                rollout.launched = self.launch_generate(rollout.records, self.n_samples, self.temperature,
                                                        rollout.step, first_prompt=rollout.first_prompt)
                rollout.version = self.engine_version()
            launched, rollout.launched = rollout.launched, None
            return self.collect_generate(launched)

        rollout.samples, rollout.sample_records, rollout.engine_s = self.recover("generate", collect)
        return rollout

    def take_prefetched(self, step: int) -> GenerationBatch | None:
        rollout, self.prefetched = self.prefetched, None
        if rollout is not None and rollout.step != step:  # steps run out of order (tests): draw anew
            self.sampler.load_state_dict(rollout.sampler_state)
            return None
        return rollout

    def sampler_state(self) -> dict:
        """The sampler as a checkpoint saves it: with a batch prefetched (async), as it was before
        drawing that batch, so a resumed run draws the same prompts (but generates them with the
        checkpoint's, newer, weights)."""
        return self.prefetched.sampler_state if self.prefetched else self.sampler.state_dict()
