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


def write_results(path: Path, overrides: list[str], results: list[dict], table) -> None:
    """The runs' results as JSON at `path`, and their `table(results)` printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"overrides": overrides, "runs": results}, indent=1) + "\n")
    print(table(results))
    print(f"wrote {path}")


def print_saved(path: Path, table) -> None:
    """`--from-json`: the table of results written earlier."""
    print(table(json.loads(path.read_text())["runs"]))


def add_run_args(parser, out: str) -> None:
    """The arguments every run-based benchmark takes: where runs go, a saved table, overrides."""
    parser.add_argument("--out", type=Path, default=Path(out), help="run dirs (finished runs are reused)")
    parser.add_argument("--from-json", type=Path, help="print the table of a results JSON and stop")
    parser.add_argument("overrides", nargs="*", help="extra rlhf-dist overrides for every run")
