"""The GPU weight path without Ray or vLLM: CUDA IPC hand-off between processes, the collective
transport's NCCL group, and checksums on the device. Skipped without CUDA.

These are the pieces the ipc and collective transports stand on (rlhf_dist.weights.transports.collective,
vLLM's ipc engine); the GPU machine this project may borrow has torch but no Ray or vLLM.
"""

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from rlhf_dist.weights.checksum import tensor_checksum  # noqa: E402
from rlhf_dist.distributed.process_group import free_port  # noqa: E402
from rlhf_dist.weights.plan import plan_buckets, unflatten_bucket  # noqa: E402
from rlhf_dist.weights.transports.collective import WeightGroup  # noqa: E402


def _receive_ipc(handle_args, queue):
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    tensor = rebuild_cuda_tensor(*handle_args)
    queue.put((tensor_checksum(tensor), tensor.shape[0]))


def test_cuda_ipc_bucket_reaches_another_process_bit_exact():
    from torch.multiprocessing.reductions import reduce_tensor

    ctx = mp.get_context("spawn")
    bucket = torch.randn(3 * 2**20, device="cuda", dtype=torch.bfloat16)  # one 6 MB bf16 bucket
    _, args = reduce_tensor(bucket)
    queue = ctx.Queue()
    proc = ctx.Process(target=_receive_ipc, args=(args, queue))
    proc.start()
    received, rows = queue.get(timeout=120)
    proc.join(60)
    assert rows == bucket.shape[0] and received == tensor_checksum(bucket)


def _nccl_rank(rank, port, plan, queue):
    torch.cuda.set_device(rank)
    group = WeightGroup.open("127.0.0.1", port, rank, 2, "nccl", 60)
    gen = torch.Generator(device="cuda").manual_seed(0)
    sums = {}
    for index, bucket in enumerate(plan):
        numel = sum(int(torch.tensor(shape).prod()) for _, shape in bucket)
        flat = torch.randn(numel, device="cuda", generator=gen) if rank == 0 else torch.empty(numel, device="cuda")
        group.broadcast(flat, f"bucket {index}", 60)
        sums.update({name: tensor_checksum(t) for name, t in unflatten_bucket(flat, bucket)})
    group.barrier("ack", 60)
    queue.put((rank, sums))


def test_nccl_weight_group_broadcasts_buckets():
    """NCCL refuses two ranks of one communicator on the same device, so this needs 2 GPUs."""
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs one device per rank: 2 GPUs")
    plan = plan_buckets([[("a", [512, 256]), ("b", [256])], [("c", [1024, 64])]], 0.1, 4)
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_nccl_rank, args=(r, port, plan, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    assert results[0] == results[1] and len(results[0]) == 3


def test_chunked_checksum_is_identical_on_cpu_and_cuda():
    weights = torch.randn(5 * 2**20 + 7)  # several chunks, the last one partial
    assert tensor_checksum(weights) == tensor_checksum(weights.cuda())
    assert tensor_checksum(weights.bfloat16()) == tensor_checksum(weights.bfloat16().cuda())


def _stalled_rank(rank, port, queue):
    import time

    torch.cuda.set_device(rank)
    group = WeightGroup.open("127.0.0.1", port, rank, 2, "nccl", 60)
    if rank == 1:  # opens the group (its communicator included), never joins the broadcast
        time.sleep(40)
        queue.put((rank, "slept"))
        return
    start = time.monotonic()
    try:
        group.broadcast(torch.randn(2**20, device="cuda"), "bucket 1/1", 5.0)
        queue.put((rank, "returned"))
    except Exception as exc:  # noqa: BLE001 - the test reads what happened
        queue.put((rank, f"raised after {time.monotonic() - start:.1f} s: {exc}"))


def test_a_stalled_nccl_broadcast_fails_at_its_deadline():
    """NCCL's wait() returns at once; the deadline is kept on the host (wait_with_deadline)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs one device per rank: 2 GPUs")
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_stalled_rank, args=(r, port, queue), daemon=True) for r in range(2)]
    try:
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.terminate()
    assert results[0].startswith("raised after") and "while bucket 1/1" in results[0], results[0]
    assert float(results[0].split()[2]) < 15
