"""A console a user can read: our progress lines plus real warnings and errors.

Third-party lines that a user can do nothing about are dropped at the source where the library
has a switch (environment variables: see `quiet_process_env` and `runtime.cluster.quiet_env`), and
by their text where it has none: in the driver's Python loggers, and in the actor output that
Ray forwards to the driver. `RLHF_DIST_VERBOSE=1` turns all of it off and shows everything.
"""

from __future__ import annotations

import logging
import os

# Lines dropped by text, each with where it comes from and why nobody needs it.
NOISE = (
    # Ray 2.60, at every local start: token authentication was switched on (it stays on). Setting
    # RAY_AUTH_MODE ourselves would silence it but has to happen before Ray reads its config.
    "Token authentication is enabled for this Ray cluster",
    # DeepSpeed guessing the device on a CPU box (DS_ACCELERATOR=cpu is set for cluster.device=cpu).
    "Setting accelerator to CPU. If you have GPU or other accelerator",
    # DeepSpeed's CPU collective op, JIT-built once and then loaded from ~/.cache/torch_extensions.
    "deepspeed_shm_comm_op built successfully",
    # vLLM CPU engine binding its memory to the NUMA node of its cores (a C++ warning, no switch).
    "NUMA binding: Using MEMBIND policy",
    # vLLM probing for GPU kernels at import time, before its own log level applies.
    "Triton is installed",
    "Triton not installed or not compatible",
    # Progress bars: vLLM's weight loading ignores TQDM_DISABLE; transformers' saving.
    "Loading safetensors checkpoint shards",
    "Writing model shards",
)

# Where the driver-side lines above are logged (a logger filter sees only its own records).
_DRIVER_LOGGERS = (
    "ray._private.authentication.authentication_token_setup",
    "vllm.triton_utils.importing",
    # transformers' save_pretrained imports DeepSpeed on the driver once accelerate is installed
    # (a dependency of peft): building the tiny model printed the accelerator line
    "DeepSpeed",
)

# Environment variables read by the libraries themselves, for the driver and every actor.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",
}


def verbose() -> bool:
    return os.environ.get("RLHF_DIST_VERBOSE") == "1"


def is_noise(line: str) -> bool:
    return any(phrase in line for phrase in NOISE)


def quiet_process_env() -> None:
    """Defaults for this process (and a local Ray it starts); values already set win."""
    if not verbose():
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage())


def quiet_driver_logging() -> None:
    """Drop NOISE from the driver's own loggers; vLLM at the level it applies only in an engine."""
    if verbose():
        return
    for name in _DRIVER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoiseFilter) for f in logger.filters):
            logger.addFilter(_NoiseFilter())
    logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"))


def quiet_actor_output() -> None:
    """Drop NOISE lines (and blank ones) from the actor output Ray prints on the driver.

    Call after `ray.init`. Ray has no public hook for this; if its internals move, the lines
    simply come through again (tests/e2e/test_console.py fails then).
    """
    if verbose():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    printer = dict(dispatcher.handlers).get("ray_print_logs")  # Ray's own printer, set by ray.init
    if printer is None or getattr(printer, "drops_noise", False):
        return

    def print_without_noise(batch: dict) -> None:
        lines = [line for line in batch.get("lines", []) if line.strip() and not is_noise(line)]
        if lines:
            printer({**batch, "lines": lines})

    print_without_noise.drops_noise = True  # type: ignore[attr-defined]
    # Same name, so that ray.shutdown() removes it as it removes its own.
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_without_noise)
