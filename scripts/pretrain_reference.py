"""Pre-train (SFT) a built-in reference model, reproducibly, on 2 CPU threads: the embedded
default (``--model embedded``) or ``embedded-qwen`` (``--model qwen``, described at the end).

Builds the project's byte-level tokenizer and a tiny Qwen2ForCausalLM, fine-tunes it on
``make_problems("sft", ...)`` (loss on the solution tokens and the EOS only), stops early at a
step count chosen so the model knows the answer format but still makes arithmetic mistakes
(partial held-out accuracy leaves A*-PO room to improve), then saves model (fp32 safetensors),
tokenizer and generation config to ``apo_core/assets/embedded-reference/`` and prints greedy and
temperature-1.0 sampled accuracy on 400 held-out ``make_problems("test", 400)`` prompts.

Reproduce the committed checkpoint (defaults are the committed settings):

    python scripts/pretrain_reference.py

The learning rate is constant after warm-up and evaluation uses its own RNG state, so the
weights after k steps do not depend on ``--steps`` or ``--eval-every`` (``--eval-every 10
--eval-from 880 --steps 1000 --no-save`` shows the curve the default was chosen from). Runs are
bit-for-bit repeatable on one machine with the same torch build and thread count.

Measured (2 threads, torch 2.13 CPU): 1,019,008 parameters, 920 steps of 64 problems in ~245 s
(~4.5 min in all), greedy accuracy 40.0% and temperature-1.0 sampled accuracy 21.5% on the 400
held-out prompts (42.2% / 24.8% on 2,000), "####" present in every greedy answer. Accuracy rises
steeply here (6% at step 800, 29% at 900, 47% at 1000; 77% at 1400), so the model has learnt
the format and makes carry/borrow mistakes in the steps: room for RL.

``--model qwen`` builds ``apo_core/assets/embedded-qwen/``: a Qwen2 with Qwen2.5's tokenizer
(``apo_core.tokenizer.build_qwen_tokenizer``) and its 151,936-row tied embedding, SFT'd on the
same problems in two forms, half each: as a ChatML user turn answered by the solution and
``<|im_end|>``, and as the plain prompt answered by the solution and ``<|endoftext|>`` (so both
stop tokens are real). The task uses a few dozen of the 151,936 tokens; the loss is the exact
full-vocabulary cross-entropy, computed cheaply: every row outside the task's tokens is kept at
zero during SFT, so each of those logits is exactly 0 and the softmax's normaliser is
logsumexp(task logits, log(rows outside)). After SFT those rows get N(0, 0.02) values, as a
fresh initialisation, and the reported accuracies are measured after that, with the full
vocabulary. Weights are saved in bfloat16 (~20 MB); tokenizer.json is not committed (apo
builds it from the pinned package on first load).

    python scripts/pretrain_reference.py --model qwen

Measured (2 threads, torch 2.13 CPU, 2026-12-02): 10,241,600 parameters (9.7M of them the
embedding), 1,125 steps of 64 problems in 517 s; on the 400 held-out prompts greedy accuracy
18.8% in ChatML (format 99.5%, every answer but 2 ended by <|im_end|>) and 16.5% plain,
temperature-1.0 sampled 15.3% / 13.8%; ~29 tokens per answer. With the unused rows still zero
(before the noise) step 1,000 scored ~20% and 1,250 ~51%: the same steep rise as the embedded
default, and 1,125 sits low in it to leave RL room (A*-PO lifts it to 72.5% in 40 steps, README).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from apo_core.embedded import make_problems  # noqa: E402
from apo_core.rewards import gsm8k_reward  # noqa: E402
from apo_core.data import chat_prompt  # noqa: E402
from apo_core.decoding import decode  # noqa: E402
from apo_core.tokenizer import QWEN_VOCAB_SIZE, build_byte_tokenizer, build_qwen_tokenizer  # noqa: E402

DEFAULT_OUT = {"embedded": REPO / "apo_core" / "assets" / "embedded-reference",
               "qwen": REPO / "apo_core" / "assets" / "embedded-qwen"}
# --model qwen: the settings the committed embedded-qwen was made with (the embedded default's are the argparse defaults).
QWEN_DEFAULTS = {"steps": 1125, "lr": 2e-3, "max_position_embeddings": 2048}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("embedded", "qwen"), default="embedded", help="which built-in model to make")
    p.add_argument("--steps", type=int, default=None,
                   help=f"SFT optimizer steps (early stop; embedded 920, qwen {QWEN_DEFAULTS['steps']}: in the target window)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the model's asset folder)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (embedded 1e-3, qwen {QWEN_DEFAULTS['lr']})")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--n-sft", type=int, default=100_000, help="distinct SFT problems to draw from")
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every k steps (0: only at the end)")
    p.add_argument("--eval-from", type=int, default=0, help="first step that --eval-every applies to")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-save", action="store_true", help="train and evaluate only")
    args = p.parse_args(argv)
    qwen = args.model == "qwen"
    args.steps = args.steps if args.steps is not None else QWEN_DEFAULTS["steps"] if qwen else 920
    args.lr = args.lr if args.lr is not None else QWEN_DEFAULTS["lr"] if qwen else 1e-3
    args.out = args.out or DEFAULT_OUT[args.model]
    return args


# Both built-in models: RoPE, tied embeddings, head_dim 32 (>= 32 so vLLM's CPU attention accepts it).
COMMON_CONFIG = dict(head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_cache=True,
                     attention_dropout=0.0)


def model_config(tokenizer) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=int(math.ceil(len(tokenizer) / 8) * 8), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **COMMON_CONFIG,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def qwen_model_config(tokenizer) -> Qwen2Config:
    """Qwen2.5's vocabulary and special ids on a small body: the 151,936 x 64 tied embedding is
    most of the ~10M parameters, as the vocabulary dominates a real model's logits."""
    return Qwen2Config(
        vocab_size=QWEN_VOCAB_SIZE, hidden_size=64, intermediate_size=384, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=QWEN_DEFAULTS["max_position_embeddings"], **COMMON_CONFIG,
        # Qwen2.5's configs: bos = <|endoftext|> (= pad), eos = <|im_end|>
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def qwen_stop_ids(tokenizer) -> list[int]:
    """<|im_end|> ends a ChatML answer, <|endoftext|> a plain one."""
    return [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def qwen_forms(tokenizer, problem: dict, chat: bool) -> tuple[str, str]:
    """(prompt, end token) of a problem as a ChatML turn or as the plain prompt."""
    if chat:
        return chat_prompt(tokenizer, problem["prompt"].strip()), "<|im_end|>"
    return problem["prompt"], "<|endoftext|>"


def encode_qwen_examples(tokenizer, problems: list[dict]) -> list[tuple[list[int], int]]:
    """(ids of prompt + solution + end token, prompt length): even problems in ChatML, odd ones plain."""
    out = []
    for i, p in enumerate(problems):
        prompt, end = qwen_forms(tokenizer, p, chat=i % 2 == 0)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(p["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(end)]
        out.append((ids + target, len(ids)))
    return out


def restricted_vocab_loss(model, batch: dict[str, torch.Tensor], used: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary cross-entropy on the labelled tokens while every embedding row outside
    `used` (U token ids) is zero: those V - U logits are 0, so
    log Z = logsumexp(logits of `used`, log(V - U)) exactly, at the cost of a U-row output layer."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    h = hidden[:, :-1][keep]  # (N, H) states that predict a labelled token
    logits = h @ model.lm_head.weight[used].T  # (N, U)
    outside = torch.full((len(h), 1), math.log(model.config.vocab_size - len(used)), dtype=logits.dtype)
    log_z = torch.logsumexp(torch.cat([logits, outside], dim=1), dim=1)
    index = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    index[used] = torch.arange(len(used))
    return (log_z - logits.gather(1, index[labels[keep]][:, None]).squeeze(1)).mean()


def encode_examples(tokenizer, problems: list[dict]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + solution + EOS, prompt length) per problem."""
    eos = tokenizer.eos_token_id
    out = []
    for p in problems:
        prompt = tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]
        target = tokenizer(p["solution"], add_special_tokens=False)["input_ids"] + [eos]
        out.append((prompt + target, len(prompt)))
    return out


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on prompt and padding, so the loss covers solution + EOS."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


@torch.no_grad()
def evaluate(model, tokenizer, problems: list[dict], *, sample: bool, seed: int, max_new_tokens: int,
             prompts: list[str] | None = None, stop_ids: list[int] | None = None) -> dict:
    """Accuracy, format rate (``####`` present) and response lengths on ``problems`` (their own
    prompts unless `prompts` is given; a response ends at any of `stop_ids`, default EOS)."""
    model.eval()
    stops = stop_ids or [tokenizer.eos_token_id]
    enc = tokenizer(prompts or [p["prompt"] for p in problems], return_tensors="pt", padding=True, add_special_tokens=False)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    if stop_ids:  # apo's decoder: generate's torch.multinomial over a 151,936-token vocabulary takes minutes here
        continuation = decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                              eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, temperature=1.0 if sample else 0.0)
    else:
        kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if sample else dict(do_sample=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stops[0],
            **kwargs,
        )
        continuation = out[:, enc["input_ids"].shape[1] :]
    torch.set_rng_state(state)
    model.train()
    texts = tokenizer.batch_decode(continuation, skip_special_tokens=True)
    rewards = gsm8k_reward(texts, [p["answer"] for p in problems])
    lengths, stopped = [], 0  # response tokens including the stop token (max_new_tokens when it never stops)
    for row in continuation.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        lengths.append(len(row) if end is None else end + 1)
        stopped += end is not None
    return {
        "accuracy": sum(rewards) / len(rewards),
        "format": sum("####" in t for t in texts) / len(texts),
        "stopped": stopped / len(texts),
        "lengths": lengths,
        "texts": texts,
    }


def report(tag: str, step: int, greedy: dict, sampled: dict, elapsed: float) -> None:
    print(
        f"[{tag}] step {step:5d}  t={elapsed:6.1f}s  greedy acc {greedy['accuracy']:.3f} "
        f"(format {greedy['format']:.3f}, eos {greedy['stopped']:.3f})  "
        f"sampled T=1 acc {sampled['accuracy']:.3f} (format {sampled['format']:.3f})",
        flush=True,
    )


def _portable_tokenizer_class(out: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both load.

    transformers 5 writes its own ``TokenizersBackend``, unknown to 4.x (which vLLM builds may pin).
    Under 5.x, AutoTokenizer on a qwen2 model folder loads ``Qwen2Tokenizer`` whatever the name
    says; it reads the same byte vocabulary and special tokens (it adds NFC normalisation).
    """
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def evaluate_all(model, tokenizer, test: list[dict], args) -> dict[str, tuple[dict, dict]]:
    """{form: (greedy, sampled)}: the plain prompts, and for --model qwen also the ChatML ones."""
    if args.model != "qwen":
        return {"plain": tuple(evaluate(model, tokenizer, test, sample=s, seed=args.seed, max_new_tokens=args.max_new_tokens)
                               for s in (False, True))}
    out = {}
    for form, chat in (("chat", True), ("plain", False)):
        prompts = [qwen_forms(tokenizer, p, chat)[0] for p in test]
        out[form] = tuple(evaluate(model, tokenizer, test, sample=s, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                   prompts=prompts, stop_ids=qwen_stop_ids(tokenizer)) for s in (False, True))
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    qwen = args.model == "qwen"

    tokenizer = build_qwen_tokenizer() if qwen else build_byte_tokenizer()
    config = qwen_model_config(tokenizer) if qwen else model_config(tokenizer)
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen2 hidden {config.hidden_size}, layers {config.num_hidden_layers}, heads "
          f"{config.num_attention_heads}/{config.num_key_value_heads} kv, head_dim {config.head_dim}, "
          f"vocab {config.vocab_size}; {n_params:,} parameters", flush=True)

    problems = make_problems("sft", args.n_sft, seed=args.seed)
    sft = encode_qwen_examples(tokenizer, problems) if qwen else encode_examples(tokenizer, problems)
    test = make_problems("test", args.n_test)
    data_rng = random.Random(args.seed)  # data order: independent of evaluation and of --steps
    used = None
    if qwen:  # the task's tokens; every other embedding row stays zero through SFT (restricted_vocab_loss)
        used = torch.tensor(sorted({t for ids, _ in sft for t in ids} | set(qwen_stop_ids(tokenizer))))
        outside = torch.ones(config.vocab_size, dtype=torch.bool)
        outside[used] = False
        with torch.no_grad():
            model.get_input_embeddings().weight[outside] = 0.0
        print(f"task tokens: {len(used)} of {config.vocab_size}", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    model.train()
    order: list[int] = []
    start = time.perf_counter()
    eval_time = 0.0
    running = 0.0
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            fresh = list(range(len(sft)))
            data_rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[: args.batch_size], order[args.batch_size :]
        batch = collate([sft[i] for i in idx], tokenizer.pad_token_id)
        loss = restricted_vocab_loss(model, batch, used) if qwen else model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 50 == 0:
            print(f"step {step:5d}  loss {running:.4f}  t={time.perf_counter() - start - eval_time:6.1f}s", flush=True)
        if args.eval_every and step >= args.eval_from and step % args.eval_every == 0 and step != args.steps:
            t0 = time.perf_counter()
            for form, (greedy, sampled) in evaluate_all(model, tokenizer, test, args).items():
                report(f"eval {form}", step, greedy, sampled, t0 - start - eval_time)
            eval_time += time.perf_counter() - t0
    train_time = time.perf_counter() - start - eval_time
    if qwen:  # the rows SFT never used get a fresh initialisation's values (a seeded draw), then bf16
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(args.seed)) * config.initializer_range
            weight[outside] = noise[outside]
        model.to(torch.bfloat16).to(torch.float32)  # evaluate exactly what is saved

    results = evaluate_all(model, tokenizer, test, args)
    summary = {
        "model": args.model,
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "n_params": n_params,
        "sft_seconds": round(train_time, 1),
        "test_prompts": len(test),
    }
    for form, (greedy, sampled) in results.items():
        report(f"final {form}", args.steps, greedy, sampled, train_time)
        lengths = sorted(greedy["lengths"])
        q = lambda f: lengths[min(len(lengths) - 1, int(f * len(lengths)))]  # noqa: E731
        print(f"greedy response tokens (incl. the stop token): min {lengths[0]} p10 {q(0.1)} median {q(0.5)} "
              f"p90 {q(0.9)} max {lengths[-1]} mean {sum(lengths) / len(lengths):.1f}")
        for p, text in list(zip(test, greedy["texts"]))[:3]:
            print(f"  {p['prompt'].strip()!r} -> {text!r} (gold {p['answer']})")
        suffix = "" if form == "plain" and not qwen else f"_{form}"
        summary.update({
            f"greedy_accuracy{suffix}": greedy["accuracy"],
            f"greedy_format{suffix}": greedy["format"],
            f"greedy_stopped{suffix}": greedy["stopped"],
            f"sampled_accuracy_t1{suffix}": sampled["accuracy"],
            f"sampled_format_t1{suffix}": sampled["format"],
            f"greedy_mean_response_tokens{suffix}": sum(lengths) / len(lengths),
        })
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stops = qwen_stop_ids(tokenizer) if qwen else tokenizer.eos_token_id
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
        if qwen:
            model.to(torch.bfloat16)
        model.save_pretrained(args.out, safe_serialization=True)
        tokenizer.save_pretrained(args.out)
        _portable_tokenizer_class(args.out)
        if qwen:  # built from the pinned package when the model is first loaded (apo_core.modeling)
            (args.out / "tokenizer.json").unlink()
        (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"saved to {args.out}")
    return summary


if __name__ == "__main__":
    main()
