"""Bad inputs: malformed data rows, unreadable data files, bad config values, wrong model paths,
adversarial model output to the verifiers, and a V* table from another run. Each one is answered
with a one-line error (asserted on its message) or a counted skip, before any model is loaded,
and the files an earlier run published stay byte for byte what they were."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import polars as pl
import pytest

import flows.apo  # noqa: F401  (every stage module imported before fail_if_model_loads patches names)
from tasks.config import ConfigError, load_config
from tasks import storage
from tasks.preflight import PreflightError
from tests.test_flow import tiny_config

RUN = "goodrun"


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_stages(cfg):
    """Stages 1a-1c of `cfg` called as plain functions (no Prefect API needed)."""
    from tasks.aggregate_vstar import aggregate_vstar
    from tasks.preprocess import preprocess
    from tasks.run import start_run
    from tasks.sample_reference import sample_reference

    ctx = start_run.fn(cfg)
    prep = preprocess.fn(ctx)
    samples = sample_reference.fn(ctx, prep)
    return ctx, prep, aggregate_vstar.fn(ctx, samples)


@pytest.fixture(scope="module")
def good_run(tiny_model_dir, tmp_path_factory):
    """A run whose first stages completed: the earlier outputs every bad input must leave alone."""
    root = tmp_path_factory.mktemp("bad-inputs")
    cfg = tiny_config(root, tiny_model_dir, **{"run_id": RUN, "data.train_size": 12, "data.test_size": 4})
    ctx, prep, vstar = run_stages(cfg)
    return cfg, ctx, prep, vstar, root / RUN


@pytest.fixture
def intact(good_run):
    """Asserts after the test that the good run's files did not change."""
    folder = good_run[-1]
    before = snapshot(folder)
    yield
    assert snapshot(folder) == before, "a bad input changed files an earlier run had published"


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and message.strip(), f"not one line: {message!r}"
    return message


def fail_if_model_loads(monkeypatch):
    """Model loading is the expensive work: a bad input must be refused before it. Patched
    wherever a module has bound the loaders (`from .loading import load_model`), and only in
    modules imported at the top of this file, so no later test imports a patched name."""
    import sys

    def refuse(*a, **k):
        raise AssertionError("a model was loaded for a run that should have been refused first")

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("tasks", "flows", "apo_core"):
            for attr in ("load_model", "load_model_and_tokenizer"):
                if callable(getattr(module, attr, None)):
                    monkeypatch.setattr(module, attr, refuse)


# -- bad config values: refused at load, one line naming the field --------------------------------

def _config_cases_from_test_config():
    """The one-line config cases tests/test_config.py already asserts, reused here."""
    from tests import test_config

    mark = next(m for m in test_config.test_bad_values_fail_in_one_line.pytestmark if m.name == "parametrize")
    return list(mark.args[1])


CONFIG_CASES = _config_cases_from_test_config() + [
    ("data.train_size=0", "data.train_size: Input should be greater than or equal to 1 (got 0)"),
    ("reference.n_samples=-8", "reference.n_samples: Input should be greater than or equal to 1 (got -8)"),
    ("train.rollout_batch_size=0", "train.rollout_batch_size: Input should be greater than or equal to 1"),
    ("train.steps=many", "train.steps: Input should be a valid integer"),
    ("vstar.beta1=-0.5", "vstar.beta1: Input should be greater than or equal to 0"),
    ("run_id=../../etc", "run_id '../../etc' must match"),
    ("data.template=Solve it.", "must be auto, gsm8k, math, raw, chat or contain {question}"),
    ("generation.engine=tensorrt", "generation.engine: Input should be 'auto', 'vllm' or 'transformers'"),
    ("storage.attempts=0", "storage.attempts: Input should be greater than or equal to 1"),
    ("data.name=custom", "name 'custom' needs train_path"),
]


@pytest.mark.parametrize("override, expected", CONFIG_CASES)
def test_bad_config_values_fail_in_one_line(override, expected, record_fault):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert expected in one_line(info.value)
    record_fault("bad-input", f"config `{override}`", f"refused at load: `{one_line(info.value)[:140]}`")


# -- caught by the preflight in start_run: before MLflow, config.json or any model load ------------

def _truncated_weights(model_dir: Path, tmp: Path) -> str:
    copy = tmp / "truncated-model"
    shutil.copytree(model_dir, copy)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    return str(copy)


def _garbage_weights(model_dir: Path, tmp: Path) -> str:
    copy = tmp / "garbage-model"
    shutil.copytree(model_dir, copy)
    (copy / "model.safetensors").write_bytes(b"\xff" * 64 + b"not a tensor file")
    return str(copy)


def _without(name: str):
    def make(model_dir: Path, tmp: Path) -> str:
        copy = tmp / f"model-without-{name}"
        shutil.copytree(model_dir, copy)
        for path in copy.glob(name):
            path.unlink()
        return str(copy)
    return make


MODEL_CASES = {
    "model folder does not exist": (lambda d, t: str(t / "no-such-model"), "no such folder, and not a hub id"),
    "model path is a file": (lambda d, t: str(d / "config.json"), "is a file; give the model's folder"),
    "folder without weights": (_without("*.safetensors"), "no weights (*.safetensors or pytorch_model*.bin)"),
    "folder without config.json": (_without("config.json"), "no config.json (not a saved model folder)"),
    "folder without tokenizer": (_without("tokenizer*"), "no tokenizer"),
    "truncated safetensors": (_truncated_weights, "(truncated or corrupt); re-copy the model"),
    "garbage safetensors": (_garbage_weights, "not a safetensors file"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_wrong_model_paths_are_refused_before_any_work(case, good_run, tiny_model_dir, tmp_path, monkeypatch, intact,
                                                       record_fault):
    from tasks.run import start_run

    make, expected = MODEL_CASES[case]
    cfg, *_ = good_run
    bad = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": make(Path(tiny_model_dir), tmp_path)})})
    fail_if_model_loads(monkeypatch)
    with pytest.raises(PreflightError) as info:
        start_run.fn(bad)  # same run id as the good run: its config.json must survive
    message = one_line(info.value)
    assert message.startswith("preflight: ") and expected in message
    record_fault("bad-input", f"model.path: {case}", f"refused by the preflight, no model loaded, earlier run intact: `{message[:150]}`")


def _data_file(kind: str, tmp: Path) -> str:
    if kind == "missing":
        return str(tmp / "absent.jsonl")
    if kind == "folder without parts":
        (tmp / "a-folder.jsonl").mkdir()
        (tmp / "a-folder.jsonl" / "notes.txt").write_text("no data here")
        return str(tmp / "a-folder.jsonl")
    if kind == "truncated parquet":
        pl.DataFrame({"prompt": ["1+1=?"] * 50, "answer": ["2"] * 50}).write_parquet(tmp / "t.parquet")
        data = (tmp / "t.parquet").read_bytes()
        (tmp / "t.parquet").write_bytes(data[: len(data) - 20])
        return str(tmp / "t.parquet")
    raise ValueError(kind)


@pytest.mark.parametrize("kind, expected", [
    ("missing", "data.train_path {path}: no such file"),
    ("folder without parts", "a folder or glob that holds no JSONL, JSON or Parquet file"),
    ("truncated parquet", "not a whole Parquet file"),
])
def test_unreadable_data_files_are_refused_before_any_work(kind, expected, good_run, tmp_path, monkeypatch, intact, record_fault):
    from tasks.run import start_run

    cfg, *_ = good_run
    path = _data_file(kind, tmp_path)
    bad = cfg.model_copy(update={"data": cfg.data.model_copy(update={"name": "custom", "train_path": path, "test_path": path})})
    fail_if_model_loads(monkeypatch)
    with pytest.raises(PreflightError) as info:
        start_run.fn(bad)
    assert expected.format(path=path) in one_line(info.value)
    record_fault("bad-input", f"data file: {kind}", f"refused by the preflight before any work: `{one_line(info.value)[:150]}`")


@pytest.mark.parametrize("template, expected", [
    ("Q: {question} A: {answer}", "may only use {question} as is; it also uses {answer}"),
    ("{question.__class__.__mro__}", "it also uses {question.__class__.__mro__}"),
    ("Q: {question} {", "is not a valid format string"),
])
def test_bad_templates_are_refused_before_any_work(template, expected, good_run, monkeypatch, intact, record_fault):
    from tasks.run import start_run

    cfg, *_ = good_run
    bad = cfg.model_copy(update={"data": cfg.data.model_copy(update={"template": template})})
    fail_if_model_loads(monkeypatch)
    with pytest.raises(PreflightError) as info:
        start_run.fn(bad)
    assert expected in one_line(info.value)
    record_fault("bad-input", f"data.template {template!r}", f"refused by the preflight: `{one_line(info.value)[:150]}`")


def test_unwritable_artifact_root_is_refused_before_any_work(good_run, tmp_path, monkeypatch, record_fault):
    from tasks.run import start_run

    cfg, *_ = good_run
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = cfg.model_copy(update={"artifact_root": str(blocker / "root"), "tracking": cfg.tracking.model_copy(
        update={"mlflow_tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})})
    fail_if_model_loads(monkeypatch)
    with pytest.raises(PreflightError) as info:
        start_run.fn(bad)
    assert "artifact_root: cannot write under" in one_line(info.value)
    assert not (tmp_path / "mlflow.db").exists()  # refused before the MLflow run was opened
    record_fault("bad-input", "artifact_root under a regular file (not writable)", f"refused by the preflight: `{one_line(info.value)[:150]}`")


# -- malformed data rows: skipped and counted per reason --------------------------------------------

ROW_CASES = {
    "missing prompt field": ({"answer": "4"}, "missing_prompt"),
    "empty prompt": ({"prompt": "   ", "answer": "4"}, "missing_prompt"),
    "prompt of wrong type (list)": ({"prompt": ["2+2"], "answer": "4"}, "wrong_type"),
    "answer of wrong type (object)": ({"prompt": "2+2?", "answer": {"v": 4}}, "wrong_type"),
    "missing answer": ({"prompt": "2+2?"}, "missing_answer"),
    "boolean answer": ({"prompt": "2+2?", "answer": True}, "wrong_type"),
    "huge row (400 kB prompt)": ({"prompt": "7+" * 200_000 + "1?", "answer": "8"}, "too_long"),
    "not JSON": (b"{this is not json", "missing_prompt"),
    "non-UTF-8 bytes": (b'{"prompt": "\xff\xfe 2+2?", "answer": "4"}', "missing_prompt"),
    "JSON array instead of object": (b"[1, 2, 3]", "missing_prompt"),
}


def _jsonl_line(row) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row).encode()


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_malformed_rows_are_skipped_and_counted(case, tiny_model_dir, tmp_path, record_fault):
    from tasks.preprocess import load_records

    row, reason = ROW_CASES[case]
    good = [json.dumps({"prompt": f"{i}+1=?", "answer": str(i + 1)}).encode() for i in range(3)]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([good[0], _jsonl_line(row), *good[1:]]) + b"\n")
    cfg = load_config(overrides=["data.name=custom", f"data.train_path={path}", f"data.test_path={path}",
                                 f"model.path={tiny_model_dir}", "data.max_prompt_tokens=256"])
    start = time.perf_counter()
    records, skipped, _ = load_records(cfg)
    assert time.perf_counter() - start < 60
    assert skipped == {"train/" + reason: 1, "test/" + reason: 1}
    assert [r.answer for r in records if r.split == "train"] == ["1", "2", "3"]  # the good rows all kept
    record_fault("bad-input", f"data row: {case}", f"skipped and counted as `{reason}`; the other rows kept")


def test_a_file_of_only_bad_rows_fails_in_one_line(tiny_model_dir, tmp_path, record_fault):
    from tasks.preprocess import load_records

    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"\xff\xfe\n{}\n[]\nnot json\n")
    cfg = load_config(overrides=["data.name=custom", f"data.train_path={path}", f"data.test_path={path}", f"model.path={tiny_model_dir}"])
    with pytest.raises(ValueError) as info:
        load_records(cfg)
    assert f"preprocess: no usable train row in {path} (missing_prompt: 4)" == one_line(info.value)
    record_fault("bad-input", "data file whose every row is bad", f"preprocess fails before sampling: `{one_line(info.value)[:150]}`")


def test_skipped_rows_reach_the_stage_log_and_metrics(good_run, tiny_model_dir, tmp_path, capsys, record_fault):
    from tasks.preprocess import preprocess
    from tasks.run import start_run

    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"prompt": f"{i}+1=?", "answer": str(i + 1)}).encode() for i in range(4)]
    lines += [b"\xff bad bytes", json.dumps({"prompt": "", "answer": "1"}).encode(), json.dumps({"prompt": "x", "answer": [1]}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg, *_ = good_run
    custom = cfg.model_copy(update={"run_id": "mixedrows", "data": cfg.data.model_copy(
        update={"name": "custom", "train_path": str(path), "test_path": str(path)})})
    result = preprocess.fn(start_run.fn(custom))
    assert result.metrics["data/skipped/train/missing_prompt"] == 2 and result.metrics["data/skipped/train/wrong_type"] == 1
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[preprocess] skipped rows: ")]
    assert len(logged) == 1 and "train/missing_prompt=2" in logged[0] and "train/wrong_type=1" in logged[0]
    record_fault("bad-input", "JSONL mixing good rows, non-UTF-8 bytes, an empty prompt and a list answer",
                 "preprocess logged `skipped rows: train/missing_prompt=2, train/wrong_type=1` (also in metrics and summary.json); 4 rows kept")


# -- adversarial model output to the verifiers: bounded, never evaluated ---------------------------

PWNED = Path("/tmp/apo-bad-inputs-pwned")
ADVERSARIAL = {
    "10 MB of digits": ("9" * 10_000_000, "5", 0.0),
    "deeply nested braces in \\boxed{}": ("\\boxed{" * 50_000 + "5" + "}" * 50_000, "5", None),
    "unclosed \\boxed{ 100k deep": ("\\boxed{" * 100_000, "5", 0.0),
    "code injection in \\boxed{}": (f"\\boxed{{__import__('os').system('touch {PWNED}')}}", "5", 0.0),
    "eval-style payload after ####": (f"#### __import__('os').system('touch {PWNED}')", "5", 0.0),
    "NaN string": ("#### nan", "5", 0.0),
    "inf string": ("\\boxed{inf}", "5", 0.0),
    "400-digit number (overflows float)": ("#### " + "9" * 400, "5", 0.0),
    "unicode Arabic-Indic digits": ("#### \u0665", "5", 1.0),
    "unicode fullwidth digits": ("#### \uff15", "5", 1.0),
    "NUL bytes and control characters": ("\x00\x01\x1b[2J#### 5\x00", "5", 1.0),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("reward", ["gsm8k", "math"])
def test_adversarial_outputs_to_the_verifiers(case, reward, record_fault):
    from apo_core.rewards import get_reward, reward_stats

    completion, gold, expected = ADVERSARIAL[case]
    gold = f"\\boxed{{{gold}}}" if reward == "math" else gold
    before = reward_stats(reward)
    start = time.perf_counter()
    score = get_reward(reward)([completion], [gold])
    seconds = time.perf_counter() - start
    assert len(score) == 1 and score[0] in (0.0, 1.0)
    if expected is not None and reward == "gsm8k":
        assert score[0] == expected
    if reward == "math" and expected == 0.0:
        assert score[0] == 0.0
    assert seconds < 30, f"verifier took {seconds:.1f}s"
    assert not PWNED.exists(), "model output was executed"
    counted = {k: v - before.get(k, 0) for k, v in reward_stats(reward).items() if v != before.get(k, 0)}
    record_fault("bad-input", f"{reward} verifier: {case}",
                 f"scored {score[0]:.0f} in {seconds:.2f}s, nothing executed" + (f"; counted {counted}" if counted else ""))


# -- a V* table from another run --------------------------------------------------------------------

@pytest.mark.parametrize("other", ["other prompts (data.seed=1)", "a subset of the prompts (train_size 6)"])
def test_train_refuses_a_vstar_table_of_another_run(other, good_run, tiny_model_dir, monkeypatch, record_fault):
    from tasks.train_online import train_online

    cfg, ctx, prep, vstar, folder = good_run
    extra = {"data.seed": 1} if "seed" in other else {"data.train_size": 6}
    foreign_cfg = tiny_config(folder.parent, tiny_model_dir, **{"run_id": "otherrun", "data.test_size": 4,
                                                                 "data.train_size": 12, **extra})
    _, _, foreign = run_stages(foreign_cfg)
    before = snapshot(folder)
    fail_if_model_loads(monkeypatch)
    with pytest.raises(PreflightError) as info:
        train_online.fn(ctx, prep, foreign)  # the good run's prompts, the other run's V*
    message = one_line(info.value)
    assert message.startswith(f"train_online: the V* table {foreign.outputs['vstar']} does not belong to this run")
    assert ("are not this run's" if "seed" in other else "have no V*") in message
    assert snapshot(folder) == before
    assert not (folder / "train_online" / "_COMPLETE.json").exists()
    record_fault("bad-input", f"V* table of another run fed to train_online: {other}",
                 f"refused before any model load; nothing published: `{message[:170]}`")


# -- the command line: a run that cannot start ends with one line and exit status 2 ----------------

def test_apo_run_reports_a_refused_run_in_one_line(prefect_api, tmp_path, monkeypatch, record_fault):
    import contextlib
    import io

    from flows.cli import main

    fail_if_model_loads(monkeypatch)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", "--set", f"artifact_root={tmp_path}", "--set", f"model.path={tmp_path / 'no-such-model'}"])
    last = err.getvalue().strip().splitlines()[-1]
    assert code == 2
    assert last.startswith("apo: ") and "no-such-model" in last, err.getvalue()[-2000:]
    record_fault("bad-input", "`apo run` with a model path that does not exist",
                 f"exit 2 before any model load; last line `{last[:140]}`")


def test_changed_data_under_a_run_id_recomputes_from_preprocess_and_names_the_file(good_run, tmp_path, capsys, record_fault):
    from tasks.preprocess import preprocess
    from tasks.run import start_run
    from tasks.sample_reference import stage_fingerprint

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=?", "answer": str(i + 1)}) + "\n" for i in range(96)))
    cfg, *_ = good_run
    custom = cfg.model_copy(update={"run_id": "datachanged", "data": cfg.data.model_copy(
        update={"name": "custom", "train_path": str(path), "test_path": str(path), "train_size": None, "test_size": 8})})
    first = preprocess.fn(start_run.fn(custom))
    again = preprocess.fn(start_run.fn(custom))
    assert again.status == "skipped" and again.fingerprint == first.fingerprint  # the same bytes: reused
    kept = path.read_text().splitlines()[:48]
    path.write_text("\n".join(kept) + "\n")  # the file cut to 48 rows under the same run id
    capsys.readouterr()
    changed = preprocess.fn(start_run.fn(custom))
    said = [line for line in capsys.readouterr().out.splitlines() if "input changed since it ran" in line]
    assert changed.status == "ran" and changed.metrics["data/train"] == 48.0
    assert len(said) == 1 and f"data.train_path ({path} sha256:" in said[0] and "recomputing it and every stage after it" in said[0]
    assert stage_fingerprint(custom, changed) != stage_fingerprint(custom, first)  # stage 1 (and so all after it) recomputes
    record_fault("bad-input", "the training file changed under a run id (96 rows cut to 48), config unchanged",
                 "preprocess saw the file's new sha256 (size/mtime changed, so it was re-hashed), said which input changed, "
                 "recomputed (48 prompts), and every later stage's fingerprint changed with it; the same bytes were reused")


def test_preflight_warns_when_a_local_root_has_less_space_than_the_run_needs(tiny_model_dir, tmp_path, capsys, record_fault):
    from tasks.preflight import check_free_space

    big = tmp_path / "big-model"
    shutil.copytree(tiny_model_dir, big)
    with open(big / "model.safetensors", "r+b") as f:  # sparse weights as large as the free space: x11 cannot fit
        f.truncate(shutil.disk_usage(tmp_path).free)
    cfg = load_config(overrides=[f"model.path={big}"])
    check_free_space(cfg, str(tmp_path / "run"))
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[preflight] WARNING:")]
    assert len(warning) == 1 and "GiB free; this run may write ~" in warning[0] and "3 checkpoints of ~3x" in warning[0]
    check_free_space(load_config(overrides=[f"model.path={tiny_model_dir}"]), str(tmp_path / "run"))
    assert "WARNING" not in capsys.readouterr().out  # 4 MB of weights fit
    record_fault("disk", "a local artifact root with less free space than the run's estimate (weights x 11)",
                 f"preflight warned before anything started: `{warning[0][:160]}...`; the run goes on (the estimate is rough)")
