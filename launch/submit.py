#!/usr/bin/env python3
"""Submit an rlhf-dist run to a Ray cluster: a thin wrapper around `ray job submit`.

    python launch/submit.py --address http://HEAD:8265 -- cluster=multinode trainer.total_steps=200
    python launch/submit.py --env WANDB_API_KEY -- cluster=multinode logger=wandb_online
    python launch/submit.py --no-wait --submission-id rl-001 -- cluster=multinode
    python launch/submit.py --logs rl-001          # follow a job's output
    python launch/submit.py --stop rl-001          # stop it

Everything after `--` is passed to `rlhf-dist` unchanged (Hydra overrides). The job runs
`python -m rlhf_dist.main <overrides>` in a copy of this repository uploaded with the job
(`--working-dir`, default: the repository this script is in; files in .gitignore stay behind),
or `rlhf-dist <overrides>` from the package installed on the cluster (`--no-working-dir`, e.g. in
the docker/ image). `--env NAME` copies NAME from your environment into the job's; values are
never printed (`NAME=***`) and reach `ray job submit` through a private temp file, not argv.
Without --no-wait it follows the job's logs and exits with the job's status, like `ray job submit`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# never uploaded with the job (besides what .gitignore lists, which Ray leaves out itself)
EXCLUDES = [".git", ".venv", "runs", "outputs", "multirun", "wandb", "bench_results", "*.whl"]


class Parser(argparse.ArgumentParser):
    """argparse whose errors name the bad argument and list every valid flag."""

    def error(self, message: str) -> None:
        flags = sorted({s for a in self._actions for s in a.option_strings if s.startswith("--")})
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\nvalid flags: {', '.join(flags)}\n"
                         "Hydra overrides for rlhf-dist go after `--`, e.g. "
                         "`-- cluster=multinode trainer.total_steps=200`.\n")
        sys.exit(2)


def build_parser() -> Parser:
    parser = Parser(prog="submit.py", description=__doc__.split("\n\n")[0],
                    usage="%(prog)s [flags] -- [rlhf-dist overrides ...]\n"
                          "       %(prog)s --logs JOB_ID | --stop JOB_ID | --status JOB_ID")
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS")
                        or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
                        help="the cluster's dashboard (job API) address; default $RAY_API_SERVER_ADDRESS, "
                             f"$RAY_ADDRESS or {DEFAULT_ADDRESS}")
    code = parser.add_mutually_exclusive_group()
    code.add_argument("--working-dir", default=str(REPO),
                      help="directory uploaded with the job and run from (default: this repository)")
    code.add_argument("--no-working-dir", action="store_true",
                      help="upload nothing; run the rlhf-dist installed on the cluster")
    parser.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help="environment variable for the job, from your environment unless "
                             "=VALUE is given (repeatable); printed as NAME=***")
    parser.add_argument("--python", default="python",
                        help="the Python the job runs with --working-dir, on the head node (default: python)")
    parser.add_argument("--submission-id", help="the job's id (default: Ray picks one)")
    parser.add_argument("--no-wait", action="store_true", help="return once submitted; do not follow logs")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the ray command and the runtime env (values masked), run nothing")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--logs", metavar="JOB_ID", help="follow the logs of a submitted job")
    action.add_argument("--stop", metavar="JOB_ID", help="stop a submitted job")
    action.add_argument("--status", metavar="JOB_ID", help="print a submitted job's status")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's flags, the overrides after the first `--`)."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def job_env(specs: list[str], parser: Parser) -> dict[str, str]:
    env = {}
    for spec in specs:
        name, has_value, value = spec.partition("=")
        if not name.isidentifier():
            parser.error(f"--env {spec!r}: expected NAME or NAME=VALUE")
        if not has_value:
            if name not in os.environ:
                parser.error(f"--env {name}: {name} is not set in your environment "
                             f"(export it, or pass --env {name}=VALUE)")
            value = os.environ[name]
        env[name] = value
    return env


def ray_cli() -> list[str]:
    """The `ray` next to this Python (a venv), else on PATH."""
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ray")
    if found is None:
        sys.exit("error: the `ray` command is not installed here (pip install 'ray[default]').")
    return [found]


def check_reachable(address: str, timeout_s: float = 10.0) -> str | None:
    """None if a Ray dashboard answers at `address`, else one message saying what was tried and how
    to fix it (instead of the `ray job` CLI's traceback)."""
    import urllib.error
    import urllib.request

    base = address if "://" in address else f"http://{address}"  # as `ray job` reads it
    url = base.rstrip("/") + "/api/version"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return None
    except urllib.error.HTTPError:  # something answers (401 with token auth): let `ray job` talk to it
        return None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return (f"error: no Ray dashboard answers at {address} (tried GET {url}: {reason}). Start a cluster "
                "on the head node (launch/README.md), or point at one with --address "
                "http://HEAD:8265 or RAY_API_SERVER_ADDRESS (the dashboard port, 8265 by default; the job API "
                "is not the GCS port 6379).")


def run_ray(cmd: list[str], address: str) -> int:
    """`cmd` (a `ray job ...` command), once a dashboard answers at `address`; else one message."""
    problem = check_reachable(address)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return subprocess.call(cmd)


def submit_command(args, overrides: list[str], runtime_env_file: str) -> list[str]:
    program = ["rlhf-dist"] if args.no_working_dir else [args.python, "-m", "rlhf_dist.main"]
    cmd = [*ray_cli(), "job", "submit", "--address", args.address, "--runtime-env", runtime_env_file]
    if args.submission_id:
        cmd += ["--submission-id", args.submission_id]
    if args.no_wait:
        cmd.append("--no-wait")
    # ray job submit shell-quotes each word of the entrypoint itself (shlex.join)
    return cmd + ["--", *program, *overrides]


def runtime_env(args, env: dict[str, str]) -> dict:
    spec: dict = {}
    if not args.no_working_dir:
        if not Path(args.working_dir).is_dir():
            sys.exit(f"error: --working-dir {args.working_dir} is not a directory")
        spec["working_dir"] = str(Path(args.working_dir).resolve())
        spec["excludes"] = EXCLUDES
    if env:
        spec["env_vars"] = env
    return spec


def masked(spec: dict) -> dict:
    return {**spec, **({"env_vars": {k: "***" for k in spec["env_vars"]}} if "env_vars" in spec else {})}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    own, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    job_id = args.logs or args.stop or args.status
    if job_id:
        if overrides:
            parser.error("--logs/--stop/--status take no overrides after `--`")
        verb = "logs" if args.logs else "stop" if args.stop else "status"
        cmd = [*ray_cli(), "job", verb, "--address", args.address, job_id]
        cmd += ["--follow"] if verb == "logs" else []
        print("$", shlex.join(cmd), flush=True)
        return 0 if args.dry_run else run_ray(cmd, args.address)
    env = job_env(args.env, parser)
    spec = runtime_env(args, env)
    print(f"address: {args.address}")
    print("runtime env: " + json.dumps(masked(spec)))
    for name in env:
        print(f"env: {name}=***")
    # secrets travel in a file only this user can read, removed when ray is done with it
    fd, path = tempfile.mkstemp(prefix="rlhf-dist-runtime-env-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)  # JSON is YAML
        cmd = submit_command(args, overrides, path)
        print("$", shlex.join(cmd).replace(path, "<runtime-env file>"), flush=True)
        return 0 if args.dry_run else run_ray(cmd, args.address)
    except KeyboardInterrupt:
        print("\nstopped following the logs; the job keeps running. Stop it with "
              "`python launch/submit.py --stop JOB_ID` (the id is printed above).", file=sys.stderr)
        return 130
    finally:
        os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
