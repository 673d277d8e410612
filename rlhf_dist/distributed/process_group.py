"""Process-group set-up for learner ranks that live in Ray actors."""

from __future__ import annotations

import datetime
import os
import socket


def node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def init_learner_process_group(
    rank: int, world_size: int, master_addr: str, master_port: int, backend: str, timeout_s: float
) -> None:
    """Set the env that torch.distributed expects (Ray does not) and join the group."""
    import deepspeed

    os.environ.update({
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": "0",  # each actor sees only its own device (Ray sets CUDA_VISIBLE_DEVICES)
        "LOCAL_WORLD_SIZE": "1",
    })
    deepspeed.init_distributed(
        dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s), verbose=False
    )
