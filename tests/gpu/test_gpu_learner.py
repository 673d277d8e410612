"""The learner's CUDA path: DeepSpeed over NCCL, bf16, ZeRO 0/2/3, on one GPU. Skipped without CUDA.

Runs without a Ray cluster (the rank is the actor class used directly); the ray package must be
importable (rlhf_dist.runtime imports it), vLLM need not be.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from rlhf_dist.actors.learner import LearnerActor  # noqa: E402
from rlhf_dist.data.batch import collate_sequences  # noqa: E402
from rlhf_dist.weights.checksum import tensor_checksum  # noqa: E402
from rlhf_dist.distributed.process_group import free_port  # noqa: E402
from rlhf_dist.models.hf import load_causal_lm, response_logprobs  # noqa: E402
from rlhf_dist.algo.objective import PolicyLossConfig  # noqa: E402

OPTIM = dict(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, grad_clip=1.0,
             scheduler="cosine", warmup_steps=2, min_lr_ratio=0.1)
LOSS = PolicyLossConfig(temperature=1.0, policy_loss="clipped", clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0,
                        kl_loss_coef=0.01, kl_loss_estimator="k3_st", entropy_coef=0.0, loss_agg="token_mean",
                        horizon=None, tis_cap=None)
PORT = free_port()


def _batch(model_dir, rows=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 98, (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(rows)]
    responses = [torch.randint(3, 98, (int(torch.randint(1, 10, (1,), generator=gen)),), generator=gen).tolist() + [1]
                 for _ in range(rows)]
    batch = collate_sequences(prompts, responses, [[0.0] * len(r) for r in responses], pad_id=0)
    model = load_causal_lm(str(model_dir)).eval()
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch.prompt_width)
    batch["rollout_logprobs"] = logprobs * batch["response_mask"]
    batch["ref_logprobs"] = batch["rollout_logprobs"].clone()
    batch["advantages"] = torch.randn(rows, 1, generator=gen).expand_as(logprobs) * batch["response_mask"]
    return batch


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
@pytest.mark.parametrize("bf16", [False, True])
def test_train_step_on_cuda(tiny_model_dir, zero_stage, bf16):
    learner = LearnerActor(rank=0, world_size=1, model_path=str(tiny_model_dir), device="cuda")
    info = learner.init("127.0.0.1", PORT, "nccl", zero_stage, micro_batch_size=8, grad_accum_steps=2,
                        optim=OPTIM, total_optimizer_steps=10, bf16=bf16,
                        gradient_checkpointing=False, timeout_s=120)
    assert info["num_params"] > 0
    before = learner.get_weights()
    batch = _batch(tiny_model_dir)
    tokens = float(batch["response_mask"].sum())
    metrics = learner.train_step([(batch, tokens, float(len(batch)))], LOSS, step=1)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert abs(metrics["policy/ratio_mean"] - 1.0) < (0.05 if bf16 else 1e-3)  # same weights as rollout
    after = learner.get_weights()
    # In bf16 the module holds bf16 copies of fp32 master weights: a 1e-3 step on a norm weight
    # of 1.0 is below bf16 resolution (2**-7) and legitimately rounds away. Matrices must move.
    names = [n for n in before if not bf16 or before[n].dim() == 2]
    moved = sum(not torch.equal(before[n], after[n]) for n in names)
    assert moved == len(names), f"only {moved}/{len(names)} tensors changed"


def test_checksum_is_identical_on_cpu_and_cuda():
    weights = torch.randn(1000, 333)
    assert tensor_checksum(weights) == tensor_checksum(weights.cuda())
    assert tensor_checksum(weights.bfloat16()) == tensor_checksum(weights.bfloat16().cuda())


def test_bf16_logprobs_track_fp32(tiny_model_dir):
    batch = _batch(tiny_model_dir, rows=8)
    fp32 = load_causal_lm(str(tiny_model_dir), "float32", "cuda").eval()
    bf16 = load_causal_lm(str(tiny_model_dir), "bfloat16", "cuda").eval()
    ids, mask = batch["input_ids"].cuda(), batch["attention_mask"].cuda()
    with torch.no_grad():
        lp32, _ = response_logprobs(fp32, ids, mask, batch.prompt_width)
        lp16, _ = response_logprobs(bf16, ids, mask, batch.prompt_width)
    valid = batch["response_mask"].cuda().bool()
    assert (lp32 - lp16)[valid].abs().max() < 0.1


LR, EPS = 1e-2, 1.0  # Adam's first step with eps >> |g| is ~ lr * g / eps: the update shows the gradient


def _torch_step(model_dir, batch):
    """Plain torch on one device: the same loss on the whole batch, one AdamW step."""
    from rlhf_dist.algo.objective import policy_objective

    model = load_causal_lm(str(model_dir), "float32", "cuda")
    tensors = {k: v.cuda() for k, v in batch.tensors.items()}
    logprobs, entropy = response_logprobs(model, tensors["input_ids"], tensors["attention_mask"],
                                          batch.prompt_width, with_entropy=True)
    loss, _, _ = policy_objective(logprobs, tensors["rollout_logprobs"], tensors["advantages"],
                                  tensors["response_mask"], ref_logprobs=tensors["ref_logprobs"],
                                  entropy=entropy, **LOSS.objective_kwargs())
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0).step()
    return {n: p.detach().cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_one_cuda_rank_makes_the_plain_torch_step(tiny_model_dir, zero_stage):
    """fp32, 2 accumulation micro-batches: the rank's update equals torch's on the whole batch."""
    optim = dict(OPTIM, lr=LR, eps=EPS, grad_clip=1e9, scheduler="constant", warmup_steps=0, min_lr_ratio=1.0)
    learner = LearnerActor(rank=0, world_size=1, model_path=str(tiny_model_dir), device="cuda")
    learner.init("127.0.0.1", free_port(), "nccl", zero_stage, micro_batch_size=8, grad_accum_steps=2,
                 optim=optim, total_optimizer_steps=1, bf16=False, gradient_checkpointing=False, timeout_s=120)
    batch = _batch(tiny_model_dir)
    tokens = float(batch["response_mask"].sum())
    learner.train_step([(batch, tokens, float(len(batch)))], LOSS, step=1)
    got, want = learner.get_weights(), _torch_step(tiny_model_dir, batch)
    _assert_same_update(got, want, tiny_model_dir)


def _assert_same_update(got, want, model_dir, msg=""):
    """The step each made from the initial weights (not the weights: a norm weight of 1.0 would
    hide a wrong update of 1e-3 inside a relative tolerance)."""
    initial = {n: p.detach() for n, p in load_causal_lm(str(model_dir)).named_parameters()}
    for name, value in want.items():
        torch.testing.assert_close(got[name] - initial[name], value - initial[name], rtol=1e-2, atol=1e-7,
                                   msg=f"{msg}{name}")


def _rank(rank, port, model_dir, zero_stage, queue):
    # started with CUDA_VISIBLE_DEVICES=<rank>, as Ray starts an actor: its one GPU is device 0
    optim = dict(OPTIM, lr=LR, eps=EPS, grad_clip=1e9, scheduler="constant", warmup_steps=0, min_lr_ratio=1.0)
    learner = LearnerActor(rank=rank, world_size=2, model_path=model_dir, device="cuda")
    learner.init("127.0.0.1", port, "nccl", zero_stage, micro_batch_size=4, grad_accum_steps=2,
                 optim=optim, total_optimizer_steps=1, bf16=False, gradient_checkpointing=False, timeout_s=120)
    batch = _batch(model_dir)
    tokens = float(batch["response_mask"].sum())
    shard = batch.chunk(2)[rank]
    learner.train_step([(shard, tokens, float(len(batch)))], LOSS, step=1)
    queue.put((rank, learner.get_weights()))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_cuda_ranks_over_nccl_make_the_plain_torch_step(tiny_model_dir, zero_stage):
    """2 ranks (one GPU each: NCCL refuses two on one device) x 2 micro-batches, ZeRO-2/3 over NCCL:
    both ranks end with torch's single-device weights."""
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs one device per rank: 2 GPUs")
    import os

    ctx, port = mp.get_context("spawn"), free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tiny_model_dir), zero_stage, queue), daemon=True)
             for r in range(2)]
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for rank, p in enumerate(procs):
            os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)  # a spawned child takes the environment at start
            p.start()
        results = dict(queue.get(timeout=600) for _ in procs)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
        for p in procs:
            p.terminate()
    want = _torch_step(tiny_model_dir, _batch(tiny_model_dir))
    for rank in (0, 1):
        _assert_same_update(results[rank], want, tiny_model_dir, f"rank {rank}: ")
