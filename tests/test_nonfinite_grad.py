"""A finite loss whose gradient is NaN must stop the rank before the weights change.

DeepSpeed ZeRO 1-3 skip such a step on their own, but ZeRO-0 applies it (measured: the weights
turn NaN), so the learner checks gradients itself at every accumulation boundary. Each stage runs
in its own process (a process can join one torch.distributed group only once).
"""

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

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
