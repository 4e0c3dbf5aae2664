r"""Verifiable rewards: functions from (completions, gold answers) to floats in [0, 1].

``get_reward(name)`` gives the verifier of a task: ``gsm8k`` (final number, pure Python),
``math`` (last ``\boxed{}`` by mathematical equivalence, see ``apo_core.math_equivalence``) and
``embedded`` (GSM8K's verifier). Model output is untrusted text: nothing here evaluates it, and
every verification is bounded in time. A verifier that fails on a response scores it 0.0 and
counts the failure instead of raising: ``reward_stats("math")`` returns the running counters
``{"verified", "no_answer", "errors", "timeouts"}`` (the same dict as ``get_reward("math").stats``);
the pure-Python GSM8K verifier cannot fail and has none.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

from .math_equivalence import MathReward, last_boxed

RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]

# Longest input we look at: bounds regex time on adversarial output.
_MAX_CHARS = 20_000
# A minus sign is a sign only where it cannot be a hyphen ("10-15", "x-3"); thousands are grouped
# by 3 ("1,000", "12,345.5"), so "3,4" is two numbers.
_NUMBER = re.compile(r"(?:(?<![\w)])(-))?(?:\$(-)?)?((?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")


def _numbers(text: str) -> list[float]:
    """Every number in ``text``, with ``$``, thousands separators and units dropped."""
    values = []
    for sign, sign_after_dollar, digits in _NUMBER.findall(text):
        value = float(digits.replace(",", ""))  # may be inf for a 400-digit string; never raises
        values.append(-value if (sign or sign_after_dollar) else value)
    return values


def extract_final_number(text: str) -> float | None:
    r"""Final numeric answer: the first number after the last ``####``, else in the last
    ``\boxed{}``, else the last number in the text.

    >>> extract_final_number("37+48=85. 85-12=73. #### 73")
    73.0
    >>> extract_final_number("so she pays $1,000.")
    1000.0
    >>> extract_final_number("It costs \\boxed{18} dollars; check: 18*2=36")
    18.0
    >>> extract_final_number("no digits") is None
    True
    """
    text = text[-_MAX_CHARS:].replace("\u2212", "-")  # unicode minus
    head, marker, answer_line = text.rpartition("####")
    if marker:
        numbers = _numbers(answer_line.split("\n", 1)[0])
        return numbers[0] if numbers else None
    boxed = last_boxed(text)
    if boxed is not None and (numbers := _numbers(boxed)):
        return numbers[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def gsm8k_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1.0 where the completion's final number equals the gold number, else 0.0.

    Gold answers are numbers as text ("18", "1,000") or GSM8K solutions ending in "#### 18".

    >>> gsm8k_reward(["2+3=5. #### 5", "#### 6", "it is 1,000", "$18.00."], ["5", "5", "1000", "18"])
    [1.0, 0.0, 1.0, 1.0]
    """
    if len(completions) != len(answers):
        raise ValueError(f"got {len(completions)} completions for {len(answers)} answers")
    rewards = []
    for completion, answer in zip(completions, answers):
        got, gold = extract_final_number(completion), extract_final_number(str(answer))
        # Tolerance covers float noise only: 1e-6 relative would accept 1,450,001 for 1,450,000.
        rewards.append(float(got is not None and gold is not None and math.isclose(got, gold, rel_tol=1e-9, abs_tol=1e-9)))
    return rewards


# One instance for the process: it owns the verifier worker processes (started on first use).
math_reward = MathReward()

REWARDS: dict[str, RewardFn] = {
    "gsm8k": gsm8k_reward,
    "math": math_reward,
    # The embedded arithmetic task answers in GSM8K's format, so it shares GSM8K's verifier.
    "embedded": gsm8k_reward,
}


# What each verifier scores is versioned: stored reference samples carry the version they were
# scored under, so a verifier that could score differently must not reuse them. Bump a version
# whenever its verifier's code changes (tests/test_rewards_version.py fails until you do).
REWARD_VERSIONS: dict[str, int] = {"gsm8k": 1, "math": 1, "embedded": 1}


def reward_version(name: str) -> str:
    """The version a reward's scores are stored under: its own, and for `math` math-verify's.

    >>> reward_version("gsm8k")
    'gsm8k-v1'
    """
    get_reward(name)  # an unknown name lists the valid ones
    version = f"{name}-v{REWARD_VERSIONS[name]}"
    if name == "math":
        from importlib.metadata import version as installed

        version += f"+math-verify-{installed('math-verify')}"
    return version


def get_reward(name: str) -> RewardFn:
    """The reward function registered under ``name``; an unknown name lists the valid ones."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(sorted(REWARDS))}") from None


def reward_stats(name: str) -> dict[str, int]:
    """Running failure counters of the reward ``name`` (a copy); {} for a verifier that cannot fail."""
    return dict(getattr(get_reward(name), "stats", {}))
