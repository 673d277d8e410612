"""Secrets out of what a run saves and prints: `redact(config)` before a config is written to
run_dir/config.yaml or sent to W&B, `redact_text(text)` for YAML and override text (Hydra's
`--cfg`/`--info` output and its .hydra/ files).

Replaced by '***':
- the value of every config key that names a secret: a last word `token` or `key`, or any word
  `secret`, `password`, `passwd`, `apikey`, `credential(s)` (`hf_token`, `api_key`, `apiKey`,
  `db_password`; not `max_new_tokens`, `hf_token_path`);
- anywhere in a string, the value of WANDB_API_KEY, HF_TOKEN, HUGGING_FACE_HUB_TOKEN and of every
  other environment variable whose name names a secret (values of 8+ characters): a secret that
  reached the config through `${oc.env:HF_TOKEN}` or was pasted into another field.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

MASK = "***"
ENV_SECRETS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_ANY_WORD = {"secret", "secrets", "password", "passwd", "apikey", "credential", "credentials"}
_LAST_WORD = {"token", "key"}
_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# `key=value` (Hydra overrides, override_dirname) and `key: value` (a YAML line)
_ASSIGNMENT = re.compile(r"(?P<key>[A-Za-z_][\w.\-]*)=(?P<value>[^,\s'\"\]]+)")
_YAML_LINE = re.compile(r"^(?P<lead>\s*(?:-\s+)?)(?P<key>[^\s:#'\"][^:#]*?):[ \t]+(?P<value>\S.*?)\s*$")
_EMPTY = {"null", "~", "''", '""', "{}", "[]"}


def looks_secret(name: str) -> bool:
    """Whether a config key or environment variable names a secret (see the module docstring)."""
    words = [word.lower() for word in _WORDS.findall(str(name).rsplit(".", 1)[-1])]
    return bool(words) and (words[-1] in _LAST_WORD or any(word in _ANY_WORD for word in words))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret environment variables, longest first (one may contain another)."""
    env = os.environ if environ is None else environ
    values = {value for name, value in env.items()
              if (name in ENV_SECRETS or looks_secret(name)) and len(value) >= 8}
    return sorted(values, key=len, reverse=True)


def redact(config: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of a plain config (dicts, lists, scalars) with its secrets replaced by '***'."""
    return _redact(config, secret_values(environ))


def _redact(node: Any, values: list[str]) -> Any:
    if isinstance(node, Mapping):
        return {key: MASK if looks_secret(key) and node[key] not in (None, "") else _redact(node[key], values)
                for key in node}
    if isinstance(node, (list, tuple)):
        return [_redact(item, values) for item in node]
    if isinstance(node, str):
        return _mask_text(node, values)
    return node


def _mask_text(text: str, values: list[str]) -> str:
    for value in values:
        text = text.replace(value, MASK)
    return _ASSIGNMENT.sub(lambda m: f"{m['key']}={MASK}" if looks_secret(m["key"]) else m[0], text)


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """YAML or override text with secret values replaced, line by line (formatting kept)."""
    values = secret_values(environ)
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        match = _YAML_LINE.match(body)
        if match and looks_secret(match["key"].strip()) and match["value"] not in _EMPTY:
            body = f"{match['lead']}{match['key']}: '{MASK}'"
        lines.append(_mask_text(body, values) + line[len(line.rstrip("\r\n")):])
    return "".join(lines)


def redact_files(paths) -> None:
    """Rewrite each text file in place with `redact_text` (only files that change)."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        clean = redact_text(text)
        if clean != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(clean)


@contextmanager
def redacted_argv() -> Iterator[None]:
    """sys.argv with `redact_text` applied to each argument while the block runs: W&B records the
    command line (wandb-metadata.json "args") when a run starts, and overrides may hold secrets."""
    saved = sys.argv[:]
    sys.argv[1:] = [redact_text(arg) for arg in saved[1:]]
    try:
        yield
    finally:
        sys.argv[:] = saved
