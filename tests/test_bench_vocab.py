"""bench/vocab.py: its quick mode end to end (the stage-2 memory part and stage 1 on embedded-qwen),
checking the JSON's structure and that its figures are sane. The quick sizes' figures mean nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VOCABS = (151_936, 32_768)


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "bench/vocab.py", "--quick", "--threads", "1", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_memory(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab") / "vocab.json"
    proc = _run("--parts", "memory", "--unchunked", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_memory_points(quick_memory):
    from apo_core.modeling import LOGITS_CHUNK_ELEMENTS, score_tile

    r, stdout = quick_memory
    s = r["settings"]["memory"]
    assert r["quick"] is True and r["settings"]["parts"] == ["memory"] and "stage1" not in r
    assert r["logits_chunk_elements"] == LOGITS_CHUNK_ELEMENTS
    assert r["chunk_tokens"] == {str(V): score_tile(V)[0] for V in VOCABS}
    points = r["memory"]["points"]
    assert sorted((p["vocab"], p["tokens"]) for p in points) == sorted((V, T) for V in VOCABS for T in s["tokens"])
    for p in points:
        V, T = p["vocab"], p["tokens"]
        assert p["prompts"] == s["prompts"] and not p["unchunked"]
        assert p["rise_mb"] >= 0 and p["peak_during_mb"] >= p["rss_before_mb"] > 100  # a real process's MB
        assert p["rise_mb"] == pytest.approx(p["peak_during_mb"] - p["rss_before_mb"], abs=0.2)
        assert p["peak_method"].startswith("VmHWM") or "sampled" in p["peak_method"]
        # the stop token is outside the vocabulary: every response runs to T
        assert p["stop_token_ids"] == [V] and p["response_tokens_mean"] == T and p["truncated_frac"] == 1.0
        assert p["pad_token_id"] < V  # the twin pads with a row it has
        assert p["step_s"] > 0 and p["warmup_step_s"] > 0 and set(p["phases_s"]) == {"generate_s", "ref_logprobs_s", "update_s"}
        assert p["chunk_tokens"] == min(score_tile(V)[0], s["prompts"] * T)
        assert p["params"] > V * 64  # the tied V x 64 embedding and the body
        # the warm-up step allocated AdamW's two fp32 moments; the measured step kept them
        phases = {ph["phase"]: ph for ph in p["memory_phases"]}
        weights_mb = p["params"] * 4 / 2**20
        assert phases["model built"]["policy_mb"] == pytest.approx(weights_mb, abs=0.06)
        for name in ("warm-up step", "measured step"):
            assert phases[name]["optimizer_state_mb"] == pytest.approx(2 * weights_mb, abs=0.2)
            assert phases[name]["gradients_mb"] == 0  # gradients do not outlive the update
        assert p["memory_plan"]["optimizer_state_dtype"] == "float32"
    for T in s["tokens"]:
        b = r["memory"]["by_tokens"][str(T)]
        assert set(b["rise_mb"]) == {str(V) for V in VOCABS}
        assert b["ratio"] == pytest.approx(b["rise_mb"]["151936"] / b["rise_mb"]["32768"], abs=1e-3)
    t = r["targets"]["memory_rise_ratio"]
    assert t["tokens"] == max(s["tokens"]) and t["target"] == "<= 1.2" and isinstance(t["met"], bool)
    assert t["value"] == r["memory"]["by_tokens"][str(max(s["tokens"]))]["ratio"]
    u = r["memory"]["unchunked"]  # one chunk holds all B x T logits rows
    assert u["unchunked"] and u["vocab"] == max(VOCABS) and u["tokens"] == s["unchunked_tokens"]
    assert u["chunk_tokens"] == s["prompts"] * u["tokens"] and u["rise_mb"] >= 0 and u["response_tokens_mean"] == u["tokens"]
    assert u["rise_over_chunked"] > 0
    assert r["machine"]["threads"] == 1 and "torch" in r["machine"]["versions"]
    assert "vocab.py" in r["run"]["command"] and "--quick" in r["run"]["command"] and r["run"]["wall_s"] > 0
    assert "figures mean nothing" in stdout and "memory_rise_ratio" in stdout


def test_quick_stage1(tmp_path):
    out = tmp_path / "v.json"
    proc = _run("--parts", "stage1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    s = r["settings"]["stage1"]
    assert set(r["stage1"]) == {"hf", "vllm"}
    for name, v in r["stage1"].items():
        assert v["engine"] == {"hf": "transformers", "vllm": "vllm"}[name]
        assert v["prompts"] == s["prompts"] and v["tokens_per_s"] > 0
        assert s["prompts"] * s["n"] <= v["tokens"] <= s["prompts"] * s["n"] * s["max_new_tokens"]
        assert 1 <= v["tokens_per_sample"] <= s["max_new_tokens"] and v["stop_token_ids"]


def test_tokenizer_load_routes_in_fresh_children(tmp_path):
    """The tokenizer part runs each route in its own child even under --quick: apo's load_tokenizer
    (the folder's generic class, heap trimmed) holds less than AutoTokenizer's Qwen2Tokenizer, same ids."""
    out = tmp_path / "v.json"
    proc = _run("--parts", "tokenizer", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    t = r["tokenizer"]
    assert r["settings"]["parts"] == ["tokenizer"] and "memory" not in r and "stage1" not in r
    assert (t["apo"]["class"], t["auto"]["class"]) == ("TokenizersBackend", "Qwen2Tokenizer")
    for route in ("apo", "auto"):
        v = t[route]
        assert v["route"] == route and v["vocab_size"] == 151_665 and v["seconds"] > 0
        assert v["rss_before_mb"] > 100 and v["peak_over_start_mb"] >= v["added_mb"] > 0
        assert v["chat_prompt_ids"][0] == 151644  # <|im_start|>
    assert t["same_ids"] is True
    assert t["apo"]["added_mb"] < t["auto"]["added_mb"]  # 73 vs 195 MB at the commit that added it
    assert t["apo_over_auto"]["added_mb"] == pytest.approx(t["apo"]["added_mb"] / t["auto"]["added_mb"], abs=1e-3)
    assert "same ids: True" in proc.stdout
