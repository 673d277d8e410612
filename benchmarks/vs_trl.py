"""rlhf_dist against TRL's GRPOTrainer, side by side, plus every phase of a step standalone.

    python benchmarks/vs_trl.py                                  # tiny model, fixed lengths
    python benchmarks/vs_trl.py --model 100m --lengths fixed     # 113M parameters, 64 x 64 tokens
    python benchmarks/vs_trl.py --model 100m --lengths natural   # brevity reward: lengths vary
    python benchmarks/vs_trl.py --model 100m --dtype bfloat16 -- trainer.async_rollout=true

Both systems get the same policy (built offline by rlhf_dist.models.tiny), prompts (the built-in
`reverse` task), reward function (benchmarks/vs_trl_rewards.py), prompts per step, completions per
prompt, max new tokens, learning rate (constant, no warm-up), KL coefficient (0.04, k3 in the
loss), one optimizer step per batch, precision and number of steps. Each side runs in its own
process, one after the other, so they never share the cores:

    ours   rlhf_dist's job (Ray, vLLM engine, reference actor, DeepSpeed ranks) via run_rl
    trl    trl.GRPOTrainer(use_cpu=True): HF generate, reference and training in one process
    parts  the same work done by each library directly, one phase at a time, in two processes:
           vLLM generating the step's prompts and reloading every weight in place (sync);
           transformers running a forward over the step's sequences (reference) and forward +
           backward + AdamW step (train)

Fixed lengths (`--lengths fixed`, reward letter_a) make every response max_new_tokens long on
both sides (vLLM ignore_eos, HF min_new_tokens), so both do the same work; natural lengths
(`--lengths natural`, reward brevity) let each side stop at EOS. Throughput counts generated
tokens, steps after the first (warm-up) only. Prints a table, writes JSON and a PNG
(benchmarks/results/vs_trl_<model>_<lengths>_<dtype>[_<tag>].{json,png}). TRL is a
benchmark-only dependency: `pip install -e .[bench]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
REWARDS = ROOT / "benchmarks" / "vs_trl_rewards.py"
# ~100M: hidden 768, 12 layers, 12 heads of 64, MLP 3072 (the 113M Qwen2)
MODELS = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2),
    "100m": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
}
PHASES = ("generate", "score", "train", "sync")


@dataclass
class Settings:
    model_dir: str
    lengths: str = "fixed"  # fixed | natural
    steps: int = 5
    prompts: int = 8
    n: int = 8
    max_new_tokens: int = 64
    lr: float = 1e-5
    beta: float = 0.04
    temperature: float = 1.0
    dtype: str = "float32"
    seed: int = 0
    overrides: list[str] = field(default_factory=list)  # extra Hydra overrides for our side
    trl_vllm: bool = False  # TRL generates with vLLM (vllm_mode="colocate") instead of HF generate

    @property
    def reward(self) -> str:
        return "letter_a" if self.lengths == "fixed" else "brevity"

    def records(self) -> list[dict]:
        from rlhf_dist.data.tasks import get_task

        return get_task("reverse").make_records("train", 512, self.seed)


# ---------------------------------------------------------------------------- sides


def side_ours(s: Settings) -> dict:
    import psutil
    from hydra import compose, initialize_config_dir

    from rlhf_dist.session import conf_dir
    from rlhf_dist.stages.rl import run_rl

    run_dir = tempfile.mkdtemp(prefix="vs_trl_ours_")
    world_size = int(next((o.split("=", 1)[1] for o in s.overrides if o.startswith("learner.world_size=")), 2))
    overrides = [
        f"model.path={s.model_dir}", f"model.dtype={s.dtype}", f"rollout.dtype={s.dtype}",
        "warmup.steps=0", f"trainer.total_steps={s.steps}", f"trainer.prompts_per_step={s.prompts}",
        f"rollout.n_samples_per_prompt={s.n}", f"rollout.max_new_tokens={s.max_new_tokens}",
        f"rollout.ignore_eos={s.lengths == 'fixed'}", f"rollout.temperature={s.temperature}",
        f"learner.optim.lr={s.lr}", "learner.optim.warmup_steps=0", "learner.optim.scheduler=constant",
        f"algo.kl_coef={s.beta}", "algo.kl_loss_estimator=k3", f"learner.mini_batch_size={s.prompts * s.n}",
        f"learner.micro_batch_size={s.prompts * s.n // world_size}",  # one forward per rank
        f"reward.fn={REWARDS}:{s.reward}", "trainer.eval_every=0", "task.num_eval=8",
        "trainer.save_every=0", f"trainer.run_dir={run_dir}", "logger.wandb.mode=disabled",
        f"trainer.seed={s.seed}", f"rollout.seed={s.seed}", *s.overrides]
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    begin = time.perf_counter()
    summary = run_rl(cfg)
    # process start -> actors ready: interpreter and imports, ray.init and checks before the
    # trainer starts (run_rl's time outside fit, which also counts the shutdown: an upper bound),
    # then the actors' own start-up
    before_run = time.time() - psutil.Process().create_time() - (time.perf_counter() - begin)
    outside_fit = time.perf_counter() - begin - summary["total_s"]
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "timing/step_s" in r]
    steps = [{"step_s": r["timing/step_s"], "tokens": r["response/length_mean"] * s.prompts * s.n,
              "reward": r["reward/mean"], "length": r["response/length_mean"], "kl": r.get("kl/mean"),
              **{f"{p}_s": r[f"timing/{p}_s"] for p in PHASES},
              **{k.split("/")[-1]: r[k] for k in r if k in (
                  "timing/generate_hidden_s", "async/staleness") or "mismatch" in k or "is_" in k}} for r in rows]
    return {"steps": steps, "startup_s": summary["startup_s"], "overrides": overrides,
            "process_to_ready_s": before_run + outside_fit + summary["startup_s"],
            "startup_parts": {k: v for k, v in summary.items() if k.startswith("startup/")}}


def side_trl(s: Settings) -> dict:
    import psutil
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(REWARDS.parent))
    import vs_trl_rewards

    start = time.perf_counter()
    process_start = time.time() - psutil.Process().create_time()
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_pretrained(s.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(s.model_dir)
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in s.records()])
    fixed = s.lengths == "fixed"
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vs_trl_trl_"), use_cpu=True, bf16=s.dtype == "bfloat16",
        per_device_train_batch_size=s.prompts * s.n, gradient_accumulation_steps=1,
        num_generations=s.n, max_completion_length=s.max_new_tokens, temperature=s.temperature,
        learning_rate=s.lr, lr_scheduler_type="constant", warmup_steps=0, beta=s.beta,
        num_iterations=1, max_steps=s.steps, logging_steps=1, report_to="none", save_strategy="no",
        seed=s.seed, disable_dropout=True, dataloader_num_workers=0,
        generation_kwargs={"min_new_tokens": s.max_new_tokens} if fixed else None,
        **(dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1,
                vllm_max_model_length=256 + s.max_new_tokens) if s.trl_vllm else {}))

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps, self.logs, self.begin, self.train_begin = [], [], 0.0, None

        def on_train_begin(self, *a, **k):
            self.train_begin = time.perf_counter()

        def on_step_begin(self, *a, **k):
            self.begin = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.steps.append(time.perf_counter() - self.begin)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs))

    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=getattr(vs_trl_rewards, s.reward), args=args,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    steps = [{"step_s": t, "tokens": log["completions/mean_length"] * s.prompts * s.n,
              "reward": log["reward"], "length": log["completions/mean_length"], "kl": log.get("kl")}
             for t, log in zip(timer.steps, timer.logs)]
    return {"steps": steps, "startup_s": timer.train_begin - start, "threads": torch.get_num_threads(),
            "process_to_ready_s": process_start + timer.train_begin - start}


def _timed(fn, repeats=2):
    """(fastest of `repeats` timed calls, the result); the first call warms up and is not timed."""
    result, best = fn(), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _step_prompts(s: Settings, tokenizer) -> list[list[int]]:
    return [tokenizer(r["prompt"])["input_ids"] for r in s.records()[: s.prompts]]


def side_parts_engine(s: Settings) -> dict:
    """vLLM alone (in this process, all cores): the step's generation, then an in-place reload of
    every weight (the floor of a weight sync: no transport, no verification)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: reload below
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt

    from rlhf_dist.weights.engine_weights import keep_cpu_linear_weights, refresh_cpu_gemm_handles

    keep_cpu_linear_weights()
    prompts = _step_prompts(s, AutoTokenizer.from_pretrained(s.model_dir))
    llm = LLM(model=s.model_dir, dtype=s.dtype, enforce_eager=True, gpu_memory_utilization=0.1,
              max_model_len=256 + s.max_new_tokens, seed=s.seed, enable_prefix_caching=False)
    params = SamplingParams(n=s.n, temperature=s.temperature, max_tokens=s.max_new_tokens,
                            ignore_eos=True, logprobs=0)
    generate_s, outputs = _timed(lambda: llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                                      params, use_tqdm=False))
    dtype = getattr(torch, s.dtype)
    weights = [(name, t.to(dtype)) for name, t in load_file(Path(s.model_dir, "model.safetensors")).items()]

    def reload(worker):
        worker.model_runner.reload_weights(weights_iterator=iter(weights))
        refresh_cpu_gemm_handles(worker.model_runner.model)

    sync_s, _ = _timed(lambda: llm.collective_rpc(reload))
    return {"generate_s": generate_s, "sync_s": sync_s,
            "tokens": sum(len(c.token_ids) for out in outputs for c in out.outputs)}


def side_parts_hf(s: Settings) -> dict:
    """transformers + torch alone (in this process, all cores): a reference forward over the
    step's sequences, and a training step (forward, backward, AdamW) over the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(s.model_dir)
    prompts = _step_prompts(s, tokenizer)
    generator = torch.Generator().manual_seed(s.seed)
    sequences = [p + torch.randint(3, len(tokenizer), (s.max_new_tokens,), generator=generator).tolist()
                 for p in prompts for _ in range(s.n)]  # the step's shape: n responses per prompt
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):  # left-padded like a generation batch
        ids[i, width - len(seq):], mask[i, width - len(seq):] = torch.tensor(seq), 1
    targets = ids[:, width - s.max_new_tokens:]  # (B, T)
    dtype = getattr(torch, s.dtype)

    def token_logprobs(model):  # logits of the response positions only, as any trainer would ask
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=s.max_new_tokens + 1).logits
        logprobs = torch.log_softmax(logits[:, :-1].float() / s.temperature, -1)  # (B, T, V)
        return logprobs.gather(-1, targets[..., None]).squeeze(-1)

    reference = AutoModelForCausalLM.from_pretrained(s.model_dir, dtype=dtype).eval()
    with torch.no_grad():
        reference_s, _ = _timed(lambda: token_logprobs(reference))
    del reference
    policy = AutoModelForCausalLM.from_pretrained(s.model_dir, dtype=dtype).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=s.lr)
    advantages = torch.randn(len(sequences), 1, generator=generator)

    def train_step():
        loss = -(token_logprobs(policy) * advantages).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_s, _ = _timed(train_step)
    return {"reference_s": reference_s, "train_s": train_s, "sequences": len(sequences),
            "threads": torch.get_num_threads()}


SIDES = {"ours": side_ours, "trl": side_trl, "parts_engine": side_parts_engine, "parts_hf": side_parts_hf}


# ---------------------------------------------------------------------------- driver


def run_side(name: str, s: Settings) -> dict:
    """One side in a fresh process (`--side`), so sides never share the cores or imports."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "side.json")
        start = time.perf_counter()
        cmd = [sys.executable, __file__, "--side", name, "--settings", json.dumps(asdict(s)), "--out", str(out)]
        print(f"\n[vs_trl] running {name} ...", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0:
            return {"error": f"exit code {proc.returncode}", "wall_s": time.perf_counter() - start}
        result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def steady(result: dict) -> dict:
    """Per-step means over the steps after the first (the first warms kernels and caches)."""
    rows = result["steps"][1:] or result["steps"]
    total_s = sum(r["step_s"] for r in rows)
    out = {"step_s": total_s / len(rows), "tokens_per_s": sum(r["tokens"] for r in rows) / total_s,
           "length": sum(r["length"] for r in rows) / len(rows),
           "reward_first": result["steps"][0]["reward"], "reward_last": result["steps"][-1]["reward"]}
    for phase in (*PHASES, "generate_hidden"):
        if f"{phase}_s" in rows[0]:
            out[f"{phase}_s"] = sum(r[f"{phase}_s"] for r in rows) / len(rows)
    return out


def summarize(s: Settings, results: dict) -> dict:
    summary = {}
    for name in ("ours", "trl"):
        if name in results and "steps" in results[name]:
            summary[name] = {**steady(results[name]), "startup_s": results[name]["startup_s"],
                             "process_to_ready_s": results[name]["process_to_ready_s"],
                             "wall_s": results[name]["wall_s"]}
    parts = results.get("parts", {})
    if "train_s" in parts:
        parts["sum_s"] = sum(parts[k] for k in ("generate_s", "reference_s", "train_s", "sync_s"))
        summary["parts"] = parts
        if "ours" in summary and s.lengths == "fixed":
            summary["ours"]["step_over_parts"] = summary["ours"]["step_s"] / parts["sum_s"]
    if "ours" in summary and "trl" in summary:
        summary["tokens_per_s_ratio"] = summary["ours"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
        summary["step_s_ratio"] = summary["trl"]["step_s"] / summary["ours"]["step_s"]
    if "ours" in summary and "sync_s" in summary["ours"]:
        summary["ours"]["sync_frac"] = summary["ours"]["sync_s"] / summary["ours"]["step_s"]
    return summary


def print_table(s: Settings, summary: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"{'':<8}{'s/step':>9}{'tok/s':>9}{'len':>7}{'reward 1st->last':>20}{'ready s':>9}{'(process)':>10}")
    for name in ("ours", "trl"):
        if name in summary:
            r = summary[name]
            print(f"{name:<8}{r['step_s']:>9.2f}{r['tokens_per_s']:>9.1f}{r['length']:>7.1f}"
                  f"{r['reward_first']:>10.3f} -> {r['reward_last']:.3f}{r['startup_s']:>9.1f}"
                  f"{r['process_to_ready_s']:>10.1f}")
    if "tokens_per_s_ratio" in summary:
        print(f"tokens/s ours / TRL: {summary['tokens_per_s_ratio']:.2f}x   "
              f"(step time TRL / ours: {summary['step_s_ratio']:.2f}x)")
    if "ours" in summary and "generate_s" in summary["ours"]:
        o = summary["ours"]
        print("ours per phase: " + ", ".join(f"{p} {o[f'{p}_s']:.2f}s" for p in PHASES)
              + f", other {o['step_s'] - sum(o[f'{p}_s'] for p in PHASES):.2f}s; sync share {o['sync_frac']:.1%}")
    if "parts" in summary:
        p = summary["parts"]
        print(f"standalone parts ({p['sequences']} x {s.max_new_tokens} tokens, {p['threads']} threads): "
              f"generate {p['generate_s']:.2f}s, reference {p['reference_s']:.2f}s, train {p['train_s']:.2f}s, "
              f"sync {p['sync_s']:.2f}s, sum {p['sum_s']:.2f}s")
        if "step_over_parts" in summary.get("ours", {}):
            print(f"our step / sum of parts: {summary['ours']['step_over_parts']:.2f}x (target <= 1.15x)")


def plot(s: Settings, results: dict, summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"generate": "#4C72B0", "score": "#DD8452", "train": "#55A868", "sync": "#C44E52", "idle": "#BBBBBB"}
    if "ours" in results and "steps" in results["ours"]:
        rows = results["ours"]["steps"]
        bottom = [0.0] * len(rows)
        xs = range(1, len(rows) + 1)
        for phase in (*PHASES, "idle"):
            values = ([r["step_s"] - sum(r[f"{p}_s"] for p in PHASES) for r in rows] if phase == "idle"
                      else [r[f"{phase}_s"] for r in rows])
            left.bar(xs, values, bottom=bottom, color=colors[phase], label=phase)
            bottom = [b + v for b, v in zip(bottom, values)]
        if "trl" in results and "steps" in results["trl"]:
            left.plot(range(1, len(results["trl"]["steps"]) + 1), [r["step_s"] for r in results["trl"]["steps"]],
                      "k--o", label="TRL step")
        left.set_xlabel("step")
        left.set_ylabel("seconds")
        left.set_title("rlhf_dist phases per step")
        left.legend(fontsize=8)
    names, values = [], []
    for name in ("ours", "trl"):
        if name in summary:
            names.append({"ours": "rlhf_dist", "trl": "TRL GRPOTrainer"}[name])
            values.append(summary[name]["tokens_per_s"])
    bars = right.bar(names, values, color=["#4C72B0", "#999999"][: len(values)])
    right.bar_label(bars, fmt="%.1f")
    right.set_ylabel("generated tokens / s (steps 2+)")
    right.set_title("end-to-end throughput")
    save_figure(fig, title, path)


def save_figure(fig, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def job_arguments(doc: str, model: str, steps: int) -> argparse.ArgumentParser:
    """The options that fix the job both sides run (also benchmarks/vs_trl_learning.py)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default=model)
    parser.add_argument("--lengths", choices=("fixed", "natural"), default="fixed")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=steps)
    return parser


def main() -> None:
    parser = job_arguments(__doc__, "tiny", 5)
    parser.add_argument("--sides", default="ours,trl,parts", help="comma-separated: ours, trl, parts")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--trl-vllm", action="store_true", help="TRL generates with vLLM (colocate mode)")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for our side, after --")
    args = parser.parse_args()
    if args.side:
        result = SIDES[args.side](Settings(**json.loads(args.settings)))
        Path(args.out).write_text(json.dumps(result))
        return

    from rlhf_dist.models.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model(Path("~/.cache/rlhf_dist/models").expanduser() / f"vs_trl_{args.model}",
                                  **MODELS[args.model])
    s = Settings(model_dir=str(model_dir), lengths=args.lengths, steps=args.steps, dtype=args.dtype,
                 overrides=args.overrides, trl_vllm=args.trl_vllm)
    results = {}
    for name in args.sides.split(","):  # each standalone part in its own process
        results[name] = ({**run_side("parts_engine", s), **run_side("parts_hf", s)} if name == "parts"
                         else run_side(name, s))
    summary = summarize(s, results)
    title = (f"vs TRL: {args.model} model, {s.prompts} prompts x {s.n} completions, <= {s.max_new_tokens} new "
             f"tokens ({args.lengths} lengths), {s.dtype}, {s.steps} steps, {os.cpu_count()} cores"
             + (f", ours: {' '.join(args.overrides)}" if args.overrides else ""))
    print_table(s, summary, title)
    stem = f"vs_trl_{args.model}_{args.lengths}_{args.dtype}" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"settings": asdict(s), "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
         "summary": summary, "results": results}, indent=1))
    try:
        plot(s, results, summary, RESULTS / f"{stem}.png", title)
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e .[bench])")
    print(f"wrote {RESULTS / stem}.json and .png")


if __name__ == "__main__":
    main()
