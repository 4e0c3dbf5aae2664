"""The embedded default task: multi-step addition/subtraction of 2-digit numbers.

A problem is a chain of 3 operands (3 in 4 problems) or 4 operands, each from 10 to 99, joined
by ``+`` or ``-``, with every running total non-negative. Text formats (byte-level, so the
token counts below are character counts):

- prompt: the expression, then ``=?`` and a newline, e.g. ``"37+48-12=?\\n"`` (10-15 tokens).
  The model answers straight after it; no chat template or instruction.
- solution: one worked step per operator, then the answer in GSM8K's format, e.g.
  ``"37+48=85. 85-12=73. #### 73"`` (27-44 tokens, plus EOS when used as a training target).
- answer: the final number as text, e.g. ``"73"``; ``apo_core.rewards.gsm8k_reward`` scores a
  completion against it (the number after the last ``####``).

Splits (``sft``, ``train``, ``test``) are disjoint by construction: a problem's split is fixed by
a SHA-256 hash of its expression (20% test, 30% train, 50% sft), never by Python's salted
``hash()``, so a held-out prompt cannot be drawn for SFT or RL under any seed. ``make_problems``
is deterministic in (split, n, seed), has no duplicates within a call, and its first k problems
do not depend on n.
"""

from __future__ import annotations

import hashlib
import random

SPLITS = ("sft", "train", "test")
# Cumulative percent boundaries of each split on the 0-99 hash bucket.
_BUCKETS = {"test": (0, 20), "train": (20, 50), "sft": (50, 100)}
_LOW, _HIGH = 10, 99
_P_FOUR_OPERANDS = 0.25
_HASH_SALT = "apo-embedded-v1:"


def _bucket(expression: str) -> int:
    digest = hashlib.sha256((_HASH_SALT + expression).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % 100


def split_of(expression: str) -> str:
    """The split an expression such as ``"37+48-12"`` belongs to."""
    bucket = _bucket(expression)
    for split, (lo, hi) in _BUCKETS.items():
        if lo <= bucket < hi:
            return split
    raise AssertionError(bucket)  # pragma: no cover - the buckets cover 0-99


def _draw(rng: random.Random) -> tuple[str, str, str] | None:
    """(expression, solution, answer) for one random chain, or None if a running total goes negative."""
    n_operands = 4 if rng.random() < _P_FOUR_OPERANDS else 3
    operands = [rng.randint(_LOW, _HIGH) for _ in range(n_operands)]
    operators = [rng.choice("+-") for _ in range(n_operands - 1)]
    total = operands[0]
    steps = []
    for op, value in zip(operators, operands[1:]):
        new_total = total + value if op == "+" else total - value
        if new_total < 0:
            return None
        steps.append(f"{total}{op}{value}={new_total}.")
        total = new_total
    expression = str(operands[0]) + "".join(f"{op}{v}" for op, v in zip(operators, operands[1:]))
    solution = " ".join(steps) + f" #### {total}"
    return expression, solution, str(total)


def make_problems(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct problems of ``split``: dicts with prompt_id, prompt, answer, solution.

    >>> make_problems("test", 1)[0]["prompt_id"]
    'emb-test-00000'
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rng = random.Random(f"{_HASH_SALT}{split}:{seed}")
    id_prefix = f"emb-{split}-" if seed == 0 else f"emb-{split}-s{seed}-"
    problems: list[dict] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 100 * n + 10_000
    while len(problems) < n:
        attempts += 1
        if attempts > max_attempts:  # pragma: no cover - the problem space holds millions
            raise RuntimeError(f"could not draw {n} distinct {split} problems")
        drawn = _draw(rng)
        if drawn is None:
            continue
        expression, solution, answer = drawn
        if expression in seen or split_of(expression) != split:
            continue
        seen.add(expression)
        problems.append(
            {
                "prompt_id": f"{id_prefix}{len(problems):05d}",
                "prompt": f"{expression}=?\n",
                "answer": answer,
                "solution": solution,
            }
        )
    return problems
