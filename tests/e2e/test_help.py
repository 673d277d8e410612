"""`rlhf-dist --help`: names the program, lists every config group with its options, and every
example it shows is a config that composes and validates."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf_dist.session import conf_dir
from rlhf_dist.validation import check_override_keys, validate

from helpers import REPO

CONF = Path(conf_dir())


@pytest.fixture(scope="module")
def help_text() -> str:
    result = subprocess.run([sys.executable, "-m", "rlhf_dist.main", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def examples(text: str) -> list[list[str]]:
    """The overrides of every `rlhf-dist ...` command shown (also after `ray job submit --`)."""
    commands = []
    for line in text.splitlines():
        command = line.split("#", 1)[0].strip()  # examples are indented, comments after `#`
        if not (line.startswith("  ") and command.startswith(("rlhf-dist", "ray job submit"))):
            continue
        words = shlex.split(command)
        if "[overrides]" not in words:
            commands.append(words[words.index("rlhf-dist") + 1:])
    return commands


def test_help_names_the_program_not_hydra(help_text):
    assert help_text.startswith("rlhf-dist: ")
    assert "powered by Hydra" not in help_text and "main is" not in help_text
    assert "--cfg job" in help_text and "RLHF_DIST_VERBOSE=1" in help_text


def test_help_lists_every_group_and_option(help_text):
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        options = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
        assert f"{group.name}: {options}" in help_text, group.name


def test_help_shows_laptop_node_and_cluster_examples(help_text):
    assert "Laptop" in help_text and "One GPU node" in help_text and "A Ray cluster" in help_text
    shown = [" ".join(words) for words in examples(help_text)]
    assert "" in shown and any("cluster=gpu8" in s for s in shown) and len(shown) >= 8


def test_every_example_in_help_composes_and_validates(help_text):
    for overrides in examples(help_text):
        check_override_keys(overrides)
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=["trainer.run_dir=/tmp/unused", *overrides])
        validate(OmegaConf.to_object(cfg))
