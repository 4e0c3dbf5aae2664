"""Prompt records: the rows every stage passes along (prompt_id, prompt, answer, split)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import DataConfig


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: str
    prompt: str
    answer: str
    split: str  # "train" or "test"

    def to_row(self) -> dict:
        return asdict(self)


def build_prompt_set(cfg: DataConfig) -> list[PromptRecord]:
    """Training and held-out prompts for the configured data set."""
    if cfg.name == "embedded":
        from .embedded import make_problems

        rows = []
        for split, n in (("train", cfg.train_size), ("test", cfg.test_size)):
            rows += [PromptRecord(p["prompt_id"], p["prompt"], p["answer"], split) for p in make_problems(split, n, cfg.seed)]
        return rows
    raise ValueError(f"unknown data set {cfg.name!r}; valid: embedded")
