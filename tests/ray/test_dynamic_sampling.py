"""algo.dynamic_sampling on the real actors (Ray, vLLM, DeepSpeed), with overlapped generation
(trainer.async_rollout) and the overlong shaping and truncation masking on.

The reward function (written to tmp) decides which prompts carry signal: on a prompt whose CRC is
not a multiple of 4 it scores each completion by a hash of its text (an untrained model's samples
differ, so such a group has signal); on the others, and on every prompt once the test writes
"none" to its mode file, it scores 0. So which groups must be kept, how many rounds a step needs
and whether a step trains at all are known from the prompts alone, whatever the policy samples.
One trainer (about 90 s on 2 cores) checks: only groups with signal are trained on and the step is
refilled from fresh prompts, a step with none trains nothing, and a step re-run from a checkpoint
draws the same prompts in the same rounds."""

import zlib

import pytest

from rlhf_dist.rl.trainer import prompt_crc
from helpers import start_trainer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS, G = 4, 8

REWARD = '''
import pathlib, zlib

MODE = pathlib.Path(__file__).with_name("mode")


def score(prompts, completions, **fields):
    if MODE.read_text().strip() == "none":
        return [0.0] * len(completions)
    return [zlib.crc32(c.encode()) % 97 / 97 if zlib.crc32(p.encode()) % 4 else 0.0
            for p, c in zip(prompts, completions)]
'''


def _has_signal(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % 4 != 0


def _drawn_records(trainer, rounds: int) -> list[dict]:
    """The records the sampler hands out next, `rounds` batches of them (without moving it)."""
    state = trainer.sampler.state_dict()
    drawn = [r for _ in range(rounds) for r in trainer.sampler.next_batch()]
    trainer.sampler.load_state_dict(state)
    return drawn


def _drawn(trainer, rounds: int) -> list[str]:
    return [r["prompt"] for r in _drawn_records(trainer, rounds)]


def _drawn_after(drawn: list[str], rounds: int) -> list[str]:
    return drawn[rounds * PROMPTS: (rounds + 1) * PROMPTS]


def test_dynamic_sampling_keeps_signal_refills_and_resumes(tiny_model_dir, tmp_path):
    (tmp_path / "reward.py").write_text(REWARD)
    mode = tmp_path / "mode"
    mode.write_text("half")
    trainer = start_trainer(tmp_path / "run", tiny_model_dir, [
        f"reward.fn={tmp_path / 'reward.py'}:score", "warmup.steps=0", "trainer.total_steps=4",
        f"trainer.prompts_per_step={PROMPTS}", f"rollout.n_samples_per_prompt={G}",
        f"learner.mini_batch_size={PROMPTS * G}", "trainer.async_rollout=true",
        "algo.dynamic_sampling=true", "algo.max_resample_rounds=3",
        "rollout.max_new_tokens=8", "algo.overlong_buffer=2", "algo.mask_truncated=true"])
    try:
        # step 1: its prompts in rounds of PROMPTS, groups with signal kept in order until PROMPTS
        drawn_records = _drawn_records(trainer, 5)
        drawn = [r["prompt"] for r in drawn_records]
        signal = [p for p in drawn if _has_signal(p)]
        rounds = next(r for r in range(1, 5) if sum(map(_has_signal, drawn[: r * PROMPTS])) >= PROMPTS)
        assert rounds >= 2, "the test's prompts need no refill: pick others"
        first = trainer.step(1)
        assert first["dynamic/rounds"] == rounds and first["dynamic/kept_groups"] == PROMPTS
        assert first["dynamic/generated_samples"] == rounds * PROMPTS * G
        assert first["dynamic/samples_per_trained"] == rounds
        assert first["reward/frac_groups_all_equal"] == 0.0  # only groups with signal trained on
        assert first["data/prompt_crc"] == prompt_crc(drawn_records[: rounds * PROMPTS])
        # async: step 2's batch was launched once step 1's rounds were done, from the prompts after them
        assert [r["prompt"] for r in trainer.prefetched.records] == _drawn_after(drawn, rounds)
        assert len(signal) >= PROMPTS, "the test's prompts give too few groups with signal"
        # the overlong ramp and the mask: logged, and the update went through
        assert "shaping/overlong_penalty_mean" in first and first["faults/skipped_update"] == 0.0
        assert first["dynamic/short_steps"] == 0.0 and first["dynamic/empty_steps"] == 0.0

        checkpoint = trainer.save_checkpoint(1, str(tmp_path / "checkpoints"))
        second = trainer.step(2)
        trainer.load_checkpoint(checkpoint)  # back to after step 1: the same prompts, same rounds
        again = trainer.step(2)
        for key in ("data/prompt_crc", "dynamic/rounds", "dynamic/kept_groups", "dynamic/generated_samples"):
            assert again[key] == second[key], key

        # no group with signal in any round: nothing trained, no weights moved, and it says so
        mode.write_text("none")
        version = trainer.policy_version
        empty = trainer.step(3)
        assert empty["dynamic/kept_groups"] == 0 and empty["dynamic/rounds"] == 4
        assert empty["dynamic/empty_steps"] == 1.0 and empty["dynamic/short_steps"] == 1.0
        assert "reward/mean" not in empty and trainer.policy_version == version
        mode.write_text("half")
        last = trainer.step(4)  # and the run goes on
        assert last["dynamic/kept_groups"] > 0 and trainer.policy_version == version + 1
    finally:
        trainer.shutdown()
        import ray

        ray.shutdown()
