"""The hidden gold score of the `sort` case: how many letters of the answer sit where the sorted
letters of the prompt put them (positions beyond either string count as wrong).

    prompt "sort dbca="  ->  best answer "abcd"

A reward function in the user signature: score(prompts, completions, **fields) -> list[float].
"""


def sorted_answer(prompt: str) -> str:
    return "".join(sorted(prompt.removeprefix("sort ").removesuffix("=")))


def score(prompts: list[str], completions: list[str], **fields) -> list[float]:
    scores = []
    for prompt, completion in zip(prompts, completions):
        answer, text = sorted_answer(prompt), completion.split("\n", 1)[0].strip()
        width = max(len(answer), len(text)) or 1
        scores.append(sum(a == b for a, b in zip(answer, text)) / width)
    return scores
