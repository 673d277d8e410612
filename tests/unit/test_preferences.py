"""Record files, preference/SFT loaders and the built-in gold preference source (fast, no Ray)."""

import csv
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_dist.data.preference_source import (
    apply_bias,
    build_recipe_data,
    confuse,
    corrupt,
    gold_score,
    label_agreement,
    make_pairwise_preferences,
    make_ranked_demonstrations,
)
from rlhf_dist.data.preferences import (
    PreferencePair,
    load_preference_pairs,
    load_sft_records,
    ranking_to_pairs,
)
from rlhf_dist.data.records import fit_prompt_length, read_records, render_prompt
from rlhf_dist.data.tasks import get_task
from rlhf_dist.errors import ConfigError, DatasetError
from rlhf_dist.models.tiny import build_char_tokenizer

PAIR = {"prompt": "rev abc=", "chosen": "cba", "rejected": "cbx"}
RANKING = {"prompt": "rev abc=", "ranking": ["cba", "cbx", "xyz"], "margin_per_rank": 0.5}
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- file formats


def test_jsonl_locations_count_blank_lines(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(PAIR), "", "  ", json.dumps(RANKING)])
    rows = read_records(path)
    assert [location for _, location in rows] == [f"{path}:1", f"{path}:4"]
    pairs, stats = load_preference_pairs(path)
    assert stats == {"records": 2, "pairs": 4, "skipped": 0, "skipped_examples": []}
    assert pairs[0] == PreferencePair("rev abc=", "cba", "cbx", 0.0, f"{path}:1")
    assert pairs[1].source == f"{path}:4"


def test_json_list_and_json_lines(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([PAIR, RANKING], indent=2))
    rows = read_records(as_list)
    assert [location for _, location in rows] == [f"{as_list}:row 1", f"{as_list}:row 2"]
    as_lines = write_lines(tmp_path / "lines.json", [json.dumps(PAIR), json.dumps(PAIR)])
    assert [location for _, location in read_records(as_lines)] == [f"{as_lines}:1",
                                                                     f"{as_lines}:2"]
    assert len(load_preference_pairs(as_list)[0]) == 4


def test_parquet_mixes_pairs_and_rankings_with_nulls(tmp_path):
    path = tmp_path / "p.parquet"
    columns = sorted(set(PAIR) | set(RANKING))
    rows = [{column: row.get(column) for column in columns} for row in (PAIR, RANKING)]
    pq.write_table(pa.Table.from_pylist(rows), path)  # a field a row lacks is null there
    pairs, stats = load_preference_pairs(path)
    assert stats["pairs"] == 4 and stats["skipped"] == 0
    assert [(p.chosen, p.rejected, p.margin) for p in pairs[1:]] == [
        ("cba", "cbx", 0.5), ("cba", "xyz", 1.0), ("cbx", "xyz", 0.5)]
    assert pairs[2].source == f"{path}:row 2"


def test_csv_through_datasets(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=["prompt", "chosen", "rejected", "margin"])
        writer.writeheader()
        writer.writerow({**PAIR, "margin": 1.5})
        writer.writerow({"prompt": "rev, ab=", "chosen": "ba", "rejected": "ab", "margin": 0})
    pairs, stats = load_preference_pairs(path)
    assert stats["pairs"] == 2
    assert (pairs[1].prompt, pairs[1].margin, pairs[1].source) == ("rev, ab=", 0.0,
                                                                   f"{path}:row 2")
    assert pairs[0].margin == 1.5


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DatasetError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    odd = tmp_path / "data.xyz"
    odd.write_text("x")
    with pytest.raises(DatasetError, match=r"'\.xyz'.*\.jsonl"):
        read_records(odd)


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(PAIR), "{broken"])
    with pytest.raises(DatasetError, match=rf"{path}:2: invalid JSON"):
        read_records(path)


# --------------------------------------------------------------------------- rankings


def test_ranking_to_pairs_by_hand():
    pairs = ranking_to_pairs("p", ["a", "b", "c"], margin_per_rank=0.5, source="f:1")
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [
        ("a", "b", 0.5), ("a", "c", 1.0), ("b", "c", 0.5)]
    assert all(p.prompt == "p" and p.source == "f:1" for p in pairs)
    assert [p.margin for p in ranking_to_pairs("p", ["a", "b", "c", "d"])] == [0.0] * 6


# --------------------------------------------------------------------------- bad records

BAD_PREFERENCES = {
    "invalid json": ('{"prompt": "x"', "invalid JSON"),
    "not an object": ('["a", "b"]', "not a JSON object"),
    "missing prompt": ('{"chosen": "a", "rejected": "b"}', "no 'prompt'"),
    "prompt wrong type": ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "'prompt' is neither"),
    "missing rejected": ('{"prompt": "x", "chosen": "a"}', "'rejected' is missing"),
    "chosen wrong type": ('{"prompt": "x", "chosen": 1, "rejected": "b"}', "'chosen' is a int"),
    "chosen == rejected": ('{"prompt": "x", "chosen": "a", "rejected": "a"}', "same text"),
    "no completion fields": ('{"prompt": "x"}', "no 'chosen'/'rejected' or 'ranking'"),
    "both shapes": ('{"prompt": "x", "chosen": "a", "rejected": "b", "ranking": ["a", "b"]}',
                    "both 'ranking'"),
    "short ranking": ('{"prompt": "x", "ranking": ["a"]}', "has 1 item"),
    "duplicate ranking": ('{"prompt": "x", "ranking": ["a", "b", "a"]}', "repeats"),
    "ranking not strings": ('{"prompt": "x", "ranking": ["a", 2]}', "list of strings"),
    "margin not a number": ('{"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"}',
                            "finite number"),
    "bad chat prompt": ('{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}',
                        "no string 'content'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PREFERENCES))
def test_bad_preference_record_error_and_skip(tmp_path, kind):
    line, fault = BAD_PREFERENCES[kind]
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(PAIR), "", line, json.dumps(PAIR)])
    with pytest.raises(DatasetError) as error:
        load_preference_pairs(path, on_bad="error")
    message = str(error.value)
    assert message.startswith(f"{path}:3: ") and fault in message, message
    assert "expected" in message and "on_bad=skip" in message
    pairs, stats = load_preference_pairs(path, on_bad="skip")
    assert (len(pairs), stats["records"], stats["pairs"], stats["skipped"]) == (2, 3, 2, 1)
    assert stats["skipped_examples"][0].startswith(f"{path}:3: ")


def test_empty_and_all_bad_files_stop(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(DatasetError, match="no usable records .0 read, 0 skipped"):
        load_preference_pairs(empty, on_bad="skip")
    all_bad = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "x"}', "oops", "[]"])
    with pytest.raises(DatasetError, match=rf"{all_bad}: no usable records .3 read, 3 skipped"):
        load_preference_pairs(all_bad, on_bad="skip")
    with pytest.raises(DatasetError, match="no usable"):
        load_sft_records(empty)


def test_skipped_examples_keep_first_three(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['{"prompt": "x"}'] * 5 + [json.dumps(PAIR)])
    _, stats = load_preference_pairs(path, on_bad="skip")
    assert stats["skipped"] == 5
    assert [m.split(": ")[0] for m in stats["skipped_examples"]] == [
        f"{path}:1", f"{path}:2", f"{path}:3"]


def test_on_bad_must_be_known(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(PAIR)])
    with pytest.raises(ConfigError, match=r"on_bad='ignore'.*\['error', 'skip'\]"):
        load_preference_pairs(path, on_bad="ignore")


# --------------------------------------------------------------------------- SFT records

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "rev ab="},
        {"role": "assistant", "content": "ba"}]


def test_sft_records_both_shapes(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [json.dumps({"prompt": "rev ab=", "completion": "ba"}),
                                              json.dumps({"messages": CHAT})])
    records, stats = load_sft_records(path)
    assert records == [
        {"prompt": "rev ab=", "completion": "ba", "source": f"{path}:1"},
        {"prompt": CHAT[:2], "completion": "ba", "source": f"{path}:2"},
    ]
    assert stats == {"records": 2, "examples": 2, "skipped": 0, "skipped_examples": []}


BAD_SFT = {
    "missing completion": ({"prompt": "x"}, "'completion' is missing"),
    "last message from user": ({"messages": CHAT[:2]}, "last message is from 'user'"),
    "only the answer": ({"messages": CHAT[2:]}, "only the assistant answer"),
    "messages not a list": ({"messages": "hi"}, "not a chat"),
    "both shapes": ({"messages": CHAT, "prompt": "x"}, "both 'messages'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_SFT))
def test_bad_sft_record_error_and_skip(tmp_path, kind):
    record, fault = BAD_SFT[kind]
    good = json.dumps({"prompt": "rev ab=", "completion": "ba"})
    path = write_lines(tmp_path / "s.jsonl", [good, json.dumps(record)])
    with pytest.raises(DatasetError, match=rf"^{path}:2: .*{fault}.*on_bad=skip"):
        load_sft_records(path)
    records, stats = load_sft_records(path, on_bad="skip")
    assert len(records) == 1 and stats["skipped"] == 1


# --------------------------------------------------------------------------- prompts


def test_render_prompt_with_and_without_chat_template():
    assert render_prompt("rev ab=", None) == "rev ab="
    plain = build_char_tokenizer()
    assert render_prompt(CHAT[:2], plain) == "system: be brief\nuser: rev ab=\nassistant: "
    assert render_prompt(CHAT[:2], None) == "system: be brief\nuser: rev ab=\nassistant: "
    templated = build_char_tokenizer()
    templated.chat_template = CHAT_TEMPLATE
    assert render_prompt(CHAT[:2], templated) == "<system>be brief\n<user>rev ab=\n<assistant>"
    with pytest.raises(DatasetError, match="neither a string nor chat messages"):
        render_prompt([{"role": "user"}], plain)


def test_fit_prompt_length_truncate_and_drop():
    tokenizer = build_char_tokenizer()  # one token per character
    records = [{"prompt": "rev abcdefgh=", "target": "hgfedcba"}, {"prompt": "rev ab="},
               {"prompt": CHAT[:2]}]  # the chat renders to 37 characters
    kept, dropped, truncated = fit_prompt_length(records, tokenizer, 8, "truncate")
    assert (len(kept), dropped, truncated) == (3, 0, 2)
    assert kept[0] == {"prompt": "bcdefgh=", "target": "hgfedcba"}
    assert kept[1] is records[1] and kept[2]["prompt"] == "assistant: "[-8:]
    assert records[0]["prompt"] == "rev abcdefgh="  # the input is not modified
    kept, dropped, truncated = fit_prompt_length(records, tokenizer, 8, "drop")
    assert (kept, dropped, truncated) == ([records[1]], 2, 0)
    assert fit_prompt_length(records, tokenizer, None, "drop") == (records, 0, 0)
    with pytest.raises(ConfigError, match=r"'cut'.*\['truncate', 'drop'\]"):
        fit_prompt_length(records, tokenizer, 8, "cut")


# --------------------------------------------------------------------------- gold source


def test_corrupt_changes_exactly_k_positions():
    rng = random.Random(0)
    for num_errors in range(6):
        text = corrupt("abcd", num_errors, rng)
        assert len(text) == 4 and sum(a != b for a, b in zip(text, "abcd")) == min(num_errors, 4)
    assert gold_score({"target": "dcba"}, "dcxx\nmore") == 0.5


def reverse4_records(num, split="train"):
    return get_task("reverse", min_len=4, max_len=4).make_records(split, num, seed=0)


def test_ranked_demonstrations_ordered_by_gold():
    rows = make_ranked_demonstrations(reverse4_records(50), (2, 3, 4), random.Random(0))
    assert len(rows) == 50
    for row in rows:
        assert row["gold"] == [0.5, 0.25, 0.0]
        assert row["gold"] == [gold_score(row, text) for text in row["ranking"]]
    best_mean = sum(row["gold"][0] for row in rows) / len(rows)
    assert best_mean == 0.5
    short = make_ranked_demonstrations([{"prompt": "rev abc=", "target": "cba"}], (2, 3, 4, 5),
                                       random.Random(0))
    assert short[0]["gold"] == [pytest.approx(1 / 3), 0.0]  # levels clipped to 3, repeats merged


def test_pair_labels_follow_beta():
    records = reverse4_records(40)
    sharp = make_pairwise_preferences(records, 1000, 100.0, random.Random(0), (2, 3, 4))
    coin = make_pairwise_preferences(records, 2000, 0.0, random.Random(1), (2, 3, 4))
    assert all(pair["chosen"] != pair["rejected"] for pair in sharp + coin)
    assert label_agreement(sharp)[0] > 0.97
    assert 0.44 < label_agreement(coin)[0] < 0.56


def test_build_recipe_data_loads_back(tmp_path):
    task = get_task("reverse", min_len=4, max_len=4)
    out = build_recipe_data(task, tmp_path / "data", num_prompts=30, num_pairs=60,
                            error_levels=(2, 3, 4), beta=10.0, seed=0)
    assert {name: out[name].name for name in ("sft", "rankings", "pairs", "eval_pairs")} == {
        "sft": "sft.jsonl", "rankings": "rankings.jsonl", "pairs": "pairs.jsonl",
        "eval_pairs": "eval_pairs.jsonl"}
    assert out["stats"]["best_demo_gold_mean"] == 0.5
    assert out["stats"]["pair_label_agreement"] > 0.7
    sft, _ = load_sft_records(out["sft"])
    assert len(sft) == 30 and all(gold_score(
        {"target": row["prompt"][4:-1][::-1]}, row["completion"]) == 0.5 for row in sft)
    ranked, stats = load_preference_pairs(out["rankings"])
    assert (stats["records"], stats["pairs"]) == (30, 90)  # 3 demonstrations -> 3 ordered pairs
    assert len(load_preference_pairs(out["pairs"])[0]) == 60
    eval_pairs, _ = load_preference_pairs(out["eval_pairs"])
    train_prompts = {row["prompt"] for row in sft}
    assert len(eval_pairs) == 15 and not {p.prompt for p in eval_pairs} & train_prompts


def test_a_systematic_bias_is_what_the_best_demonstration_carries(tmp_path):
    """bias=0.8 with levels (0, 1, 2): the best demonstration is exact but for the last letter,
    written as the next letter of the alphabet in ~80% of them, so the imitation target (the
    majority letter at that position) is wrong and the best demonstration's gold is ~0.8."""
    task = get_task("reverse", min_len=4, max_len=4)
    out = build_recipe_data(task, tmp_path / "data", num_prompts=2000, num_pairs=4000,
                            error_levels=(0, 1, 2), beta=10.0, seed=0, bias=0.8)
    stats = out["stats"]
    assert 0.76 < stats["sft_biased_frac"] < 0.84
    assert stats["best_demo_gold_mean"] == pytest.approx(1 - 0.25 * stats["sft_biased_frac"], abs=1e-9)
    sft, _ = load_sft_records(out["sft"])
    for row in sft:
        target = row["prompt"][4:-1][::-1]
        assert row["completion"][:3] == target[:3]  # the best demonstration's only error is the bias
        assert row["completion"][3] in (target[3], confuse(target[3]))
    # the comparisons carry the fix: of two 4-letter answers equally right in the first three
    # letters, one right in the last, the right one is preferred (gold gap 0.25: sigmoid(2.5) = 0.92)
    def first3(text, target):
        return sum(a == b for a, b in zip(text[:3], target[:3]))

    pairs = []
    for p in load_preference_pairs(out["pairs"])[0]:
        target = p.prompt[4:-1][::-1]
        if (len(p.chosen) == len(p.rejected) == 4 and first3(p.chosen, target) == first3(p.rejected, target)
                and (p.chosen[3] == target[3]) != (p.rejected[3] == target[3])):
            pairs.append(p.chosen[3] == target[3])
    assert len(pairs) > 100 and 0.85 < sum(pairs) / len(pairs) < 0.98
    unbiased = build_recipe_data(task, tmp_path / "plain", num_prompts=30, num_pairs=60,
                                 error_levels=(2, 3, 4), beta=10.0, seed=0, bias=0.0)
    assert unbiased["stats"]["sft_biased_frac"] < 0.2  # only random errors land there by chance
    with pytest.raises(ConfigError, match="bias=1.5"):
        build_recipe_data(task, tmp_path / "bad", num_prompts=30, num_pairs=60, bias=1.5)


def test_confuse_is_a_fixed_shift():
    assert [confuse(c) for c in "abyz"] == ["b", "c", "z", "a"]
    rng = random.Random(0)
    assert apply_bias("dcba", "dcba", 1.0, rng) == "dcbb" and apply_bias("dcba", "dcba", 0.0, rng) == "dcba"
    assert apply_bias("dc", "dcba", 1.0, rng) == "dc"  # cut short: no last letter to confuse
