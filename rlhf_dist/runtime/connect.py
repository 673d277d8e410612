"""Joining a running Ray cluster (`cluster.address`) within a deadline, or failing with the address.

`ray.init(address=...)` on an address nobody answers retries for about 12 minutes (20 attempts of
~35 s each in Ray 2.60) and then prints a traceback from deep inside Ray. Here the driver first
waits, up to `cluster.connect_timeout_s`, until the address accepts a TCP connection, then gives
ray.init itself the same deadline; past either it stops with a message naming the address.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from contextlib import contextmanager

from rlhf_dist.errors import ClusterConnectError

_HINT = ("Check that the head is running (`ray start --head` prints its address, default port "
         "6379), that this machine can reach that host and port (firewall, security group), and "
         "that the address is the head's GCS port, not the dashboard's (8265, used only by `ray "
         "job submit`). If the head is still starting, raise cluster.connect_timeout_s.")


def join_cluster(address: str, timeout_s: float, runtime_env: dict) -> None:
    """ray.init(address) that fails within ~timeout_s (ClusterConnectError) instead of hanging."""
    import ray

    host, port, shown = resolve_address(address)
    deadline = time.monotonic() + timeout_s
    wait_until_reachable(host, port, shown, timeout_s, deadline)
    message = (f"error: {shown} accepts connections but Ray did not finish joining it within "
               f"{timeout_s:g} s (cluster.connect_timeout_s). Is it a Ray head's GCS port? {_HINT}")
    with _exit_after(max(deadline - time.monotonic(), 10.0), message):
        try:
            ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
        except Exception as err:  # noqa: BLE001 - version mismatch, auth token, ...: say where
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ClusterConnectError(f"could not join the Ray cluster at {shown}: {first[:500]}") from None


def resolve_address(address: str) -> tuple[str, int, str]:
    """(host, port, how to name it in messages) for `auto`, `host:port` or `ray://host:port`."""
    if address.startswith(("http://", "https://")):
        raise ClusterConnectError(
            f"cluster.address={address} is a dashboard (job submission) address. The driver joins "
            "the head's GCS address instead: cluster.address=auto inside a `ray job submit` job or "
            "on a cluster node, or cluster.address=HOST:6379.")
    target = address
    if address == "auto":
        try:  # Ray's own lookup: RAY_ADDRESS, then the address file of a head on this machine
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address("auto")
        except ImportError:  # a private API: other Ray versions may move it
            target = os.environ.get("RAY_ADDRESS") or None
        except ConnectionError:  # Ray 2.60: "Could not find any running Ray instance"
            target = None
        if target is None:
            raise ClusterConnectError(
                "cluster.address=auto found no running Ray cluster: RAY_ADDRESS is unset and no "
                "head was started on this machine. Start one (`ray start --head`), submit through "
                "`ray job submit` (which sets RAY_ADDRESS), or give cluster.address=HOST:6379.")
    shown = address
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        shown = f"{target} (cluster.address=auto{', RAY_ADDRESS=' + env if env else ''})"
    hostport = target.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterConnectError(f"cluster.address={address}: expected auto, HOST:PORT or "
                                  "ray://HOST:PORT (e.g. 10.0.0.1:6379).")
    return host.strip("[]"), int(port), shown


def wait_until_reachable(host: str, port: int, shown: str, timeout_s: float, deadline: float) -> None:
    """Retry a TCP connect until it succeeds (a head may still be starting) or the deadline."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as err:
            last = err.strerror or type(err).__name__
        if time.monotonic() + 0.5 >= deadline:
            raise ClusterConnectError(
                f"cannot reach the Ray cluster at {shown} within {timeout_s:g} s "
                f"(cluster.connect_timeout_s): {last}. {_HINT}")
        time.sleep(0.5)


@contextmanager
def _exit_after(timeout_s: float, message: str):
    """ray.init blocks in C++ and cannot be interrupted: past the deadline print the message and
    end the process (exit code 2, like every other user error); nothing has started yet."""
    def give_up() -> None:
        sys.stderr.write(f"\n{message}\n")
        sys.stderr.flush()
        os._exit(2)

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
