"""GSM8K verifier: hand-written cases, the reward registry, and every gold of the GSM8K test set."""

import json
from pathlib import Path

import pytest

from apo_core.rewards import REWARDS, extract_final_number, get_reward, gsm8k_reward, reward_stats

FIXTURES = Path(__file__).parent / "fixtures" / "rewards"

# (completion, gold, expected reward)
CASES = [
    # the `#### ` line, in the ways a model writes it
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", 1.0),
    ("#### 18.0", "18", 1.0),
    ("#### 18.00", "18", 1.0),
    ("#### $18", "18", 1.0),
    ("#### $1,000.00", "1000", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("#### 1000", "1,000", 1.0),  # GSM8K golds carry commas too
    ("#### 1,234,567", "1,234,567", 1.0),
    ("#### 18 dollars", "18", 1.0),
    ("#### 18kg", "18", 1.0),
    ("#### -3", "-3", 1.0),
    ("#### 0.5", ".5", 1.0),
    ("#### .5", "0.5", 1.0),
    ("####18", "18", 1.0),
    ("#### 0", "0", 1.0),
    ("#### 007", "7", 1.0),
    ("5 + 13 = 18\n#### 18\n", "18", 1.0),
    ("first guess #### 17\nthen, corrected: #### 18", "18", 1.0),  # the last marker counts
    ("#### 18\n\nQuestion: what is 6 * 7?\nAnswer: 42", "18", 1.0),  # a run-on after the answer
    ("#### $-5", "-5", 1.0),
    ("#### -$5", "-5", 1.0),
    # no marker: a \boxed{} answer, else the last number
    ("She pays $18.", "18", 1.0),
    ("The answer is 18 dollars.", "18", 1.0),
    ("So the total is 1,234,567.", "1234567", 1.0),
    ("It drops to -3 degrees", "-3", 1.0),
    ("The temperature changes by \u22123", "-3", 1.0),  # unicode minus
    ("the answer: 5.\n", "5", 1.0),
    ("The answer is \\boxed{18}.", "18", 1.0),
    ("\\boxed{18}. Check: 18 * 2 = 36", "18", 1.0),
    ("The answer is $\\boxed{1,000}$", "1000", 1.0),
    # the gold may be a whole GSM8K solution
    ("#### 18", "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", 1.0),
    # wrong answers
    ("#### 19", "18", 0.0),
    ("#### 17", "18", 0.0),
    ("#### 18.5", "18", 0.0),
    ("#### 180", "18", 0.0),
    ("#### 1.8", "18", 0.0),
    ("#### 3", "-3", 0.0),
    ("#### -18", "18", 0.0),
    ("#### 1,000", "100", 0.0),
    ("#### 100", "1,000", 0.0),
    ("#### 1,450,001", "1,450,000", 0.0),  # exact for large numbers: no relative slack
    ("no number here", "18", 0.0),
    ("", "18", 0.0),
    ("I think 18 ... #### eighteen", "18", 0.0),  # a marker without a number is no answer
    ("The answer is 18. Then add 20 more", "18", 0.0),  # the last number counts
    ("Between 10-18 apples", "-18", 0.0),  # a hyphen is not a minus sign
    ("#### 18\nActually, it is 19", "19", 0.0),  # the marker wins over later numbers
    ("\\boxed{17}, although 18 would also fit", "18", 0.0),  # the boxed answer wins
    ("the pair is 3,4", "34", 0.0),  # "3,4" is two numbers, not thirty-four
    ("#### 18", "", 0.0),  # no gold number: nothing is correct
]


@pytest.mark.parametrize("completion, gold, expected", CASES)
def test_hand_written_case(completion, gold, expected):
    assert gsm8k_reward([completion], [gold]) == [expected]


def test_case_count():
    assert len(CASES) >= 40
    assert {e for _, _, e in CASES} == {0.0, 1.0}


def test_batch_matches_one_by_one():
    completions, golds, expected = zip(*CASES)
    assert gsm8k_reward(list(completions), list(golds)) == list(expected)


def test_extract_final_number():
    assert extract_final_number("so she pays $1,000.") == 1000.0
    assert extract_final_number("#### 12\n") == 12.0
    assert extract_final_number("nothing") is None
    assert extract_final_number("x" * 1_000_000 + " 7") == 7.0  # long input: only the tail is read


def test_non_string_gold_is_read_as_text():
    assert gsm8k_reward(["#### 18", "#### 18"], [18, 18.0]) == [1.0, 1.0]


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 completions for 1 answers"):
        gsm8k_reward(["#### 1", "#### 2"], ["1"])


def test_registry():
    assert get_reward("gsm8k") is gsm8k_reward
    assert get_reward("embedded") is gsm8k_reward  # the embedded task answers in GSM8K's format
    assert callable(get_reward("math"))
    assert set(REWARDS) == {"gsm8k", "math", "embedded"}
    with pytest.raises(ValueError, match="unknown reward 'gsm9k'; valid: embedded, gsm8k, math"):
        get_reward("gsm9k")
    assert reward_stats("gsm8k") == {}  # pure Python: nothing to count


# --- the GSM8K test set ------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _gold(row: dict) -> str:
    return row["answer"].split("#### ")[-1].replace(",", "")



def _check_golds(rows: list[dict]) -> None:
    golds = [_gold(r) for r in rows]
    # the gold written as a model would: correct
    assert gsm8k_reward([f"Let me compute.\n#### {g}" for g in golds], golds) == [1.0] * len(rows)
    # off by one: wrong
    assert gsm8k_reward([f"Let me compute.\n#### {int(g) + 1}" for g in golds], golds) == [0.0] * len(rows)
    # the reference solution (calculator annotations, commas and all) against its raw gold
    raw_golds = [r["answer"].split("#### ")[-1] for r in rows]
    assert gsm8k_reward([r["answer"] for r in rows], raw_golds) == [1.0] * len(rows)


def test_fixture_sample_golds():
    rows = _read_jsonl(FIXTURES / "gsm8k_test_sample.jsonl")
    assert len(rows) == 20
    assert any("," in r["answer"].split("#### ")[-1] for r in rows) and any(_gold(r).startswith("-") for r in rows)
    _check_golds(rows)


def test_every_gsm8k_test_gold(shared_data):
    rows = _read_jsonl(shared_data / "gsm8k" / "test.jsonl")
    assert len(rows) == 1319
    _check_golds(rows)
