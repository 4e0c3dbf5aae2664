"""Evaluation: greedy accuracy, avg@K / pass@K, and the `apo evaluate` command."""

import json
import subprocess
import sys

import polars as pl
import pytest

from apo_core.data import PromptRecord
from apo_core.engines import Completion
from apo_core.rewards import gsm8k_reward
from apo_core.rollouts import evaluate


class ScriptedEngine:
    """Answers from a script: greedy calls get `greedy`, sampled call k gets `sampled[k]`."""

    name = "scripted"

    def __init__(self, greedy, sampled):
        self.greedy, self.sampled, self.calls = greedy, sampled, []

    def generate(self, prompts, *, temperature, top_p=1.0, max_new_tokens, seed=None):
        self.calls.append((temperature, seed))
        texts = self.greedy if temperature == 0 else self.sampled[len(self.calls) - 2]
        return [Completion(t, [1, 2], "stop") for t in texts]


def test_greedy_avg_and_pass_at_k():
    records = [PromptRecord("a", "1+1=?", "2", "test"), PromptRecord("b", "2+2=?", "4", "test")]
    engine = ScriptedEngine(["#### 2", "#### 5"], [["#### 2", "#### 5"], ["#### 3", "#### 5"], ["#### 2", "#### 4"]])
    rows, m = evaluate(engine, records, gsm8k_reward, max_new_tokens=8, samples=3, temperature=0.7, seed=10)
    assert m["accuracy"] == 0.5
    assert m["avg@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["pass@3"] == 1.0
    assert [r["sampled_correct"] for r in rows] == [2.0, 1.0]
    assert engine.calls == [(0.0, None), (0.7, 10), (0.7, 11), (0.7, 12)]  # one seed per sample index


def test_single_sample_reports_greedy_only():
    records = [PromptRecord("a", "q", "2", "test")]
    _, m = evaluate(ScriptedEngine(["#### 2"], []), records, gsm8k_reward, max_new_tokens=8)
    assert m["accuracy"] == 1.0 and not any("@" in k for k in m)


def run_cli(*args):
    """The `apo` command as users run it, in its own process."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=300)


def test_apo_evaluate_command(tiny_model_dir, tmp_path):
    out = tmp_path / "ev"
    proc = run_cli("evaluate", "--model", str(tiny_model_dir), "--benchmark", "gsm8k", "--data-path",
                   "tests/fixtures/data/gsm8k_test_sample.jsonl", "--limit", "3", "--samples", "2",
                   "--out", str(out), "--set", "eval.max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    aggregate = json.loads((out / "results.json").read_text())
    assert aggregate["n"] == 3 and {"accuracy", "avg@2", "pass@2"} <= set(aggregate)
    per_problem = pl.read_parquet(out / "results.parquet")
    assert per_problem.height == 3 and {"prompt_id", "reward", "avg_at_k", "pass_at_k"} <= set(per_problem.columns)


def test_apo_evaluate_missing_file_is_one_line(tiny_model_dir):
    proc = run_cli("evaluate", "--model", str(tiny_model_dir), "--benchmark", "math500", "--data-path", "/nonexistent/m.jsonl")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "apo: data file not found: /nonexistent/m.jsonl"
