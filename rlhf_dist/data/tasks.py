"""Built-in tasks whose reward is checked in code, with partial credit in [0, 1].

Each task makes short prompts that a 0.4M-parameter character model can learn on CPU:

    reverse   "rev abc="     -> "cba"     (lowercase letters, length min_len..max_len)
    copy      "copy abc="    -> "abc"
    add       "add 12+7="    -> "19"      (two integers in 0..max_value)
    chain     "3+4,*2?"      -> "7,14#=14" (2-3 operations left to right, each step's value
                                           shown, the answer after "#="; reward = 0.9 x
                                           correct + 0.1 x format: `chain_reward`)

A record is `{"prompt": str, "target": str}`. Train and eval problems are disjoint: a problem
belongs to the eval split when a stable hash of its prompt falls below `eval_fraction`, so the
same prompt is always in the same split, whatever the seed.

Reward functions have the user signature `score(prompts, completions, **fields) -> list[float]`
with `fields["target"]` a list of per-sample targets. Completions are cleaned the same way by
every built-in reward (see `clean_completion`): the text is cut at the first newline or literal
"<eos>", then surrounding whitespace is stripped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
import string
from dataclasses import dataclass

from rlhf_dist.errors import ConfigError, RewardFnError

SPLITS = ("train", "eval")
STOP_MARKERS = ("\n", "<eos>")


# --------------------------------------------------------------------------- rewards


def clean_completion(completion: str) -> str:
    """Cut at the first stop marker ("\\n" or a literal "<eos>") and strip whitespace."""
    for marker in STOP_MARKERS:
        completion = completion.split(marker, 1)[0]
    return completion.strip()


def _targets(fields: dict, num: int) -> list[str]:
    targets = fields.get("target")
    if targets is None or len(targets) != num:
        given = "no 'target' field" if targets is None else f"{len(targets)} targets"
        raise RewardFnError(
            f"built-in task reward got {given} for {num} completions. Expected a 'target' "
            f"field per record. Fix: use records made by the task's make_records."
        )
    return [str(target) for target in targets]


def position_match_score(completion: str, target: str) -> float:
    """Matches at the same index over the longer length: "abxd" vs "abcd" -> 3/4.

    Extra or missing characters count as mismatches, so the score is 1.0 only on an exact
    match and 0.0 for an empty completion (when the target is not empty).
    """
    longest = max(len(completion), len(target))
    if longest == 0:
        return 1.0
    matches = sum(c == t for c, t in zip(completion, target))
    return matches / longest


def reverse_reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """Per-position credit against the reversed string (see `position_match_score`)."""
    targets = _targets(fields, len(completions))
    return [position_match_score(clean_completion(c), t) for c, t in zip(completions, targets)]


def copy_reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """Per-position credit against the copied string (see `position_match_score`)."""
    targets = _targets(fields, len(completions))
    return [position_match_score(clean_completion(c), t) for c, t in zip(completions, targets)]


def add_reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """Digits right-aligned, as in column addition: "18" vs "19" -> 1/2, "119" vs "19" -> 2/3.

    Position credit on the reversed strings, so the ones digit is compared with the ones digit.
    """
    targets = _targets(fields, len(completions))
    return [
        position_match_score(clean_completion(c)[::-1], t[::-1])
        for c, t in zip(completions, targets)
    ]


def episode_text(demonstration: str | list[str]) -> str:
    """A demonstration as the reward function sees a sample: a multi-turn one's turns joined by
    newlines, as rlhf_dist.rl.episodes joins an episode's."""
    return demonstration if isinstance(demonstration, str) else "\n".join(demonstration)


def calc_reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """The calculator task (multi-turn): the episode's last line is the answer, scored against the
    sum digit by digit from the right as in `add_reward` (1 only for the exact sum: eval/solved_frac
    is the success rate). Tool calls and their results (earlier lines) earn nothing by themselves."""
    targets = _targets(fields, len(completions))
    answers = [(c.strip().splitlines() or [""])[-1].strip() for c in completions]
    return [position_match_score(a[::-1], t[::-1]) for a, t in zip(answers, targets)]


CHAIN_FORMAT_WEIGHT = 0.1  # the format term's share of the chain reward (correctness: the rest)


def _chain_pattern(prompt: str) -> re.Pattern:
    """The strict answer format for a chain prompt of k operations ("3+4,*2?", k = 2): the value
    after each operation, comma-separated, then "#=<int>": r"\d+,\d+#=(\d+)"."""
    return re.compile(",".join(["\\d+"] * (prompt.count(",") + 1)) + "#=(\\d+)")


def chain_parts(prompts: list[str], completions: list[str], **fields) -> dict[str, list[float]]:
    """The chain reward's two terms per completion (logged as reward/correct_mean and
    reward/format_mean):

        correct  1 if the cleaned completion ends in "#=<the answer>", else 0
        format   1 if the whole cleaned completion is the step format (`_chain_pattern`), else 0

    A right number anywhere else ("14", "7,14") earns nothing: the answer must be where the
    format puts it. The steps' values are not checked, only their format: the answer depends on them."""
    targets = _targets(fields, len(completions))
    correct, formatted = [], []
    for prompt, completion, target in zip(prompts, completions, targets):
        text = clean_completion(completion)
        answer = re.search(r"#=(\d+)$", text)
        correct.append(float(answer is not None and answer.group(1) == target))
        formatted.append(float(_chain_pattern(prompt).fullmatch(text) is not None))
    return {"correct": correct, "format": formatted}


def chain_reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """(1 - w) x correct + w x format, w = CHAIN_FORMAT_WEIGHT (`chain_parts`): 1.0 right and
    written in the format (solved), 0.9 right in a loose format, 0.1 wrong in the format, else 0."""
    parts = chain_parts(prompts, completions, **fields)
    w = CHAIN_FORMAT_WEIGHT
    return [(1 - w) * c + w * f for c, f in zip(parts["correct"], parts["format"])]


chain_reward.parts = chain_parts  # the reward actor logs each term's mean (rlhf_dist.actors.reward)


def guess_reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """The guessing game (multi-turn): 1 when the episode's last policy turn is a right guess by the
    environment's own rule (envs.guess.answer, which ends the episode there), else 0;
    eval/solved_frac is the success rate."""
    from rlhf_dist.envs.guess import answer

    targets = _targets(fields, len(completions))
    rewards = []
    for completion, target in zip(completions, targets):
        lines = completion.strip().splitlines() or [""]
        # the last line is the policy's last turn only if an answer ("...;") or the prompt precedes it
        whole_turn = len(lines) == 1 or lines[-2].strip().endswith(";")
        rewards.append(float(whole_turn and answer(lines[-1], target) is None))
    return rewards


# --------------------------------------------------------------------------- tasks


def _stable_unit(text: str) -> float:
    """A number in [0, 1) fixed by `text` alone (unlike `hash()`, same in every process)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class Task:
    """A task: samples problems, knows the ideal answer, names its reward function."""

    name: str
    reward_fn: str  # import spec, "package.module:function"
    eval_fraction: float = 0.1  # share of all problems reserved for the eval split
    partial_credit: bool = True  # False: the reward is 1 or 0

    def __post_init__(self):
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(
                f"task {self.name!r}: eval_fraction={self.eval_fraction} is not in (0, 1). "
                f"Fix: use e.g. eval_fraction=0.1."
            )

    def sample(self, rng: random.Random) -> dict:
        """One random problem as a record with at least "prompt" and "target"."""
        raise NotImplementedError

    def demonstration(self, record: dict) -> str:
        """The ideal completion text for `record` (no eos)."""
        return record["target"]

    def problem(self, record: dict) -> str:
        """What makes `record` the problem it is (its prompt): the key of the train/eval split."""
        return record["prompt"]

    def split_of(self, record: dict) -> str:
        in_eval = _stable_unit(f"{self.name}|{self.problem(record)}") < self.eval_fraction
        return "eval" if in_eval else "train"

    def make_records(self, split: str, num: int, seed: int) -> list[dict]:
        """`num` records of `split`, sampled with replacement; the same for the same seed."""
        if split not in SPLITS:
            raise ConfigError(f"task {self.name!r}: split={split!r}; expected one of {SPLITS}.")
        if num < 0:
            raise ConfigError(f"task {self.name!r}: num={num} records; expected num >= 0.")
        rng = random.Random(f"{self.name}|{split}|{seed}")
        records: list[dict] = []
        max_draws = 1000 + 200 * num  # a split holds >= ~1% of problems unless the space is tiny
        for _ in range(max_draws):
            if len(records) == num:
                return records
            record = self.sample(rng)
            if self.split_of(record) == split:
                records.append(record)
        raise ConfigError(
            f"task {self.name!r}: found only {len(records)} of {num} {split} records in "
            f"{max_draws} draws; the problem space is too small for this split. "
            f"Fix: widen the task's ranges (e.g. max_len, max_value) or change eval_fraction."
        )


@dataclass(frozen=True)
class StringTask(Task):
    """Lowercase strings of length min_len..max_len, written "<verb> <string>="."""

    verb: str = "rev"
    reverse: bool = True
    min_len: int = 3
    max_len: int = 6

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.min_len <= self.max_len:
            raise ConfigError(
                f"task {self.name!r}: min_len={self.min_len}, max_len={self.max_len}; expected "
                f"1 <= min_len <= max_len. Fix: e.g. min_len=3 max_len=6."
            )

    def sample(self, rng: random.Random) -> dict:
        length = rng.randint(self.min_len, self.max_len)
        text = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        target = text[::-1] if self.reverse else text
        return {"prompt": f"{self.verb} {text}=", "target": target}


@dataclass(frozen=True)
class AddTask(Task):
    """Two integers in 0..max_value, written "add A+B="; the target is the sum's digits."""

    max_value: int = 30

    def __post_init__(self):
        super().__post_init__()
        if self.max_value < 1:
            raise ConfigError(
                f"task {self.name!r}: max_value={self.max_value}; expected >= 1. Fix: e.g. 30."
            )

    def sample(self, rng: random.Random) -> dict:
        a, b = rng.randint(0, self.max_value), rng.randint(0, self.max_value)
        return {"prompt": f"add {a}+{b}=", "target": str(a + b)}


@dataclass(frozen=True)
class CalcTask(Task):
    """Sums of two integers in min_value..max_value, "calc A+B=", to be answered with the help of a
    calculator tool (rlhf_dist.envs.calculator, `experiment=agentic`).

    Its demonstrations (the warm-up) are whole episodes, [policy turn, observation, policy turn]:
    the demonstrator calls the tool ("call A+B", the tool answers "got S;") and then answers S.
    With `tool_fraction` < 1 the others answer S at once, from its head; measured: with 30% or
    60% tool episodes, 1500 warm-up steps left the 0.44M and 0.87M tiny models answering from
    their heads after a tool call (1/40 answers copied from the tool's), so the default shows the
    tool every time and RL's part is reading its answer reliably.
    """

    min_value: int = 100
    max_value: int = 999
    tool_fraction: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.min_value <= self.max_value or not 0.0 <= self.tool_fraction <= 1.0:
            raise ConfigError(
                f"task {self.name!r}: min_value={self.min_value}, max_value={self.max_value}, "
                f"tool_fraction={self.tool_fraction}; expected 0 <= min_value <= max_value and a "
                "tool_fraction in [0, 1]. Fix: e.g. min_value=100 max_value=999 tool_fraction=0.5."
            )

    def sample(self, rng: random.Random) -> dict:
        a, b = rng.randint(self.min_value, self.max_value), rng.randint(self.min_value, self.max_value)
        return {"prompt": f"calc {a}+{b}=", "target": str(a + b)}

    def demonstration(self, record: dict) -> list[str]:
        expression = record["prompt"].removeprefix("calc ").removesuffix("=")
        if _stable_unit(f"tool|{record['prompt']}") < self.tool_fraction:
            return [f"call {expression}", f"got {record['target']};", record["target"]]
        return [record["target"]]


@dataclass(frozen=True)
class ChainTask(Task):
    """Multi-step arithmetic, left to right: "3+4,*2,-1?" -> "7,14,13#=13".

    The start is a digit 1..9; each of `min_steps`..`max_steps` operations is + or - a digit 1..9
    (never below 0) or * 2..3 (only on values up to 20). The demonstration writes the value after
    every operation, then the answer after "#=", so a warm-up teaches the steps and the format;
    which steps the tiny model gets right is RL's to improve. Easy (two additions) and hard
    (three steps with a product) problems side by side: after a warm-up many groups are all
    right or all wrong, the case dynamic sampling is for.
    """

    min_steps: int = 2
    max_steps: int = 3

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.min_steps <= self.max_steps <= 4:
            raise ConfigError(
                f"task {self.name!r}: min_steps={self.min_steps}, max_steps={self.max_steps}; expected "
                "1 <= min_steps <= max_steps <= 4 (prompts stay short). Fix: e.g. min_steps=2 max_steps=3."
            )

    def sample(self, rng: random.Random) -> dict:
        start = value = rng.randint(1, 9)
        operations = []
        for _ in range(rng.randint(self.min_steps, self.max_steps)):
            ops = ["+"] + (["-"] if value >= 1 else []) + (["*"] if value <= 20 else [])
            op = rng.choice(ops)
            operand = rng.randint(2, 3) if op == "*" else rng.randint(1, min(9, value) if op == "-" else 9)
            operations.append(f"{op}{operand}")
            value = _apply(value, op, operand)
        return {"prompt": f"{start}{','.join(operations)}?", "target": str(value)}

    def demonstration(self, record: dict) -> str:
        start, operations = _chain_operations(record["prompt"])
        values = []
        for op, operand in operations:
            values.append(_apply(values[-1] if values else start, op, operand))
        return ",".join(map(str, values)) + f"#={record['target']}"


def _apply(value: int, op: str, operand: int) -> int:
    return {"+": value + operand, "-": value - operand, "*": value * operand}[op]


def _chain_operations(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """"3+4,*2?" -> (3, [("+", 4), ("*", 2)])."""
    first, *rest = prompt.rstrip("?").split(",")
    operations = [(first[1], int(first[2:]))] + [(part[0], int(part[1:])) for part in rest]
    return int(first[0]), operations


@dataclass(frozen=True)
class GuessTask(Task):
    """Find a secret number in 0..max_value with "higher"/"lower" answers
    (rlhf_dist.envs.guess, `experiment=agentic`). Every prompt reads the same ("guess 0-9:"), so
    nothing but the environment's answers tells the policy where the secret is: a policy that
    ignores them finds it within G guesses in at most G of max_value + 1 games (40% for 4 guesses
    of 0..9), and a success rate above that is the feedback read and used. Halving finds any
    secret in ceil(log2(max_value + 2)) guesses (4 for 0..9).

    Its demonstrations (the warm-up) show the game's format only: distinct numbers in a random
    order, whatever the answers, until the secret comes up. After any answers, the next guess is
    uniform over the numbers not yet tried; what to guess after "higher" is left for RL to find.
    """

    max_value: int = 9
    partial_credit: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.max_value <= 9:
            raise ConfigError(
                f"task {self.name!r}: max_value={self.max_value}; expected 1 <= max_value <= 9 "
                "(one-digit guesses). Fix: e.g. max_value=9."
            )

    def sample(self, rng: random.Random) -> dict:
        return {"prompt": f"guess 0-{self.max_value}:", "target": str(rng.randint(0, self.max_value)),
                "game": str(rng.randrange(10**12))}

    def problem(self, record: dict) -> str:  # the prompts are all alike: a game is its own problem
        return record["game"]

    def make_records(self, split: str, num: int, seed: int) -> list[dict]:
        """As Task.make_records, with the secrets balanced: every number equally often (up to one) in
        any `num` records, so that the 40% bound holds on the very games a run trains and evals on
        (uniform draws of 64 games gave a fixed guess sequence 56%)."""
        records = super().make_records(split, num, seed)
        secrets = [str(i % (self.max_value + 1)) for i in range(num)]
        random.Random(f"{self.name}|secrets|{split}|{seed}").shuffle(secrets)
        return [{**record, "target": secret} for record, secret in zip(records, secrets)]

    def demonstration(self, record: dict) -> list[str]:
        from rlhf_dist.envs.guess import answer

        guesses = [str(number) for number in range(self.max_value + 1)]
        random.Random(f"demo|{record['game']}").shuffle(guesses)
        turns: list[str] = []
        for guess in guesses:
            turns.append(guess)
            reply = answer(guess, record["target"])
            if reply is None:
                return turns
            turns.append(reply)
        raise AssertionError("every number was guessed and none was the secret")


# --------------------------------------------------------------------------- registry

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add `task` to TASKS under `task.name` (ConfigError if the name is taken)."""
    if task.name in TASKS:
        raise ConfigError(f"task name {task.name!r} is already registered; pick another name.")
    TASKS[task.name] = task
    return task


def get_task(name: str, **overrides) -> Task:
    """The registered task `name`, with fields replaced by `overrides` (e.g. max_len=8)."""
    if name not in TASKS:
        raise ConfigError(
            f"task={name!r} is not a built-in task. Expected one of {sorted(TASKS)}. "
            f"Fix: pick one of those, or give a prompt file and reward.fn instead."
        )
    task = TASKS[name]
    fields = {field.name for field in dataclasses.fields(task)} - {"name", "reward_fn"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"task {name!r} has no option(s) {unknown}. Expected some of {sorted(fields)}."
        )
    return dataclasses.replace(task, **overrides) if overrides else task


register_task(StringTask(name="reverse", reward_fn="rlhf_dist.data.tasks:reverse_reward",
                         verb="rev", reverse=True))
register_task(StringTask(name="copy", reward_fn="rlhf_dist.data.tasks:copy_reward",
                         verb="copy", reverse=False))
register_task(AddTask(name="add", reward_fn="rlhf_dist.data.tasks:add_reward"))
register_task(CalcTask(name="calc", reward_fn="rlhf_dist.data.tasks:calc_reward"))
register_task(ChainTask(name="chain", reward_fn="rlhf_dist.data.tasks:chain_reward"))
register_task(GuessTask(name="guess", reward_fn="rlhf_dist.data.tasks:guess_reward"))
