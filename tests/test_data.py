"""Data: gold extraction, prompt templates, bad-row accounting, file reading."""

import json

import polars as pl
import pytest

from tasks.config import load_config
from apo_core.data import TEMPLATES, clean_rows, gold_from_field, last_boxed, render_prompt, spec_for  # last_boxed: re-exported
from tasks.datasets import hub_uri, read_rows


def clean(rows, **kw):
    args = dict(split="train", name="t", prompt_field="question", answer_field="answer", answer_from="field", template="raw")
    return clean_rows(rows, **{**args, **kw})


@pytest.mark.parametrize(
    "value, answer_from, expected",
    [
        ("She pays 5+13=18.\n#### 1,018", "gsm8k_solution", "1018"),
        ("no marker here", "gsm8k_solution", None),
        (r"so \boxed{\frac{1}{\sqrt{2}}}.", "boxed", r"\frac{1}{\sqrt{2}}"),
        (r"first \boxed{1} then \boxed{ {2} }", "boxed", "{2}"),
        (r"unclosed \boxed{3", "boxed", None),
        (27.0, "field", "27"),
        (2.5, "field", "2.5"),
        ("  ", "field", None),
        (None, "field", None),
        (True, "field", None),
    ],
)
def test_gold_from_field(value, answer_from, expected):
    assert gold_from_field(value, answer_from) == expected


def test_last_boxed_handles_fbox_and_nesting():
    assert last_boxed(r"\fbox{a{b}c}") == "a{b}c"
    assert last_boxed("nothing") is None


def test_paper_templates():
    assert render_prompt("What is 2+2?", "gsm8k") == 'What is 2+2?\nLet\'s think step by step and output the final answer after "####".'
    assert render_prompt("Find x.", "math") == "Find x.\nLet's think step by step and output the final answer within \\boxed{}."
    assert render_prompt("Q", "Question: {question}\nAnswer:") == "Question: Q\nAnswer:"
    assert render_prompt("Q", "chat", chat_template=lambda q: f"<user>{q}</user>") == "<user>Q</user>"
    with pytest.raises(ValueError, match="chat template"):
        render_prompt("Q", "chat")


def test_bad_rows_are_skipped_and_counted_per_reason():
    rows = [
        {"id": 1, "question": "ok?", "answer": "3"},
        {"id": 2, "question": "", "answer": "3"},
        {"id": 3, "answer": "3"},
        {"id": 4, "question": "no answer", "answer": ""},
        {"id": 5, "question": ["a", "list"], "answer": "1"},
        {"id": 6, "question": "dict answer", "answer": {"x": 1}},
        {"id": 1, "question": "duplicate id", "answer": "2"},
        {"id": 7, "question": "x" * 500, "answer": "2"},
        {},
    ]
    out = clean(rows, id_field="id", max_prompt_tokens=100, count_tokens=len)
    assert [r.prompt_id for r in out.records] == ["t-train-1"]
    assert dict(out.skipped) == {"missing_prompt": 3, "missing_answer": 1, "wrong_type": 2, "duplicate_id": 1, "too_long": 1}


def test_limit_counts_usable_rows_only():
    rows = [{"question": ""}] + [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    out = clean(rows, limit=4)
    assert len(out.records) == 4 and out.skipped["missing_prompt"] == 1


def test_read_rows_jsonl_json_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"q": 1}\nnot json\n\n[1, 2]\n{"q": 2}\n')
    assert read_rows(str(tmp_path / "a.jsonl")) == [{"q": 1}, {}, {}, {"q": 2}]
    (tmp_path / "b.json").write_text(json.dumps([{"q": 1}, 5]))
    assert read_rows(str(tmp_path / "b.json")) == [{"q": 1}, {}]
    pl.DataFrame({"q": [1, 2]}).write_parquet(tmp_path / "c.parquet")
    assert read_rows(f"file://{tmp_path}/c.parquet") == [{"q": 1}, {"q": 2}]
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_builtin_specs_and_hub_uris():
    gsm = spec_for(load_config(overrides=["data.name=gsm8k"]).data)
    assert (gsm.prompt_field, gsm.answer_from, gsm.template) == ("question", "gsm8k_solution", "gsm8k")
    assert hub_uri(gsm, "test", "gsm8k") == "hf://datasets/openai/gsm8k@main/main/test-00000-of-00001.parquet"
    m500 = spec_for(load_config(overrides=["data.name=math500"]).data)
    with pytest.raises(ValueError, match="has no 'train' split on the hub; set data.train_path"):
        hub_uri(m500, "train", "math500")
    custom = spec_for(load_config(overrides=["data.name=custom", "data.train_path=x.jsonl", "data.prompt_field=q",
                                             "data.template=Q: {question}"]).data)
    assert (custom.prompt_field, custom.answer_field, custom.template) == ("q", "answer", "Q: {question}")


def test_reward_follows_the_data_set():
    assert load_config().reward_name == "embedded"
    assert load_config(overrides=["data.name=gsm8k"]).reward_name == "gsm8k"
    assert load_config(overrides=["data.name=math500"]).reward_name == "math"
    assert load_config(overrides=["data.name=math500", "reward=gsm8k"]).reward_name == "gsm8k"


def test_shared_gsm8k_sample_parses_fully():
    rows = read_rows("tests/fixtures/data/gsm8k_test_sample.jsonl")
    out = clean(rows, answer_from="gsm8k_solution", template="gsm8k")
    assert len(out.records) == len(rows) and not out.skipped
    assert all(r.answer.lstrip("-").replace(".", "").isdigit() for r in out.records)
    assert out.records[0].prompt.endswith(TEMPLATES["gsm8k"].split("\n", 1)[1])


QWEN_STYLE_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_of_an_instruct_tokenizer_wraps_the_paper_prompt(tmp_path):
    """template=chat goes through the tokenizer's own chat template (as an instruct model's
    tokenizer_config.json carries it), with the paper's instruction inside the user turn."""
    from apo_core.modeling import load_tokenizer
    from tasks.datasets import load_split

    tokenizer = load_tokenizer("embedded")
    tokenizer.chat_template = QWEN_STYLE_CHAT
    tokenizer.save_pretrained(tmp_path / "instruct")
    tokenizer = load_tokenizer(str(tmp_path / "instruct"))  # read back from disk, as a run would
    spec = spec_for(load_config(overrides=["data.name=gsm8k", "data.template=chat"]).data)
    cleaned, uri = load_split("gsm8k", spec, "test", "tests/fixtures/data/gsm8k_test_sample.jsonl", 3, tokenizer)
    prompt = cleaned.records[0].prompt
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert 'output the final answer after "####".' in prompt
    assert uri.endswith("gsm8k_test_sample.jsonl")


def test_rows_without_an_id_field_keep_their_id_as_the_data_grows():
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(5)]
    ids = lambda out: {r.prompt.strip(): r.prompt_id for r in out.records}  # noqa: E731
    grown = ids(clean(rows + [{"question": "q9", "answer": "9"}]))
    assert ids(clean(rows[2:4])).items() <= grown.items()  # q2 and q3 have the ids they have in the larger set
    assert ids(clean(list(reversed(rows)))) == ids(clean(rows))  # and in any order
    again = clean(rows + [{"question": "q1", "answer": "1"}])
    assert len(again.records) == 5 and again.skipped["duplicate_id"] == 1  # the same question twice


def test_a_folder_or_glob_of_parts_is_read_in_name_order_and_train_size_none_takes_every_row(tmp_path):
    from apo_core.modeling import load_tokenizer
    from tasks.datasets import load_split

    parts = tmp_path / "train"
    parts.mkdir()
    (parts / "part-00000.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    pl.DataFrame({"prompt": ["7+1=?", "8+1=?"], "answer": ["8", "9"]}).write_parquet(parts / "part-00001.parquet")
    (parts / ".part-00002.jsonl.tmp").write_text("not a part")  # hidden files are not parts
    spec = spec_for(load_config(overrides=["data.name=custom", f"data.train_path={parts}", "data.train_size=null"]).data)
    tokenizer = load_tokenizer("embedded")
    for path in (str(parts), f"{parts}/part-*"):
        cleaned, uri = load_split("custom", spec, "train", path, None, tokenizer)
        assert [r.answer for r in cleaned.records] == ["1", "2", "3", "8", "9"] and uri == path
    with pytest.raises(FileNotFoundError, match="no JSONL, JSON or Parquet file under"):
        load_split("custom", spec, "train", str(tmp_path / "empty-*"), None, tokenizer)
    with pytest.raises(ValueError, match="train_size None"):
        load_config(overrides=["data.train_size=null"])  # the embedded task generates a fixed number
