"""Train the tiny model for a few A*-PO steps on fixed rollouts and write the losses and
final weights: run as one plain process, or under `torchrun --nproc_per_node=K` with ZeRO.
With `generate`: greedy answers of the real engine instead, one rank's rows stopping long
before the other's, written per rank.

usage: ds_train.py MODEL_DIR OUT_DIR ZERO_STAGE|none [generate]
"""

import json
import sys
from pathlib import Path

import torch

from apo_core.config import DeepSpeedSettings, TrainConfig
from apo_core.distributed import gathered
from apo_core.engines import Completion, TransformersEngine
from apo_core.modeling import load_model_and_tokenizer, reference_of
from apo_core.rewards import gsm8k_reward
from apo_core.rollouts import TrainPrompt
from apo_core.trainer import OnlineTrainer

PROMPTS = [TrainPrompt(f"p{i}", f"{10 + i}+{20 + i}=?\n", str(30 + 2 * i), 0.25 * (i % 4)) for i in range(16)]


class FixedEngine:
    """A response that depends only on the prompt and the step: the same rollouts whatever
    the split of the batch over ranks, so the runs differ only in how they train."""

    name = "fixed"

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def prompt_token_ids(self, prompts):
        return [self.tokenizer.encode(p) for p in prompts]

    def generate(self, prompts, **_):
        self.calls += 1
        out = []
        for p in prompts:
            a, b = (int(x) for x in p.split("=")[0].split("+"))
            guess = a + b + (self.calls + a) % 3 - 1  # right about a third of the time
            ids = self.tokenizer.encode(f"{a}+{b}={guess}. #### {guess}") + [self.tokenizer.eos_token_id]
            out.append(Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, "stop"))
        return out

    def update_weights(self, model):
        pass


def main(model_dir: str, out_dir: str, zero: str) -> None:
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(model_dir)
    ds = None if zero == "none" else DeepSpeedSettings(zero_stage=int(zero))
    cfg = TrainConfig(steps=3, rollout_batch_size=16, minibatch_size=8, lr=1e-3, max_new_tokens=16,
                      checkpoint_every=3, deepspeed=ds)
    trainer = OnlineTrainer(model, reference_of(model), tok, FixedEngine(tok), gsm8k_reward, cfg)
    losses: list[float] = []
    out = Path(out_dir)
    trainer.train(PROMPTS, out / "checkpoints", on_step=lambda s, m, _: losses.append(m["train/loss"]))
    if trainer.rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))


# a one-step question and a three-step one: greedy answers of very different lengths
GENERATE_PROMPTS = ["3+4=?\n", "37+48-12+55-21=?\n"]


def generate(model_dir: str, out_dir: str, zero: str) -> None:
    """Greedy answers through the trainer's own path (the real engine, weights gathered), rank r
    answering GENERATE_PROMPTS[r::world], then one real rollout step on both prompts with logits
    scored one token per chunk (so ranks with different response lengths would score different
    numbers of chunks). Writes {"answers": {prompt: token ids}, "step": n_tokens, loss} to
    answers_<rank>.json."""
    from apo_core import modeling

    modeling.LOGITS_CHUNK_ELEMENTS = 1  # one position per chunk
    model, tok = load_model_and_tokenizer(model_dir)
    engine = TransformersEngine(model, tok, autocast_bf16=False)
    ds = None if zero == "none" else DeepSpeedSettings(zero_stage=int(zero))
    cfg = TrainConfig(steps=1, rollout_batch_size=2, minibatch_size=2, max_new_tokens=64, deepspeed=ds)
    trainer = OnlineTrainer(model, reference_of(model), tok, engine, gsm8k_reward, cfg)
    prompts = GENERATE_PROMPTS[trainer.rank :: trainer.world_size]
    with gathered(trainer.policy):
        answers = engine.generate(prompts, temperature=0.0, max_new_tokens=64)
    metrics, samples = trainer.train_step([TrainPrompt(f"g{i}", p, "7", 0.5) for i, p in enumerate(GENERATE_PROMPTS)])
    Path(out_dir, f"answers_{trainer.rank}.json").write_text(json.dumps({
        "answers": {p: a.token_ids for p, a in zip(prompts, answers)},
        "step": {"n_tokens": [s["n_tokens"] for s in samples], "loss": metrics["train/loss"]}}))


class DrawingEngine(FixedEngine):
    """FixedEngine whose guess also draws from torch's global RNG: each rank's rollouts depend on
    its own RNG stream, which a resume must restore (apo_core.checkpoints rng_rank*.pt)."""

    def generate(self, prompts, **_):
        self.calls += 1
        out = []
        for p in prompts:
            a, b = (int(x) for x in p.split("=")[0].split("+"))
            guess = a + b + int(torch.randint(-1, 2, ()).item())
            ids = self.tokenizer.encode(f"{a}+{b}={guess}. #### {guess}") + [self.tokenizer.eos_token_id]
            out.append(Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, "stop"))
        return out


def resumable(model_dir: str, out_dir: str, zero: str, part: str) -> None:
    """Part `all`: 3 steps, a checkpoint after each. Part `first`: steps 1-2 only; part `rest`: a
    new process (other seed) resumes from step_000002 and trains step 3. Writes each step's loss
    and responses per rank (steps_<part>_<rank>.json) and, on rank 0, the final weights."""
    torch.manual_seed(0 if part != "rest" else 12345)  # the resume must not depend on the seed it starts with
    model, tok = load_model_and_tokenizer(model_dir)
    cfg = TrainConfig(steps=2 if part == "first" else 3, rollout_batch_size=16, minibatch_size=8, lr=1e-3,
                      max_new_tokens=16, checkpoint_every=1, keep_checkpoints=3, deepspeed=DeepSpeedSettings(zero_stage=int(zero)))
    trainer = OnlineTrainer(model, reference_of(model), tok, DrawingEngine(tok), gsm8k_reward, cfg)
    out = Path(out_dir)
    if part == "rest":
        trainer.load_checkpoint(out / "checkpoints" / "step_000002")
    steps = {}
    trainer.train(PROMPTS, out / "checkpoints",
                  on_step=lambda s, m, samples: steps.update({s: {"loss": m["train/loss"], "responses": [x["response"] for x in samples]}}))
    (out / f"steps_{part}_{trainer.rank}.json").write_text(json.dumps(steps))


if __name__ == "__main__":
    if sys.argv[4:5] == ["generate"]:
        generate(*sys.argv[1:4])
    elif sys.argv[4:5] in (["all"], ["first"], ["rest"]):
        resumable(*sys.argv[1:5])
    else:
        main(*sys.argv[1:4])
