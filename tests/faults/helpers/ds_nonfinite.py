"""Three A*-PO steps on fixed rollouts where rollout step 2 scores NaN on the rows rank 1 of 2
owns: run as one plain process, or under `torchrun --nproc_per_node=2` with ZeRO. Writes every
step's metrics (rank 0) and the final weights.

usage: ds_nonfinite.py MODEL_DIR OUT_DIR ZERO_STAGE|none
"""

import json
import sys
from pathlib import Path

import torch

from apo_core.config import DeepSpeedSettings, TrainConfig
from apo_core.modeling import load_model_and_tokenizer, reference_of
from apo_core.rewards import gsm8k_reward
from apo_core.trainer import OnlineTrainer
from tests.helpers.ds_train import PROMPTS, FixedEngine

MINIBATCH = 8


def main(model_dir: str, out_dir: str, zero: str) -> None:
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(model_dir)
    ds = None if zero == "none" else DeepSpeedSettings(zero_stage=int(zero))
    cfg = TrainConfig(steps=3, rollout_batch_size=16, minibatch_size=MINIBATCH, lr=1e-3, max_new_tokens=16,
                      checkpoint_every=3, deepspeed=ds)
    calls = []

    def reward(completions, answers):
        calls.append(1)
        scores = gsm8k_reward(completions, answers)
        if len(calls) != 2:
            return scores
        if trainer.world_size == 1:  # the rows rank 1 of 2 would own: the second half of every minibatch
            return [float("nan") if i % MINIBATCH >= MINIBATCH // 2 else s for i, s in enumerate(scores)]
        return [float("nan")] * len(scores) if trainer.rank == 1 else scores

    trainer = OnlineTrainer(model, reference_of(model), tok, FixedEngine(tok), reward, cfg)
    history: list[dict] = []
    out = Path(out_dir)
    trainer.train(PROMPTS, out / "checkpoints", on_step=lambda s, m, _: history.append(m))
    if trainer.rank == 0:
        (out / "history.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main(*sys.argv[1:4])
