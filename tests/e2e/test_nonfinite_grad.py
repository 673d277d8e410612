"""A finite loss whose gradient is NaN must stop the rank before the weights change.

DeepSpeed ZeRO 1-3 skip such a step on their own, but ZeRO-0 applies it (measured: the weights
turn NaN), so the learner checks gradients itself at every accumulation boundary. Each stage runs
in its own process (a process can join one torch.distributed group only once).
"""

import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import REPO

pytestmark = pytest.mark.slow  # DeepSpeed ranks in subprocesses, ~75 s

SCRIPT = textwrap.dedent("""
    import sys, torch
    from rlhf_dist.actors.learner import LearnerActor
    from rlhf_dist.distributed.process_group import free_port
    from rlhf_dist.errors import NonFiniteLossError

    model_dir, stage = sys.argv[1], int(sys.argv[2])
    optim = dict(lr=1e-2, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, grad_clip=1.0,
                 scheduler="constant", warmup_steps=0, min_lr_ratio=1.0)
    learner = LearnerActor(rank=0, world_size=1, model_path=model_dir)
    learner.init("127.0.0.1", free_port(), "gloo", stage, 2, 2, optim, 10, False, False, 120)
    before = learner.get_weights()
    ids = torch.randint(3, 98, (4, 6))

    def micro_loss(micro, num_tokens, num_seqs):
        logits = learner.ds_engine(input_ids=ids[:2]).logits  # through the engine, as train_step does
        logits.register_hook(lambda grad: grad * float("nan"))  # finite loss, NaN gradient
        loss = logits.float().logsumexp(-1).mean()
        return loss, {"loss/total": loss.detach()}, {}

    from rlhf_dist.data.batch import Batch
    shard = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "response_mask": torch.ones(4, 2)}, prompt_width=4)
    try:
        learner.run_minibatches([(shard, 8.0, 4.0)], micro_loss, step=7)
    except NonFiniteLossError as err:
        after = learner.get_weights()
        unchanged = all(torch.equal(before[n], after[n]) for n in before)
        print("CAUGHT", unchanged, err)
    else:
        print("NOT CAUGHT")
""")


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_nan_gradient_with_finite_loss_is_caught_and_not_applied(tiny_model_dir, zero_stage):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(zero_stage)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("CAUGHT", "NOT CAUGHT"))]
    assert lines, result.stdout[-2000:] + result.stderr[-3000:]
    assert lines[0].startswith("CAUGHT True"), lines[0]
    assert "non-finite learner gradient at RL step 7" in lines[0]
    assert "learner.optim.lr" in lines[0]


SKIP_SCRIPT = textwrap.dedent("""
import sys, torch
from rlhf_dist.actors.learner import LearnerActor
from rlhf_dist.distributed.process_group import free_port
from rlhf_dist.errors import NonFiniteLossError
from rlhf_dist.data.batch import Batch

model_dir, stage, mode, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
optim = dict(lr=1e-2, weight_decay=0.01, betas=[0.9, 0.999], eps=1e-8, grad_clip=1.0,
             scheduler="linear", warmup_steps=2, min_lr_ratio=0.1)
learner = LearnerActor(rank=0, world_size=1, model_path=model_dir)
learner.init("127.0.0.1", free_port(), "gloo", stage, 2, 2, optim, 10, False, False, 120)
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(3, 98, (4, 6), generator=gen) for _ in range(3)]
calls = {"n": 0}

def loss_for(ids, poison_second):
    def micro_loss(micro, num_tokens, num_seqs):
        calls["n"] += 1
        logits = learner.ds_engine(input_ids=micro["input_ids"]).logits
        loss = logits.float().logsumexp(-1).mean() * 0.1
        if poison_second and calls["n"] == 2:
            loss = loss * float("nan")
        return loss, {"loss/total": loss.detach()}, {}
    return micro_loss

def shard(ids):
    return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.ones(4, 2)}, prompt_width=4)

learner.run_minibatches([(shard(batches[0]), 8.0, 4.0)], loss_for(batches[0], False), step=1)
if mode == "with_bad":
    calls["n"] = 0
    try:
        learner.run_minibatches([(shard(batches[1]), 8.0, 4.0)], loss_for(batches[1], True), step=2)
        print("NOT RAISED")
    except NonFiniteLossError:
        print("SKIPPED", calls["n"])
learner.run_minibatches([(shard(batches[2]), 8.0, 4.0)], loss_for(batches[2], False), step=3)
torch.save(learner.get_weights(), out)
""")


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_skipped_minibatch_leaves_no_trace(tiny_model_dir, zero_stage, tmp_path):
    """good, NaN-loss (in its 2nd micro-batch, after one was accumulated), good == good, good:
    the skipped mini-batch changes neither weights, optimizer moments nor the LR schedule.
    (ZeRO-2 keeps partial gradients in its own buffers: a first version leaked them.)"""
    outputs = {}
    for mode in ("with_bad", "clean"):
        out = tmp_path / f"{mode}.pt"
        result = subprocess.run([sys.executable, "-c", SKIP_SCRIPT, str(tiny_model_dir), str(zero_stage), mode,
                                 str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        if mode == "with_bad":
            assert "SKIPPED 2" in result.stdout, result.stdout[-2000:]
        outputs[mode] = torch.load(out)
    for name, tensor in outputs["clean"].items():
        assert torch.equal(outputs["with_bad"][name], tensor), name
