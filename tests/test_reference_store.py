"""The reference-sample store on its own: keys that miss when anything deciding a sample changes,
publishing that is all-or-nothing and first-wins under concurrent writers (locally and on S3),
damaged entries found by their manifests, and pruning that spares what a run is reading."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time

import polars as pl
import pytest
from safetensors.torch import load_file, save_file

from tasks import reference_store as rs
from tasks.config import load_config
from tasks.sample_reference import sample_context

CONTEXT = rs.SampleContext("ab" * 32, "cd" * 32, "float32", "transformers", "gsm8k-v1", 1.0, 1.0, 32, None, 1234)


def rows_for(keys, indices, response="r") -> pl.DataFrame:
    return pl.DataFrame([dict(key=k, sample_idx=i, seed=i, response=f"{response}{k[:4]}{i}", reward=float(i % 2), n_tokens=3,
                              finish_reason="stop") for k in keys for i in indices])


def test_a_change_to_anything_that_decides_a_sample_misses_the_store(tiny_model_dir, tmp_path, monkeypatch):
    base = ["model.path=" + str(tiny_model_dir)]
    key = lambda cfg, prompt="3+4=?\n", answer="7": sample_context(cfg).key(prompt, answer)  # noqa: E731
    cfg = load_config(overrides=base)
    first = key(cfg)
    assert key(load_config(overrides=base)) == first  # the same settings: a hit
    assert key(load_config(overrides=[*base, "reference.shard_size=7", "reference.shards=3", "reference.n_samples=16",
                                      f"reference.store={tmp_path}"])) == first  # how and where it is sampled: still a hit
    changed_weights = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed_weights)
    weights = load_file(changed_weights / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, changed_weights / "model.safetensors", metadata={"format": "pt"})
    misses = {
        "reference weights": key(load_config(overrides=[f"model.path={changed_weights}"])),
        "template (the rendered prompt)": key(cfg, prompt="Q: 3+4=?\n"),
        "gold answer": key(cfg, answer="8"),
        "temperature": key(load_config(overrides=[*base, "reference.temperature=0.7"])),
        "dtype": key(load_config(overrides=[*base, "model.dtype=bfloat16"])),
        "seed": key(load_config(overrides=[*base, "reference.seed=1"])),
        "max_new_tokens": key(load_config(overrides=[*base, "reference.max_new_tokens=50"])),
        "engine": key(load_config(overrides=[*base, "generation.engine=vllm"])),
    }
    monkeypatch.setitem(__import__("apo_core.rewards").rewards.REWARD_VERSIONS, "embedded", 2)
    misses["reward version"] = key(cfg)
    for what, other in misses.items():
        assert other != first, f"a changed {what} still hits the store"
    # the tokenizer is part of the key too
    changed_tok = tmp_path / "changed-tokenizer"
    shutil.copytree(tiny_model_dir, changed_tok)
    config = json.loads((changed_tok / "tokenizer_config.json").read_text())
    (changed_tok / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    assert sample_context(load_config(overrides=[f"model.path={changed_tok}"])).tokenizer != sample_context(cfg).tokenizer


def test_weight_digests_are_cached_by_size_and_mtime(tiny_model_dir, tmp_path, monkeypatch):
    from tasks import storage

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    monkeypatch.setenv("APO_CACHE_DIR", str(tmp_path / "cache"))
    first = storage.folder_digest(str(folder), rs.is_weight_file)
    reads = []
    monkeypatch.setattr(storage, "_sha256", lambda fs, path: reads.append(path) or "x")
    assert storage.folder_digest(str(folder), rs.is_weight_file) == first and reads == []  # nothing re-read
    os.utime(folder / "model.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    storage.folder_digest(str(folder), rs.is_weight_file)
    assert [p.rsplit("/", 1)[1] for p in reads] == ["model.safetensors"]  # a touched file is read again


def test_publish_lookup_read_and_overlapping_entries(tmp_path):
    store = rs.ReferenceStore(str(tmp_path), CONTEXT, "r1")
    a, b = CONTEXT.key("a", "1"), CONTEXT.key("b", "2")
    assert store.publish(rows_for([a], range(4), "first"))
    assert not store.publish(rows_for([a], range(4), "again"))  # the same samples: the first entry stands
    assert store.publish(rows_for([a, b], range(2, 6), "second"))  # overlaps a's samples 2-3
    found = store.lookup([a, b, CONTEXT.key("c", "3")])
    assert {k: sorted(v) for k, v in found.indices().items()} == {a: [0, 1, 2, 3, 4, 5], b: [2, 3, 4, 5]}
    rows, damaged = store.read(found)
    assert damaged == [] and rows.height == 10
    got = {(k, i): r for k, i, r in rows.select("key", "sample_idx", "response").iter_rows()}
    assert got[(a, 2)].startswith("first") and got[(a, 4)].startswith("second")  # each sample from the first published
    assert len(list((tmp_path / "v1").glob("*/samples/*.parquet"))) == 2  # the losing writer removed its files


def test_a_damaged_entry_is_found_by_its_manifest_and_quarantined(tmp_path, capsys):
    store = rs.ReferenceStore(str(tmp_path), CONTEXT, "r1")
    a = CONTEXT.key("a", "1")
    store.publish(rows_for([a], range(4)))
    found = store.lookup([a])
    samples = next((tmp_path / "v1").glob("*/samples/*.parquet"))
    samples.write_bytes(samples.read_bytes()[:-10])  # truncated
    rows, damaged = store.read(found)
    assert rows.height == 0 and len(damaged) == 1
    assert "is damaged" in capsys.readouterr().out
    assert store.lookup([a]).indices() == {}  # quarantined: the next lookup misses, so it is sampled again
    assert len(list((tmp_path / "v1").glob("*/damaged/*.json"))) == 1
    assert store.publish(rows_for([a], range(4)))  # and the same entry can be published again


def _publish_together(root: str, barrier, keys: list[str], out) -> None:
    store = rs.ReferenceStore(root, CONTEXT, f"w{os.getpid()}")
    rows = rows_for(keys, range(8))
    barrier.wait(120)  # every writer imported and ready: they publish at once
    out.put(store.publish(rows))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_writers_of_the_same_keys_end_with_one_entry_per_key(where, tmp_path, request):
    if where == "s3":
        request.getfixturevalue("s3_endpoint")
        root = f"s3://apo-test/store-{time.time_ns()}"
    else:
        root = str(tmp_path)
    keys = [CONTEXT.key(f"p{i}", str(i)) for i in range(16)]
    ctx = multiprocessing.get_context("spawn")
    out, barrier = ctx.Queue(), ctx.Barrier(4)
    writers = [ctx.Process(target=_publish_together, args=(root, barrier, keys, out)) for _ in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(180)
    results = sorted(out.get(timeout=5) for _ in writers)
    assert results == [False, False, False, True]  # exactly one published
    store = rs.ReferenceStore(root, CONTEXT)
    found = store.lookup(keys)
    assert len(found.manifests) == 1 and {k: len(v) for k, v in found.indices().items()} == {k: 8 for k in keys}
    rows, _ = store.read(found)
    assert rows.height == 16 * 8 and rows.select("key", "sample_idx").is_unique().all()


def test_prune_spares_what_a_run_reads_and_removes_unused_models_and_orphans(tmp_path, monkeypatch):
    old = rs.ReferenceStore(str(tmp_path), CONTEXT, "old-run")
    other = rs.SampleContext(*("ef" * 32, *list(vars(CONTEXT).values())[1:]))
    busy = rs.ReferenceStore(str(tmp_path), other, "busy-run")
    with old.reading("old-model"):
        old.publish(rows_for([CONTEXT.key("a", "1")], range(2)))
    used = json.loads((tmp_path / "v1" / CONTEXT.model[:16] / "used.json").read_text())
    used["last_used"] = "2026-01-01T00:00:00+00:00"
    (tmp_path / "v1" / CONTEXT.model[:16] / "used.json").write_text(json.dumps(used))
    orphan = tmp_path / "v1" / other.model[:16] / "samples" / "dead-writer.parquet"
    with busy.reading("busy-model"):
        busy.publish(rows_for([other.key("a", "1")], range(2)))
        orphan.write_bytes(b"half")
        described = {d["model"]: d for d in rs.describe(str(tmp_path))}
        assert described[CONTEXT.model[:16]]["samples"] == 2 and described[CONTEXT.model[:16]]["model_path"] == "old-model"
        assert described[other.model[:16]]["readers"] == 1
        monkeypatch.setattr(rs, "ORPHAN_AGE_S", -1)
        assert rs.prune(str(tmp_path), unused_days=30, models=[other.model[:6]]) == []  # being read: kept
    removed = rs.prune(str(tmp_path), unused_days=30)
    assert removed == [str(tmp_path / "v1" / CONTEXT.model[:16]), str(orphan)]
    assert not (tmp_path / "v1" / CONTEXT.model[:16]).exists() and busy.lookup([other.key("a", "1")]).indices()


def test_a_hub_model_is_digested_from_its_snapshot(tiny_model_dir, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: asked.append(repo) or str(tiny_model_dir))
    hub = sample_context(load_config(overrides=["model.path=org/some-model"]))
    assert asked == ["org/some-model"]
    assert hub == sample_context(load_config(overrides=[f"model.path={tiny_model_dir}"]))  # the same files, the same key


def test_apo_store_lists_the_store_and_prunes_it(tmp_path, capsys):
    from flows.cli import main

    store = rs.ReferenceStore(str(tmp_path / "_reference"), CONTEXT, "r1")
    with store.reading("embedded"):
        store.publish(rows_for([CONTEXT.key("a", "1"), CONTEXT.key("b", "2")], range(8)))
    assert main(["store", "--set", f"artifact_root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "1 model(s), 16 samples" in out and CONTEXT.model[:16] in out and "embedded" in out
    assert main(["store", "--set", f"artifact_root={tmp_path}", "--prune", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == "nothing to prune"  # used just now
    assert main(["store", "--set", f"artifact_root={tmp_path}", "--prune", "--model", CONTEXT.model[:8]]) == 0
    assert "removed" in capsys.readouterr().out and not (tmp_path / "_reference" / "v1" / CONTEXT.model[:16]).exists()


def test_an_entry_whose_file_is_gone_is_quarantined_not_fatal(tmp_path):
    store = rs.ReferenceStore(str(tmp_path), CONTEXT, "r1")
    a = CONTEXT.key("a", "1")
    store.publish(rows_for([a], range(2)))
    next((tmp_path / "v1").glob("*/index/*.parquet")).unlink()
    found = store.lookup([a])
    assert found.indices() == {} and len(found.damaged) == 1
