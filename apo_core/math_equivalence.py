r"""MATH answer checking: the last ``\boxed{}`` of a response against a gold answer, by equivalence.

Cheap, safe checks run in the calling process: normalised string equality and exact rational
comparison of plain numbers (``\frac{1}{2}`` = ``0.5``, ``10,\!080`` = ``10080``). Anything
else is parsed (LaTeX -> SymPy, never Python's eval) and compared by math-verify in worker
processes. math-verify's own time limit is ``signal.alarm``, which fails off the main thread
(Prefect runs tasks in threads) and cannot interrupt SymPy's big-integer C code anyway, so it
is disabled and the caller bounds time instead: a worker that overruns ``timeout_s`` on one
answer is killed and replaced, and the answer scores 0.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from fractions import Fraction
from functools import lru_cache
from multiprocessing.connection import wait
from typing import Sequence

# Only the end of a response is searched for its answer, and an answer longer than this is not
# parsed: both bound the work an adversarial response can cause (MATH-500's longest gold: 53).
MAX_TAIL_CHARS = 4_000
MAX_ANSWER_CHARS = 1_000

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    r"""Content of the last ``\boxed{...}`` / ``\fbox{...}`` / ``\boxed 5`` in ``text``, else None.

    >>> last_boxed("so x = \\boxed{\\frac{1}{2}}. Also \\boxed{\\{1, 2\\}}")
    '\\{1, 2\\}'
    >>> last_boxed("The answer is $\\boxed 5$.")
    '5'
    >>> last_boxed("\\boxed{unclosed") is None
    True
    """
    text = text[-MAX_TAIL_CHARS:]
    start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    after = start + len(command)
    i = after
    while text.startswith(" ", i):
        i += 1
    if text.startswith("{", i):
        depth = 0
        for j in range(i, min(len(text), i + max_chars + 2)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
        return None  # unbalanced, or longer than max_chars
    if i > after:  # "\boxed 5": one token, as TeX reads it
        token = re.match(r"[^\s$]+", text[i : i + max_chars + 1])
        return token.group(0).rstrip(".") if token else None
    return None


def gold_for_comparison(answer: str) -> str:
    """The gold answer text: the ``answer`` field as is, or the last boxed content of a solution."""
    if any(c in answer for c in _BOX_COMMANDS):
        boxed = last_boxed(answer)
        if boxed is not None:
            return boxed
    return answer.strip()


_SPACING = re.compile(r"(?<!\\)\\[!,;: ]|\\(?:left|right|displaystyle)(?![A-Za-z])|\\q?quad(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
# "5.4 \text{ cents}", "864 \mbox{ inches}^2": a number or expression followed by a unit word.
_RIGHT_UNITS = re.compile(r"^(.*?[\w})])\s*\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z ]*\}(?:\^\{?\d\}?)?$")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf)\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])")  # \frac12, \frac 59
_FRAC_HALF = re.compile(r"\\frac\s*(\{[^{}]*\})\s*([0-9a-zA-Z])")  # \frac{270}7
_FRAC_HALF_NUM = re.compile(r"\\frac\s*([0-9a-zA-Z])\s*(\{)")  # \frac1{2}
_SQRT_SHORT = re.compile(r"\\sqrt\s*([0-9a-zA-Z])")  # \sqrt2
_VARIABLE_PREFIX = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?(?:=|\\in(?![A-Za-z]))(?!.*=)")  # "x=5", "x \in [1,2]"
_CHOICE = re.compile(r"^\(([A-Z])\)$")
_PARENTHESISED_NUMBER = re.compile(r"^\((-?[\d.]+)\)$")  # "(073)", as in \textbf{(073)}


def normalize_answer(s: str) -> str:
    r"""A canonical string for exact comparison: layout, wrappers and units removed.

    >>> normalize_answer("\\left( 3, \\dfrac{\\pi}{2} \\right)")
    '(3,\\frac{\\pi}{2})'
    >>> normalize_answer("864 \\mbox{ inches}^2"), normalize_answer("90^\\circ"), normalize_answer("x = 5")
    ('864', '90', '5')
    """
    s = s.strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACING.sub(" ", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _RIGHT_UNITS.sub(r"\1", s.strip())
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_HALF.sub(r"\\frac\1{\2}", s)
    s = _FRAC_HALF_NUM.sub(r"\\frac{\1}\2", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = _VARIABLE_PREFIX.sub("", s)
    s = _CHOICE.sub(r"\1", s)
    s = _PARENTHESISED_NUMBER.sub(r"\1", s)
    return re.sub(r"(?<!\d)\.(\d)", r"0.\1", s)  # .5 -> 0.5


_INTEGER_OR_DECIMAL = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|-?\.\d+")
_FRACTION = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(\d+)")
_MIXED = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")  # 1\frac{4}{5} = 9/5, as MATH writes it


def plain_number(normalized: str) -> Fraction | None:
    r"""The exact value of a normalised plain number (integer, decimal, fraction, mixed number).

    >>> plain_number("0.5") == plain_number("\\frac{1}{2}") == plain_number("1/2")
    True
    >>> plain_number("10,080"), plain_number("1\\frac{4}{5}"), plain_number("\\sqrt{2}")
    (Fraction(10080, 1), Fraction(9, 5), None)
    """
    if len(normalized) > 100:  # Fraction of a 10^5-digit string is slow and never a real answer
        return None
    if _INTEGER_OR_DECIMAL.fullmatch(normalized):
        return Fraction(normalized.replace(",", ""))
    if m := _FRACTION.fullmatch(normalized):
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else ("", m.group(4), m.group(5))
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign else value
    if m := _MIXED.fullmatch(normalized):
        if int(m.group(4)) == 0:
            return None
        value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        return -value if m.group(1) else value
    return None


def quick_equivalent(gold: str, pred: str) -> bool | None:
    r"""Decide the easy cases without SymPy; None when math-verify has to decide.

    Equal normalised strings are equivalent; two plain numbers are compared exactly
    (``0.333`` is not ``\frac{1}{3}``).

    >>> quick_equivalent("\\frac12", "0.5"), quick_equivalent("3", "4"), quick_equivalent("\\pi", "3.14") is None
    (True, False, True)
    """
    g, p = normalize_answer(gold), normalize_answer(pred)
    if not p:
        return False
    if g == p:
        return True
    g_num, p_num = plain_number(g), plain_number(p)
    if g_num is not None and p_num is not None:
        return g_num == p_num
    # "x = 5" became "5" above; an equation left over is not a value (math-verify would compare
    # its right-hand side, so "5x - 7y + 4 = 0" would match a gold of 0).
    if "=" in p and "=" not in gold:
        return False
    based = _base_equivalent(g, p)
    if based is not None:
        return based
    # A tuple or interval is ordered, a bare list of answers is not: (-2,1) is not "-2, 1".
    if _is_bracketed(g) != _is_bracketed(p) and (_is_bare_list(g) or _is_bare_list(p)):
        return False
    return None


_BASED_INTEGER = re.compile(r"([0-9A-Za-z]+)_\{?(\d+)\}?")  # 52_8, 4210_{5}


def _base_equivalent(g: str, p: str) -> bool | None:
    """Numbers written in a base: same digits and base. A response may leave out the gold's base
    (``52`` for ``52_8``); ``40_9`` is not ``40``. None when neither side is such a number."""

    def based(s: str) -> tuple[str, int] | None:
        m = _BASED_INTEGER.fullmatch(s)
        if not m or not 2 <= int(m.group(2)) <= 36:
            return None
        try:
            int(m.group(1), int(m.group(2)))  # digits valid in that base
        except ValueError:
            return None
        return m.group(1).lower(), int(m.group(2))

    g_based, p_based = based(g), based(p)
    if g_based is None and p_based is None:
        return None
    g_digits, g_base = g_based or (g.lower(), 10)
    p_digits, p_base = p_based or (p.lower(), g_base)
    return g_digits == p_digits and g_base == p_base


def _top_level_comma(s: str) -> bool:
    depth = 0
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth <= 0:
            return True
    return False


def _is_bracketed(s: str) -> bool:
    return s[:1] in ("(", "[") and s[-1:] in (")", "]") and "," in s


def _is_bare_list(s: str) -> bool:
    return not _is_bracketed(s) and _top_level_comma(s)


def _math_verify_form(answer: str) -> str:
    """What the worker parses: plain numbers in canonical form (math-verify reads "10,080" as a
    set), anything else as written (its own normaliser knows LaTeX better than a regex)."""
    number = plain_number(normalize_answer(answer))
    if number is not None:
        return f"{number.numerator}/{number.denominator}" if number.denominator != 1 else str(number.numerator)
    return answer


# ---------------------------------------------------------------------------------------------
# Worker processes: math-verify runs only there, so a runaway parse can be killed. They are plain
# subprocesses speaking JSON lines, not multiprocessing ones: "spawn" re-imports the caller's
# __main__ (a script without a main guard would start workers recursively), "fork" copies a
# threaded, CUDA-holding trainer, and nothing coming back from a worker is unpickled.

_WORKER_COMMAND = "from apo_core.math_equivalence import _worker_main; _worker_main()"
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Address space a worker may add to what it had at start: a 10^(10^10) that slips through raises
# MemoryError there instead of swapping the machine.
_WORKER_EXTRA_MEMORY = 2 << 30


def _limit_memory() -> None:
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (current + _WORKER_EXTRA_MEMORY, resource.RLIM_INFINITY))
    except (ImportError, OSError, ValueError):
        pass  # not Linux: the time bound still holds


def _worker_main() -> None:
    """Worker loop: per stdin line a JSON batch ``[[idx, gold, pred], ...]``; per answer one line
    ``[idx, "equal" | "unequal" | "error"]`` on stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's own copy of stdout
    os.dup2(2, 1)  # a library's stray print() goes to stderr, not into the protocol
    _limit_memory()
    # math-verify warns once that its timeout is off: it is, because this process is the timeout.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        from math_verify import LatexExtractionConfig, parse, verify
    except ImportError as e:
        out.write(json.dumps(["import_error", repr(e)]) + "\n")
        return
    # LaTeX extraction only: math-verify's plain-expression extractor calls sympy's parse_expr,
    # which is Python's eval.
    config = [LatexExtractionConfig(boxed_match_priority=0)]

    @lru_cache(maxsize=8192)  # the N samples of a prompt share a gold, and often an answer
    def parsed(answer: str):
        return parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=None)

    out.write(json.dumps(["ready", os.getpid()]) + "\n")
    for line in sys.stdin:
        for idx, gold, pred in json.loads(line):
            try:
                outcome = "equal" if verify(parsed(gold), parsed(pred), timeout_seconds=None) else "unequal"
            except Exception:  # noqa: BLE001 - MemoryError, RecursionError, a SymPy bug: all score 0
                outcome = "error"
            out.write(json.dumps([idx, outcome]) + "\n")


class _Worker:
    """One worker process and the parent's end of its pipes."""

    def __init__(self) -> None:
        pythonpath = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_COMMAND],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": pythonpath},
        )
        self._buffer = b""

    def fileno(self) -> int:  # lets multiprocessing.connection.wait poll the worker's stdout
        return self.process.stdout.fileno()

    def send(self, batch: list) -> None:
        try:
            self.process.stdin.write(json.dumps(batch).encode() + b"\n")
            self.process.stdin.flush()
        except OSError:
            pass  # it died: reading its stdout reports that

    def receive(self) -> list:
        """The complete messages available now (call when readable); EOFError once it is gone."""
        chunk = os.read(self.fileno(), 1 << 16)
        if not chunk:
            raise EOFError
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        return [json.loads(line) for line in lines]

    def wait_ready(self, timeout_s: float) -> None:
        deadline, messages = time.monotonic() + timeout_s, []
        try:
            while not messages and wait([self], max(0.0, deadline - time.monotonic())):
                messages = self.receive()
        except (EOFError, OSError, ValueError):
            pass
        if not messages or messages[0][0] != "ready":
            self.kill()
            if messages and messages[0][0] == "import_error":
                raise RuntimeError(f"math-verify is not importable ({messages[0][1]}); install 'math-verify[antlr4_13_2]'")
            raise RuntimeError(f"math verifier worker did not start within {timeout_s:.0f} s")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class VerifierPool:
    """A few math-verify worker processes, started on first use and reused across calls.

    ``run`` spreads a batch over the workers; each answer gets ``timeout_s`` from the moment its
    predecessor finished. Not thread-safe: callers serialise (``MathReward`` holds a lock).
    """

    def __init__(self, n_workers: int = 2, startup_timeout_s: float = 120.0):
        self.n_workers = max(1, n_workers)
        self.startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._owner_pid = os.getpid()
        atexit.register(self.close)

    def _start(self, n: int) -> list[_Worker]:
        workers = [_Worker() for _ in range(n)]
        for w in workers:  # started together, so their imports overlap
            w.wait_ready(self.startup_timeout_s)
        return workers

    def _ensure(self, n: int) -> None:
        if self._owner_pid != os.getpid():  # inherited through fork: those workers are not ours
            self._workers, self._owner_pid = [], os.getpid()
        self._workers = [w for w in self._workers if w.alive()]
        if len(self._workers) < n:
            self._workers += self._start(n - len(self._workers))

    def run(self, jobs: Sequence[tuple[str, str]], timeout_s: float) -> list[str]:
        """Outcome per (gold, pred): "equal", "unequal", "error" or "timeout"."""
        if not jobs:
            return []
        try:
            return self._run(jobs, timeout_s)
        except BaseException:
            self.close()  # a half-read batch would leave stale answers in the pipes
            raise

    def _run(self, jobs: Sequence[tuple[str, str]], timeout_s: float) -> list[str]:
        n = min(self.n_workers, len(jobs))
        self._ensure(n)
        results: list[str | None] = [None] * len(jobs)
        pending: dict[_Worker, deque[int]] = {}  # per busy worker, its answers still to come
        deadline: dict[_Worker, float] = {}

        def assign(worker: _Worker, indices: deque[int]) -> None:
            pending[worker], deadline[worker] = indices, time.monotonic() + timeout_s
            worker.send([[i, *jobs[i]] for i in indices])

        def replace(worker: _Worker, outcome: str) -> None:
            """The worker failed on the answer it was working on: score it, restart on the rest."""
            rest = pending.pop(worker)
            results[rest.popleft()] = outcome
            del deadline[worker]
            worker.kill()
            self._workers.remove(worker)
            if rest:
                (fresh,) = self._start(1)
                self._workers.append(fresh)
                assign(fresh, rest)

        size = -(-len(jobs) // n)
        for k, worker in enumerate(self._workers[:n]):
            assign(worker, deque(range(k * size, min(len(jobs), (k + 1) * size))))
        while pending:
            ready = wait(list(pending), timeout=max(0.0, min(deadline.values()) - time.monotonic()))
            for worker in ready:
                try:
                    messages = worker.receive()
                except (EOFError, OSError, ValueError):  # crashed (segfault, OOM kill): this answer failed
                    replace(worker, "error")
                    continue
                for idx, outcome in messages:
                    if idx != pending[worker][0]:
                        raise RuntimeError(f"math verifier worker answered {idx}, expected {pending[worker][0]}")
                    pending[worker].popleft()
                    results[idx] = outcome
                    deadline[worker] = time.monotonic() + timeout_s
                if not pending[worker]:
                    del pending[worker], deadline[worker]
            now = time.monotonic()
            expired = [w for w in pending if deadline[w] <= now]
            # One whose answer is waiting was not slow: this loop was (starting a replacement).
            answered = set(wait(expired, 0)) if expired else set()
            for worker in expired:
                if worker not in answered:
                    replace(worker, "timeout")
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the workers (they also exit by themselves when this process closes their stdin)."""
        for w in self._workers if self._owner_pid == os.getpid() else []:
            w.kill()
        self._workers = []


class MathReward:
    r"""MATH reward: 1.0 where the completion's last ``\boxed{}`` is equivalent to the gold answer.

    A callable ``(completions, answers) -> list[float]`` with running counters in ``stats``:
    ``verified`` (responses scored), ``no_answer`` (no complete ``\boxed{}`` in the last
    ``MAX_TAIL_CHARS``, or one longer than ``MAX_ANSWER_CHARS``), ``errors`` (the verifier raised
    or its worker died) and ``timeouts`` (killed after ``timeout_s``). Every one of those scores
    0.0 and none raises; only a worker that cannot start at all (math-verify missing) does. Safe
    to call from any thread; calls are serialised.

    >>> reward = MathReward()
    >>> reward([r"so \boxed{0.5}", r"\boxed{(3, \dfrac{\pi}{2})}", "no box"], [r"\frac12", r"\left( 3, \frac{\pi}{2} \right)", "1"])
    [1.0, 1.0, 0.0]
    >>> reward.stats
    {'verified': 3, 'no_answer': 1, 'errors': 0, 'timeouts': 0}
    """

    def __init__(self, timeout_s: float = 5.0, n_workers: int | None = None):
        self.timeout_s = timeout_s
        self.pool = VerifierPool(n_workers or min(2, os.cpu_count() or 1))
        self.stats = {"verified": 0, "no_answer": 0, "errors": 0, "timeouts": 0}
        self._lock = threading.Lock()

    def __call__(self, completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        if len(completions) != len(answers):
            raise ValueError(f"got {len(completions)} completions for {len(answers)} answers")
        rewards = [0.0] * len(completions)
        counts = dict.fromkeys(self.stats, 0)
        jobs: dict[tuple[str, str], list[int]] = {}  # identical (gold, answer) pairs checked once
        for row, (completion, answer) in enumerate(zip(completions, answers)):
            try:
                pred = last_boxed(completion)
                if pred is None:
                    counts["no_answer"] += 1
                    continue
                gold = gold_for_comparison(answer if isinstance(answer, str) else str(answer))  # AMC23 golds are floats
                decided = quick_equivalent(gold, pred)
                if decided is None:
                    jobs.setdefault((_math_verify_form(gold), _math_verify_form(pred)), []).append(row)
                else:
                    rewards[row] = float(decided)
            except Exception:  # noqa: BLE001 - a normaliser bug must not stop training
                counts["errors"] += 1
        with self._lock:
            outcomes = self.pool.run(list(jobs), self.timeout_s) if jobs else []
            for rows, outcome in zip(jobs.values(), outcomes):
                for row in rows:
                    rewards[row] = float(outcome == "equal")
                    counts["errors"] += outcome == "error"
                    counts["timeouts"] += outcome == "timeout"
            counts["verified"] = len(completions)
            for key, n in counts.items():
                self.stats[key] += n
        return rewards

    def close(self) -> None:
        with self._lock:
            self.pool.close()
