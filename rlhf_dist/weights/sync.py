"""Moving a learner group's weights into a group of rollout engines: plan, transport, verification.

Used by the RL trainer (phase 5) and by benchmarks/weight_sync.py. Set-up (`prepare`) runs once:
the bucket plan from the learner, the engines' fusion map and per-shard layout, and the
transport's links (`connect`: the collective transport's process group). `sync` then moves the
weights by the transport named in `rollout.sync_transport` (rlhf_dist.weights.transports) under
the deadline `rollout.sync_timeout_s` and, with `verify`, compares every engine worker's
checksums with the learner's. The controller receives summaries and checksums, never weight data.
"""

from __future__ import annotations

from typing import Any

from rlhf_dist.errors import WeightSyncError
from rlhf_dist.runtime.group import ActorGroup, wait_all
from rlhf_dist.weights.checksum import diff_checksums
from rlhf_dist.weights.transports import get_transport


class WeightSync:
    """The weight-sync controller of one learner group and one engine group (see the module doc)."""

    def __init__(self, learners: ActorGroup, engines: ActorGroup, rollout_cfg: Any, device: str,
                 zero_stage: int) -> None:
        self.learners, self.engines, self.cfg = learners, engines, rollout_cfg
        self.device, self.zero_stage = device, zero_stage
        # ZeRO-3 gathers are collective, so every rank joins; otherwise rank 0 holds everything
        self.ranks = learners.actors if zero_stage == 3 else learners.actors[:1]
        self.rank_names = learners.names[: len(self.ranks)]
        # what the engines have released (rollout.sleep_level > 0): None (awake), "all" (since
        # sleep_engines) or ["kv_cache"] (weights woken for a sync that did not finish)
        self.asleep: str | list[str] | None = None

    def prepare(self, bucket_mb: float | None = None) -> None:
        ro = self.cfg
        self.plan = self.learners.run("weight_plan", bucket_mb or ro.sync_bucket_mb, ro.dtype, timeout_s=60)[0]
        self.packed_modules = self.engines.run("packed_modules", timeout_s=60)[0]
        self.layouts = self.engines.run("weight_layout", timeout_s=60)[0]  # one per TP worker
        lora = self.learners.run("engine_lora_config", timeout_s=60)[0]
        if lora is not None:  # model.lora.sync=adapter: engines install what they receive as the adapter
            self.engines.run("lora_setup", lora, timeout_s=60)
        self.connect()

    def connect(self) -> None:
        """(Re)build the transport's links between learners and engines (the collective
        transport's group; nothing for the others). Also the way back after a failed sync, which
        leaves such a group in an unknown state."""
        get_transport(self.cfg.sync_transport).connect(self)

    def sync(self, transport: str | None = None, verify: bool | None = None) -> dict[str, float]:
        """One sync by `transport` (default rollout.sync_transport), verified unless `verify` is
        False (default rollout.verify_sync); returns the sync/* metrics."""
        ro = self.cfg
        transport = transport or ro.sync_transport
        verify = ro.verify_sync if verify is None else verify
        if self.asleep == "all":  # asleep since generation: weights back first, KV cache after the sync
            self._wake(["weights"])
            self.asleep = ["kv_cache"]
        # The learner hashes its weights (an actor runs its calls in order): on GPU after sending,
        # while the engines load; on CPU before sending, since hashing beside the engine's reload
        # on the same cores made both slower (113M: 2.4 s sync with the overlap, ~1 s without).
        hash_first = verify and self.device == "cpu"
        if hash_first:
            sum_refs = self._learner_checksums()
        sends, loads = get_transport(transport).start(self, verify)
        if verify and not hash_first:
            sum_refs = self._learner_checksums()
        results = wait_all(sends + loads, self.rank_names + self.engines.names, "weight sync",
                           ro.sync_timeout_s + 30)
        sent, loaded = results[0], results[len(sends):]
        metrics = {"sync/buckets": float(sent["buckets"]), "sync/mb": sent["bytes"] / 2**20,
                   "sync/send_s": sent["publish_s"],
                   "sync/engine_load_s": max(r["load_s"] for r in loaded),
                   # CPU: re-packing vLLM's oneDNN linear weights after the reload (part of load_s)
                   "sync/engine_repack_s": max(r.get("refresh_s", 0.0) for r in loaded),
                   "sync/engine_verify_s": max(r.get("verify_s", 0.0) for r in loaded)}
        self.wake_engines()
        if verify:
            expected = wait_all(sum_refs, self.rank_names, "weight checksums", ro.sync_timeout_s)[0]
            self._compare(expected, loaded)
            metrics["sync/verified_tensors"] = float(sum(len(e) for e in expected))
        return metrics

    def _learner_checksums(self) -> list:
        return [r.weight_checksums.remote(self.plan, self.cfg.dtype, self.packed_modules, self.layouts)
                for r in self.ranks]

    def sleep_engines(self) -> None:
        """After generation (rollout.sleep_level > 0): engines free their GPU memory for training."""
        if self.cfg.sleep_level and self.asleep is None:
            self.engines.wait(self.engines.call("sleep", self.cfg.sleep_level), "engine sleep",
                              self.cfg.sync_timeout_s)
            self.asleep = "all"

    def wake_engines(self) -> None:
        """Whatever the engines released, back: after a sync, and before anything generates, so
        that no way out of a step (a skipped step, a failed sync) leaves them asleep. Level 2
        discarded the weights, and waking does not bring them back: they are sent again (the
        policy is the one the engines last held, since nothing trained in between)."""
        if self.asleep == "all" and self.cfg.sleep_level == 2:
            self.sync()  # wakes the weights, sends them, wakes the KV cache
            return
        if self.asleep is not None:
            self._wake(None if self.asleep == "all" else self.asleep)
            self.asleep = None

    def _wake(self, tags: list[str] | None) -> None:
        self.engines.wait(self.engines.call("wake_up", tags), "engine wake-up", self.cfg.sync_timeout_s)

    def _compare(self, expected: list[dict], loaded: list[dict[str, Any]]) -> None:
        for name, result in zip(self.engines.names, loaded):
            for tp_rank, (want, held) in enumerate(zip(expected, result["checksums"])):
                problems = diff_checksums(want, held)
                if problems:
                    shard = f" (tensor-parallel shard {tp_rank})" if len(expected) > 1 else ""
                    raise WeightSyncError(
                        f"{name}{shard} holds different weights than the learner after sync "
                        f"({len(problems)} tensors differ): " + "; ".join(problems[:5]))
