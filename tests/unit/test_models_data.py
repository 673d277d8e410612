"""Tiny model + tokenizer, built-in tasks and rewards, reward loading, prompt files and sampling."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_dist.data.prompts import PromptSampler, load_prompt_records
from rlhf_dist.data.reward_fn import check_reward_fn, load_reward_fn
from rlhf_dist.data.tasks import TASKS, add_reward, copy_reward, episode_text, get_task, reverse_reward
from rlhf_dist.errors import ConfigError, DatasetError, ModelPathError, RewardFnError
from rlhf_dist.models.tiny import (
    NUM_TOKENS,
    build_char_tokenizer,
    build_tiny_model,
    check_model_dir,
    ensure_tiny_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
ALL_PRINTABLE = "".join(chr(code) for code in range(32, 127))
ROUND_TRIP_TEXTS = ["", " ", "rev abc=", "  two  spaces ", " lead", "trail ", "a<b>c",
                    ALL_PRINTABLE]


# --------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "qwen2", arch="qwen2")


def test_char_tokenizer_round_trips_printable_ascii():
    tokenizer = build_char_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == NUM_TOKENS == 98
    assert tokenizer.encode("a b") == [ord("a") - 29, 3, ord("b") - 29]  # no BOS
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode("ab") + [1, 0], skip_special_tokens=True) == "ab"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_model_loads_back_and_runs(arch, tmp_path, qwen2_dir):
    model_dir = qwen2_dir if arch == "qwen2" else build_tiny_model(tmp_path / arch, arch=arch)
    assert check_model_dir(model_dir) == model_dir
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # AutoTokenizer rebuilds qwen2 tokenizers as byte-level BPE: the text must still round-trip.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
        assert tokenizer.encode(text) == build_char_tokenizer().encode(text)
    assert model.config.model_type == arch and model.dtype == torch.float32
    assert model.generation_config.eos_token_id == 1 and model.generation_config.pad_token_id == 0
    batch = tokenizer(["rev abc=", "add 1+2="], return_tensors="pt", padding=True)
    logits = model(**batch).logits  # (B, T, V)
    assert logits.shape == (2, 8, NUM_TOKENS) and torch.isfinite(logits).all()
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_build_is_seeded_and_leaves_global_rng_alone(tmp_path, qwen2_dir):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert torch.rand(1) == expected_next
    first = AutoModelForCausalLM.from_pretrained(qwen2_dir).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_ensure_tiny_model_builds_once(tmp_path):
    model_dir = ensure_tiny_model(tmp_path / "m", num_layers=1)
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path / "m", num_layers=1) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ModelPathError, match="holds other files and no config.json"):
        ensure_tiny_model(tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_size": 64, "num_heads": 4}, "head_dim = hidden_size/num_heads = 64/4 = 16"),
        ({"arch": "gpt9"}, "Expected one of ['llama', 'qwen2']"),
        ({"vocab_size": 50}, "vocab_size >= 98"),
        ({"num_kv_heads": 3}, "num_kv_heads=3"),
    ],
)
def test_bad_tiny_model_shapes_raise_config_error(tmp_path, kwargs, message):
    with pytest.raises(ConfigError) as info:
        build_tiny_model(tmp_path / "bad", **kwargs)
    assert message in str(info.value)
    assert not (tmp_path / "bad").exists()


def test_check_model_dir_errors(tmp_path, qwen2_dir):
    with pytest.raises(ModelPathError, match="does not exist.*leave model.path unset"):
        check_model_dir(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelPathError, match="no config.json; no weights.*no tokenizer"):
        check_model_dir(empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"]:
        (no_weights / name).write_bytes((qwen2_dir / name).read_bytes())
    with pytest.raises(ModelPathError, match=r"has no weights \(\*.safetensors") as info:
        check_model_dir(no_weights)
    assert "config.json" in str(info.value)  # lists what the directory does contain


# --------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_splits_are_disjoint_and_deterministic(name):
    task = get_task(name)
    train = task.make_records("train", 300, seed=0)
    evals = task.make_records("eval", 100, seed=0)
    assert len(train) == 300 and len(evals) == 100
    assert not {task.problem(r) for r in train} & {task.problem(r) for r in evals}
    assert task.make_records("train", 300, seed=0) == train
    assert task.make_records("train", 300, seed=1) != train
    assert all(len(r["prompt"]) <= 16 for r in train + evals)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_demonstration_gets_full_reward_and_wrong_gets_less(name):
    task = get_task(name)
    reward_fn = load_reward_fn(task.reward_fn)
    records = task.make_records("train", 20, seed=3)
    demos = [episode_text(task.demonstration(record)) for record in records]  # calc: whole episodes
    assert check_reward_fn(reward_fn, task.reward_fn, records, demos) == [1.0] * 20
    wrong = [demo + (demo[-1] if task.partial_credit else "x") for demo in demos]  # one extra character
    rewards = check_reward_fn(reward_fn, task.reward_fn, records, wrong)
    assert all(0.0 < reward < 1.0 if task.partial_credit else reward == 0.0 for reward in rewards)
    assert check_reward_fn(reward_fn, task.reward_fn, records, [""] * 20) == [0.0] * 20


def test_task_formats_and_partial_credit_by_hand():
    record = get_task("reverse").make_records("train", 1, seed=0)[0]
    prompt_text = record["prompt"].removeprefix("rev ").removesuffix("=")
    assert record["target"] == prompt_text[::-1]
    add_record = get_task("add").make_records("train", 1, seed=0)[0]
    a, b = add_record["prompt"].removeprefix("add ").removesuffix("=").split("+")
    assert add_record["target"] == str(int(a) + int(b))

    def rewards(fn, completions, targets):
        return fn([""] * len(targets), completions, target=targets)

    assert rewards(reverse_reward, ["abxd", "ab", "abcdef", "abcd \n junk", " abcd<eos>"],
                   ["abcd"] * 5) == [0.75, 0.5, 4 / 6, 1.0, 1.0]
    assert rewards(copy_reward, ["dcba", "xbcd", ""], ["abcd"] * 3) == [0.0, 0.75, 0.0]
    assert rewards(add_reward, ["19", "18", "9", "119", "29", "x"], ["19"] * 6) == \
        [1.0, 0.5, 0.5, 2 / 3, 0.5, 0.0]


def test_get_task_errors_and_overrides():
    with pytest.raises(ConfigError, match=r"task='nope'.*\['add', 'calc', 'chain', 'copy', 'guess', 'reverse'\]"):
        get_task("nope")
    long_task = get_task("reverse", min_len=7, max_len=7)
    assert all(len(r["target"]) == 7 for r in long_task.make_records("train", 10, seed=0))
    with pytest.raises(ConfigError, match="no option"):
        get_task("reverse", max_value=3)
    with pytest.raises(ConfigError, match="min_len=5, max_len=2"):
        get_task("copy", min_len=5, max_len=2)


# --------------------------------------------------------------------------- reward loading


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_reward_fn_from_file_and_module(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    example = load_reward_fn("examples/my_rewards.py:score")
    assert example(["p", "p"], ["ka", "zzzzzzzzzzzzzzzz"], letter=["k", "k"]) == [1.0, 0.25]
    assert load_reward_fn("rlhf_dist.data.tasks:reverse_reward") is reverse_reward
    (tmp_path / "helper.py").write_text("BONUS = 0.5\n")
    write(tmp_path / "mine.py", "from helper import BONUS\n"
          "def score(prompts, completions, **fields):\n    return [BONUS] * len(completions)\n")
    assert load_reward_fn(f"{tmp_path}/mine.py:score")([], ["a"]) == [0.5]


def test_load_reward_fn_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardFnError, match="not a valid spec.*'path/to/file.py:fn_name'"):
        load_reward_fn("examples/my_rewards.py")
    with pytest.raises(RewardFnError, match=f"file not found: {tmp_path}/missing.py"):
        load_reward_fn("missing.py:score")
    write(tmp_path / "broken.py", "import numpy\nraise ValueError('no config for rewards')\n")
    with pytest.raises(RewardFnError, match="ValueError: no config for rewards"):
        load_reward_fn("broken.py:score")
    write(tmp_path / "syntax.py", "def score(:\n")
    with pytest.raises(RewardFnError, match="SyntaxError"):
        load_reward_fn("syntax.py:score")
    with pytest.raises(RewardFnError, match="ModuleNotFoundError: No module named 'no_such_pkg'"):
        load_reward_fn("no_such_pkg.rewards:score")
    write(tmp_path / "other.py", "import os\nLIMIT = 3\ndef reward_a(p, c):\n    return []\n"
          "class Scorer:\n    pass\n")
    with pytest.raises(RewardFnError, match=r"no attribute 'score'.*\['Scorer', 'reward_a'\]"):
        load_reward_fn("other.py:score")
    with pytest.raises(RewardFnError, match="'LIMIT' .* is a int, not a function"):
        load_reward_fn("other.py:LIMIT")


# --------------------------------------------------------------------------- check_reward_fn

RECORDS = [{"prompt": "rev ab=", "target": "ba"}, {"prompt": "rev cd=", "target": "dc", "id": 7}]


def test_check_reward_fn_passes_fields_and_converts():
    seen = {}

    def fn(prompts, completions, **fields):
        seen.update(fields, prompts=prompts)
        return torch.tensor([0.5, 1])

    assert check_reward_fn(fn, "t:fn", RECORDS, ["ba", "x"]) == [0.5, 1.0]
    assert seen == {"prompts": ["rev ab=", "rev cd="], "target": ["ba", "dc"], "id": [None, 7]}


def test_check_reward_fn_errors():
    def raises(prompts, completions, **fields):
        return [1 / 0 for _ in completions]

    with pytest.raises(RewardFnError) as info:
        check_reward_fn(raises, "my.py:raises", RECORDS, ["ba", "x"])
    message = str(info.value)
    assert "reward.fn='my.py:raises' raised ZeroDivisionError: division by zero" in message
    assert "prompt='rev ab=', completion='ba'" in message
    with pytest.raises(RewardFnError, match=r"returned 1 values for 2 completions: \[1.0\]"):
        check_reward_fn(lambda p, c, **f: [1.0], "s", RECORDS, ["a", "b"])
    with pytest.raises(RewardFnError, match="returned a float: 1.0"):
        check_reward_fn(lambda p, c, **f: 1.0, "s", RECORDS, ["a", "b"])
    with pytest.raises(RewardFnError, match="returned nan .* at index 1"):
        check_reward_fn(lambda p, c, **f: [0.0, math.nan], "s", RECORDS, ["a", "b"])
    with pytest.raises(RewardFnError, match="returned 'high' .str. at index 0"):
        check_reward_fn(lambda p, c, **f: ["high", 1], "s", RECORDS, ["a", "b"])


# --------------------------------------------------------------------------- prompt files


def test_load_prompt_records_and_errors(tmp_path):
    good = write(tmp_path / "p.jsonl", '{"prompt": "a", "target": "b"}\n\n{"prompt": "c"}\n')
    assert load_prompt_records(good) == [{"prompt": "a", "target": "b"}, {"prompt": "c"}]
    with pytest.raises(DatasetError, match="not found"):
        load_prompt_records(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="is empty"):
        load_prompt_records(write(tmp_path / "empty.jsonl", "\n"))
    with pytest.raises(DatasetError, match="line 2: invalid JSON"):
        load_prompt_records(write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{"prompt": \n'))
    with pytest.raises(DatasetError, match='line 1: .* has no string "prompt"'):
        load_prompt_records(write(tmp_path / "noprompt.jsonl", '{"text": "a"}\n'))


def test_prompt_sampler_epochs_determinism_and_resume():
    records = [{"prompt": str(i)} for i in range(10)]
    sampler = PromptSampler(records, batch_size=4, seed=5)
    first_epoch = [sampler.next_batch() for _ in range(2)]
    seen = [r["prompt"] for batch in first_epoch for r in batch]
    assert len(set(seen)) == 8  # no repeats within an epoch; 2 left over are skipped
    assert sampler.next_batch() and sampler.epoch == 1
    same = PromptSampler(records, batch_size=4, seed=5)
    assert [same.next_batch() for _ in range(2)] == first_epoch
    assert [PromptSampler(records, 4, seed=6).next_batch() for _ in range(2)] != first_epoch

    state = json.loads(json.dumps(sampler.state_dict()))
    expected = [sampler.next_batch() for _ in range(5)]
    resumed = PromptSampler(records, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(5)] == expected
    with pytest.raises(DatasetError, match="saved with 10 prompt records but this run has 9"):
        PromptSampler(records[:9], 4).load_state_dict(state)


def test_prompt_sampler_errors():
    with pytest.raises(DatasetError, match="no records"):
        PromptSampler([], batch_size=1, seed=0)
    with pytest.raises(DatasetError, match="batch_size=4 is larger than the 3 prompt records"):
        PromptSampler([{"prompt": "a"}] * 3, batch_size=4, seed=0)


# --------------------------------------------------------------------------- logprobs, micro-batches


def _full_vocab_logprobs(model, batch, temperature):
    """The obvious computation: fp32 logits of every position, sliced to the response."""
    from rlhf_dist.models.hf import position_ids_from_mask

    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, batch.prompt_width - 1 : -1].float() / temperature  # (B, T, V)
    log_norm = logits.logsumexp(-1)
    logprobs = logits.gather(-1, ids[:, batch.prompt_width :, None]).squeeze(-1) - log_norm
    return logprobs, log_norm - (logits.softmax(-1) * logits).sum(-1)


def _mixed_batch(prompt_lens, response_lens):
    from rlhf_dist.data.batch import collate_sequences

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 98, (n,), generator=gen).tolist() for n in prompt_lens]
    responses = [torch.randint(3, 98, (n,), generator=gen).tolist() for n in response_lens]
    return collate_sequences(prompts, responses, [[0.0] * n for n in response_lens], pad_id=0)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1024])  # one position, 2 of 5 (uneven), all
def test_chunked_response_logprobs_equal_full_vocab_ones_with_gradients(qwen2_dir, chunk_tokens):
    from rlhf_dist.models.hf import disable_dropout, load_causal_lm, response_logprobs

    model = disable_dropout(load_causal_lm(str(qwen2_dir)))
    batch = _mixed_batch([3, 5, 2], [5, 1, 3])  # P = 5, T = 5
    weights = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))

    def values_and_grads(compute):
        model.zero_grad()
        logprobs, entropy = compute()
        ((weights[0] * logprobs).sum() + (weights[1] * entropy).sum()).backward()
        return logprobs.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want = values_and_grads(lambda: _full_vocab_logprobs(model, batch, 0.7))
    got = values_and_grads(lambda: response_logprobs(
        model, batch["input_ids"], batch["attention_mask"], batch.prompt_width, 0.7,
        with_entropy=True, chunk_tokens=chunk_tokens))
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
    for name, grad in want[2].items():
        scale = float(grad.abs().max())  # fp32 rounding of sums over tokens and vocab
        torch.testing.assert_close(got[2][name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_entropy_as_a_metric_builds_no_graph_and_keeps_its_value(qwen2_dir):
    from rlhf_dist.models.hf import load_causal_lm, response_logprobs

    model = load_causal_lm(str(qwen2_dir))
    batch = _mixed_batch([3, 5], [4, 2])
    args = (model, batch["input_ids"], batch["attention_mask"], batch.prompt_width)
    logprobs, metric = response_logprobs(*args, with_entropy=True, entropy_grad=False, chunk_tokens=4)
    _, with_graph = response_logprobs(*args, with_entropy=True, chunk_tokens=4)
    assert logprobs.requires_grad and not metric.requires_grad and with_graph.requires_grad
    torch.testing.assert_close(metric, with_graph.detach(), rtol=0, atol=0)


def test_token_budget_parts_respect_the_budget_and_pad_less_than_fixed_size():
    from rlhf_dist.data.batch import token_budget_parts

    lengths, prompt_width, budget = [1, 12, 1, 11, 2, 10, 3, 12], 6, 40
    parts = token_budget_parts(lengths, prompt_width, budget)
    assert sorted(r for part in parts for r in part) == list(range(8))

    def padded(part):
        return len(part) * (prompt_width + max(lengths[r] for r in part))

    assert all(padded(part) <= budget for part in parts)
    assert [sorted(part) for part in parts] == [[1, 7], [3, 5], [0, 2, 4, 6]]  # longest first
    fixed = sum(padded(list(range(i, i + 2))) for i in range(0, 8, 2))
    assert sum(map(padded, parts)) == 36 + 34 + 36 < fixed == 36 + 34 + 32 + 36
    more = token_budget_parts(lengths, prompt_width, budget, num_parts=5)  # another rank needs 5
    assert len(more) == 5 and sorted(r for part in more for r in part) == list(range(8))
    assert max(map(padded, more)) <= budget
    assert token_budget_parts([30], 6, budget) == [[0]]  # over the budget alone: its own part
    with pytest.raises(ValueError, match="cannot split 2 rows into 3"):
        token_budget_parts([1, 2], 6, budget, num_parts=3)


def test_split_by_tokens_trims_each_micro_batch_to_its_own_longest_response():
    batch = _mixed_batch([3, 6, 4, 5], [1, 12, 2, 11])
    micros = batch.split_by_tokens(40)
    assert [m["input_ids"].shape for m in micros] == [(2, 18), (2, 8)]
    assert sum(m.token_counts()[1] for m in micros) == int(batch["attention_mask"].sum())
    rows = sorted(tuple(r.tolist()) for m in micros for r in m["response_mask"].sum(-1, keepdim=True))
    assert rows == [(1.0,), (2.0,), (11.0,), (12.0,)]


def test_batched_forward_by_token_budget_keeps_row_order_and_values():
    # rows of different lengths grouped by length into budgeted micro-batches must come back in
    # the batch's order, each value where the row-by-row forward puts it
    from rlhf_dist.data.batch import collate_sequences
    from rlhf_dist.models.hf import batched_forward

    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3, 9, 2, 7]
    responses = [torch.randint(3, 90, (n,), generator=gen).tolist() for n in lengths]
    batch = collate_sequences([[1, 2]] * len(lengths), responses, [[0.0] * n for n in lengths], 0)
    calls = []

    def forward(input_ids, attention_mask, prompt_width):  # (b, T_micro): the token ids as values
        calls.append(tuple(input_ids.shape))
        return input_ids[:, prompt_width:].float() * attention_mask[:, prompt_width:]

    by_rows = batched_forward(batch, 2, forward)
    calls.clear()
    by_tokens = batched_forward(batch, 2, forward, max_tokens=24)
    assert torch.equal(by_tokens, by_rows)
    assert all(rows * width <= 24 or rows == 1 for rows, width in calls)
    assert sorted(w - 2 for _, w in calls)[0] < max(lengths)  # short rows were not padded to 9
