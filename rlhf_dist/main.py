"""Entry points. `rlhf-dist [overrides...]` runs the configured stage (RL by default) with the
Hydra config in conf/; the stages live in rlhf_dist.stages, what they share in rlhf_dist.session.

    rlhf-dist                                    # the default job: tiny model, reverse task, CPU
    rlhf-dist trainer.total_steps=50 rollout.num_engines=2 learner.world_size=2
    rlhf-dist model.path=/models/my-sft cluster=gpu8 logger.wandb.mode=online
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from rlhf_dist.session import conf_dir  # first: sets the environment before vLLM/transformers load

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rlhf_dist.errors import RlhfDistError
from rlhf_dist.console import quiet_driver_logging
from rlhf_dist.redact import redact_files, redact_text
from rlhf_dist.validation import check_override_keys


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def _train_main(cfg: DictConfig) -> None:
    from rlhf_dist.monitor import check_wandb_credentials
    from rlhf_dist.stages import stage_runner

    quiet_driver_logging()
    hydra_files = HydraConfig.get().runtime.output_dir, HydraConfig.get().output_subdir
    if hydra_files[1]:  # .hydra/config.yaml, overrides.yaml, hydra.yaml: overrides written as given
        redact_files(Path(*hydra_files).glob("*.yaml"))
    try:
        check_wandb_credentials(cfg.logger.wandb.mode)
        stage_runner(cfg.stage)(cfg)
    except RlhfDistError as err:
        print(f"\nerror: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; actors are being shut down", file=sys.stderr, flush=True)
        sys.exit(130)


def train() -> None:
    """Console script `rlhf-dist`."""
    try:
        check_override_keys(sys.argv[1:])
    except RlhfDistError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if not {"--cfg", "-c", "--info", "-i"} & {arg.split("=", 1)[0] for arg in sys.argv[1:]}:
        return _train_main()
    shown = io.StringIO()  # Hydra prints the config itself: redact what it printed
    try:
        with contextlib.redirect_stdout(shown):
            _train_main()
    finally:
        sys.stdout.write(redact_text(shown.getvalue()))


if __name__ == "__main__":
    train()
