"""Prompt records from a .jsonl file, and a resumable shuffling batch sampler over them.

A prompt file has one JSON object per line with at least a string "prompt"; any other keys
(e.g. "target") are passed to the reward function as per-sample fields. Blank lines are skipped.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from rlhf_dist.errors import ConfigError, DatasetError

EXAMPLE_LINE = '{"prompt": "rev abc=", "target": "cba"}'


def load_prompt_records(path: str | os.PathLike) -> list[dict]:
    """Read records from a .jsonl file; DatasetError names the file and line of any problem."""
    file = Path(path).expanduser().absolute()
    if not file.is_file():
        raise DatasetError(
            f"prompt file {str(path)!r} not found (looked at {file}). Expected a .jsonl file "
            f"with one JSON object per line, e.g. {EXAMPLE_LINE}. Fix: check the path, or use "
            f"a built-in task instead."
        )
    records = []
    with file.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"prompt file {file}, line {line_number}: invalid JSON ({exc.msg} at column "
                    f"{exc.colno}): {line.strip()[:120]!r}. Expected one JSON object per line, "
                    f"e.g. {EXAMPLE_LINE}."
                ) from exc
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise DatasetError(
                    f"prompt file {file}, line {line_number}: {line.strip()[:120]!r} has no "
                    f"string \"prompt\". Expected an object like {EXAMPLE_LINE}."
                )
            records.append(record)
    if not records:
        raise DatasetError(
            f"prompt file {file} is empty. Expected one JSON object per line, e.g. "
            f"{EXAMPLE_LINE}."
        )
    return records


class PromptSampler:
    """Endless batches of records, reshuffled every epoch, resumable from `state_dict()`.

    The order of epoch `e` is a permutation fixed by (seed, e), so the state is just
    (seed, epoch, position). A batch never spans two epochs: the last len(records) % batch_size
    records of an epoch's order are skipped, and a different set is skipped each epoch.
    """

    def __init__(self, records: list[dict], batch_size: int, seed: int = 0):
        if not records:
            raise DatasetError(
                "PromptSampler got no records. Expected at least batch_size prompt records. "
                "Fix: check the prompt file or the task's number of records."
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}; expected a positive integer.")
        if batch_size > len(records):
            raise DatasetError(
                f"batch_size={batch_size} is larger than the {len(records)} prompt records, so "
                f"not one full batch fits in an epoch. Fix: lower the prompt batch size to at "
                f"most {len(records)}, or provide more prompts."
            )
        self.records = records
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index into the current epoch's order of the next record
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(f"{self.seed}|{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[dict]:
        """The next `batch_size` records."""
        if self.position + self.batch_size > len(self.records):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        indices = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return [self.records[index] for index in indices]

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_records": len(self.records)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; the records must be the same count as when saved."""
        if state.get("num_records", len(self.records)) != len(self.records):
            raise DatasetError(
                f"sampler state was saved with {state['num_records']} prompt records but this "
                f"run has {len(self.records)}. Fix: resume with the same prompt data."
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
