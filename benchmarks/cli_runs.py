"""One `rlhf-dist` run of a benchmark, as a subprocess of this Python, logged beside its run dir
and skipped when its run dir already holds a summary (a benchmark re-run reuses finished runs)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_once(run_dir: Path, args: list[str]) -> None:
    """`rlhf-dist <args>` into `run_dir` (the args must point trainer/hydra there) unless done."""
    if (run_dir / "summary.json").exists():
        return
    print("  $ rlhf-dist " + " ".join(args), flush=True)
    start = time.perf_counter()
    log_path = run_dir.parent / f"{run_dir.name}.log"
    with log_path.open("w") as log:
        done = subprocess.run([sys.executable, "-m", "rlhf_dist.main", *args], stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}); see {log_path}")
    print(f"    done in {time.perf_counter() - start:.0f} s", flush=True)


def metrics(run_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """The run's step rows, eval rows and summary."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/solved_frac" in r]
    return steps, evals, json.loads((run_dir / "summary.json").read_text())
