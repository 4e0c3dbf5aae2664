"""Verifiable rewards: plain functions from (completions, gold answers) to floats in [0, 1].

Model output is untrusted text: nothing here evaluates it; numbers are parsed with a regex
and compared with float arithmetic only.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]

_HASH_ANSWER = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# Longest input we look at: bounds regex time on adversarial output.
_MAX_CHARS = 20_000


def _to_float(text: str) -> float | None:
    cleaned = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_final_number(text: str) -> float | None:
    """Final numeric answer: the first number after the last ``####``, else the last number.

    >>> extract_final_number("37+48=85. 85-12=73. #### 73")
    73.0
    >>> extract_final_number("so she pays $1,000.")
    1000.0
    >>> extract_final_number("no digits") is None
    True
    """
    text = text[-_MAX_CHARS:]
    marked = _HASH_ANSWER.findall(text)
    if marked:
        numbers = _NUMBER.findall(marked[-1])
        if numbers:
            return _to_float(numbers[0])
        return None
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def gsm8k_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1.0 where the completion's final number equals the gold number, else 0.0.

    >>> gsm8k_reward(["2+3=5. #### 5", "#### 6", "it is 1,000"], ["5", "5", "1000"])
    [1.0, 0.0, 1.0]
    """
    if len(completions) != len(answers):
        raise ValueError(f"got {len(completions)} completions for {len(answers)} answers")
    rewards = []
    for completion, answer in zip(completions, answers):
        got, gold = extract_final_number(completion), _to_float(answer.strip())
        rewards.append(float(got is not None and gold is not None and abs(got - gold) <= 1e-6 * max(1.0, abs(gold))))
    return rewards


REWARDS: dict[str, RewardFn] = {
    "gsm8k": gsm8k_reward,
    # The embedded arithmetic task answers in GSM8K's format, so it shares GSM8K's verifier.
    "embedded": gsm8k_reward,
}


def get_reward(name: str) -> RewardFn:
    """The reward function registered under ``name``; an unknown name lists the valid ones."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(sorted(REWARDS))}") from None
