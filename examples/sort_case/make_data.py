"""Write the `sort` case's files, as a user would bring them: noisy demonstrations, noisy
pairwise preferences labelled by the hidden gold score (gold.py), and prompt files.

    python examples/sort_case/make_data.py OUT_DIR [--seed 0]

OUT_DIR/demos.jsonl        {prompt, completion}: 4000 demonstrations, one wrong letter each (gold 0.75)
OUT_DIR/pairs.jsonl        {prompt, chosen, rejected}: 8000 comparisons of answers with 0-3 wrong
                           letters (sometimes cut short or run on), the label drawn by
                           P(a chosen) = sigmoid(10 * (gold(a) - gold(b)))
OUT_DIR/eval_pairs.jsonl   1000 such comparisons on held-out prompts
OUT_DIR/prompts.jsonl      {prompt}: the RL prompts (the demonstrations' prompts)
OUT_DIR/eval_prompts.jsonl held-out prompts for eval; test_prompts.jsonl: others, for a final check
"""

import argparse
import json
import math
import random
import string
from pathlib import Path

from gold import score, sorted_answer

LETTERS = string.ascii_lowercase


def prompt(rng: random.Random) -> str:
    return "sort " + "".join(rng.choice(LETTERS) for _ in range(4)) + "="


def answer_with_errors(text: str, wrong: int, rng: random.Random) -> str:
    out = list(text)
    for i in rng.sample(range(len(out)), min(wrong, len(out))):
        out[i] = rng.choice([c for c in LETTERS if c != out[i]])
    return "".join(out)


def candidate(p: str, rng: random.Random) -> str:
    text = answer_with_errors(sorted_answer(p), rng.randint(0, 3), rng)
    roll = rng.random()
    if roll < 0.15:
        return text[: rng.randint(1, 3)]
    if roll < 0.3:
        return text + "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 6)))
    return text


def comparisons(prompts: list[str], count: int, rng: random.Random) -> list[dict]:
    rows = []
    while len(rows) < count:
        p = rng.choice(prompts)
        a, b = candidate(p, rng), candidate(p, rng)
        if a == b:
            continue
        gap = score([p], [a])[0] - score([p], [b])[0]
        a_first = rng.random() < 1 / (1 + math.exp(-10 * gap))
        rows.append({"prompt": p, "chosen": a if a_first else b, "rejected": b if a_first else a})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, rng = Path(args.out), random.Random(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    unique = list(dict.fromkeys(prompt(rng) for _ in range(6000)))
    train, held, test = unique[:4000], unique[4000:4256], unique[4256:4512]
    write(out / "demos.jsonl", [{"prompt": p, "completion": answer_with_errors(sorted_answer(p), 1, rng)}
                                for p in train])
    write(out / "pairs.jsonl", comparisons(train, 8000, rng))
    write(out / "eval_pairs.jsonl", comparisons(held, 1000, rng))
    write(out / "prompts.jsonl", [{"prompt": p} for p in train])
    write(out / "eval_prompts.jsonl", [{"prompt": p} for p in held])
    write(out / "test_prompts.jsonl", [{"prompt": p} for p in test])
    print(f"wrote {out}: {len(train)} demonstrations, 8000 + 1000 pairs, {len(held)} eval and "
          f"{len(test)} test prompts")


if __name__ == "__main__":
    main()
