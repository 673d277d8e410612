"""Where the Ray dashboard (job API) listens in every launch file: 127.0.0.1 unless the file needs
more, and then only behind a private network and token authentication (launch/README.md).
The local Ray of `rlhf-dist` starts no dashboard: tests/e2e/test_reaper.py checks that no process of
its session listens on the dashboard port."""

import re

import yaml

from helpers import REPO

LAUNCH_FILES = sorted(p for d in ("launch", "docker") for p in (REPO / d).iterdir() if p.is_file())
SLURM = REPO / "launch" / "slurm.sbatch"
COMPOSE = REPO / "docker" / "compose.yaml"
KUBERAY = REPO / "launch" / "kuberay-rayjob.yaml"


def _head_starts(text: str) -> list[str]:
    """Every `ray start --head ...` command, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line for line in joined.splitlines() if re.search(r"ray start\b.*--head", line)]


def test_every_launch_file_that_starts_a_head_or_sets_the_host_is_checked_here():
    sets_host = [p.relative_to(REPO).as_posix() for p in LAUNCH_FILES if p.suffix != ".md"
                 and (_head_starts(p.read_text()) or "dashboard-host" in p.read_text())]
    assert sets_host == ["docker/compose.yaml", "launch/kuberay-rayjob.yaml", "launch/slurm.sbatch"]


def test_slurm_dashboard_listens_on_localhost_unless_asked_and_submit_finds_it():
    text = SLURM.read_text()
    assert 'DASHBOARD_HOST="${DASHBOARD_HOST:-127.0.0.1}"' in text
    (head,) = _head_starts(text)
    assert '--dashboard-host="$DASHBOARD_HOST"' in head and "0.0.0.0" not in head
    # the batch script runs on the head node and submits to the address the dashboard listens on
    assert 'head_node="${SLURMD_NODENAME:-' in text
    assert re.search(r'submit\.py --address "http://\$dashboard_ip:\$DASHBOARD_PORT"', text)
    assert '[ "$dashboard_ip" = 0.0.0.0 ] && dashboard_ip=127.0.0.1' in text
    assert "export RAY_AUTH_MODE=token" in text


def test_compose_dashboard_is_published_on_the_host_loopback_only_with_token_auth():
    compose = yaml.safe_load(COMPOSE.read_text())
    head = compose["services"]["head"]
    (start,) = _head_starts(head["command"][0])
    assert "--dashboard-host=0.0.0.0" in start  # the job container reaches it over the compose network
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
        assert service.get("network_mode") != "host", name
    assert compose["x-node"]["environment"]["RAY_AUTH_MODE"] == "token"


def test_kuberay_dashboard_stays_inside_the_cluster_with_token_auth():
    spec = yaml.safe_load(KUBERAY.read_text())["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # submitter pod
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress", False)
    for group in spec["workerGroupSpecs"]:
        assert "dashboard-host" not in group.get("rayStartParams", {})

