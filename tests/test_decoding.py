"""Sampling loops: the KV-cached decoder and the plain forward loop draw what `generate` draws."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from apo_core.decoding import KVDecoder, decode, next_tokens
from apo_core.embedded import make_problems
from apo_core.modeling import EMBEDDED_MODEL, add_lora, load_model_and_tokenizer

EOS, PAD = 257, 256


def left_padded(tok, prompts):
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), PAD)
    mask = torch.zeros_like(input_ids)
    for j, row in enumerate(ids):
        input_ids[j, width - len(row):] = torch.tensor(row)
        mask[j, width - len(row):] = 1
    return input_ids, mask


@pytest.fixture(scope="module")
def reference():
    """The shipped embedded reference (a trained model: its samples are not uniform noise)."""
    model, tok = load_model_and_tokenizer(str(EMBEDDED_MODEL))
    prompts = [p["prompt"] for p in make_problems("train", 24, seed=3)]
    return model.eval(), tok, left_padded(tok, prompts)


def generate_ref(model, input_ids, mask, temperature, max_new_tokens=48, seed=7):
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=EOS,
                             pad_token_id=PAD, **sampling)
    return out[:, input_ids.shape[1]:]


def ours(model, input_ids, mask, temperature, kv_decoder, max_new_tokens=48, seed=7):
    torch.manual_seed(seed)
    with torch.inference_mode():
        return decode(model, input_ids, mask, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=PAD,
                      temperature=temperature, kv_decoder=kv_decoder)


def same_tokens(a, b):
    """Equal up to generate's trailing all-pad columns (it may run one step past the last EOS)."""
    width = min(a.shape[1], b.shape[1])
    return torch.equal(a[:, :width], b[:, :width]) and bool((a[:, width:] == PAD).all()) and bool((b[:, width:] == PAD).all())


@pytest.mark.parametrize("kv_decoder", [True, False], ids=["kv_decoder", "forward_loop"])
def test_greedy_decode_gives_generates_tokens(reference, kv_decoder):
    model, _, (input_ids, mask) = reference
    assert KVDecoder.of(model) is not None  # the embedded Qwen2 takes the fast path
    got = ours(model, input_ids, mask, 0.0, kv_decoder)
    assert same_tokens(got, generate_ref(model, input_ids, mask, 0.0))
    assert (got == EOS).any(-1).float().mean() > 0.5  # real stopping rows, not only truncation


def test_sampling_is_the_same_on_both_paths_and_dropping_finished_rows_changes_nothing(reference, monkeypatch):
    from apo_core import decoding

    model, _, (input_ids, mask) = reference
    drops = []
    keep_rows = decoding._CachedSteps.keep_rows
    monkeypatch.setattr(decoding._CachedSteps, "keep_rows", lambda self, keep: (drops.append(len(keep)), keep_rows(self, keep)))
    fast = ours(model, input_ids, mask, 1.0, True)
    assert drops and min(drops) < len(input_ids) // 2  # finished rows did leave the forward
    loop = ours(model, input_ids, mask, 1.0, False)
    assert torch.equal(fast, loop)
    assert not torch.equal(fast, ours(model, input_ids, mask, 1.0, True, seed=8))  # the seed matters
    assert (fast == EOS).any(-1).float().mean() > 0.5


def random_lm(kind: str, **config):
    torch.manual_seed(0)
    common = dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=128, bos_token_id=EOS, eos_token_id=EOS,
                  pad_token_id=PAD)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**common, "attention_bias": True, **config}))
    elif kind == "qwen2-mha":
        model = Qwen2ForCausalLM(Qwen2Config(**{**common, "num_key_value_heads": 4, **config}))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=264, n_embd=64, n_layer=2, n_head=2, n_positions=128, bos_token_id=EOS,
                                           eos_token_id=EOS, pad_token_id=PAD))
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2-mha"])
def test_kv_decoder_matches_generate_on_other_llama_family_shapes(reference, kind):
    """Llama with biased projections and grouped KV heads; Qwen2 without KV grouping."""
    _, _, (input_ids, mask) = reference
    model = random_lm(kind)
    assert KVDecoder.of(model) is not None
    assert same_tokens(ours(model, input_ids, mask, 0.0, True, max_new_tokens=16),
                       generate_ref(model, input_ids, mask, 0.0, max_new_tokens=16))
    assert torch.equal(ours(model, input_ids, mask, 1.0, True, max_new_tokens=16),
                       ours(model, input_ids, mask, 1.0, False, max_new_tokens=16))


@pytest.mark.parametrize("kind", ["gpt2", "llama-linear-rope"])
def test_unsupported_models_fall_back_to_their_own_forward(reference, kind):
    _, _, (input_ids, mask) = reference
    if kind == "gpt2":
        model = random_lm("gpt2")
    else:
        model = random_lm("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert KVDecoder.of(model) is None
    assert same_tokens(ours(model, input_ids, mask, 0.0, True, max_new_tokens=16),
                       generate_ref(model, input_ids, mask, 0.0, max_new_tokens=16))


def test_kv_decoder_applies_lora_adapters(reference):
    _, tok, (input_ids, mask) = reference
    base, _ = load_model_and_tokenizer(str(EMBEDDED_MODEL))
    model = add_lora(base, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    with torch.no_grad():  # a non-zero adapter, so the samples depend on it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    assert KVDecoder.of(model) is not None
    with_adapter = ours(model, input_ids, mask, 0.0, True)
    assert same_tokens(with_adapter, generate_ref(model, input_ids, mask, 0.0))
    with model.disable_adapter():
        assert not same_tokens(ours(model, input_ids, mask, 0.0, True), with_adapter)


def test_next_tokens_top_p_keeps_the_nucleus_only():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(4000, 1)
    torch.manual_seed(0)
    assert set(next_tokens(logits, 1.0, top_p=0.5).tolist()) == {0}
    assert set(next_tokens(logits, 1.0, top_p=0.75).tolist()) == {0, 1}
    kept = next_tokens(logits, 1.0, top_p=0.9)
    assert set(kept.tolist()) == {0, 1, 2}
    assert abs((kept == 0).float().mean().item() - 0.5 / 0.95) < 0.03  # renormalised over the nucleus
    full = next_tokens(logits, 1.0)
    assert torch.allclose(torch.bincount(full, minlength=4).float() / len(full), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    assert next_tokens(logits[:2], 0.0).tolist() == [0, 0]


def test_kv_decoder_writes_every_steps_logits_into_one_block(reference, monkeypatch):
    """The LM head's (rows, V) logits go into one block kept for the whole decode (a fresh one a step
    is page-faulted in anew on CPU), rows dropped or not; the tokens are those of the plain loop."""
    from apo_core import decoding

    model, _, (input_ids, mask) = reference
    blocks, call = [], decoding._CachedSteps.__call__
    monkeypatch.setattr(decoding._CachedSteps, "__call__",
                        lambda self, *a: (lambda out: (blocks.append((out.data_ptr(), len(out))), out)[1])(call(self, *a)))
    fast = ours(model, input_ids, mask, 1.0, True)
    assert len(blocks) > 5 and len({ptr for ptr, _ in blocks}) == 1
    assert min(rows for _, rows in blocks) < len(input_ids)  # rows were dropped on the way
    assert torch.equal(fast, ours(model, input_ids, mask, 1.0, False))
