"""The embedded default: synthetic task, byte-level tokenizer, committed reference checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from apo_core.embedded import SPLITS, make_problems, split_of
from apo_core.rewards import gsm8k_reward
from apo_core.tokenizer import build_byte_tokenizer

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "apo_core" / "assets" / "embedded-reference"


# ---------------------------------------------------------------- task


def test_make_problems_is_deterministic():
    for split in SPLITS:
        assert make_problems(split, 200) == make_problems(split, 200)
        assert make_problems(split, 50, seed=3) == make_problems(split, 50, seed=3)
    assert make_problems("train", 50, seed=0) != make_problems("train", 50, seed=1)


def test_prefix_does_not_depend_on_n():
    assert make_problems("test", 300)[:100] == make_problems("test", 100)


def test_schema_and_prompt_ids():
    problems = make_problems("test", 20)
    assert problems[12]["prompt_id"] == "emb-test-00012"
    for p in problems:
        assert set(p) == {"prompt_id", "prompt", "answer", "solution"}
        assert all(isinstance(v, str) for v in p.values())
        assert p["prompt"].endswith("=?\n")
        assert p["solution"].endswith(f"#### {p['answer']}")
        assert int(p["answer"]) >= 0
    assert len({p["prompt_id"] for p in make_problems("train", 500, seed=2)}) == 500


def test_splits_are_disjoint_and_without_duplicates():
    by_split = {split: make_problems(split, 3000) for split in SPLITS}
    prompts = {split: [p["prompt"] for p in problems] for split, problems in by_split.items()}
    for split, items in prompts.items():
        assert len(set(items)) == len(items), f"duplicates in {split}"
        assert all(split_of(prompt[: -len("=?\n")]) == split for prompt in items)
    test = set(prompts["test"])
    assert not test & set(prompts["sft"])
    assert not test & set(prompts["train"])
    assert not set(prompts["sft"]) & set(prompts["train"])
    # Another seed draws other problems, but never crosses splits.
    assert not test & {p["prompt"] for p in make_problems("sft", 3000, seed=7)}


def test_bad_split_and_bad_n():
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        make_problems("validation", 3)
    with pytest.raises(ValueError):
        make_problems("test", -1)
    assert make_problems("test", 0) == []


def test_solutions_are_correct_worked_steps():
    problems = make_problems("sft", 2000)
    solutions = [p["solution"] for p in problems]
    answers = [p["answer"] for p in problems]
    assert gsm8k_reward(solutions, answers) == [1.0] * len(problems)
    off_by_one = [str(int(a) + 1) for a in answers]
    assert gsm8k_reward(solutions, off_by_one) == [0.0] * len(problems)
    for p in problems:
        expression = p["prompt"][: -len("=?\n")]
        steps = p["solution"].split(" #### ")[0].split(" ")
        assert len(steps) == expression.count("+") + expression.count("-")
        total = None
        for step in steps:
            lhs, rhs = step.rstrip(".").split("=")
            op = "+" if "+" in lhs else "-"
            a, b = (int(x) for x in lhs.split(op))
            assert total is None or a == total
            total = a + b if op == "+" else a - b
            assert total == int(rhs) >= 0  # every running total is non-negative
        assert str(total) == p["answer"]
    assert any(p["solution"].count(".") == 3 for p in problems)  # some 4-operand chains


# ---------------------------------------------------------------- tokenizer

UNICODE_SAMPLES = [
    "Natalia sold clips to 48 of her friends in April.\nShe earned $1,000 in total.\n#### 1000",
    "37+48=85. 85-12=73. #### 73",
    "  leading spaces, tabs\tand\r\nwindows newlines  ",
    "ünïcødé — 日本語, emoji 😀👍🏽, zero-width\u200bjoiner, NUL\x00byte",
    "",
]
# Not NFC-normalised (decomposed accent, Angstrom sign): the project's tokenizer keeps them as is.
NON_NFC = "cafe\u0301 \u212b"


def test_tokenizer_round_trips_unicode():
    tok = build_byte_tokenizer()
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert len(tok) == 258
    for text in [*UNICODE_SAMPLES, NON_NFC]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == list(text.encode("utf-8"))  # one token per byte, id = byte value
        assert tok.decode(ids) == text
    assert tok("1+2")["input_ids"] == list(b"1+2")  # nothing added automatically


def test_tokenizer_left_pads_batches():
    tok = build_byte_tokenizer()
    batch = tok(["1+2=?\n", "11+22-3=?\n"], padding=True)
    assert batch["input_ids"][0][:4] == [tok.pad_token_id] * 4
    assert batch["attention_mask"][0] == [0] * 4 + [1] * 6


def test_tokenizer_save_load_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_byte_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok)
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert loaded.padding_side == "left"
    for text in [*UNICODE_SAMPLES, NON_NFC]:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text


# ---------------------------------------------------------------- committed checkpoint


def test_reference_checkpoint_loads_and_answers_in_format():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (REFERENCE_DIR / "model.safetensors").is_file(), "run scripts/pretrain_reference.py"
    tok = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_DIR, dtype=torch.float32).eval()
    assert model.config.model_type == "qwen2"
    assert model.config.head_dim >= 32
    assert model.config.vocab_size >= len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    # transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer (NFC-normalising); on
    # NFC text it must give exactly the ids of the tokenizer the model was trained with.
    built = build_byte_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.padding_side) == (built.pad_token_id, built.eos_token_id, "left")
    for text in UNICODE_SAMPLES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == built(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text

    problems = make_problems("test", 8)
    enc = tok([p["prompt"] for p in problems], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=64, do_sample=False)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    formatted = [t for t in texts if t.count("####") == 1 and t.rsplit("#### ", 1)[-1].strip().isdigit()]
    assert formatted, texts
    # Every greedy answer stops at EOS in the worked-step format.
    assert all(tok.eos_token_id in row for row in out[:, enc["input_ids"].shape[1] :].tolist())

    # Left padding in a batch gives the same greedy answer as the prompt alone.
    single = tok(problems[0]["prompt"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        alone = model.generate(**single, max_new_tokens=64, do_sample=False)
    assert tok.decode(alone[0, single["input_ids"].shape[1] :], skip_special_tokens=True) == texts[0]
