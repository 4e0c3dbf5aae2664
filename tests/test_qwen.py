"""The Qwen2.5 path on CPU: its tokenizer (built from the pinned package), ChatML, the built-in
`embedded-qwen` model (151,936-row vocabulary), stop tokens, chunked log-probabilities and the
preflight checks a real HF folder gets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from apo_core import modeling
from apo_core.data import TEMPLATES, chat_prompt, render_prompt
from apo_core.engines import TransformersEngine, resolve_stop_ids
from apo_core.modeling import collate, left_pad_positions, load_model_and_tokenizer, response_logprobs
from apo_core.tokenizer import (QWEN_RANKS_SHA256, QWEN_SPECIAL_TOKENS, QWEN_VOCAB_SIZE, build_qwen_tokenizer,
                                qwen_ranks_path)

IM_END, ENDOFTEXT = 151645, 151643


@pytest.fixture(scope="module")
def qwen_tok():
    return build_qwen_tokenizer()


@pytest.fixture(scope="module")
def qwen_model():
    model, tok = load_model_and_tokenizer("embedded-qwen")
    return model, tok


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the tokenizer ------------------------------------------------------------------------------

def test_ranks_come_from_the_pinned_package_with_the_published_digest():
    import hashlib

    path = qwen_ranks_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == QWEN_RANKS_SHA256
    assert len(path.read_text().splitlines()) == 151_643


def test_special_tokens_have_qwen25_ids(qwen_tok):
    assert qwen_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert len(qwen_tok) == 151_643 + len(QWEN_SPECIAL_TOKENS) == 151_665
    assert (qwen_tok.pad_token_id, qwen_tok.eos_token_id, qwen_tok.padding_side) == (ENDOFTEXT, IM_END, "left")
    # a special token in text is one token, never split into its characters
    assert qwen_tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"][0] == 151644


def test_every_gsm8k_test_question_round_trips_and_matches_tiktoken(qwen_tok, shared_data):
    """The fast tokenizer agrees with tiktoken on the same ranks and pattern, id for id."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from apo_core.tokenizer import QWEN_PATTERN

    specials = {t: 151643 + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    reference = tiktoken.Encoding("qwen2.5", pat_str=QWEN_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(qwen_ranks_path())),
                                  special_tokens=specials)
    questions = [row["question"] for row in _read_jsonl(shared_data / "gsm8k" / "test.jsonl")]
    assert len(questions) == 1319
    encoded = qwen_tok(questions, add_special_tokens=False)["input_ids"]
    for question, ids in zip(questions, encoded):
        assert ids == reference.encode(question)
        assert qwen_tok.decode(ids) == question
    digits = qwen_tok("Janet sells 1234 eggs", add_special_tokens=False)["input_ids"]
    assert [qwen_tok.decode([t]) for t in digits[-5:-1]] == ["1", "2", "3", "4"]  # Qwen2.5 splits digits one by one


def test_chatml_renders_a_user_turn_exactly(qwen_tok):
    assert chat_prompt(qwen_tok, "What is 2+3?") == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"


def test_gsm8k_and_math500_prompts_are_tokenized_with_their_lengths(qwen_tok, shared_data):
    """Both paper templates and ChatML over the shared data: the lengths a run's preprocess records."""
    lengths = {}
    for name, field, template in (("gsm8k", "question", "gsm8k"), ("math500", "problem", "math")):
        files = sorted((shared_data / name).glob("*.jsonl"))
        rows = _read_jsonl(files[-1])
        plain = [render_prompt(r[field], template) for r in rows]
        chat = [chat_prompt(qwen_tok, p) for p in plain]
        n_plain = [len(x) for x in qwen_tok(plain, add_special_tokens=False)["input_ids"]]
        n_chat = [len(x) for x in qwen_tok(chat, add_special_tokens=False)["input_ids"]]
        assert all(c == p + 8 for c, p in zip(n_chat, n_plain))  # ChatML adds 8 tokens around a user turn
        lengths[name] = (sum(n_plain) / len(n_plain), max(n_plain))
    assert 50 < lengths["gsm8k"][0] < 150 and 60 < lengths["math500"][0] < 200, lengths
    assert TEMPLATES["gsm8k"].endswith('"####".')


# -- the built-in model --------------------------------------------------------------------------

def test_embedded_qwen_is_a_standard_folder_with_qwen25s_vocabulary(qwen_model, qwen_tok):
    model, tok = qwen_model
    folder = Path(modeling.resolve_model_path("embedded-qwen"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= \
        {p.name for p in folder.iterdir()}
    assert not (modeling.EMBEDDED_QWEN / "tokenizer.json").exists()  # built from the package, not committed
    assert model.config.vocab_size == QWEN_VOCAB_SIZE and model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert (modeling.EMBEDDED_QWEN / "model.safetensors").stat().st_size < 25 * 2**20  # bf16, ~20 MB
    assert model.generation_config.eos_token_id == [IM_END, ENDOFTEXT]
    text = chat_prompt(tok, "37+48=?")
    assert tok(text)["input_ids"] == qwen_tok(text)["input_ids"]
    assert resolve_stop_ids(model, tok) == [IM_END, ENDOFTEXT]


@pytest.mark.parametrize("name", ["embedded-qwen", "embedded"])
def test_a_generic_tokenizer_folder_loads_its_tokenizer_json_as_is_with_autotokenizers_ids(name, shared_data):
    """Both built-in folders declare the generic fast class; load_tokenizer takes their tokenizer.json
    as it is where AutoTokenizer builds Qwen2Tokenizer from the config's model type. Every text
    field of the shared data sets and the embedded task's prompts get the same ids either way."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from apo_core.embedded import make_problems

    folder = modeling.resolve_model_path(name)
    assert modeling.declares_generic_tokenizer(folder)
    ours, auto = modeling.load_tokenizer(name), AutoTokenizer.from_pretrained(folder)
    assert type(ours) is not type(auto) and type(auto).__name__ == "Qwen2Tokenizer"  # two routes, really
    assert isinstance(ours, PreTrainedTokenizerFast) and ours.padding_side == "left"
    texts = [str(v) for f in sorted(shared_data.rglob("*.jsonl")) for row in _read_jsonl(f) for v in row.values()
             if isinstance(v, (str, int, float))]
    texts += [p["prompt"] for p in make_problems("test", 64)]
    assert len(texts) > 20_000
    ids = ours(texts, add_special_tokens=False)["input_ids"]
    assert ids == auto(texts, add_special_tokens=False)["input_ids"]
    assert ours.batch_decode(ids[:500]) == auto.batch_decode(ids[:500])
    assert (ours.eos_token_id, ours.pad_token_id, len(ours)) == (auto.eos_token_id, auto.pad_token_id, len(auto))


def test_a_folder_naming_its_own_tokenizer_class_keeps_autotokenizers_choice(tmp_path):
    folder = tmp_path / "named"
    shutil.copytree(modeling.resolve_model_path("embedded"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    assert not modeling.declares_generic_tokenizer(folder)
    assert type(modeling.load_tokenizer(str(folder))).__name__ == "Qwen2Tokenizer"
    (folder / "tokenizer.json").unlink()  # no tokenizer.json: nothing to take as it is
    assert not modeling.declares_generic_tokenizer(folder) and modeling.declares_generic_tokenizer(modeling.EMBEDDED_MODEL)


def test_generation_stops_at_im_end_in_chatml_and_at_endoftext_in_plain_form(qwen_model):
    """The SFT answers a ChatML turn with <|im_end|> and a plain prompt with <|endoftext|>: both
    end a response, and the stop token is kept (it counts in the log-ratio)."""
    model, tok = qwen_model
    from apo_core.embedded import make_problems

    problems = make_problems("test", 16)
    engine = TransformersEngine(model, tok, autocast_bf16=False)
    chat = engine.generate([chat_prompt(tok, p["prompt"].strip()) for p in problems], temperature=0, max_new_tokens=64)
    plain = engine.generate([p["prompt"] for p in problems], temperature=0, max_new_tokens=64)
    assert all(c.finish_reason == "stop" and c.token_ids[-1] == IM_END for c in chat)
    assert all(c.finish_reason == "stop" and c.token_ids[-1] == ENDOFTEXT for c in plain)
    assert all("####" in c.text and "<|" not in c.text for c in chat + plain)
    # with the stop list narrowed to <|im_end|>, a plain answer runs on past its <|endoftext|>
    narrowed = TransformersEngine(model, tok, autocast_bf16=False, stop_token_ids=[IM_END])
    longer = narrowed.generate([p["prompt"] for p in problems[:4]], temperature=0, max_new_tokens=64)
    assert all(len(a.token_ids) > len(b.token_ids) for a, b in zip(longer, plain[:4]))


def test_stop_token_counts_in_the_log_ratio_when_pad_equals_eos(qwen_model):
    """Qwen2.5 base pads with its eos (<|endoftext|>): the final stop token is still scored."""
    model, tok = qwen_model
    prompt = tok("37+48=?\n", add_special_tokens=False)["input_ids"]
    response = tok("37+48=85. #### 85", add_special_tokens=False)["input_ids"] + [ENDOFTEXT]
    batch = collate([prompt, prompt], [response, response[:3]], pad_id=ENDOFTEXT)  # pad id == the stop token
    with torch.no_grad():
        logp = response_logprobs(model, batch)
    assert batch.response_mask[0].sum() == len(response) and logp[0, len(response) - 1] != 0
    assert torch.all(logp[1, 3:] == 0)  # padding (the same id) is masked


# -- log-probabilities without a B x T x V tensor -----------------------------------------------

def _random_qwen_vocab_model(vocab: int = QWEN_VOCAB_SIZE):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg)


def _full_logit_scores(model, batch):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=left_pad_positions(batch.attention_mask)).logits
    # float64: torch's float32 log_softmax over 151,936 logits is off by ~5e-5 where p(y) is near 1
    logp = logits[:, batch.prompt_len - 1 : -1].double().log_softmax(-1)
    token = logp.gather(-1, batch.input_ids[:, batch.prompt_len :, None]).squeeze(-1) * batch.response_mask
    entropy = -(logp.exp() * logp).sum(-1) * batch.response_mask
    return token.float(), entropy.float()


@pytest.mark.parametrize("vocab_tile", [8192, 700])  # one tile of rows; five (the last partial)
def test_chunked_scores_equal_the_full_logits_in_value_and_gradient(monkeypatch, vocab_tile):
    model = _random_qwen_vocab_model(vocab=3000)
    monkeypatch.setattr(modeling, "LOGITS_CHUNK_ELEMENTS", 3000 * 5)  # 5 tokens a chunk: several chunks per row
    monkeypatch.setattr(modeling, "VOCAB_TILE", vocab_tile)
    g = torch.Generator().manual_seed(1)
    batch = collate([torch.randint(0, 3000, (n,), generator=g).tolist() for n in (4, 7)],
                    [torch.randint(0, 3000, (n,), generator=g).tolist() for n in (13, 6)], pad_id=0)
    logp, entropy = response_logprobs(model, batch, with_entropy=True)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full_logp, full_entropy = _full_logit_scores(model, batch)
    (full_logp.sum() + 0.5 * full_entropy.sum()).backward()
    assert torch.allclose(logp, full_logp, atol=1e-5) and torch.allclose(entropy, full_entropy, atol=1e-4)
    for name, param in model.named_parameters():
        assert torch.allclose(chunked[name], param.grad, atol=1e-5), name
    assert "lm_head" not in model.__dict__  # the stand-in is gone after the forward


@pytest.mark.parametrize("responses, length", [(4, 600), (2, 8)], ids=["two-position-chunks", "short-batch"])
def test_no_logits_block_beyond_one_tile_at_qwens_vocabulary(monkeypatch, responses, length):
    """Forward and backward (with the entropy bonus) compute at most one tile of logits at a time
    (LOGITS_CHUNK_ELEMENTS, and VOCAB_TILE rows of the vocabulary), each once forward and once
    recomputed in the backward, and never for the prompt: also for a batch short enough to fit
    in one chunk of positions."""
    model = _random_qwen_vocab_model()
    tiles = []
    real = modeling._tile_logits

    def spy(h, weight, rows):
        logits = real(h, weight, rows)
        tiles.append(logits.shape)
        return logits

    monkeypatch.setattr(modeling, "_tile_logits", spy)
    batch = collate([[1, 2, 3, 4, 5]] * responses, [list(range(10, 10 + length))] * responses, pad_id=0)
    # 4 x 600 response tokens: two chunks of positions; 2 x 8: less than one
    assert (modeling.LOGITS_CHUNK_ELEMENTS < responses * length * QWEN_VOCAB_SIZE) == (length == 600)
    logp, entropy = response_logprobs(model, batch, with_entropy=True)
    (logp.sum() - entropy.sum()).backward()
    assert max(n * v for n, v in tiles) <= modeling.LOGITS_CHUNK_ELEMENTS and max(v for _, v in tiles) <= modeling.VOCAB_TILE
    assert sum(n * v for n, v in tiles) == 2 * responses * length * QWEN_VOCAB_SIZE
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all()


def test_lora_and_frozen_reference_score_through_the_chunks(qwen_model):
    """LoRA policy, its adapter-disabled pi_ref and the bf16-stored pi_ref score responses of the
    Qwen-vocabulary model through the chunked path and agree with the full logits."""
    from apo_core.modeling import add_lora, reference_of

    model, tok = qwen_model
    prompt = tok(chat_prompt(tok, "37+48=?"), add_special_tokens=False)["input_ids"]
    batch = collate([prompt], [tok("37+48=85. #### 85", add_special_tokens=False)["input_ids"] + [IM_END]], ENDOFTEXT)
    with torch.no_grad():
        expected, _ = _full_logit_scores(model, batch)
        narrow = reference_of(model, "bfloat16")
        assert torch.allclose(response_logprobs(narrow, batch), expected, atol=0.1)
        import copy

        lora = add_lora(copy.deepcopy(model), rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
        ref = reference_of(lora)
        assert torch.allclose(response_logprobs(lora, batch), expected, atol=1e-5)  # B = 0 at init: the same model
        assert torch.allclose(response_logprobs(ref, batch), expected, atol=1e-5)


# -- preflight on any HF folder -----------------------------------------------------------------

def _copy_of_embedded_qwen(tmp: Path) -> Path:
    folder = tmp / "qwen-folder"
    shutil.copytree(modeling.resolve_model_path("embedded-qwen"), folder)
    return folder


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))


def _preflight(folder, **overrides):
    from tasks.config import load_config
    from tasks.preflight import check_model, check_model_tokens

    cfg = load_config(None, [f"model.path={folder}", *(f"{k}={v}" for k, v in overrides.items())])
    check_model(cfg.model.path)
    check_model_tokens(cfg)


def test_preflight_passes_the_builtin_and_a_copy_of_it(tmp_path, capsys):
    _preflight("embedded-qwen", **{"data.template": "chat"})
    _preflight(_copy_of_embedded_qwen(tmp_path), **{"data.template": "chat"})
    assert "WARNING" not in capsys.readouterr().out


@pytest.mark.parametrize("case, expected", [
    ("no chat template", "data.template is chat, but the tokenizer of model.path"),
    ("stop id outside the vocabulary", "generation.stop_token_ids: stop token 200000 is outside the vocabulary (ids 0-151935)"),
    ("vocabulary smaller than the tokenizer", "the tokenizer has 151,665 tokens but the model's vocabulary only 151,000 rows"),
    ("eos outside the vocabulary", "stop token 160000 is outside the vocabulary (ids 0-151935)"),
])
def test_preflight_refuses_a_folder_that_cannot_run_right(case, expected, tmp_path):
    from tasks.preflight import PreflightError

    folder = _copy_of_embedded_qwen(tmp_path)
    overrides = {"data.template": "chat"}
    if case == "no chat template":
        (folder / "chat_template.jinja").unlink()
    elif case == "stop id outside the vocabulary":
        overrides["generation.stop_token_ids"] = "[200000]"
    elif case == "vocabulary smaller than the tokenizer":
        _edit_json(folder / "config.json", vocab_size=151_000)
    else:
        _edit_json(folder / "generation_config.json", eos_token_id=[151645, 160000])
        overrides["data.template"] = "auto"
    with pytest.raises(PreflightError) as info:
        _preflight(folder, **overrides)
    message = str(info.value)
    assert "\n" not in message and message.startswith("preflight: ") and expected in message, message


def test_preflight_warns_when_apo_pads_with_eos(tmp_path, capsys):
    folder = _copy_of_embedded_qwen(tmp_path)
    # an explicit null: Qwen2Tokenizer (chosen by config.json's model_type) defaults pad to <|endoftext|>
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": None}))
    _preflight(folder)
    out = capsys.readouterr().out
    assert "WARNING" in out and "has no pad token; apo pads with its eos token '<|im_end|>'" in out


# -- the pipeline on it -------------------------------------------------------------------------

@pytest.mark.slow
def test_astar_po_lifts_embedded_qwen_in_chatml(prefect_api, tmp_path):
    """The whole pipeline on the Qwen-vocabulary model with ChatML prompts: held-out greedy
    accuracy on 200 prompts rises by at least 5 points (measured: 19.0% -> 35.5% in 2 min 18 s on
    2 cores); the prompts are ChatML turns, the responses end on a stop token, and the prompt
    lengths are recorded."""
    from tasks.config import load_config
    from flows.apo import apo

    cfg = load_config(overrides=[
        "run_id=qwen", f"artifact_root={tmp_path}", "model.path=embedded-qwen", "data.template=chat",
        "data.train_size=128", "data.test_size=200", "reference.n_samples=2", "reference.max_new_tokens=56",
        "train.max_new_tokens=56", "eval.max_new_tokens=56", "train.steps=16", "train.rollout_batch_size=32",
        "train.minibatch_size=32", "train.lr=2e-4",
    ])
    summary = apo(config=cfg)
    assert summary["trained_accuracy"] >= summary["reference_accuracy"] + 0.05, summary
    import polars as pl

    prompts = pl.read_parquet(f"{tmp_path}/qwen/preprocess/prompts.parquet")
    assert prompts["prompt"][0].startswith("<|im_start|>user\n") and prompts["prompt"][0].endswith("<|im_start|>assistant\n")
    provenance = json.loads((tmp_path / "qwen/preprocess/provenance.json").read_text())
    assert provenance["template"] == "chat" and 15 <= provenance["prompt_tokens"]["test"]["mean"] <= 30
    samples = pl.read_parquet(f"{tmp_path}/qwen/sample_reference/samples.parquet")
    assert (samples["finish_reason"] == "stop").mean() > 0.95
