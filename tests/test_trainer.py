"""Stage 2 mechanics: one generation per prompt per step, log-probs, updates, resume."""

import pytest
import torch

from apo_core import modeling
from apo_core.config import TrainConfig
from apo_core.engines import TransformersEngine
from apo_core.modeling import add_lora, collate, load_model_and_tokenizer, reference_of, response_logprobs
from apo_core.rewards import gsm8k_reward
from apo_core.rollouts import TrainPrompt
from apo_core.checkpoints import list_checkpoints
from apo_core.trainer import OnlineTrainer

PROMPTS = [TrainPrompt(f"p{i}", f"{10 + i}+{20 + i}=?\n", str(30 + 2 * i), 0.25 * (i % 4)) for i in range(8)]


class CountingEngine(TransformersEngine):
    """Records every generate call's prompts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[list[str]] = []

    def generate(self, prompts, **kwargs):
        self.calls.append(list(prompts))
        return super().generate(prompts, **kwargs)


def make_trainer(model_dir, lora=False, **overrides):
    model, tok = load_model_and_tokenizer(str(model_dir))
    if lora:
        model = add_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    cfg = TrainConfig(**{"steps": 3, "rollout_batch_size": 8, "minibatch_size": 4, "max_new_tokens": 12,
                         "lr": 1e-3, "checkpoint_every": 2, **overrides})
    engine = CountingEngine(model, tok, batch_size=8)
    return OnlineTrainer(model, reference_of(model), tok, engine, gsm8k_reward, cfg)


def test_one_generation_per_prompt_per_step(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, steps=4, rollout_batch_size=4, minibatch_size=2)
    steps = []
    trainer.train(PROMPTS, tmp_path, on_step=lambda s, m, samples: steps.append((s, samples)))
    calls = trainer.engine.calls
    assert len(calls) == 4  # one generate call per rollout step
    for call, (_, samples) in zip(calls, steps):
        assert len(call) == 4 and len(set(call)) == 4  # each prompt of the batch exactly once
        assert len(samples) == 4
    # two steps of 4 cover the 8 prompts exactly once per epoch
    assert sorted(calls[0] + calls[1]) == sorted(p.prompt for p in PROMPTS)
    assert sorted(calls[2] + calls[3]) == sorted(p.prompt for p in PROMPTS)


def test_training_changes_policy_not_reference(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    ref_before = {k: v.clone() for k, v in trainer.ref_policy.state_dict().items()}
    history = []
    trainer.train(PROMPTS, tmp_path, on_step=lambda s, m, _: history.append(m))
    after = trainer.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(ref_before[k], v) for k, v in trainer.ref_policy.state_dict().items())
    # Before the first update pi == pi_ref, so the first minibatch has zero log-ratio and KL.
    assert history[0]["train/kl"] == pytest.approx(0.0, abs=1e-2)
    assert {"train/loss", "train/kl", "train/grad_norm", "rollout/reward_mean", "vstar/batch_mean"} <= set(history[0])
    assert len(history) == 3


def test_resume_from_checkpoint_reproduces_uninterrupted_run(tiny_model_dir, tmp_path):
    straight = make_trainer(tiny_model_dir, steps=4)
    straight.train(PROMPTS, tmp_path / "a")

    first = make_trainer(tiny_model_dir, steps=2)
    first.train(PROMPTS, tmp_path / "b")
    (ckpt,) = list_checkpoints(tmp_path / "b")[-1:]
    resumed = make_trainer(tiny_model_dir, steps=4)
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 2
    resumed.train(PROMPTS, tmp_path / "b")
    for (k, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_lr_warms_up_linearly_over_rollout_steps_and_a_resume_mid_warmup_goes_on_from_there(tiny_model_dir, tmp_path):
    lrs = []
    straight = make_trainer(tiny_model_dir, steps=4, lr=1e-3, lr_warmup_steps=3)
    straight.train(PROMPTS, tmp_path / "a", on_step=lambda s, m, _: lrs.append(m["train/lr"]))
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])

    first = make_trainer(tiny_model_dir, steps=2, checkpoint_every=1, lr=1e-3, lr_warmup_steps=3)
    first.train(PROMPTS, tmp_path / "b")
    resumed = make_trainer(tiny_model_dir, steps=4, lr=1e-3, lr_warmup_steps=3)
    resumed.load_checkpoint(list_checkpoints(tmp_path / "b")[-1])
    resumed_lrs = []
    resumed.train(PROMPTS, tmp_path / "b", on_step=lambda s, m, _: resumed_lrs.append(m["train/lr"]))
    assert resumed_lrs == pytest.approx([1e-3, 1e-3])
    for (k, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_keep_checkpoints_prunes_oldest(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, steps=3, checkpoint_every=1, keep_checkpoints=2)
    trainer.train(PROMPTS, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]


def test_response_logprobs_ignore_left_and_right_padding(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    prompts = [tok.encode("1+2=?\n"), tok.encode("12+34-56=?\n")]
    responses = [tok.encode("1+2=3. #### 3") + [tok.eos_token_id], tok.encode("#### 7")]
    batch = collate(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        together = response_logprobs(model, batch)
        for i in range(2):
            alone = response_logprobs(model, collate([prompts[i]], [responses[i]], tok.pad_token_id))
            n = len(responses[i])
            assert torch.allclose(together[i, :n], alone[0, :n], atol=1e-5)
            assert torch.all(together[i, n:] == 0)


def test_response_logprobs_match_the_full_logits(tiny_model_dir):
    """Asking the model for the response block's logits only gives the log-softmax of the full logits."""
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    batch = collate([tok.encode("1+2=?\n"), tok.encode("12+34-56=?\n")],
                    [tok.encode("#### 3") + [tok.eos_token_id], tok.encode("#### 7")], tok.pad_token_id)
    with torch.no_grad():
        logp = response_logprobs(model, batch)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp_min(0)).logits.log_softmax(-1)
    P = batch.prompt_len
    expected = full[:, P - 1 : -1].gather(-1, batch.input_ids[:, P:, None]).squeeze(-1) * batch.response_mask
    assert full.shape[1] == batch.input_ids.shape[1]
    assert torch.allclose(logp, expected, atol=1e-5)


def test_reference_stored_in_bfloat16_halves_its_matrices_and_keeps_the_scores(tiny_model_dir, monkeypatch):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    policy_before = {k: v.clone() for k, v in model.state_dict().items()}
    exact, narrow = reference_of(model), reference_of(model, "bfloat16")
    assert reference_of(model, "model").state_dict().keys() == exact.state_dict().keys()

    def stored_bytes(m):
        return sum(p.numel() * p.element_size() for p in m.parameters())

    # every matrix narrowed, the norms and biases not: well under 60% of the exact copy
    assert stored_bytes(narrow) < 0.6 * stored_bytes(exact)
    assert {p.dtype for p in narrow.parameters() if p.dim() == 2} == {torch.bfloat16}
    if model.config.tie_word_embeddings:  # the tied matrix stays one tensor in the copy
        assert narrow.lm_head.parametrizations.weight.original is narrow.model.embed_tokens.weight
    assert not any(p.requires_grad for p in narrow.parameters())
    batch = collate([tok.encode("12+34-56=?\n")], [tok.encode("#### 7") + [tok.eos_token_id]], tok.pad_token_id)
    rounded = reference_of(model)  # an fp32 model holding the bf16-rounded matrices
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.to(torch.bfloat16).float())
    widened = []
    real = modeling._StoredAs.forward
    monkeypatch.setattr(modeling._StoredAs, "forward", lambda self, w: widened.append(w.shape) or real(self, w))
    with torch.no_grad():
        a, b, c = response_logprobs(exact, batch), response_logprobs(narrow, batch), response_logprobs(rounded, batch)
    assert b.dtype == torch.float32 and 0 < (a - b).abs().max() < 0.1  # rounded weights, fp32 arithmetic
    assert torch.allclose(b, c, atol=1e-5)
    assert widened and model.lm_head.weight.shape not in widened  # the vocabulary matrix is never widened whole
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in policy_before.items())  # the policy untouched


def test_optimizer_is_fused_adamw_on_cpu(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.optimizer.defaults["fused"] is True


def test_update_in_backward_matches_the_usual_clipped_update(tiny_model_dir, tmp_path):
    """The two-pass update (gradient norm, then each weight updated as its gradient is final)
    trains to the same weights as backward + clip_grad_norm_ + step, clipping active."""
    runs = {}
    for in_backward in (False, True):
        trainer = make_trainer(tiny_model_dir, steps=3, grad_clip=1e-4, beta2=0.1, optimizer_state_dtype="bfloat16",
                               update_in_backward=in_backward)
        assert trainer.memory["update_in_backward"] is in_backward
        history = []
        trainer.train(PROMPTS, tmp_path / str(in_backward), on_step=lambda s, m, _: history.append(m))
        runs[in_backward] = (trainer, history)
    (plain, h0), (fused, h1) = runs[False], runs[True]
    assert plain.policy.config.tie_word_embeddings and fused._shared  # the tied matrix takes the deferred path
    assert all(m["train/grad_norm"] > 1e-4 for m in h0)  # clipping did act
    assert [m["train/grad_norm"] for m in h1] == pytest.approx([m["train/grad_norm"] for m in h0], rel=1e-4)
    # The two paths sum gradients in different orders (norms agree to ~1e-7 relative), and a bf16
    # moment rounded stochastically can land one bf16 step (2^-8 relative) apart, which moves that
    # element's update by up to ~0.4%: against updates of ~lr x 2 minibatches x 3 steps = 6e-3 that
    # is ~2.5e-5 (measured max 2.1e-5 in 10 of 17k embedding elements; 1.9e-6 with other rollouts).
    # All but a few elements agree to 1e-6.
    for (k, a), b in zip(plain.policy.state_dict().items(), fused.policy.state_dict().values()):
        assert torch.allclose(a, b, atol=5e-5), k
        assert ((a - b).abs() > 1e-6).float().mean() < 0.01, k
    assert all(p.grad is None for p in fused.policy.parameters())  # no gradient outlives its update


def test_update_in_backward_takes_the_output_matrix_a_tile_of_rows_at_a_time(tiny_model_dir, tmp_path, monkeypatch):
    """Where the output layer's logits come in tiles, its tied matrix is counted and updated a tile of
    rows at a time during the backward (the rows of the batch's tokens after the sparse embedding
    gradient is added): the same weights as the usual clipped update, and the only gradient the
    matrix ever holds is the embedding's sparse one, never a dense (V, H) tensor."""
    from apo_core.modeling import sparse_tied_embedding_grad

    monkeypatch.setattr(modeling, "LOGITS_CHUNK_ELEMENTS", 264 * 5)  # 5 positions per tile
    monkeypatch.setattr(modeling, "VOCAB_TILE", 100)  # three tiles of rows, the last partial
    runs, held = {}, []
    for in_backward in (False, True):
        trainer = make_trainer(tiny_model_dir, steps=3, grad_clip=1e-4, beta2=0.1, optimizer_state_dtype="bfloat16",
                               update_in_backward=in_backward)
        assert sparse_tied_embedding_grad(trainer.policy)
        matrix = trainer.policy.lm_head.weight
        if in_backward:
            matrix.register_post_accumulate_grad_hook(lambda p: held.append((p.grad.is_sparse, p.grad._nnz())))
        history = []
        trainer.train(PROMPTS, tmp_path / str(in_backward), on_step=lambda s, m, _: history.append(m))
        runs[in_backward] = (trainer, history)
    (plain, h0), (tiled, h1) = runs[False], runs[True]
    assert all(m["train/grad_norm"] > 1e-4 for m in h0)  # clipping did act
    assert [m["train/grad_norm"] for m in h1] == pytest.approx([m["train/grad_norm"] for m in h0], rel=1e-4)
    # 3 steps x 2 minibatches x 2 passes; each time only the embedding's rows of the batch's tokens
    assert len(held) == 12 and all(sparse and 0 < nnz < 264 for sparse, nnz in held)
    # Within the bf16 rounding bound of the test above (a row or sign error would move elements by
    # up to 2 x lr = 2e-3: Adam's update is about lr per element whatever the gradient's scale); the
    # matrix's rows are rounded with each tile's own noise, so most of its elements (and, through
    # the next steps' gradients, a few % of the others') differ slightly.
    for (k, a), b in zip(plain.policy.state_dict().items(), tiled.policy.state_dict().values()):
        assert torch.allclose(a, b, atol=5e-5), k
    assert all(p.grad is None for p in tiled.policy.parameters())


def test_update_in_backward_scores_the_policy_in_one_graph(tiny_model_dir, tmp_path, monkeypatch):
    """Each weight is updated as soon as its gradient is final, so the policy's log-probs come
    from one forward per minibatch under update_in_backward: with two length-bucket graphs the
    autograd engine would hold the later graph's partial gradient of every weight until the
    earlier one's arrived (a whole gradient set, which the update-in-backward path exists to
    avoid). pi_ref, without gradients, keeps its buckets; without update_in_backward so does the policy."""
    from apo_core import trainer as trainer_module

    calls = []
    real = trainer_module.response_logprobs
    monkeypatch.setattr(trainer_module, "response_logprobs",
                        lambda model, batch, **kw: calls.append((model.training, kw.get("buckets"))) or real(model, batch, **kw))
    for in_backward in (True, False):
        calls.clear()
        trainer = make_trainer(tiny_model_dir, steps=1, length_buckets=2, optimizer_state_dtype="bfloat16",
                               update_in_backward=in_backward)
        trainer.train(PROMPTS, tmp_path / str(in_backward))
        policy = {b for training, b in calls if training}
        reference = {b for training, b in calls if not training}
        assert reference == {2} and policy == ({1} if in_backward else {2})


def test_memory_plan_auto_by_model_size():
    from apo_core.trainer import memory_plan

    big, small = dict(n_params=500_000_000, n_trained=500_000_000), dict(n_params=1_000_000, n_trained=1_000_000)
    assert memory_plan(TrainConfig(), **big) == {"optimizer_state_dtype": "bfloat16", "gradient_checkpointing": True,
                                                 "update_in_backward": True, "return_freed_memory": True,
                                                 "sparse_embedding_grad": True}
    assert memory_plan(TrainConfig(), **small) == {"optimizer_state_dtype": "float32", "gradient_checkpointing": False,
                                                   "update_in_backward": False, "return_freed_memory": False,
                                                   "sparse_embedding_grad": False}
    # LoRA on a large model: the adapter's optimizer state is small, fp32; checkpointing still pays
    lora = memory_plan(TrainConfig(), n_params=500_000_000, n_trained=2_000_000)
    assert lora["optimizer_state_dtype"] == "float32" and lora["gradient_checkpointing"] and not lora["update_in_backward"]
    with pytest.raises(ValueError, match="update_in_backward needs"):
        memory_plan(TrainConfig(update_in_backward=True, optimizer_state_dtype="float32"), **small)


def _lora_params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_lora_trains_only_the_adapter_and_keeps_pi_ref_exact(tiny_model_dir, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    probe = collate([tok.encode("12+34-56=?\n")], [tok.encode("#### 7")], tok.pad_token_id)
    with torch.no_grad():
        original = response_logprobs(model, probe)
    trainer = make_trainer(tiny_model_dir, lora=True, lr=1e-2)
    base_before = {k: v.clone() for k, v in trainer.policy.state_dict().items() if "lora_" not in k}
    lora_before = _lora_params(trainer.policy)
    assert lora_before and all(p.requires_grad == ("lora_" in k) for k, p in trainer.policy.named_parameters())
    # pi_ref is the same network with the adapter off, not a second copy of the weights
    assert not list(trainer.ref_policy.parameters())
    trainer.train(PROMPTS, tmp_path)
    after = trainer.policy.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())
    assert any(not torch.equal(v, _lora_params(trainer.policy)[k]) for k, v in lora_before.items())
    with torch.no_grad():
        assert torch.equal(response_logprobs(trainer.ref_policy, probe), original)  # pi_ref exact
        assert not torch.allclose(response_logprobs(trainer.policy, probe), original)  # the policy moved
    # the checkpoint holds only the adapter
    ckpt = list_checkpoints(tmp_path)[-1]
    assert (ckpt / "model" / "adapter_model.safetensors").exists()
    assert not (ckpt / "model" / "model.safetensors").exists()


def test_lora_resume_and_serving_weights_match_the_merged_model(tiny_model_dir, tmp_path):
    from apo_core.modeling import serving_weights

    straight = make_trainer(tiny_model_dir, lora=True, steps=4, lr=1e-2)
    straight.train(PROMPTS, tmp_path / "a")
    first = make_trainer(tiny_model_dir, lora=True, steps=2, lr=1e-2)
    first.train(PROMPTS, tmp_path / "b")
    resumed = make_trainer(tiny_model_dir, lora=True, steps=4, lr=1e-2)
    resumed.load_checkpoint(list_checkpoints(tmp_path / "b")[-1])
    assert resumed.step == 2
    resumed.train(PROMPTS, tmp_path / "b")
    for k, v in _lora_params(straight.policy).items():
        assert torch.allclose(v, _lora_params(resumed.policy)[k], atol=1e-6), k

    served = dict(serving_weights(straight.policy))
    merged = straight.policy.merge_and_unload().state_dict()
    assert served.keys() == merged.keys()
    for k, v in merged.items():
        assert torch.allclose(served[k], v, atol=1e-6), k


def test_nonfinite_updates_are_skipped_then_stop_the_run(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, steps=4, checkpoint_every=1)
    good_reward = trainer.reward_fn
    calls = []

    def flaky(completions, answers):  # NaN rewards on rollout step 2 only
        calls.append(1)
        return [float("nan")] * len(completions) if len(calls) == 2 else good_reward(completions, answers)

    trainer.reward_fn = flaky
    history = []
    trainer.train(PROMPTS[:4] * 2, tmp_path / "a", on_step=lambda s, m, _: history.append(m))
    assert [m["train/nonfinite_skipped"] for m in history] == [0.0, 2.0, 0.0, 0.0]  # both updates of step 2
    assert all(v == v for m in history for k, v in m.items() if k.startswith("train/"))  # no NaN in the update metrics
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())

    broken = make_trainer(tiny_model_dir, steps=4, checkpoint_every=1)
    broken.train(PROMPTS, tmp_path / "b")  # 4 good steps, checkpoint step_000004
    broken.cfg = broken.cfg.model_copy(update={"steps": 8})
    broken.reward_fn = lambda completions, answers: [float("nan")] * len(completions)
    # step 5 skips its 2 updates (streak 2) and still checkpoints unchanged, finite weights; step 6's first update stops it
    with pytest.raises(FloatingPointError, match=r"3 updates in a row .* at rollout step 6; last good checkpoint: .*step_000005"):
        broken.train(PROMPTS, tmp_path / "b")


class UnseededEngine(CountingEngine):
    """Samples from the global torch generator (no per-step seed): a resume reproduces the run
    only if the checkpoint restored the RNG state."""

    def generate(self, prompts, **kwargs):
        return super().generate(prompts, **{**kwargs, "seed": None})


def _scramble_rngs():
    import random

    import numpy as np

    random.seed(999), np.random.seed(999), torch.manual_seed(999)


def test_checkpoint_holds_rng_states_data_position_and_vstar_hash(tiny_model_dir, tmp_path):
    import json
    import random

    import numpy as np

    from apo_core.checkpoints import vstar_table_hash

    trainer = make_trainer(tiny_model_dir, steps=3, rollout_batch_size=4, minibatch_size=2, checkpoint_every=3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    trainer.train(PROMPTS, tmp_path)  # the last checkpoint is written at the end, so the RNGs now are its RNGs
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    (ckpt,) = list_checkpoints(tmp_path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    # 3 steps of 4 over 8 prompts: the next step reads epoch 1 of the seeded order from index 4
    assert state["data_position"] == {"step": 3, "epoch": 1, "next_prompt_index": 4, "prompts": 8}
    assert state["vstar_hash"] == vstar_table_hash(PROMPTS) and state["train_config"]["steps"] == 3

    _scramble_rngs()
    resumed = make_trainer(tiny_model_dir, steps=3, rollout_batch_size=4, minibatch_size=2)
    resumed.load_checkpoint(ckpt, vstar_hash=vstar_table_hash(PROMPTS))
    assert random.getstate() == saved[0]
    restored_np = np.random.get_state()
    assert restored_np[0] == saved[1][0] and np.array_equal(restored_np[1], saved[1][1]) and restored_np[2:] == saved[1][2:]
    assert torch.equal(torch.get_rng_state(), saved[2])
    assert resumed.step == 3 and resumed.resumed_from["data_position"]["next_prompt_index"] == 4


def test_killed_and_resumed_unseeded_run_matches_the_uninterrupted_run(tiny_model_dir, tmp_path):
    def trainer(steps):
        t = make_trainer(tiny_model_dir, steps=steps)
        t.engine = UnseededEngine(t.policy, t.tokenizer, batch_size=8)
        return t

    torch.manual_seed(5)
    straight = trainer(4)
    losses = []
    straight.train(PROMPTS, tmp_path / "a", on_step=lambda s, m, _: losses.append(m["train/loss"]))

    torch.manual_seed(5)
    first = trainer(2)
    first.train(PROMPTS, tmp_path / "b")  # "killed" after its step-2 checkpoint
    _scramble_rngs()  # a fresh process: other RNG states until the checkpoint restores them
    resumed = trainer(4)
    resumed.load_checkpoint(list_checkpoints(tmp_path / "b")[-1])
    resumed_losses = []
    resumed.train(PROMPTS, tmp_path / "b", on_step=lambda s, m, _: resumed_losses.append(m["train/loss"]))
    assert resumed_losses == pytest.approx(losses[2:], rel=1e-5, abs=1e-7)
    for (k, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_resume_against_another_vstar_table_fails_before_training(tiny_model_dir, tmp_path):
    from apo_core.checkpoints import CheckpointMismatch, vstar_table_hash

    first = make_trainer(tiny_model_dir, steps=2)
    first.train(PROMPTS, tmp_path)
    ckpt = list_checkpoints(tmp_path)[-1]
    other = [TrainPrompt(p.prompt_id, p.prompt, p.answer, p.vstar + 0.125) for p in PROMPTS]
    ours, theirs = vstar_table_hash(PROMPTS), vstar_table_hash(other)
    assert ours != theirs

    resumed = make_trainer(tiny_model_dir, steps=4)
    before = {k: v.clone() for k, v in resumed.policy.state_dict().items()}
    with pytest.raises(CheckpointMismatch) as err:
        resumed.load_checkpoint(ckpt, vstar_hash=theirs)
    message = str(err.value)
    assert "\n" not in message and ours in message and theirs in message and str(ckpt) in message
    assert resumed.step == 0 and all(torch.equal(v, resumed.policy.state_dict()[k]) for k, v in before.items())

    # loaded without the hash, train() still refuses other V* values before any rollout
    resumed.load_checkpoint(ckpt)
    with pytest.raises(CheckpointMismatch, match=f"{ours}.*{theirs}"):
        resumed.train(other, tmp_path)
    assert resumed.engine.calls == [] and resumed.step == 2 and [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]


def test_entropy_bonus_raises_the_policys_entropy(tiny_model_dir, tmp_path):
    """train.entropy_coef > 0 subtracts coef x the policy's mean token entropy from the loss:
    the step reports it, and training with it leaves the policy with more entropy than without."""
    from apo_core.objectives import mean_entropy

    def entropy_after(coef):
        trainer = make_trainer(tiny_model_dir, entropy_coef=coef, steps=3)
        history = []
        trainer.train(PROMPTS, tmp_path / f"coef{coef}", on_step=lambda s, m, _: history.append(m))
        tok = trainer.tokenizer
        probe = collate([tok(p.prompt)["input_ids"] for p in PROMPTS], [tok(" 42")["input_ids"] * 4] * len(PROMPTS),
                        tok.pad_token_id)
        with torch.no_grad():
            _, entropies = response_logprobs(trainer.policy, probe, with_entropy=True)
        return history, float(mean_entropy(entropies, probe.response_mask))

    plain, plain_entropy = entropy_after(0.0)
    bonus, bonus_entropy = entropy_after(5.0)
    assert "train/entropy" not in plain[0] and bonus[0]["train/entropy"] > 0
    assert bonus[0]["rollout/reward_mean"] == plain[0]["rollout/reward_mean"]  # the first rollout is the same
    assert bonus_entropy > plain_entropy + 1e-3


def test_time_budget_bounds_training_and_counts_over_resumes(tiny_model_dir, tmp_path, monkeypatch):
    """A fake clock: a rollout step takes 1 s, a checkpoint 0.5 s. With 4.2 s, three steps fit and
    the checkpoint after the third (a fourth step and its checkpoint would end past 4.2 s); a
    resume from it has no time left, and a larger budget trains on to `steps`."""
    import apo_core.trainer as trainer_module

    now = [0.0]
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: now[0])
    real_step, real_save = OnlineTrainer.train_step, OnlineTrainer.save_checkpoint

    def one_second_step(self, batch):
        out = real_step(self, batch)
        now[0] += 1.0
        return out

    def half_second_checkpoint(self, *args, **kwargs):
        path = real_save(self, *args, **kwargs)
        now[0] += 0.5
        self.save_seconds = 0.5
        return path

    monkeypatch.setattr(OnlineTrainer, "train_step", one_second_step)
    monkeypatch.setattr(OnlineTrainer, "save_checkpoint", half_second_checkpoint)
    settings = dict(steps=12, rollout_batch_size=4, minibatch_size=4, checkpoint_every=100)
    trainer = make_trainer(tiny_model_dir, **settings, time_budget_s=4.2)
    trainer.train(PROMPTS, tmp_path)
    assert trainer.step == 3 and trainer.train_seconds == pytest.approx(3.5) and trainer.out_of_time()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003"]  # the last step is checkpointed
    resumed = make_trainer(tiny_model_dir, **settings, time_budget_s=4.2)
    resumed.load_checkpoint(tmp_path / "step_000003")
    assert resumed.train_seconds == pytest.approx(3.0) and resumed.last_step_seconds == pytest.approx(1.0)
    resumed.train(PROMPTS, tmp_path)
    assert resumed.step == 3  # the spent seconds came back with the checkpoint: no time for a step
    more = make_trainer(tiny_model_dir, **settings, time_budget_s=1e6)
    more.load_checkpoint(tmp_path / "step_000003")
    more.train(PROMPTS, tmp_path)
    assert more.step == 12  # a large budget: steps decide again


def test_length_buckets_give_the_scores_and_gradient_of_one_padded_forward(tiny_model_dir):
    """Rows of very different lengths scored in 3 length buckets (each cut to its own longest
    prompt and response) equal one forward over the whole padded block, scores and gradients."""
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    prompts = [tok.encode(p) for p in ("1+1=?\n", "123+456-78=?\n", "9=?\n", "40+2=?\n", "7-3+11+19=?\n")]
    responses = [tok.encode(r) + [tok.eos_token_id] for r in ("2", "501. #### 501", "9", "42 #### 42", "34")]
    batch = collate(prompts, responses, tok.pad_token_id)
    grads = []
    for buckets in (1, 3):
        model.zero_grad()
        logp, entropy = response_logprobs(model, batch, with_entropy=True, buckets=buckets)
        (logp.sum() + entropy.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if buckets == 1:
            one_logp, one_entropy = logp.detach(), entropy.detach()
    assert torch.allclose(logp, one_logp, atol=1e-5) and torch.allclose(entropy, one_entropy, atol=1e-5)
    assert (logp[batch.response_mask == 0] == 0).all()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("in_backward", [False, True])
def test_a_sparse_tied_embedding_gradient_makes_the_same_update(tiny_model_dir, tmp_path, in_backward):
    """The embedded model ties its embedding to the output layer: with the embedding's gradient
    sparse (as large models get it), the summed gradient and so every update are the dense path's."""
    from apo_core.modeling import sparse_tied_embedding_grad

    settings = dict(optimizer_state_dtype="bfloat16", update_in_backward=in_backward) if in_backward else {}
    dense, sparse = make_trainer(tiny_model_dir, **settings), make_trainer(tiny_model_dir, **settings)
    assert sparse_tied_embedding_grad(sparse.policy) and sparse.policy.get_input_embeddings().sparse
    dense.train(PROMPTS, tmp_path / "dense")
    sparse.train(PROMPTS, tmp_path / "sparse")
    for (k, a), b in zip(dense.policy.state_dict().items(), sparse.policy.state_dict().values()):
        assert torch.allclose(a, b, atol=2e-5), k
    untied, tok = load_model_and_tokenizer(str(tiny_model_dir))
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert not sparse_tied_embedding_grad(untied) and not untied.get_input_embeddings().sparse
