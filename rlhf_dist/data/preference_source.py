"""A built-in preference source: demonstrations and comparisons labelled by a hidden gold scorer.

Stands in for human data in the full recipe (SFT on demonstrations -> reward model on rankings
and pairs -> RL against the reward model) on a built-in StringTask such as `reverse`, where the
task's own partial credit is the gold score that nobody downstream sees:

    gold(completion) = position_match_score(clean_completion(completion), target)

The demonstrator is deliberately imperfect: a demonstration is the target with `e` positions
replaced by other letters, so it scores 1 - e/len(target). With the default error levels
(2, 3, 4) and reversal targets of length 3..6, the best demonstration scores 1/3..2/3 (0.5 at
length 4): imitation alone stays well below the best score 1.0, and the recipe can show what
T-REX (Brown et al. 2019) claims, a reward learned from ranked demonstrations lets RL go
beyond the demonstrator.

Pairwise labels follow the Bradley-Terry model with temperature 1/beta:
P(a preferred to b) = sigmoid(beta * (gold(a) - gold(b))); beta=0 gives coin flips, a large
beta labels almost every pair with distinct gold scores like the gold scorer does.
Completions are plain text without an end-of-sequence marker.
"""

from __future__ import annotations

import json
import math
import os
import random
import string
from pathlib import Path

from rlhf_dist.data.tasks import Task, clean_completion, get_task, position_match_score
from rlhf_dist.errors import ConfigError

DEFAULT_ERROR_LEVELS = (2, 3, 4)
DEFAULT_BETA = 10.0  # one error more on a length-4 target (gold gap 0.25): P(agree) = 0.92
EXTRA_ERROR_PROB = 0.5  # chance that a drawn comparison completion gets one error more
# chance that a comparison completion is cut short or runs on (gold penalises both): without
# such pairs a reward model never sees long outputs, and RL against it learned to ramble
LENGTH_ERROR_PROB = 0.3
RECIPE_FILES = ("sft", "rankings", "pairs", "eval_pairs")


def gold_score(record: dict, completion: str) -> float:
    """The task's own partial credit for `completion` against record["target"], in [0, 1]."""
    return position_match_score(clean_completion(completion), record["target"])


def corrupt(target: str, num_errors: int, rng: random.Random) -> str:
    """`target` with `num_errors` distinct positions (at most all) set to another letter."""
    letters = list(target)
    for position in rng.sample(range(len(target)), min(num_errors, len(target))):
        letters[position] = rng.choice([c for c in string.ascii_lowercase if c != target[position]])
    return "".join(letters)


def confuse(letter: str) -> str:
    """The demonstrator's systematic confusion: a letter written as the next one (z as a)."""
    return chr((ord(letter) - ord("a") + 1) % 26 + ord("a")) if letter in string.ascii_lowercase else letter


def apply_bias(text: str, target: str, bias: float, rng: random.Random) -> str:
    """With probability `bias`, the last letter of the answer written as its confusion.

    A systematic error: unlike the random ones it is the same on every demonstration, so
    imitation learns it (greedy decoding picks it once bias > 0.5) and only comparisons that
    prefer the right letter carry what it takes to do better than the demonstrator.
    """
    if bias <= 0 or not target or len(text) < len(target) or rng.random() >= bias:
        return text
    last = len(target) - 1
    return text[:last] + confuse(target[last]) + text[last + 1:]


def _check_error_levels(error_levels) -> tuple[int, ...]:
    levels = tuple(error_levels)
    if not levels or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0
                             for e in levels):
        raise ConfigError(
            f"error_levels={error_levels!r}; expected a non-empty list of error counts >= 0, "
            f"e.g. {list(DEFAULT_ERROR_LEVELS)} (errors per demonstration)."
        )
    return levels


def make_ranked_demonstrations(
    records: list[dict], error_levels=DEFAULT_ERROR_LEVELS, rng: random.Random | None = None,
    bias: float = 0.0,
) -> list[dict]:
    """One demonstration per error level for each record, best (highest gold) first.

    Error counts are clipped to the target length and repeats removed. With `bias` each
    demonstration also gets the systematic error (`apply_bias`) with that probability; the
    ranking is then ordered by gold and keeps one text per gold value, so its texts are distinct
    with strictly decreasing gold. A record left with fewer than 2 demonstrations is left out.
    Rows: {"prompt", "target", "ranking": [text, ...], "gold": [score, ...]}.
    """
    levels = _check_error_levels(error_levels)
    rng = rng or random.Random(0)
    rows = []
    for record in records:
        target = record["target"]
        clipped = sorted({min(level, len(target)) for level in levels})
        if len(clipped) < 2:
            continue
        ranking = [corrupt(target, num_errors, rng) for num_errors in clipped]
        if bias > 0:
            scored = [(gold_score(record, t), t) for t in (apply_bias(t, target, bias, rng) for t in ranking)]
            kept = {}
            for gold, text in sorted(scored, key=lambda pair: -pair[0]):  # stable: fewer errors first
                kept.setdefault(gold, text)
            if len(kept) < 2:
                continue
            ranking = list(kept.values())
        rows.append({"prompt": record["prompt"], "target": target, "ranking": ranking,
                     "gold": [gold_score(record, text) for text in ranking]})
    return rows


def _sigmoid(logit: float) -> float:
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    return math.exp(logit) / (1.0 + math.exp(logit))  # no overflow for very negative logits


def _draw_completion(target: str, levels: tuple[int, ...], rng: random.Random, bias: float = 0.0) -> str:
    num_errors = rng.choice(levels) + (1 if rng.random() < EXTRA_ERROR_PROB else 0)
    text = apply_bias(corrupt(target, num_errors, rng), target, bias, rng)
    if rng.random() < LENGTH_ERROR_PROB:  # the demonstrator sometimes rambles or stops early
        if rng.random() < 0.5 and len(text) > 1:
            text = text[: rng.randint(1, len(text) - 1)]
        else:
            text += "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 2 * len(text))))
    return text


def make_pairwise_preferences(
    records: list[dict], num_pairs: int, beta: float = DEFAULT_BETA,
    rng: random.Random | None = None, error_levels=DEFAULT_ERROR_LEVELS, bias: float = 0.0,
) -> list[dict]:
    """`num_pairs` comparisons {"prompt", "chosen", "rejected", "target"} with Bradley-Terry labels.

    Each draws a record and two corruptions of its target (error counts from `error_levels`,
    sometimes one more, and the systematic error with probability `bias`); identical texts are
    drawn again. a is labelled chosen with probability
    sigmoid(beta * (gold(a) - gold(b))).
    """
    levels = _check_error_levels(error_levels)
    if num_pairs < 0:
        raise ConfigError(f"num_pairs={num_pairs}; expected a count >= 0.")
    if not records:
        raise ConfigError("make_pairwise_preferences got no records. Fix: pass prompt records.")
    rng = rng or random.Random(0)
    rows = []
    max_draws = 1000 + 100 * num_pairs
    for _ in range(max_draws):
        if len(rows) == num_pairs:
            return rows
        record = rng.choice(records)
        text_a = _draw_completion(record["target"], levels, rng, bias)
        text_b = _draw_completion(record["target"], levels, rng, bias)
        if text_a == text_b:
            continue
        gold_gap = gold_score(record, text_a) - gold_score(record, text_b)
        a_wins = rng.random() < _sigmoid(beta * gold_gap)
        chosen, rejected = (text_a, text_b) if a_wins else (text_b, text_a)
        rows.append({"prompt": record["prompt"], "chosen": chosen, "rejected": rejected,
                     "target": record["target"]})
    raise ConfigError(
        f"made only {len(rows)} of {num_pairs} pairs with distinct texts in {max_draws} draws; "
        f"the targets are too short for different corruptions. Fix: use longer targets."
    )


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write one JSON object per line (parent directories made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def label_agreement(pairs: list[dict]) -> tuple[float, float]:
    """(share of pairs with distinct gold whose label agrees with gold, share of gold ties)."""
    gold_gaps = [gold_score(pair, pair["chosen"]) - gold_score(pair, pair["rejected"])
                 for pair in pairs]
    decided = [gap for gap in gold_gaps if gap != 0]
    agreement = sum(gap > 0 for gap in decided) / len(decided) if decided else float("nan")
    ties = (len(gold_gaps) - len(decided)) / len(gold_gaps) if gold_gaps else float("nan")
    return agreement, ties


def build_recipe_data(
    task: Task | str, out_dir: str | os.PathLike, num_prompts: int = 256,
    num_pairs: int = 1024, error_levels=DEFAULT_ERROR_LEVELS, beta: float = DEFAULT_BETA,
    seed: int = 0, num_eval_prompts: int | None = None, num_eval_pairs: int | None = None,
    bias: float = 0.0,
) -> dict:
    """Write the recipe's data files for `task` into `out_dir`; return their paths and stats.

    sft.jsonl         {"prompt", "completion", "target"}: the best demonstration per prompt
    rankings.jsonl    ranked demonstrations of the same prompts (make_ranked_demonstrations)
    pairs.jsonl       Bradley-Terry labelled comparisons on the same prompts
    eval_pairs.jsonl  the same generator on the task's eval split (disjoint prompts)

    Eval sizes default to a quarter of the train sizes. Returns {"sft": Path, "rankings": Path,
    "pairs": Path, "eval_pairs": Path, "stats": {...}} with stats "best_demo_gold_mean",
    "pair_label_agreement" and "eval_pair_label_agreement" (over pairs whose gold scores
    differ) and "pair_gold_ties" (share of pairs with equal gold, labelled by a coin flip).
    """
    task = get_task(task) if isinstance(task, str) else task
    num_eval_prompts = max(1, num_prompts // 4) if num_eval_prompts is None else num_eval_prompts
    num_eval_pairs = max(1, num_pairs // 4) if num_eval_pairs is None else num_eval_pairs
    rng = random.Random(f"preference-source|train|{seed}")
    eval_rng = random.Random(f"preference-source|eval|{seed}")

    records = task.make_records("train", num_prompts, seed)
    if not 0.0 <= bias <= 1.0:
        raise ConfigError(f"bias={bias}; expected a probability in [0, 1] (the demonstrator's systematic "
                          "error rate, 0 = off).")
    rankings = make_ranked_demonstrations(records, error_levels, rng, bias)
    if not rankings:
        raise ConfigError(
            f"no prompt of task {task.name!r} has 2 distinct error levels among "
            f"{list(error_levels)} (a level is clipped to the target length). Fix: use levels "
            f"below the target length, e.g. {list(DEFAULT_ERROR_LEVELS)} for lengths >= 3."
        )
    sft = [{"prompt": row["prompt"], "completion": row["ranking"][0], "target": row["target"]}
           for row in rankings]
    pairs = make_pairwise_preferences(records, num_pairs, beta, rng, error_levels, bias)
    eval_records = task.make_records("eval", num_eval_prompts, seed)
    eval_pairs = make_pairwise_preferences(eval_records, num_eval_pairs, beta, eval_rng,
                                           error_levels, bias)

    out_dir = Path(out_dir)
    rows_by_name = {"sft": sft, "rankings": rankings, "pairs": pairs, "eval_pairs": eval_pairs}
    paths = {name: write_jsonl(rows, out_dir / f"{name}.jsonl")
             for name, rows in rows_by_name.items()}
    agreement, ties = label_agreement(pairs)
    best_golds = [row["gold"][0] for row in rankings]
    stats = {
        "best_demo_gold_mean": sum(best_golds) / len(best_golds) if best_golds else float("nan"),
        # the share of SFT demonstrations that carry the systematic error (what imitation learns)
        "sft_biased_frac": sum(r["completion"][len(r["target"]) - 1:len(r["target"])] == confuse(r["target"][-1])
                               for r in sft) / max(1, len(sft)),
        "pair_label_agreement": agreement,
        "eval_pair_label_agreement": label_agreement(eval_pairs)[0],
        "pair_gold_ties": ties,
        "num_sft": len(sft), "num_rankings": len(rankings),
        "num_pairs": len(pairs), "num_eval_pairs": len(eval_pairs),
    }
    return {**paths, "stats": stats}
