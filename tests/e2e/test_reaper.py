"""A driver killed with SIGKILL leaves no process of its local Ray session behind, and no process of
another Ray session on the machine is touched (rlhf_dist/runtime/reaper.py, started by init_ray).

Without the watchdog the raylet's dashboard agent and runtime-env agent outlive the driver.
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from helpers import REPO

DRIVER = """
import sys, time, types, ray
from rlhf_dist.runtime.cluster import init_ray
init_ray(types.SimpleNamespace(address=None, num_cpus=1))
@ray.remote(num_cpus=0.1)
class Sleeper:
    def ping(self):
        return 1
sleeper = Sleeper.remote()
ray.get(sleeper.ping.remote())
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def other_session():
    """Another local Ray session (this test process's), started first: it must survive."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        yield ray._private.worker._global_node.get_session_dir_path()
    finally:
        ray.shutdown()


def _session_of(driver: psutil.Process) -> tuple[str, list[psutil.Process]]:
    """The driver's Ray session directory and every process under the driver (GCS, raylet,
    agents, workers, the watchdog)."""
    below = driver.children(recursive=True)
    for proc in below:
        for arg in proc.cmdline():
            if arg.startswith("--session-dir="):
                return arg.split("=", 1)[1], below
    raise AssertionError(f"no Ray process under driver {driver.pid}: {[p.cmdline()[:2] for p in below]}")


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def _naming(session_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(session_dir in arg for arg in proc.info["cmdline"] or ()) and _alive([proc]):
            found.append(proc)
    return found


def _start(args: list[str], ready: str, cwd, timeout_s: float, env: dict | None = None) -> subprocess.Popen:
    """Start a driver; return once it printed a line starting with `ready`."""
    env = dict(env or os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if line.lstrip().startswith(ready):
            return proc
    proc.kill()
    raise AssertionError(f"no {ready!r} line within {timeout_s} s:\n{''.join(seen)[-3000:]}")


def _kill_and_check(proc: subprocess.Popen, other_dir: str) -> float:
    """kill -9 the driver; every process of its session gone within 30 s, the other session whole.
    Returns the seconds it took."""
    import ray

    driver = psutil.Process(proc.pid)
    session_dir, below = _session_of(driver)
    assert any("reaper.py" in " ".join(p.cmdline()) for p in below), "no watchdog under the driver"
    others = _naming(other_dir)
    assert others, "the other Ray session has no processes"
    for listener in psutil.net_connections("inet"):  # local Ray has no dashboard (HTTP)
        assert not (listener.status == "LISTEN" and listener.laddr.port == 8265
                    and listener.pid in {p.pid for p in below}), listener
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        while time.monotonic() - killed < 30 and (_alive(below) or _naming(session_dir)):
            time.sleep(0.5)
        left = _alive(below) + _naming(session_dir)
        assert not left, [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in left]
    finally:
        for leftover in _alive(below):  # ours: never leave them to the next test
            leftover.kill()
    took = time.monotonic() - killed
    assert not [p for p in others if not _alive([p])], "a process of the other Ray session ended"
    assert ray.get(ray.remote(lambda: 7).remote(), timeout=60) == 7  # and it still runs tasks
    return took


@pytest.mark.ray
def test_killed_driver_of_a_local_ray_leaves_nothing(other_session, tmp_path):
    proc = _start([sys.executable, "-c", DRIVER], "ready", tmp_path, 120)
    _kill_and_check(proc, other_session)


@pytest.mark.slow
@pytest.mark.ray
def test_killed_training_run_leaves_nothing(other_session, tmp_path):
    """`rlhf-dist` killed with SIGKILL while training (engine, learner ranks, reference, reward)."""
    proc = _start([sys.executable, "-m", "rlhf_dist.main", "experiment=smoke", "trainer.total_steps=50",
                   "warmup.steps=2", f"hydra.run.dir={tmp_path}/run", "trainer.save_every=0"],
                  "step ", tmp_path, 600)
    _kill_and_check(proc, other_session)
