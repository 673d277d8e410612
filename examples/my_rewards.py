"""An example user reward: `reward.fn=examples/my_rewards.py:score`.

A reward function takes the batch's prompts and completions (decoded text, eos removed) and,
as keyword arguments, one list per extra field of the prompt records (here an optional
"letter" field, e.g. {"prompt": "say a word with k:", "letter": "k"}). It returns one finite
number per completion; this one stays in [0, 1].
"""

MAX_CHARS = 8  # completions longer than this earn less


def score(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """Reward short completions that contain the record's letter (default "a").

    Half the reward for containing the letter, half for brevity: 1.0 up to MAX_CHARS
    characters, then shrinking as MAX_CHARS / length.
    """
    letters = fields.get("letter") or ["a"] * len(completions)
    rewards = []
    for completion, letter in zip(completions, letters):
        text = completion.strip()
        if not text:
            rewards.append(0.0)
            continue
        has_letter = 1.0 if (letter or "a") in text else 0.0
        brevity = min(1.0, MAX_CHARS / len(text))
        rewards.append(0.5 * has_letter + 0.5 * brevity)
    return rewards
