"""Watchdog of the local Ray that `init_ray` starts: when the driver dies without `ray.shutdown()`
(kill -9, an OOM kill), it ends the processes of that Ray session, and only those.

Ray ties its GCS and raylet to the driver, but the raylet's dashboard agent and runtime-env agent
(~200 MB together) outlive a driver killed with SIGKILL, adopted by init. `start_reaper` runs

    python rlhf_dist/runtime/reaper.py <driver pid> <session dir>

detached (its own session, so a signal to the driver's process group spares it). Once a second,
while the driver lives, it notes the session's processes: those whose command line holds the
session directory (GCS, raylet, dashboard head, log monitor), those a raylet of the session started
(its pid in their RAY_RAYLET_PID: agents, workers) and their descendants (vLLM's engine processes).
When the driver is gone it sends each of them still alive SIGTERM, SIGKILL after a grace period,
and exits. When the session's own processes are gone while the driver lives (`ray.shutdown()`), it
exits too. Processes of other Ray sessions never match: they name another session directory and
another raylet. Its log: <session dir>/logs/rlhf_dist_reaper.log.

A run that joined a cluster (`cluster.address`) gets no watchdog: the Ray session there is the
cluster's, and ending it would end every job on it. There Ray itself ends what the run started
when the driver dies: the actors the driver owns (engines, learner ranks, reference, reward) die
with their owner, and the job's placement groups are removed. Tested by killing a
run with SIGKILL on a two-node cluster (tests/e2e/test_multinode.py): every actor of the job ends,
another job's actor and both nodes stay.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

POLL_S = 1.0
GRACE_S = 5.0  # between SIGTERM and SIGKILL (the agents ignore SIGTERM for a while)


def start_reaper() -> subprocess.Popen | None:
    """Start the watchdog of the local Ray session this process has just started."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # Ray has no public session-dir API
    if node is None:
        return None
    session_dir = node.get_session_dir_path()
    log = open(os.path.join(session_dir, "logs", "rlhf_dist_reaper.log"), "ab")
    with log:
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid()), session_dir],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                                start_new_session=True)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class SessionProcesses:
    """The processes of one Ray session, noted while its driver lives: {pid: create_time}."""

    def __init__(self, session_dir: str) -> None:
        self.session_dir = session_dir
        self.members: dict[int, float] = {}
        self.raylets: set[str] = set()  # raylet pids, as RAY_RAYLET_PID spells them
        self.others: set[tuple[int, float]] = set()  # looked at, not of this session
        self.since = 0.0  # nothing created before the session's first process belongs to it

    def scan(self) -> int:
        """Note the session's processes alive now; returns how many of them run the session's
        own services (command line naming the session directory)."""
        procs = {p.pid: p for p in psutil.process_iter(["ppid", "cmdline", "create_time"])
                 if p.pid != os.getpid() and p.info["create_time"]}
        roots = 0
        for pid, proc in procs.items():
            if self.names_session(proc.info["cmdline"] or []):
                roots += 1
                self.members[pid] = proc.info["create_time"]
                self.since = min(self.since or proc.info["create_time"], proc.info["create_time"])
                if os.path.basename((proc.info["cmdline"] or [""])[0]) == "raylet":
                    self.raylets.add(str(pid))
        unknown = {pid: proc for pid, proc in procs.items() if pid not in self.members
                   and (pid, proc.info["create_time"]) not in self.others}
        added = True
        while added:  # children of members are members: to a fixed point (grandchildren)
            added = False
            for pid, proc in list(unknown.items()):
                if proc.info["create_time"] >= self.since - 1.0 and (
                        proc.info["ppid"] in self.members or self._from_raylet(proc)):
                    self.members[pid] = proc.info["create_time"]
                    del unknown[pid]
                    added = True
        self.others.update((pid, proc.info["create_time"]) for pid, proc in unknown.items())
        return roots

    def names_session(self, cmdline: list[str]) -> bool:
        """The session directory itself, or a path under it, in one of the arguments."""
        return any(arg == self.session_dir or arg.endswith("=" + self.session_dir)
                   or self.session_dir + "/" in arg for arg in cmdline)

    def _from_raylet(self, proc: psutil.Process) -> bool:
        try:
            return proc.environ().get("RAY_RAYLET_PID") in self.raylets
        except psutil.Error:
            return False

    def alive(self) -> list[psutil.Process]:
        procs = []
        for pid, created in self.members.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and _alive(proc):
                    procs.append(proc)
            except psutil.Error:
                continue
        return procs

    def end(self) -> list[int]:
        """SIGTERM to every noted process still alive, SIGKILL after GRACE_S; their pids."""
        ended = []
        for signal_name in ("terminate", "kill"):
            self.scan()  # also any started since the last look (raylet children keep its pid)
            procs = self.alive()
            for proc in procs:
                try:
                    getattr(proc, signal_name)()
                except psutil.Error:
                    pass
            ended += [proc.pid for proc in procs if proc.pid not in ended]
            psutil.wait_procs(procs, timeout=GRACE_S if signal_name == "terminate" else 2.0)
        return ended


def watch(driver_pid: int, session_dir: str) -> str:
    """Poll until the driver or the session is gone; returns what happened."""
    session = SessionProcesses(session_dir)
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        driver = None
    if not session.scan():
        return f"no process of {session_dir} found; nothing to watch"
    while True:
        if driver is None or not _alive(driver):
            ended = session.end()
            return f"driver {driver_pid} gone without ray.shutdown(): ended {len(ended)} processes {ended}"
        if not session.scan() and not session.alive():
            return f"session {session_dir} shut down by its driver {driver_pid}"
        time.sleep(POLL_S)


if __name__ == "__main__":
    pid, directory = int(sys.argv[1]), sys.argv[2]
    print(f"[reaper {os.getpid()}] watching driver {pid}, session {directory}", flush=True)
    print(f"[reaper {os.getpid()}] {watch(pid, directory)}", flush=True)
