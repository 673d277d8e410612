"""User-facing errors.

Every error a user can cause (bad config, missing model, broken reward function, empty dataset,
a dead actor, a NaN loss) is raised as a subclass of `RlhfDistError`. The entry point prints the
message (never a traceback from deep inside Ray) and exits non-zero. Messages say what was given,
what was expected and how to fix it.
"""


class RlhfDistError(Exception):
    """Base class: the message is meant for the user, as is."""


class ConfigError(RlhfDistError):
    """A config value is invalid or inconsistent with another one."""


class ModelPathError(RlhfDistError):
    """`model.path` does not point at a loadable HF-format model directory."""


class DatasetError(RlhfDistError):
    """A prompt source is missing, empty or malformed."""


class RewardFnError(RlhfDistError):
    """`reward.fn` cannot be imported, is not callable, raises, or returns the wrong thing."""


class RewardSamplesFailedError(RewardFnError):
    """`reward.fn` raised on some (not all) samples of a batch and reward.fallback_score is null:
    the trainer skips the step. `failures` lists them ({"index", "prompt", "completion", "error"})
    where the error was not rebuilt from its message alone."""

    def __init__(self, message: str, failures: list | None = None) -> None:
        super().__init__(message)
        self.failures = list(failures or [])

    def __reduce__(self):  # through Ray (pickle) with its failures
        return type(self), (str(self), self.failures)


class ClusterResourceError(RlhfDistError):
    """The Ray cluster cannot fit the requested actors."""


class ClusterConnectError(RlhfDistError):
    """`cluster.address` cannot be reached or joined within cluster.connect_timeout_s."""


class ActorDiedError(RlhfDistError):
    """A Ray actor (rollout engine, learner rank, ...) died; the message names it."""


class WeightSyncError(RlhfDistError):
    """A weight broadcast timed out or the engine's checksum does not match the learner's."""


class NonFiniteLossError(RlhfDistError):
    """The learner computed a NaN or infinite loss."""
