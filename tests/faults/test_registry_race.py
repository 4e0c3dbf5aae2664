"""Two retrains registering at the same moment (tasks/register.py): each compares itself with the
champion it read, both are promoted, and whichever moves the alias last used to win even when it
is the worse. The recomputation after each registration must leave the better one champion."""

from __future__ import annotations

import threading
import time

from tasks import register as reg
from tasks import storage
from tests.test_registry import champion_version, fabricated_run, register


def test_concurrent_registrations_converge_on_the_better_champion(tmp_path, monkeypatch, record_fault):
    from mlflow.tracking import MlflowClient

    root, uri = tmp_path / "art", f"sqlite:///{tmp_path}/mlflow.db"
    register(root, uri, "base", {"heldout": 0.5})  # v1, the champion
    runs = {name: fabricated_run(root, uri, name, {"heldout": score}) for name, score in (("worse", 0.6), ("better", 0.7))}
    both_read = threading.Barrier(2)
    original = reg.against_champion

    def racing(tracker, cfg, number, score, eval_set):
        decided = original(tracker, cfg, number, score, eval_set)  # both read champion v1 ...
        both_read.wait(timeout=60)
        if score < 0.7:
            time.sleep(1.0)  # ... and the worse one moves the alias last
        return decided

    monkeypatch.setattr(reg, "against_champion", racing)
    results, errors = {}, []

    def retrain(name):
        try:
            results[name] = reg.register_model.fn(*runs[name])
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=retrain, args=(name,)) for name in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results["worse"]["decision"] == results["better"]["decision"] == "promoted"  # each beat v1
    assert champion_version(uri) == results["better"]["version"]
    version = MlflowClient(uri).get_model_version("arith", results["better"]["version"])
    model = runs["better"][1].outputs["model"]
    assert version.tags[reg.MODEL_DIGEST_TAG] == storage.folder_digest(model, keep=lambda _: True)
    record_fault("concurrency", "two retrains register at the same moment: both read champion v1, both are promoted, "
                 "the worse (0.6) moves the alias last",
                 f"the worse one's recomputation after its move found v{results['better']['version']} (0.7) and gave it "
                 "`champion`; each version carries apo.model_sha256, the digest of the weights it registered")
