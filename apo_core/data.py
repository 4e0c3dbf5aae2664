"""Prompt records: the rows every stage passes along (prompt_id, prompt, answer, split).

Raw rows (dicts read from JSONL/Parquet by the caller) become records here: the gold answer
is taken from a field or extracted from a solution (GSM8K's `#### ` line, MATH's last
`\\boxed{}`), the question is rendered through a prompt template, and bad rows are skipped
and counted per reason, never silently dropped.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .math_equivalence import last_boxed

if TYPE_CHECKING:
    from .config import DataConfig


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: str
    prompt: str
    answer: str
    split: str  # "train" or "test"

    def to_row(self) -> dict:
        return asdict(self)


def data_version(records: Iterable[PromptRecord]) -> str:
    """The digest of a prompt set as used (ids, rendered prompts, gold answers, splits, in order):
    equal digests mean the same prompts; every record of a run's data version goes through here.

    >>> data_version([PromptRecord("a", "1+1=?", "2", "train")])[:12]
    '0f1f89bff366'
    """
    digest = hashlib.sha256()
    for r in records:
        digest.update("\x1f".join((r.prompt_id, r.prompt, r.answer, r.split)).encode() + b"\x1e")
    return digest.hexdigest()


def content_id(text: str) -> str:
    """A row's id from its question when the data has no id field: 12 hex digits of its sha256,
    so a row keeps its id when rows are added or reordered."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in data set: where it lives on the hub and how to read its rows."""

    hub_id: str
    files: dict[str, str]  # split -> file inside the hub repo
    prompt_field: str
    answer_field: str
    answer_from: str  # "field", "gsm8k_solution" or "boxed"
    template: str  # key of TEMPLATES
    reward: str
    hub_revision: str = "main"  # no hub is reachable where apo is built: not pinned to a commit yet
    id_field: str | None = None


BUILTIN: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec("openai/gsm8k", {"train": "main/train-00000-of-00001.parquet", "test": "main/test-00000-of-00001.parquet"},
                         "question", "answer", "gsm8k_solution", "gsm8k", "gsm8k"),
    "math": DatasetSpec("DigitalLearningGmbH/MATH-lighteval", {"train": "data/train-00000-of-00001.parquet", "test": "data/test-00000-of-00001.parquet"},
                        "problem", "solution", "boxed", "math", "math"),
    "math500": DatasetSpec("HuggingFaceH4/MATH-500", {"test": "test.jsonl"}, "problem", "answer", "field", "math", "math", id_field="unique_id"),
    "amc23": DatasetSpec("math-ai/amc23", {"test": "test-00000-of-00001.parquet"}, "problem", "answer", "field", "math", "math", id_field="id"),
    "aime24": DatasetSpec("HuggingFaceH4/aime_2024", {"train": "data/train-00000-of-00001.parquet"}, "problem", "answer", "field", "math", "math", id_field="id"),
}
# `custom`: the user's own files, read with these defaults unless data.* says otherwise
CUSTOM = DatasetSpec("", {}, "prompt", "answer", "field", "raw", "gsm8k")
# Every data.name: the synthetic task apo ships, the user's files, and the built-ins above
DATA_SETS: tuple[str, ...] = ("embedded", "custom", *BUILTIN)


def reward_of(name: str) -> str:
    """The verifier of data set `name`: the built-in's (gsm8k or math), gsm8k for custom files,
    the embedded task's own for `embedded`."""
    if name == "embedded":
        return "embedded"
    return _spec_named(name).reward


def _spec_named(name: str) -> DatasetSpec:
    if name == "custom":
        return CUSTOM
    if name not in BUILTIN:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATA_SETS)}")
    return BUILTIN[name]

TEMPLATES: dict[str, str] = {
    # The paper's prompts.
    "gsm8k": "{question}\nLet's think step by step and output the final answer after \"####\".",
    "math": "{question}\nLet's think step by step and output the final answer within \\boxed{{}}.",
    "raw": "{question}",
}


def render_prompt(question: str, template: str, chat_template: Callable[[str], str] | None = None) -> str:
    """The prompt for `question`: a TEMPLATES key, `chat` (the model's chat template, applied to
    the paper's instruction), or a user string containing `{question}`."""
    if template == "chat":
        if chat_template is None:
            raise ValueError("template 'chat' needs a tokenizer with a chat template")
        return chat_template(question)
    text = TEMPLATES.get(template, template)
    return text.format(question=question)


def chat_prompt(tokenizer, content: str) -> str:
    """`content` as a user turn through the tokenizer's chat template, ready for the assistant's
    answer (ChatML: ``<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n``)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def gold_from_field(value: Any, answer_from: str) -> str | None:
    """The gold answer from a raw field: as is, after GSM8K's `#### `, or the last \\boxed{}."""
    if value is None or isinstance(value, (bool, list, dict)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # AMC's answers come as floats (27.0)
    text = str(value).strip()
    if answer_from == "gsm8k_solution":
        if "####" not in text:
            return None
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif answer_from == "boxed":
        text = last_boxed(text) or ""
    elif answer_from != "field":
        raise ValueError(f"unknown answer_from {answer_from!r}; valid: field, gsm8k_solution, boxed")
    return text or None


@dataclass
class Cleaned:
    records: list[PromptRecord] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows


def clean_rows(
    rows: Iterable[dict],
    *,
    split: str,
    name: str,
    prompt_field: str,
    answer_field: str,
    answer_from: str,
    template: str,
    id_field: str | None = None,
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    chat_template: Callable[[str], str] | None = None,
    limit: int | None = None,
) -> Cleaned:
    """Records from raw rows; a bad row is skipped and counted under one reason:
    missing_prompt, missing_answer, wrong_type, duplicate_id (the same id, or without an id
    field the same question, seen before), too_long."""
    out = Cleaned()
    seen: set[str] = set()
    for row in rows:
        if limit is not None and len(out.records) >= limit:
            break
        question = row.get(prompt_field)
        if question is None or (isinstance(question, str) and not question.strip()):
            out.skipped["missing_prompt"] += 1
            continue
        if not isinstance(question, str):
            out.skipped["wrong_type"] += 1
            continue
        raw_answer = row.get(answer_field)
        if raw_answer is not None and not isinstance(raw_answer, (str, int, float)) or isinstance(raw_answer, bool):
            out.skipped["wrong_type"] += 1
            continue
        answer = gold_from_field(raw_answer, answer_from)
        if answer is None:
            out.skipped["missing_answer"] += 1
            continue
        raw_id = row.get(id_field) if id_field else None
        prompt_id = f"{name}-{split}-{raw_id if raw_id is not None else content_id(question.strip())}"
        if prompt_id in seen:
            out.skipped["duplicate_id"] += 1
            continue
        prompt = render_prompt(question.strip(), template, chat_template)
        if max_prompt_tokens and count_tokens and count_tokens(prompt) > max_prompt_tokens:
            out.skipped["too_long"] += 1
            continue
        seen.add(prompt_id)
        out.records.append(PromptRecord(prompt_id, prompt, answer, split))
    return out


def embedded_prompt_set(cfg: DataConfig, chat_template: Callable[[str], str] | None = None) -> list[PromptRecord]:
    """Training and held-out prompts of the embedded arithmetic task: as generated (``37+48=?\\n``),
    or with `template: chat` the expression as a user turn (``37+48=?``) through `chat_template`."""
    from .embedded import make_problems

    if cfg.template == "chat" and chat_template is None:
        raise ValueError("template 'chat' needs a tokenizer with a chat template")
    render = (lambda prompt: chat_template(prompt.strip())) if cfg.template == "chat" else (lambda prompt: prompt)
    rows = []
    for split, n in (("train", cfg.train_size), ("test", cfg.test_size)):
        rows += [PromptRecord(p["prompt_id"], render(p["prompt"]), p["answer"], split) for p in make_problems(split, n, cfg.seed)]
    return rows


def spec_for(cfg: DataConfig) -> DatasetSpec:
    """The built-in spec of cfg.name, with the config's field overrides applied."""
    base = _spec_named(cfg.name)
    return DatasetSpec(
        hub_id=base.hub_id, files=base.files, hub_revision=base.hub_revision,
        prompt_field=cfg.prompt_field or base.prompt_field,
        answer_field=cfg.answer_field or base.answer_field,
        answer_from=cfg.answer_from or base.answer_from,
        template=cfg.template if cfg.template != "auto" else base.template,
        reward=base.reward, id_field=cfg.id_field or base.id_field,
    )

