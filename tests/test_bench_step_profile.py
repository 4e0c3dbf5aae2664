"""bench/step_profile.py, the command: a stage-2 step split into its parts and profiled by op."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_profile_splits_the_step_and_ranks_the_ops(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "bench/step_profile.py", "--quick", "--threads", "1", "--top", "8", "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    parts = r["step_parts_s"]
    assert set(parts) == {"generate_s", "ref_logprobs_s", "update_s", "step_s"}
    assert parts["step_s"] == pytest.approx(parts["generate_s"] + parts["ref_logprobs_s"] + parts["update_s"], abs=2e-4)
    assert all(v > 0 for v in parts.values()) and r["stage1_s"] > 0
    p = r["profile"]
    ops = p["ops"]
    assert len(ops) == 8 and [o["ms_per_step"] for o in ops] == sorted((o["ms_per_step"] for o in ops), reverse=True)
    assert sum(o["ms_per_step"] for o in ops) <= p["total_ms_per_step"] + 1e-6
    # the products are where a step of this model computes: the top op, with its flops counted
    assert ops[0]["op"] == "aten::mm" and ops[0]["gflops"] > 0 and 0 < p["matmul_share"] < 1 and p["matmul_gflops"] > 0
    assert r["settings"]["size"] == "quick" and r["settings"]["threads"] == 1
    assert "matrix products" in proc.stdout


def test_step_profile_docstring_examples():
    import doctest
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_step_profile", ROOT / "bench" / "step_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
