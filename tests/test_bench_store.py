"""bench/reference_store.py: its quick mode end to end (a first `apo run`, a retrain over 10% more
prompts against the same store, and a lookup on moto's S3), checking what the JSON counts. The
quick sizes' timings mean nothing; the counts and the V* identity do."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_retrain_samples_only_the_new_prompts_and_lookup_finds_every_key(tmp_path):
    out = tmp_path / "store.json"
    proc = subprocess.run([sys.executable, "bench/reference_store.py", "--quick", "--repeat", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    (pair,) = r["retrain"]["pairs"]
    assert pair["prompts"] == {"first": 128, "second": 140, "new": 12}
    n = pair["samples_per_prompt"]
    assert pair["first"] == {**pair["first"], "sampled": 128 * n, "reused": 0}
    assert pair["second"] == {**pair["second"], "sampled": 12 * n, "reused": 128 * n}
    assert pair["vstar_of_old_prompts_identical"] is True
    assert r["retrain"]["target"]["second_samples_exactly_the_new_prompts"] is True
    lookup = r["lookup"]
    assert lookup["prompts"] == 5000 and lookup["read_1pct_rows"] == 50 * 16 and len(lookup["lookup_s"]) == 3
    assert r["run"]["command"].startswith("python bench/reference_store.py --quick")
