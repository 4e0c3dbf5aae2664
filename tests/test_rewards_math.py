r"""MATH verifier: hand-written equivalences, MATH-500 golds, safety and failure accounting.

One shared ``math_reward`` serves most tests (its worker processes start once, ~1 s); tests that
need their own timeout or a broken worker build a private ``MathReward`` and close it.
"""

import itertools
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import apo_core.math_equivalence as me
from apo_core.math_equivalence import MathReward, gold_for_comparison, last_boxed, normalize_answer, plain_number
from apo_core.rewards import get_reward, reward_stats

FIXTURES = Path(__file__).parent / "fixtures" / "rewards"

# (boxed answer, gold, expected reward)
CASES = [
    # fractions, decimals, mixed numbers
    ("0.5", r"\frac{1}{2}", 1.0),
    (r"\frac{1}{2}", "0.5", 1.0),
    (".5", r"\frac{1}{2}", 1.0),
    ("1/2", r"\frac{1}{2}", 1.0),
    (r"\dfrac{1}{2}", r"\frac12", 1.0),
    (r"\tfrac{3}{4}", r"\frac 34", 1.0),
    (r"\frac{-3}{8}", r"-\frac{3}{8}", 1.0),
    ("-0.375", r"-\frac{3}{8}", 1.0),
    (r"\frac{9}{5}", r"1\frac{4}{5}", 1.0),  # MATH writes mixed numbers
    ("137.5", r"137 \frac{1}{2}", 1.0),
    (r"\frac{270}{7}", r"\frac{270}7\text{ degrees}", 1.0),
    ("0.0000672", ".0000672", 1.0),
    ("0.33", r"\frac{1}{3}", 0.0),
    ("0.333", r"\frac{1}{3}", 0.0),
    ("0.00006721", ".0000672", 0.0),  # math-verify alone rounds both to 6 places and says equal
    (r"\frac{1}{3}", r"\frac{1}{2}", 0.0),
    (r"\frac{4}{5}", r"1\frac{4}{5}", 0.0),
    (r"\frac{1}{0}", "5", 0.0),
    # integers, signs, thousands, money, percent
    ("-50", "-50", 1.0),
    ("25", "025", 1.0),  # AIME golds are zero-padded
    ("27", "27.0", 1.0),  # AMC23 golds are floats
    (r"\textbf{(073)}", "073", 1.0),  # as an AIME solution boxes it
    ("2", "-2", 0.0),
    ("10080", r"10,\!080", 1.0),
    ("10,080", "10080", 1.0),
    ("10081", r"10,\!080", 0.0),
    ("11111111100", r"11,\! 111,\! 111,\! 100", 1.0),
    ("32348", r"\$32,\!348", 1.0),
    (r"\$18.90", "18.9", 1.0),
    (r"10\%", "10", 1.0),
    ("2^{10}", "1024", 1.0),
    # tuples, \left( \right)
    (r"(3,\frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (r"\left(3, \dfrac{\pi}{2}\right)", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (r"(3, \frac{\pi}{3})", r"\left( 3, \frac{\pi}{2} \right)", 0.0),
    (r"(\frac{\pi}{2}, 3)", r"\left( 3, \frac{\pi}{2} \right)", 0.0),  # a tuple is ordered
    ("(6,31,-1)", "(6,31,-1)", 1.0),
    # degrees, units, \text{}
    ("90", r"90^\circ", 1.0),
    (r"90^{\circ}", r"90^\circ", 1.0),
    ("90°", r"90^\circ", 1.0),
    ("91", r"90^\circ", 0.0),
    ("5.4", r"5.4 \text{ cents}", 1.0),
    ("864", r"864 \mbox{ inches}^2", 1.0),
    (r"15\text{ cm}^2", r"15\mbox{ cm}^2", 1.0),
    (r"\text{Evelyn}", r"\text{Evelyn}", 1.0),
    ("Evelyn", r"\text{Evelyn}", 1.0),
    (r"\text{Nevely}", r"\text{Evelyn}", 0.0),
    (r"\text{(C)}", "C", 1.0),
    ("(C)", r"\text{(C)}", 1.0),
    (r"\text{(B)}", r"\text{(C)}", 0.0),
    # intervals and unions
    (r"(-\infty, 2) \cup (3, \infty)", r"(-\infty,2)\cup(3,\infty)", 1.0),
    ("(3, 4]", "(3,4]", 1.0),
    ("(3,4)", "(3,4]", 0.0),
    ("[3,4]", "(3,4]", 0.0),
    ("[-2,7]", r"x \in [-2,7]", 1.0),
    (r"\left(\frac{3}{5},\frac{8}{3}\right]", r"\left(\frac{3}{5},\frac{8}{3}\right]", 1.0),
    # sets and lists of answers
    ("-2, 1", "1,-2", 1.0),
    (r"\{-2, 1\}", "1,-2", 1.0),
    ("3,5,7", "3, 5, 7", 1.0),
    ("7, 5, 3", "3, 5, 7", 1.0),
    ("1,2", "1,-2", 0.0),
    ("1", "1,-2", 0.0),
    ("(-2,1)", "-2,1", 0.0),  # an ordered pair or interval is not a list of roots (math-verify: 1.0)
    ("-2, 1", "(-2,1)", 0.0),
    (r"1+\sqrt{19}, 1-\sqrt{19}", r"1 \pm \sqrt{19}", 1.0),
    (r"1 + \sqrt{19}", r"1 \pm \sqrt{19}", 0.0),
    # equations
    ("x=5", "5", 1.0),
    ("5", "x=5", 1.0),
    ("x = 5", "x=5", 1.0),
    ("x=6", "x=5", 0.0),
    ("y=2x+3", "y = 2x + 3", 1.0),
    ("-5x+7y-11z-4=0", "5x - 7y + 11z + 4 = 0", 1.0),
    ("5x - 7y + 11z + 4 = 0", "0", 0.0),  # math-verify alone compares the right-hand side: 1.0
    ("2x+3=5", "5", 0.0),
    ("2x-y+3=0", "y = 2x + 3", 1.0),
    # radicals, pi, complex numbers, expressions
    ("3\\sqrt{13}", "3\\sqrt{13}", 1.0),
    (r"\sqrt{117}", r"3\sqrt{13}", 1.0),
    (r"2\sqrt5", r"2 \sqrt{5}", 1.0),
    (r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{3}", 1.0),
    (r"\sqrt{50}", r"\sqrt{51}", 0.0),
    (r"\pi", r"\pi", 1.0),
    ("3.14", r"\pi", 0.0),
    (r"\frac{\pi}{2}", r"\frac{\pi}2", 1.0),
    ("6-5i", "6 - 5i", 1.0),
    ("-5i+6", "6 - 5i", 1.0),
    ("6+5i", "6 - 5i", 0.0),
    ("-q+p", "p - q", 1.0),
    ("q - p", "p - q", 0.0),
    ("2(k+1)", "2k+2", 1.0),
    ("2k+1", "2k+2", 0.0),
    (r"\frac{\cos x}{\sin x}", r"\cot x", 1.0),
    ("x", "5", 0.0),
    (r"\infty", "5", 0.0),
    # matrices and vectors
    (r"\begin{pmatrix} -\frac{1}{3} \\ \frac{2}{3} \\ \frac{5}{3} \end{pmatrix}",
     r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", 1.0),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}", 0.0),
    (r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", r"\begin{pmatrix}-1&0\\0&-1\end{pmatrix}", 1.0),
    # number bases
    ("52_8", "52_8", 1.0),
    ("2516_8", "2516_8", 1.0),
    ("52", "52_8", 1.0),  # the base may be left out
    ("4210_5", "4210_{5}", 1.0),
    ("52_{10}", "52_8", 0.0),
    ("40_9", "40", 0.0),  # 40 in base 9 is 36 (math-verify drops the subscript: 1.0)
    # nothing in the box, or answers that hedge (what a policy would learn to exploit)
    ("", "5", 0.0),
    ("1,2,3,4,5,6,7,8,9,10", "5", 0.0),
    (r"\pm 5", "5", 0.0),
    ("[0,10]", "5", 0.0),
    (r"\{1,-2,3\}", "1,-2", 0.0),
    ("5 = 5", "5", 0.0),
    (r"5 \text{ or } 6", "5", 0.0),
    (r"\mathbb{R}", r"(-\infty,\infty)", 1.0),
]


@pytest.fixture(scope="module")
def math_reward():
    return get_reward("math")


@pytest.fixture
def private_reward():
    """A MathReward of the test's own (timeouts, broken workers), closed afterwards."""
    made = []

    def make(**kwargs):
        made.append(MathReward(**kwargs))
        return made[-1]

    yield make
    for reward in made:
        reward.close()


def test_case_count():
    assert len(CASES) >= 60
    assert sum(e == 0.0 for _, _, e in CASES) >= 25 and sum(e == 1.0 for _, _, e in CASES) >= 35


def test_hand_written_cases(math_reward):
    """All cases in one batch (as training calls it); failures are listed together."""
    completions = [f"Some reasoning.\nThe final answer is $\\boxed{{{pred}}}$." for pred, _, _ in CASES]
    rewards = math_reward(completions, [gold for _, gold, _ in CASES])
    wrong = [(pred, gold, expected, got) for (pred, gold, expected), got in zip(CASES, rewards) if got != expected]
    assert wrong == []


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\{1, 2\}}", r"\{1, 2\}"),  # the last one, nested braces
    (r"\fbox{7}", "7"),
    (r"The answer is $\boxed 5$.", "5"),
    (r"\boxed {12}", "12"),
    (r"\boxed{\boxed{3}}", "3"),
    (r"\boxed{unclosed", None),
    ("no box at all", None),
    ("\\boxed{" + "9" * (me.MAX_ANSWER_CHARS + 1) + "}", None),  # too long to be an answer
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_helpers():
    assert gold_for_comparison(r"We get $x = \boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"  # a MATH solution
    assert gold_for_comparison(r" \frac{1}{2} ") == r"\frac{1}{2}"  # an answer field
    assert normalize_answer(r"\left( 3, \dfrac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert normalize_answer(r"\text{(C)}") == "C"
    assert plain_number(r"\$32,\!348".replace(r"\$", "").replace(r"\!", "")) == 32348
    assert plain_number(r"\sqrt{2}") is None


def test_no_answer_is_counted(math_reward):
    before = reward_stats("math")
    assert math_reward(["The answer is 5.", r"\boxed{5"], ["5", "5"]) == [0.0, 0.0]
    after = reward_stats("math")
    assert after["no_answer"] - before["no_answer"] == 2
    assert after["verified"] - before["verified"] == 2
    assert set(after) == {"verified", "no_answer", "errors", "timeouts"}


def test_non_string_gold_is_read_as_text(math_reward):
    assert math_reward([r"\boxed{27}", r"\boxed{28}"], [27.0, 27]) == [1.0, 0.0]


def test_length_mismatch_raises(math_reward):
    with pytest.raises(ValueError, match="1 completions for 2 answers"):
        math_reward([r"\boxed{1}"], ["1", "2"])


# --- MATH-500 golds ---------------------------------------------------------------------------

# Different MATH-500 gold strings that are the same answer (found by running every ordered pair of
# the 500 golds through the verifier); any other pair of different golds must be judged unequal.
EQUIVALENT_GOLDS = {
    frozenset(pair) for pair in [
        ("10,\\!080", "10080"),
        ("120", "120^\\circ"), ("30", "30^\\circ"), ("36", "36^\\circ"), ("90", "90^\\circ"),
        ("36", "\\$36"), ("36^\\circ", "\\$36"),  # units and currency are dropped
        ("15", "15\\mbox{ cm}^2"),
        ("2 \\sqrt{5}", "2\\sqrt{5}"),
        ("\\frac14", "\\frac{1}{4}"),
        ("5", "x=5"),
        ("-2,1", "1,-2"),  # lists of roots: order does not matter
        ("40_9", "40"),  # gold 40_9 accepts "40" (the base left out); gold 40 does not accept 40_9
    ]
}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def math500_rows(shared_data) -> list[dict]:
    return _read_jsonl(shared_data / "math500" / "test.jsonl")


def _check_golds_score_one(reward, golds: list[str]) -> None:
    variants = {
        "as written": lambda g: g,
        "dfrac": lambda g: g.replace(r"\frac", r"\dfrac"),
        "no spaces": lambda g: "".join(g.split()),
    }
    for name, variant in variants.items():
        rewards = reward([f"The answer is $\\boxed{{{variant(g)}}}$." for g in golds], golds)
        assert [g for g, r in zip(golds, rewards) if r != 1.0] == [], name


def _check_different_golds_unequal(reward, golds: list[str]) -> None:
    pairs = [(a, b) for a, b in itertools.permutations(sorted(set(golds)), 2)]
    rewards = reward([f"\\boxed{{{pred}}}" for _, pred in pairs], [gold for gold, _ in pairs])
    judged_equal = {frozenset(pair) for pair, r in zip(pairs, rewards) if r == 1.0}
    assert judged_equal - EQUIVALENT_GOLDS == set()


def test_fixture_sample_golds(math_reward):
    rows = _read_jsonl(FIXTURES / "math500_test_sample.jsonl")
    assert len(rows) == 20
    golds = [r["answer"] for r in rows]
    _check_golds_score_one(math_reward, golds)
    _check_different_golds_unequal(math_reward, golds)
    # the reference solution's own \boxed{} answer agrees with the answer field
    assert math_reward([r["solution"] for r in rows], golds) == [1.0] * len(rows)


def test_every_math500_gold_scores_one(math_reward, math500_rows):
    assert len(math500_rows) == 500
    start = time.monotonic()
    _check_golds_score_one(math_reward, [r["answer"] for r in math500_rows])
    assert time.monotonic() - start < 30  # 1,500 answers: the exact-match shortcut takes nearly all


def test_math500_solutions_agree_with_answers(math_reward, math500_rows):
    rewards = math_reward([r["solution"] for r in math500_rows], [r["answer"] for r in math500_rows])
    assert [r["answer"] for r, x in zip(math500_rows, rewards) if x != 1.0] == []


def test_different_math500_golds_are_unequal(math_reward, math500_rows):
    rows = random.Random(0).sample(math500_rows, 50)
    _check_different_golds_unequal(math_reward, [r["answer"] for r in rows])


# --- safety: untrusted output is never executed, and every answer is bounded in time ----------


@pytest.mark.parametrize("payload", [
    "__import__('os').system('touch {path}')",
    "eval(\"__import__('os').system('touch {path}')\")",
    "exec(\"open('{path}', 'w').close()\")",
    "().__class__.__base__.__subclasses__()",
    "lambda: open('{path}', 'w')",
])
def test_code_in_the_answer_is_not_run(math_reward, tmp_path, payload):
    path = tmp_path / "pwned"
    text = payload.format(path=path)
    completions = [f"\\boxed{{{text}}}", text, f"The answer is {text}"]
    assert math_reward(completions, ["2", "2", "2"]) == [0.0, 0.0, 0.0]
    assert math_reward([r"\boxed{eval(1+1)}"], ["2"]) == [0.0]
    assert not path.exists()


def _huge_and_nested() -> list[str]:
    return [
        "1" * 10**6,
        "\\boxed{" + "1" * 10**6 + "}",
        "x" * 10**6 + r"\boxed{5}" + "y" * 10**6,
        "\\boxed{" + "\\frac{1}{" * 5000 + "2" + "}" * 5000 + "}",
        "\\frac{1}{" * 5000 + "2" + "}" * 5000,
        "\\boxed{" + "(" * 100_000 + "1" + ")" * 100_000 + "}",
        "(" * 100_000 + "1" + ")" * 100_000,
        "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
        "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",  # short enough to be parsed: slow in antlr
    ]


@pytest.fixture(scope="module")
def bounded_reward():
    reward = MathReward(timeout_s=3.0, n_workers=1)
    reward([r"\boxed{\sqrt{2}}"], [r"\sqrt{2}"])  # start the worker outside the timed calls
    yield reward
    reward.close()


@pytest.mark.parametrize("completion", _huge_and_nested(), ids=lambda c: f"{c[:12]}..{len(c)}")
def test_huge_or_nested_answers_are_bounded(bounded_reward, completion):
    reward = bounded_reward
    start = time.monotonic()
    assert reward([completion], ["5"]) == [0.0]
    assert time.monotonic() - start < 10


def test_timeout_kills_the_worker_and_scores_zero(private_reward):
    reward = private_reward(timeout_s=1.0, n_workers=1)
    slow = r"\boxed{2^{2^{2^{2^{2^{2}}}}}}"  # SymPy's big-integer power: minutes in C, deaf to signals
    start = time.monotonic()
    rewards = reward([r"\boxed{\frac{\cos x}{\sin x}}", slow, r"\boxed{\sqrt{117}}"], [r"\cot x", "5", r"3\sqrt{13}"])
    assert time.monotonic() - start < 10
    assert rewards == [1.0, 0.0, 1.0]  # the answers after the slow one go to a fresh worker
    assert reward.stats["timeouts"] == 1 and reward.stats["errors"] == 0
    assert reward([r"\boxed{-5i+6}"], ["6 - 5i"]) == [1.0]  # and the reward keeps working


def test_verifier_exception_scores_zero_and_is_counted(monkeypatch):
    reward = get_reward("math")
    before = reward_stats("math")

    def broken(gold, pred):
        raise RuntimeError("verifier bug")

    monkeypatch.setattr(me, "quick_equivalent", broken)
    assert reward([r"\boxed{5}", r"\boxed{6}"], ["5", "5"]) == [0.0, 0.0]
    assert reward_stats("math")["errors"] - before["errors"] == 2


def test_worker_crash_scores_zero_and_is_counted(monkeypatch, private_reward):
    # A worker that starts, reads its first batch and dies (as on a segfault or an OOM kill).
    monkeypatch.setattr(me, "_WORKER_COMMAND", (
        "import json, os, sys; sys.stdout.write(json.dumps(['ready', os.getpid()]) + '\\n'); "
        "sys.stdout.flush(); sys.stdin.readline(); os._exit(1)"
    ))
    reward = private_reward(n_workers=1)
    assert reward([r"\boxed{\cot x}", r"\boxed{\tan x}"], [r"\frac{\cos x}{\sin x}"] * 2) == [0.0, 0.0]
    assert reward.stats["errors"] == 2 and reward.stats["timeouts"] == 0


def test_missing_math_verify_is_a_loud_error(monkeypatch, private_reward):
    monkeypatch.setattr(me, "_WORKER_COMMAND", "from apo_core.math_equivalence import _worker_main; "
                        "import sys; sys.modules['math_verify'] = None; _worker_main()")
    reward = private_reward(n_workers=1)
    with pytest.raises(RuntimeError, match="math-verify is not importable"):
        reward([r"\boxed{\cot x}"], [r"\frac{\cos x}{\sin x}"])


# --- threads: Prefect calls rewards from worker threads ---------------------------------------


def test_call_from_another_thread(math_reward):
    result = []
    thread = threading.Thread(target=lambda: result.append(math_reward([r"\boxed{\frac{\cos x}{\sin x}}"], [r"\cot x"])))
    thread.start()
    thread.join(timeout=60)
    assert result == [[1.0]]


def test_concurrent_calls_from_a_thread_pool(math_reward):
    batches = [([rf"\boxed{{\sqrt{{{k * k * 2}}}}}", rf"\boxed{{{k}\sqrt{{3}}}}"], [rf"{k}\sqrt{{2}}"] * 2) for k in range(2, 10)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda batch: math_reward(*batch), batches))
    assert results == [[1.0, 0.0]] * len(batches)
