"""Weight transports: how a learner's weights reach the rollout engines. One module each, picked by
name (`rollout.sync_transport`).

A transport keeps all of its sides in its own module, behind the `Transport` interface:

- controller (`connect`, `start`): runs in the driver inside `WeightSync` (rlhf_dist.weights.sync);
  it starts the learners' send and the engines' receive and returns their refs, never weight data;
- learner (`learner_verbs`): functions of one learner rank's `WeightPublisher`, reached through
  `LearnerActor.weights_call(transport, verb, *args)`;
- engine (`engine_verbs`): functions of one `RolloutActor`, reached through
  `RolloutActor.weights_call(transport, verb, *args)`;
- worker (`worker_verbs`): functions of one vLLM worker (one per tensor-parallel shard, maybe in its
  own process), reached through `llm.collective_rpc("rlhf_weights_call", args=(transport, verb, ...))`
  (rlhf_dist.weights.vllm_worker.WorkerExtension).

Adding a transport: a module here whose `Transport` subclass is decorated
`@register_transport("<name>")`, and its import at the bottom of this file. Config validation
accepts every registered name.
"""

from rlhf_dist.weights.transports.base import (
    TRANSPORTS, Transport, call_verb, get_transport, register_transport, transport_names, with_checksums)

__all__ = ["TRANSPORTS", "Transport", "call_verb", "get_transport", "register_transport", "transport_names",
           "with_checksums"]

# registration: importing a transport registers it (this order is the order of the names in messages)
from rlhf_dist.weights.transports import object_store, collective, ipc  # noqa: E402,F401,I001
