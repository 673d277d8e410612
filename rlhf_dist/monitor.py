"""Run monitoring: metrics.jsonl (always), W&B (offline by default), a console line per step."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


def check_wandb_credentials(mode: str) -> None:
    """`logger.wandb.mode=online` needs a W&B key; say so before any actor starts.

    Looks where wandb itself looks: WANDB_API_KEY (or WANDB_IDENTITY_TOKEN_FILE), then the
    netrc entry that `wandb login` writes for the server (WANDB_BASE_URL, default api.wandb.ai).
    """
    import netrc
    import os
    from urllib.parse import urlparse

    from rlhf_dist.errors import ConfigError

    if mode != "online" or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for path in map(os.path.expanduser, paths):
        try:
            entry = netrc.netrc(path).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            continue
        if entry and entry[2]:
            return
    raise ConfigError(
        f"logger.wandb.mode=online needs a W&B API key, and none was found (no WANDB_API_KEY in the "
        f"environment, no entry for {host} in {' or '.join(paths)}). Fix: run `wandb login` or "
        "export WANDB_API_KEY=..., or log without an account: logger.wandb.mode=offline "
        "(upload later with `wandb sync`).")


class RunMonitor:
    def __init__(self, run_dir: str, wandb_mode: str, project: str, entity: str | None,
                 name: str | None, tags: list[str], config: dict, total_steps: int,
                 console: bool = True, resume_step: int | None = None, wandb_id: str | None = None) -> None:
        """`resume_step`: continuing a run from its checkpoint of that step; lines logged after it
        (by the run that died) are dropped, so metrics.jsonl has each step once. `wandb_id`: the
        W&B run to continue."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for name in ("metrics.jsonl", "samples.jsonl"):
                _truncate_after(self.run_dir / name, resume_step)
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.samples_file = open(self.run_dir / "samples.jsonl", "a", buffering=1)
        self.total_steps = total_steps
        self.console = console
        self.start = time.perf_counter()
        self.wandb = None
        if wandb_mode != "disabled":
            import wandb

            from rlhf_dist.redact import redact_text, redacted_argv

            with redacted_argv():  # the run's metadata records the command line, its name and tags
                self.wandb = wandb.init(
                    mode=wandb_mode, project=project, entity=entity,
                    name=redact_text(name) if name else name, tags=[redact_text(str(t)) for t in tags],
                    config=config, dir=str(self.run_dir), reinit="finish_previous",
                    **({"id": wandb_id, "resume": "allow"} if wandb_id else {}),
                )

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def history(self) -> list[dict[str, Any]]:
        """Every metrics.jsonl line so far (a resumed run's summary covers the whole run)."""
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        """One line of metrics.jsonl, mirrored to W&B."""
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.metrics_file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._record(step, metrics)
        if self.console and "reward/mean" in metrics:
            self.print(format_step_line(step, self.total_steps, metrics))

    def log_eval(self, step: int, metrics: dict[str, float], shown: list[str] | None = None) -> None:
        """Record every metric; the console line shows `shown` (None: all)."""
        self._record(step, metrics)
        if self.console:
            parts = " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                               if isinstance(v, float) and (shown is None or k in shown))
            self.print(f"[eval] step {step:>4} | {parts}")

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.samples_file.write(json.dumps({"step": step, **row}) + "\n")
        if self.wandb is not None and rows:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=["step", *columns],
                                data=[[step, *[row[c] for c in columns]] for row in rows])
            self.wandb.log({"samples": table}, step=step)

    def print(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)

    def finish(self, summary: dict[str, Any]) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.wandb is not None:
            for key, value in summary.items():
                if isinstance(value, (int, float, str)):
                    self.wandb.summary[key] = value
            self.wandb.finish()
        self.metrics_file.close()
        self.samples_file.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep only the lines of a jsonl log whose "step" is at most `step` (atomic rewrite)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def format_step_line(step: int, total: int, m: dict[str, float]) -> str:
    dynamic = ""  # algo.dynamic_sampling: groups kept, in how many generation rounds
    if "dynamic/rounds" in m:
        dynamic = f"| kept {m['dynamic/kept_groups']:.0f} groups in {m['dynamic/rounds']:.0f} round(s) "
    return (
        f"step {step:>4}/{total} | reward {m['reward/mean']:.3f} ±{m['reward/std']:.3f} {dynamic}"
        f"| kl {m.get('kl/mean', 0.0):.4f} | loss {m.get('loss/policy', 0.0):+.4f} "
        f"| len {m['response/length_mean']:.1f} | gen {m['timing/generate_s']:.1f}s "
        f"score {m['timing/score_s']:.1f}s train {m['timing/train_s']:.1f}s "
        f"sync {m['timing/sync_s']:.2f}s | {m['throughput/tokens_per_s']:.0f} tok/s"
    )


def format_summary(summary: dict[str, Any]) -> str:
    rows = [(k, v) for k, v in summary.items() if not isinstance(v, (dict, list))]
    width = max(len(k) for k, _ in rows)
    lines = ["", "=" * (width + 24), "run summary", "-" * (width + 24)]
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    lines.append("=" * (width + 24))
    if summary.get("eval_sets"):
        lines += ["", format_sets_table(summary["eval_sets"])]
    return "\n".join(lines)


def format_sets_table(table: dict[str, dict[str, float]]) -> str:
    """{set: {statistic: value}} as a table, one row per eval set (the last eval of a run, or stage=eval)."""
    columns = list(dict.fromkeys(key for row in table.values() for key in row))
    width = max(len("eval set"), *(len(name) for name in table))
    header = f"{'eval set':<{width}}  " + "  ".join(f"{c:>14}" for c in columns)
    rows = [f"{name:<{width}}  " + "  ".join(
        f"{row[c]:>14.4g}" if isinstance(row.get(c), float) else f"{'-':>14}" for c in columns)
        for name, row in table.items()]
    return "\n".join([header, "-" * len(header), *rows])


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
