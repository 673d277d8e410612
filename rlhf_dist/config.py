"""Config schema: dataclasses registered in Hydra's ConfigStore.

The dataclasses are the schema (types, defaults, one comment per field); YAML files under conf/
only pick group options and override values. `rlhf_dist.validation.validate(cfg)` checks values
and their consistency once, before any actor starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore




# stage=<name> -> "module:function" that runs it with the composed (Hydra) config (rlhf_dist.stages)
STAGES = {
    "rl": "rlhf_dist.stages.rl:run_rl",
    "sft": "rlhf_dist.stages.recipe:run_stage",
    "reward_model": "rlhf_dist.stages.recipe:run_stage",
    "full_recipe": "rlhf_dist.stages.recipe:run_stage",
    "eval": "rlhf_dist.stages.evaluate:run_eval",
}

@dataclass
class TinyModelConfig:
    """The offline tiny model built when `model.path` is unset."""

    arch: str = "qwen2"  # "qwen2" or "llama"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2  # head_dim = hidden_size / num_heads must be >= 32 (vLLM CPU)
    seed: int = 0
    cache_dir: str = "~/.cache/rlhf_dist/models"  # built once per shape, reused afterwards


@dataclass
class LoraConfig:
    """LoRA adapters on the RL policy's learner ranks (rlhf_dist/models/lora.py, docs/lora.md).
    The warm-up/SFT, reward-model and critic ranks train all weights whatever this says."""

    rank: int = 0  # 0 = full fine-tuning; > 0 = adapters of this rank, the base weights frozen
    alpha: float = 16.0  # the update is (alpha / rank) * B @ A
    dropout: float = 0.0  # on the adapters' input only
    # leaf names of the linear layers to adapt; [] = every attention and MLP projection of the
    # architecture (rlhf_dist.models.lora.DEFAULT_TARGETS)
    target_modules: list[str] = field(default_factory=list)
    path: Optional[str] = None  # a trained PEFT adapter dir to start from (its rank must match)
    # trainer.save_final: final/ holds the adapter (PEFT format); with this also final/merged/, a
    # full HF model with the adapter merged in, which model.path accepts
    export_merged: bool = False
    # the reference policy = the base model with the adapters off, computed on the learner ranks:
    # no reference actor and no second copy of the model
    reference_from_base: bool = True
    # what the engines get after each update: "merged" (W + (alpha/rank) B A, every weight, served
    # as a plain model) or "adapter" (only A and B, served through vLLM's LoRA support; falls back
    # to merged, saying so, for a model vLLM serves no adapters for). Merged is the default by
    # measurement: vLLM's LoRA kernels made CPU generation 1.4-3.1x slower (docs/lora.md)
    sync: str = "merged"


@dataclass
class ModelConfig:
    path: Optional[str] = None  # HF-format model dir; None = build the tiny model offline
    dtype: str = "float32"  # learner compute dtype: float32 | bfloat16 (rollout uses rollout.dtype)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TaskConfig:
    name: str = "reverse"  # built-in task (rlhf_dist.data.tasks); its reward is the default reward.fn
    prompts_file: Optional[str] = None  # .jsonl with a "prompt" column; replaces the task's train set
    eval_file: Optional[str] = None  # .jsonl for held-out eval; default: the task's eval split
    num_train: int = 2000  # train prompts generated from the built-in task
    num_eval: int = 64  # held-out prompts for eval
    seed: int = 0
    # task-specific knobs passed to the built-in task, e.g. {min_len: 3, max_len: 5} for reverse
    options: dict[str, Any] = field(default_factory=dict)
    # Prompt length budget in tokens; the engines get max_model_len = max_prompt_len +
    # rollout.max_new_tokens, so a prompt that fits here never fails inside vLLM mid-run.
    max_prompt_len: int = 256
    long_prompts: str = "truncate"  # truncate (keep the last tokens) | drop | error


@dataclass
class WarmupConfig:
    """A short SFT stage (rlhf_dist.stages.sft) on the task's own demonstrations before RL, on
    the policy's learner ranks.

    A randomly initialised tiny model never produces a rewarded completion, so GRPO would see
    all-zero advantages. A few SFT steps give it a weak policy that RL then improves.
    """

    steps: int = 50  # 0 = no warm-up (model=hf sets 0: a pretrained/SFT model needs none)
    batch_size: int = 32  # sequences per step, split over learner.world_size ranks
    lr: float = 3e-3  # decays linearly to 0.1 x lr
    seed: int = 0


@dataclass
class RolloutConfig:
    num_engines: int = 1  # vLLM engines, one Ray actor each; prompts are split across them
    n_samples_per_prompt: int = 8  # group size G for GRPO
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    dtype: str = "float32"  # engine dtype: float32 | bfloat16
    ignore_eos: bool = False  # every response runs to max_new_tokens (fixed-length benchmarks)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.1  # on CPU: fraction of RAM for the KV cache
    kv_cache_gb: Optional[int] = 1  # CPU only: VLLM_CPU_KVCACHE_SPACE (GiB); None = vLLM default
    enforce_eager: bool = True
    seed: int = 0
    # how new weights reach the engines: a transport registered in rlhf_dist/weights/transports/
    #   object_store  Ray object store buckets (CPU and GPU; tensor_parallel_size 1)
    #   collective    broadcast over a process group of learner rank 0 + every engine worker
    #                 (gloo on CPU, NCCL on GPU; any tensor_parallel_size)
    #   ipc           CUDA IPC handles, no copy: engines on the learner's GPU (cluster=gpu1)
    # collective is the default: as fast or faster than object_store at every size measured on
    # CPU (benchmarks/weight_sync.py, docs/weight-sync.md), and the only one that feeds tensor-parallel engines.
    sync_transport: str = "collective"
    sync_bucket_mb: float = 64.0  # max bucket size; buckets hold whole layers
    sync_timeout_s: float = 120.0  # per-bucket and per-engine deadline: a stuck sync fails loudly
    verify_sync: bool = True  # compare a checksum of engine weights with the learner's after sync
    init_timeout_s: float = 600.0  # engine start-up (model load + warm-up) deadline
    # GPU: free the engine's memory while the learner trains (vLLM sleep mode): 0 = never,
    # 1 = weights to CPU and KV cache dropped, 2 = both dropped (the sync rewrites the weights).
    # vLLM's CPU platform has no sleep mode (measured: vLLM 0.32 refuses it): refused on CPU.
    sleep_level: int = 0
    # multi-turn episodes (rlhf_dist.rl.episodes): an environment class answers the policy between
    # turns, "file.py:Class" or "package.module:Class" (contract: rlhf_dist/envs/base.py); null =
    # one completion per prompt. max_new_tokens is then the budget of one policy turn.
    env: Optional[str] = None
    max_turns: int = 4  # policy turns per episode
    max_episode_tokens: int = 64  # policy and observation tokens of one episode together
    tool_timeout_s: float = 10.0  # one environment step (a tool call); past it the policy sees an error


@dataclass
class RewardModelServeConfig:
    path: Optional[str] = None  # a trained scalar reward model (HF sequence classification)
    batch_size: int = 64  # sequences per forward in the reward actor
    # K reward models: the reward-model stage trains K (bootstrap resamples of the pairs, their
    # own seeds) and the reward actor serves their mean - uncertainty_coef * std (Coste et al. 2023)
    ensemble: int = 1
    uncertainty_coef: float = 0.0  # the pessimism where the members disagree; needs ensemble > 1


@dataclass
class RewardConfig:
    """reward = fn_weight * rule + model_weight * post(reward model), post = normalise, clip.

    The rule (`fn`, default the task's built-in reward) is always computed and logged as
    reward/rule_mean: with a reward model and fn_weight=0 it is the hidden gold score beside the
    learned reward (reward/model_mean) the policy is trained on.
    """

    # "path/to/file.py:fn" or "package.module:fn"; None = the task's built-in reward.
    # Signature: fn(prompts: list[str], completions: list[str], **fields) -> list[float]
    fn: Optional[str] = None
    model: RewardModelServeConfig = field(default_factory=RewardModelServeConfig)
    fn_weight: float = 1.0
    model_weight: float = 1.0
    normalize: bool = False  # running mean/std normalisation of the reward model's score
    clip: Optional[float] = None  # clip the (normalised) model score to +-clip; null = off
    timeout_s: float = 300.0
    # Score of a sample on which `fn` raises (the batch is then re-scored one sample at a time to
    # find them; each is printed and counted in reward/failed_samples). 0.0 = no credit, what a
    # wrong answer gets from the built-in tasks (rewards in [0, 1]); pick the low end of your
    # reward's range. null = skip the step instead. An fn that raises on every sample stops the run.
    fallback_score: Optional[float] = 0.0


@dataclass
class OptimConfig:
    lr: float = 3e-4  # RL wants ~10x less than SFT: 1e-3 made single Adam steps destructive
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    scheduler: str = "constant"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 10  # optimizer steps of linear LR warm-up
    min_lr_ratio: float = 0.1  # cosine/linear decay floor, as a fraction of lr


@dataclass
class CriticLoraConfig:
    """LoRA adapters on the PPO critic (rlhf_dist/models/lora.py): the value model's body frozen,
    its adapters and its value head trained."""

    rank: int = 0  # 0 = the critic trains every weight
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # [] = the architecture's default


@dataclass
class CriticOptimConfig(OptimConfig):
    lr: float = 1e-3  # a fresh value head must catch up quickly; the policy's lr is 10x lower


@dataclass
class AlgoConfig:
    """The RL algorithm. Each conf/algo/<name>.yaml is a preset of these fields (docs/algorithms.md)."""

    name: str = "grpo"  # a label for logs and checkpoints: the preset (conf/algo/) that filled this section
    advantage: str = "grpo"  # estimator in rlhf_dist.algo.advantages ("gae" needs the critic)
    policy_loss: str = "clipped"  # clipped (PPO, + dual-clip) | gspo (sequence-level ratio)
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_sum | seq_mean_token_mean | seq_mean_token_sum_norm
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    clip_ratio_c: Optional[float] = 3.0  # dual-clip bound for A < 0 (Ye et al. 2020); null = off; > 1
    # KL to the reference: in the reward (per-token penalty, InstructGPT) and/or as a loss term
    kl_coef: float = 0.01  # beta; 0 = no KL and no reference actor
    kl_in_reward: bool = False  # r_t -= beta * KL_t (estimator kl_reward_estimator)
    kl_in_loss: bool = True  # loss += beta * agg(KL_t) (estimator kl_loss_estimator)
    kl_reward_estimator: str = "k1"  # k1 (exact KL-regularised return) | k2 | k3
    kl_loss_estimator: str = "k3_st"  # k3_st (value k3, gradient of KL(pi||ref)) | k1 | k2 | k3 (docs/algorithms.md)
    kl_target: Optional[float] = None  # adaptive beta (Ziegler et al. 2019): target KL per sequence
    kl_horizon: int = 10000  # adaptive beta: samples over which beta moves by at most ~20%
    whiten_advantages: bool = False  # normalise advantages over the batch (PPO default: true)
    gamma: float = 1.0  # discount (gae, reinforce_pp)
    lam: float = 0.95  # GAE lambda
    ppo_epochs: int = 1  # passes over each rollout batch
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * agg(H(pi))
    # The learner recomputes log pi_old before its first update (verl/OpenRLHF) instead of using
    # the engine's sampling logprobs; then a truncated importance weight min(pi_old/pi_rollout,
    # tis_cap) corrects for engine/trainer numeric mismatch (null = no correction).
    recompute_old_logprobs: bool = False
    # Without the recompute, and with one optimizer step per batch (ppo_epochs=1 and
    # learner.mini_batch_size = prompts_per_step x n_samples_per_prompt), pi_old IS the policy being
    # trained: take log pi_old from the training forward itself, detached (ratio 1, no extra pass)
    # and weight the loss by min(pi_old / pi_rollout, tis_cap). On with trainer.async_rollout
    # (the engine's weights are one update behind) whatever this says; see old_logprobs_source.
    rollout_correction: bool = False
    tis_cap: Optional[float] = 2.0
    # SFT mix (InstructGPT's PPO-ptx): loss += sft_coef * NLL of sft_batch_size demonstrations per
    # mini-batch, in the same optimizer step. Demonstrations: sft.train_file, the recipe's SFT data,
    # or else the built-in task's. Keeps the policy near what it imitated where the reward model is blind.
    sft_coef: float = 0.0
    sft_batch_size: int = 16  # demonstrations per mini-batch, over learner.world_size ranks
    # DAPO (Yu et al. 2025; docs/reasoning.md). Dynamic sampling: a group whose rewards are all
    # equal has zero GRPO advantage, so it is dropped after scoring and new prompts are generated
    # until the step has trainer.prompts_per_step groups with signal, for at most
    # max_resample_rounds extra rounds (then the step trains on what it has; none: no update).
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3  # extra generation rounds after the first, each of prompts_per_step prompts
    # Soft overlong punishment: over the last overlong_buffer tokens before rollout.max_new_tokens
    # the reward falls linearly from 0 to -overlong_penalty (0 = off). Single-turn rollouts only.
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    mask_truncated: bool = False  # responses cut at rollout.max_new_tokens (no eos) are left out of the loss


@dataclass
class CriticConfig:
    """PPO's value model: its own DeepSpeed ranks, optimizer and ZeRO stage (used when the
    advantage estimator needs values, i.e. algo.advantage=gae)."""

    model_path: Optional[str] = None  # None = initialise from the policy (a reward model works too)
    world_size: int = 2  # DeepSpeed ranks of the critic, one Ray actor each
    zero_stage: int = 2
    micro_batch_size: Optional[int] = None  # per critic rank per forward/backward; None = learner's
    value_clip: Optional[float] = 0.2  # clip V - V_old to +-value_clip in the loss; null = off
    value_loss_coef: float = 1.0  # scales the value loss (matters with grad clipping)
    optim: CriticOptimConfig = field(default_factory=CriticOptimConfig)
    lora: CriticLoraConfig = field(default_factory=CriticLoraConfig)
    init_timeout_s: float = 600.0
    step_timeout_s: float = 1800.0


@dataclass
class LearnerConfig:
    world_size: int = 2  # DeepSpeed data-parallel ranks, one Ray actor each
    zero_stage: int = 2  # 0-3
    mini_batch_size: int = 128  # sequences per optimizer step (global, over all ranks)
    micro_batch_size: int = 64  # sequences per forward/backward on one rank
    # > 0: training micro-batches by padded tokens (rows x trimmed width) per rank instead of
    # micro_batch_size rows; rows grouped by length, so short responses do not pad to the longest.
    # Applies to the critic and to the reference actor's forward too. 0 = off.
    max_tokens_per_micro_batch: int = 0
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    optim: OptimConfig = field(default_factory=OptimConfig)
    init_timeout_s: float = 600.0
    step_timeout_s: float = 1800.0  # one train_step on all ranks


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None = start a local Ray; "auto" = join a running cluster
    device: str = "cpu"  # cpu | cuda
    num_cpus: Optional[int] = None  # local Ray only; None = all cores
    # Ray resources per actor. Fractional CPUs let every actor fit on a 2-core laptop; the phases
    # run one after another, so the actors rarely compete for the cores.
    cpus_per_engine: float = 0.3
    cpus_per_learner: float = 0.4
    cpus_per_critic: float = 0.3
    cpus_per_aux: float = 0.1  # reference and reward actors
    gpus_per_engine: float = 0.0
    gpus_per_learner: float = 0.0
    gpus_per_critic: float = 0.0
    gpus_per_aux: float = 0.0
    placement_timeout_s: float = 60.0  # waiting for resources before failing with a clear error
    # Joining a running cluster (address set): the head must answer and ray.init finish within
    # this, else the run stops with the address in the message (ray.init alone retries ~12 min).
    connect_timeout_s: float = 60.0
    # Custom Ray resources per actor of each role, e.g. cluster.engine_resources={node_b:1} with a
    # node started as `ray start --resources='{"node_b": 8}'`: pins engines, learners, ... to
    # chosen nodes. null = none. Typed Any, checked in validation: OmegaConf cannot set a whole
    # dict from the CLI into a typed dict field (an empty one is locked, a null one crashes).
    engine_resources: Any = None  # {resource name: amount per actor}
    learner_resources: Any = None  # warm-up/SFT/RM ranks too
    critic_resources: Any = None
    aux_resources: Any = None  # reference and reward actors
    # Model directories (rlhf_dist.runtime.files): paths under shared_dir are the same on every
    # node (NFS, a dir baked into the image) and are read in place; any other model dir goes to
    # actors on other nodes through Ray's object store, and weights saved by a learner rank on
    # another node come back to the driver. null = no shared filesystem assumed.
    shared_dir: Optional[str] = None
    # CPU nodes: cores of the engines and of the training side (learner and critic ranks,
    # reference), e.g. engine_cores=0 learner_cores=1, so that overlapped generation and training
    # (trainer.async_rollout) do not compete for cores; several engines split engine_cores equally.
    # null = all cores, shared by a group's
    # actors on the node (right when the phases run one after another). Ranges: "2-5", lists: "0,2".
    engine_cores: Optional[str] = None
    learner_cores: Optional[str] = None
    ship_models: bool = False  # copy through Ray even to actors on the driver's node (tests)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (default, no account) | online | disabled
    project: str = "rlhf_dist"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sample_every: int = 10  # steps between sample tables (W&B and samples.jsonl)
    num_samples: int = 8  # rows per sample table
    console: bool = True
    memory_every: int = 10  # steps between memory/<actor>_rss_mb metrics (every actor's RSS); 0 = never


@dataclass
class EvalConfig:
    """What an eval scores (in a run: at start, every trainer.eval_every steps, at the end; and
    `stage=eval` on any model). Every set gets a greedy pass and, with n > 0, n sampled responses
    per prompt: eval/<set>/greedy, greedy_solved, mean@n, pass@k, greedy_length, sampled_length
    (rlhf_dist/evaluation, docs/evaluation.md)."""

    # {name: {file, reward_fn, n, temperature, solved_threshold}}: sets beside `held_out` (the task's
    # held-out split with the run's reward, always evaluated; eval/reward_mean is its greedy score).
    # A set's reward_fn has reward.fn's signature; unset = the run's reward. Typed Any, checked in
    # validation: the CLI can then set the whole mapping, eval.sets={math: {file: m.jsonl}}.
    sets: Any = None
    n: int = 4  # sampled responses per prompt (a set's default); 0 = greedy only
    k: list[int] = field(default_factory=lambda: [1, 4])  # pass@k for each k (every k <= n)
    temperature: Optional[float] = None  # of the sampled pass; null = rollout.temperature
    solved_threshold: float = 1.0 - 1e-6  # solved: rule (gold) score >= this (exact-correct rewards of 1)


@dataclass
class TrainerConfig:
    total_steps: int = 200
    prompts_per_step: int = 96  # prompts per rollout batch; sequences = prompts x n_samples
    eval_every: int = 50  # held-out eval every N steps (plus at start and end); 0 = start/end only
    seed: int = 0
    run_dir: str = "."  # set by conf/config.yaml to Hydra's run directory
    save_final: bool = False  # write the final policy (HF format) into run_dir/final
    # keep the policy of the best eval (rlhf_dist/rl/keep_best.py): an eval metric to maximise, e.g.
    # eval/rule_mean (the gold/rule score) or eval/model_mean; it goes to run_dir/best and is
    # exported as run_dir/final. null = off (final/ is the last policy, with save_final)
    keep_best: Optional[str] = None
    kl_budget: Optional[float] = None  # keep_best: evals past this KL to the reference (nats/seq) are not kept
    # checkpoints (rlhf_dist/checkpoint.py): every save_every steps and at the end; 0 = never
    save_every: int = 50
    keep_last: int = 2  # complete checkpoints kept; older ones go once a newer one is whole
    checkpoint_dir: Optional[str] = None  # None = <run_dir>/checkpoints; shared storage on several nodes
    # HF-format policy (weights, config, tokenizer: what model.path and stage=eval take) to
    # run_dir/exports/step_N every export_every steps and at the end; 0 = never. Written complete or
    # absent like checkpoints; the newest keep_exports stay (0 = all).
    export_every: int = 0
    keep_exports: int = 2
    resume: Optional[str] = None  # null | auto (newest complete checkpoint of the run) | a checkpoint path
    max_bad_steps: int = 3  # non-finite loss/gradient: skip the update; this many in a row stop the run
    max_engine_restarts: int = 3  # a dead rollout engine is replaced and the phase retried, this often per run
    max_aux_restarts: int = 3  # the same for a dead reward or reference actor (they hold no training state)
    # engines generate batch k+1 while the learner trains on batch k (one batch in flight). A resumed
    # run is then not bit-exact: the batch after the checkpoint is regenerated with newer weights.
    # (one batch in flight: each batch from step 2 on is exactly one policy update stale)
    async_rollout: bool = False


@dataclass
class SFTStageConfig:
    """stage=sft (and the first stage of stage=full_recipe)."""

    train_file: Optional[str] = None  # {prompt, completion} or {messages} records; full_recipe: built in
    eval_frac: float = 0.1  # share of the records held out for the held-out loss
    steps: int = 200
    batch_size: int = 32  # sequences per optimizer step, over learner.world_size ranks
    micro_batch_size: int = 16
    lr: float = 3e-3  # decays linearly to 0.1 x lr
    eval_every: int = 50
    on_bad: str = "error"  # error | skip: what a malformed record does


@dataclass
class RewardModelStageConfig:
    """stage=reward_model (and the second stage of stage=full_recipe)."""

    train_files: list[str] = field(default_factory=list)  # pair and/or ranking records
    eval_file: Optional[str] = None  # held-out pairs (accuracy, margin)
    init_path: Optional[str] = None  # None = model.path (full_recipe: the SFT model)
    steps: int = 300
    batch_size: int = 64  # pairs per optimizer step, over learner.world_size ranks
    micro_batch_size: int = 32
    lr: float = 1e-3
    eval_every: int = 100
    on_bad: str = "error"


@dataclass
class RecipeDataConfig:
    """The built-in preference source (rlhf_dist.data.preference_source) used by full_recipe."""

    num_prompts: int = 512  # ranked demonstrations (one ranking per prompt) and SFT records
    num_pairs: int = 2048  # noisy Bradley-Terry pairwise preferences
    error_levels: list[int] = field(default_factory=lambda: [2, 3, 4])  # demonstrator's errors
    beta: float = 10.0  # label noise: P(a > b) = sigmoid(beta * (gold(a) - gold(b)))
    # the demonstrator's systematic error: the answer's last letter written as the next letter of
    # the alphabet, with this probability (0 = off). Imitation learns it; only preferences fix it.
    bias: float = 0.0
    seed: int = 0
    rm_init: str = "sft"  # the reward model starts from: sft (the SFT model) | base (model.path)


@dataclass
class RLConfig:
    stage: str = "rl"  # rl | sft | reward_model | full_recipe (SFT -> reward model -> RL) | eval (no training)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    reward_model: RewardModelStageConfig = field(default_factory=RewardModelStageConfig)
    recipe: RecipeDataConfig = field(default_factory=RecipeDataConfig)


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` is type-checked against it."""
    cs = ConfigStore.instance()
    cs.store(name="rl_schema", node=RLConfig)


def uses_critic(cfg: Any) -> bool:
    """An estimator that needs state values (its registry entry says so: gae) needs a critic."""
    from rlhf_dist.algo import estimator_needs

    return estimator_needs(cfg.algo.advantage).values


def critic_micro_batch_size(cfg: Any) -> int:
    return cfg.critic.micro_batch_size or cfg.learner.micro_batch_size


def old_logprobs_source(cfg: Any) -> str:
    """Where the policy loss takes log pi_old from, and so what the TIS weights (algo.tis_cap) compare
    with the engine's sampling logprobs:

        recomputed  a learner forward pass before the first update (algo.recompute_old_logprobs)
        current     the training forward itself, detached: exact with one optimizer step per batch
                    (algo.rollout_correction, or trainer.async_rollout without the recompute)
        rollout     the engine's sampling logprobs themselves: no correction
    """
    if cfg.algo.recompute_old_logprobs:
        return "recomputed"
    if cfg.algo.rollout_correction or cfg.trainer.async_rollout:
        return "current"
    return "rollout"


def response_budget(cfg: Any) -> int:
    """Most response tokens of one sample: an episode's budget with rollout.env, else one completion's."""
    return cfg.rollout.max_episode_tokens if cfg.rollout.env else cfg.rollout.max_new_tokens


def uses_reference(cfg: Any) -> bool:
    return cfg.algo.kl_coef > 0 and (cfg.algo.kl_in_reward or cfg.algo.kl_in_loss)


def uses_reference_actor(cfg: Any) -> bool:
    """A reference is needed and is not the learner's own base model (LoRA, model.lora.reference_from_base)."""
    return uses_reference(cfg) and not (cfg.model.lora.rank > 0 and cfg.model.lora.reference_from_base)
