"""Stage 2: on-policy least-squares regression to the optimal advantage, one sample per prompt.

Each rollout step takes `rollout_batch_size` prompts, samples ONE response per prompt from the
current policy, scores it, scores it under pi_ref, and takes rollout/minibatch AdamW steps on

    loss = mean_B ( beta2 * [log pi(y|x) - log pi_ref(y|x)] - (r(x, y) - V*(x)) )^2

The prompt order and sampling seeds are functions of the step number, so a run resumed from
a checkpoint continues exactly where the checkpoint left it. A checkpoint also holds every RNG
state (torch CPU and CUDA, numpy, python `random`; per rank under DeepSpeed) for the draws that
are not seeded per step (dropout, unseeded engines), the data position, and the hash of the V*
table it trained against: resuming against other V* values fails instead of training.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .config import TrainConfig
from .engines import GenerationEngine
from .distributed import all_max, gathered, partitioned
from .modeling import collate, is_peft, response_logprobs
from .objectives import apo_loss, mean_entropy
from .optim import BF16StateAdamW
from .rewards import RewardFn

STATE_FILE = "trainer_state.pt"


@dataclass(frozen=True)
class TrainPrompt:
    prompt_id: str
    prompt: str
    answer: str
    vstar: float


StepCallback = Callable[[int, dict[str, float], list[dict]], None]


class CheckpointMismatch(ValueError):
    """A checkpoint that must not be resumed here (it trained against another V* table)."""


def vstar_table_hash(prompts: Sequence[TrainPrompt]) -> str:
    """sha256 of the V* table a run trains against: its (prompt_id, vstar) pairs, i.e. the rows of
    vstar.parquet that stage 2 keeps, one `prompt_id<TAB>float.hex(vstar)` line each, sorted by
    prompt_id. Exact (hex floats), independent of row order and of Parquet's encoding.

    >>> a, b = TrainPrompt("a", "", "", 1.0), TrainPrompt("b", "", "", 0.5)
    >>> vstar_table_hash([a, b]) == vstar_table_hash([b, a]) != vstar_table_hash([a, TrainPrompt("b", "", "", 0.25)])
    True
    """
    lines = sorted(f"{p.prompt_id}\t{float(p.vstar).hex()}" for p in prompts)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def rng_state() -> dict:
    """Every global RNG this process draws from, in a form torch.load(weights_only=True) reads."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured (CUDA only where this process has the same devices)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


LARGE_MODEL_PARAMS = 100_000_000  # from here on the memory savings of "auto" are gigabytes


def memory_plan(cfg: TrainConfig, n_params: int, n_trained: int) -> dict:
    """How the trainer holds memory, "auto" settings resolved by model size: the optimizer
    state's dtype (DeepSpeed: always its own fp32), activation checkpointing, and whether
    freed tensors go back to the OS at once (a large model on CPU: glibc otherwise keeps
    the freed blocks of one step's temporaries, gigabytes at 0.5B, in the process).

    >>> memory_plan(TrainConfig(), n_params=494_000_000, n_trained=494_000_000)["optimizer_state_dtype"]
    'bfloat16'
    >>> memory_plan(TrainConfig(), n_params=1_000_000, n_trained=1_000_000)["gradient_checkpointing"]
    False
    """
    large = n_params >= LARGE_MODEL_PARAMS
    state = cfg.optimizer_state_dtype
    if cfg.deepspeed is not None:
        state = "float32"
    elif state == "auto":
        state = "bfloat16" if n_trained >= LARGE_MODEL_PARAMS else "float32"
    ckpt = large if cfg.gradient_checkpointing == "auto" else bool(cfg.gradient_checkpointing)
    in_backward = (state == "bfloat16" and cfg.optimizer_state_dtype == "auto") if cfg.update_in_backward == "auto" \
        else bool(cfg.update_in_backward)
    if in_backward and (state != "bfloat16" or cfg.deepspeed is not None):
        raise ValueError("train.update_in_backward needs train.optimizer_state_dtype bfloat16 and no DeepSpeed")
    return {"optimizer_state_dtype": state, "gradient_checkpointing": ckpt, "update_in_backward": in_backward,
            "return_freed_memory": large}


def _fused_adamw_ok(params: Sequence[torch.Tensor]) -> bool:
    """torch's fused AdamW takes floating-point parameters on CPU and CUDA."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)


def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Serve allocations of `threshold` bytes or more with their own mappings (glibc mallopt
    M_MMAP_THRESHOLD), so freeing a large tensor returns its memory instead of leaving a
    reusable hole in the heap. False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class OnlineTrainer:
    def __init__(
        self,
        policy: torch.nn.Module,
        ref_policy: torch.nn.Module,
        tokenizer,
        engine: GenerationEngine,
        reward_fn: RewardFn,
        cfg: TrainConfig,
    ):
        self.policy, self.ref_policy, self.tokenizer = policy, ref_policy, tokenizer
        self.engine, self.reward_fn, self.cfg = engine, reward_fn, cfg
        self.device = next(policy.parameters()).device
        trained = [p for p in policy.parameters() if p.requires_grad]
        self.memory = memory_plan(cfg, n_params=sum(p.numel() for p in policy.parameters()),
                                  n_trained=sum(p.numel() for p in trained))
        if self.memory["optimizer_state_dtype"] == "bfloat16":
            self.optimizer = BF16StateAdamW(trained, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                            weight_decay=cfg.weight_decay, seed=cfg.seed)
        else:
            self.optimizer = torch.optim.AdamW(
                trained, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                # one fused kernel per step: faster than the multi-tensor path, and without its temporaries
                # the size of all the weights (a peak of several GB on a 0.5B model).
                fused=_fused_adamw_ok(trained))
        uses = Counter(id(p) for module in policy.modules() for p in module.parameters(recurse=False))
        self._shared = {key for key, n in uses.items() if n > 1}  # ids of weights two modules use (tied)
        if self.memory["gradient_checkpointing"]:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.memory["return_freed_memory"]:
            return_freed_memory_to_os()
        self.rank, self.world_size = 0, 1
        self.ds = None  # the DeepSpeed engine wrapping the policy when cfg.deepspeed is set
        if cfg.deepspeed is not None:
            import deepspeed

            from . import distributed

            distributed.init()
            self.rank, self.world_size = distributed.world()
            self.ds, self.optimizer, _, _ = deepspeed.initialize(
                model=policy, optimizer=self.optimizer, config=distributed.ds_config(cfg.deepspeed, cfg, self.world_size))
            self.device = self.ds.device
        # ZeRO-3: every call of a partitioned module is a collective, so ranks score blocks of one shape
        self.lockstep = self.ds is not None and partitioned(policy)
        self.step = 0  # rollout steps completed
        self.nonfinite_streak = 0  # optimizer updates skipped in a row for a NaN/inf loss or gradient
        self.last_checkpoint: Path | None = None
        self.vstar_hash: str | None = None  # of the prompts train() runs on; saved with every checkpoint
        self.n_prompts: int | None = None
        self.resumed_from: dict | None = None  # {"path", "vstar_hash", "data_position"} after load_checkpoint

    # -- data order ---------------------------------------------------------------------------
    def batch_for_step(self, prompts: Sequence[TrainPrompt], step: int) -> list[TrainPrompt]:
        """Prompts of rollout step `step`: consecutive slices of per-epoch seeded permutations."""
        R, n = self.cfg.rollout_batch_size, len(prompts)
        out: list[TrainPrompt] = []
        pos = step * R
        while len(out) < R:
            epoch, offset = divmod(pos, n)
            order = list(range(n))
            random.Random(self.cfg.seed * 7919 + epoch).shuffle(order)
            take = min(R - len(out), n - offset)
            out += [prompts[i] for i in order[offset : offset + take]]
            pos += take
        return out

    def data_position(self, n_prompts: int, step: int | None = None) -> dict:
        """Where rollout step `step` (default: the next one) starts reading: the epoch of the
        seeded prompt order and the index into it."""
        epoch, index = divmod((self.step if step is None else step) * self.cfg.rollout_batch_size, n_prompts)
        return {"step": self.step if step is None else step, "epoch": epoch, "next_prompt_index": index, "prompts": n_prompts}

    # -- one rollout step ---------------------------------------------------------------------
    def train_step(self, batch: Sequence[TrainPrompt]) -> tuple[dict[str, float], list[dict]]:
        cfg = self.cfg
        t0 = time.perf_counter()
        M = cfg.minibatch_size
        n_updates = len(batch) // M
        if self.world_size > 1:  # this rank's share of every minibatch
            from .distributed import local_rows

            batch = [batch[i] for i in local_rows(len(batch), M, self.rank, self.world_size)]
            M //= self.world_size
        with gathered(self.policy):  # ZeRO-3 shards the weights; generation needs them whole
            completions = self.engine.generate(
                [p.prompt for p in batch], temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                seed=cfg.seed * 1_000_033 + self.step,
            )
        rewards = self.reward_fn([c.text for c in completions], [p.answer for p in batch])
        t_gen = time.perf_counter()

        tokens = collate(self.engine.prompt_token_ids([p.prompt for p in batch]), [c.token_ids for c in completions],
                         self.tokenizer.pad_token_id).to(self.device)
        tokens = tokens.with_response_len(self._same_on_every_rank(tokens.response_mask.shape[1]))
        reward_t = torch.tensor(rewards, dtype=torch.float32, device=self.device)
        vstar_t = torch.tensor([p.vstar for p in batch], dtype=torch.float32, device=self.device)
        with torch.no_grad():
            ref_logp = response_logprobs(self.ref_policy, tokens)  # (R, T)
        t_ref = time.perf_counter()

        sums: dict[str, torch.Tensor] = {}
        skipped = 0
        trained = self.ds if self.ds is not None else self.policy
        for k in range(n_updates):
            rows = slice(k * M, (k + 1) * M)
            mb = tokens.select(rows)
            # Trim the response block to this minibatch's longest response: less padding compute.
            T = self._same_on_every_rank(int(mb.response_mask.sum(-1).max().item()))
            mb = mb.with_response_len(T)
            if cfg.entropy_coef > 0:
                logp, token_entropies = response_logprobs(trained, mb, with_entropy=True)
            else:
                logp = response_logprobs(trained, mb)
            loss, metrics = apo_loss(logp, ref_logp[rows, :T], mb.response_mask, reward_t[rows], vstar_t[rows], cfg.beta2)
            if cfg.entropy_coef > 0:
                entropy = mean_entropy(token_entropies, mb.response_mask)
                loss = loss - cfg.entropy_coef * entropy
                metrics["entropy"] = entropy.detach()
            if self.ds is not None:  # DeepSpeed averages gradients over ranks and clips them itself
                self.ds.backward(loss)
                self.ds.step()
                norm = self.ds.get_global_grad_norm()
                metrics["grad_norm"] = torch.tensor(float(0.0 if norm is None else norm))
                # ZeRO drops a step whose global gradient norm is NaN/inf (a NaN loss on any rank
                # makes it so) and reports the norm as inf; the norm is global, so every rank agrees.
                if not bool(torch.isfinite(metrics["grad_norm"])):
                    self._skip_nonfinite()
                    skipped += 1
                    continue
                self.nonfinite_streak = 0
            elif self.memory["update_in_backward"]:
                metrics["grad_norm"] = self._update_in_backward(loss)
                if not bool(torch.isfinite(loss) & torch.isfinite(metrics["grad_norm"])):
                    self._skip_nonfinite()
                    skipped += 1
                    continue
                self.nonfinite_streak = 0
            else:
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
                if not bool(torch.isfinite(loss) & torch.isfinite(metrics["grad_norm"])):
                    self._skip_nonfinite()  # no update from NaN/inf; stops the run after too many in a row
                    skipped += 1
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)  # gradients do not outlive the update (nor sit through the next rollout)
                self.nonfinite_streak = 0
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
        # metrics of the whole minibatch, not of this rank's share (none if every rank skipped every update)
        if self.world_size > 1 and sums:
            keys = sorted(sums)
            flat = torch.stack([sums[k].reshape(()) for k in keys]).to(self.device)
            torch.distributed.all_reduce(flat)
            sums = {k: v / self.world_size for k, v in zip(keys, flat.cpu())}
        self._sync_engine()  # the next rollout samples from the updated policy
        self.step += 1
        t_upd = time.perf_counter()

        n_tokens = [len(c.token_ids) for c in completions]
        out = {f"train/{k}": float(v) / max(1, n_updates - skipped) for k, v in sums.items()}  # one sync per step
        out["train/nonfinite_skipped"] = float(skipped)
        out.update({
            "rollout/reward_mean": sum(rewards) / len(rewards),
            "rollout/response_tokens_mean": sum(n_tokens) / len(n_tokens),
            "rollout/truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "vstar/batch_mean": float(vstar_t.mean()),
            "train/optimizer_steps": float(self.step * n_updates),
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "time/generate_s": t_gen - t0,
            "time/ref_logprobs_s": t_ref - t_gen,
            "time/update_s": t_upd - t_ref,
            "time/step_s": t_upd - t0,
        })
        samples = [
            dict(step=self.step, prompt_id=p.prompt_id, response=c.text, reward=float(r), vstar=p.vstar, n_tokens=len(c.token_ids))
            for p, c, r in zip(batch, completions, rewards)
        ]
        return out, samples

    def train(
        self,
        prompts: Sequence[TrainPrompt],
        checkpoint_dir: Path,
        on_step: StepCallback | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
        before_publish: Callable[[Path], None] | None = None,
    ) -> None:
        """Run rollout steps from self.step up to cfg.steps, checkpointing as configured."""
        if not prompts:
            raise ValueError("no training prompts (did the V* filter drop all of them?)")
        self.vstar_hash, self.n_prompts = vstar_table_hash(prompts), len(prompts)
        if self.resumed_from is not None:
            self._check_resume(self.resumed_from, self.vstar_hash, len(prompts))
        self.policy.train()
        self._sync_engine()  # covers weights restored from a checkpoint
        while self.step < self.cfg.steps:
            metrics, samples = self.train_step(self.batch_for_step(prompts, self.step))
            if on_step:
                on_step(self.step, metrics, samples)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                path = self.save_checkpoint(checkpoint_dir, before_publish)
                if on_checkpoint:
                    on_checkpoint(path)

    def _update_in_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Clipped AdamW without a full set of gradients: backward pass 1 keeps only each
        weight's gradient norm (the gradient is dropped once counted); if loss and norm are
        finite, pass 2 (the retained graph) updates each weight with the clipping coefficient as
        soon as its gradient is final. A weight used by two modules (tied embeddings) gets its
        gradient in two parts, so it is counted and updated after each pass instead. Returns
        the global gradient norm before clipping, as clip_grad_norm_ does."""
        trained = [p for p in self.policy.parameters() if p.requires_grad]
        norms: list[torch.Tensor] = []

        def count(p: torch.Tensor) -> None:
            norms.append(torch.linalg.vector_norm(p.grad))
            p.grad = None

        def update(p: torch.Tensor) -> None:
            self.optimizer.step_weight(p, p.grad, coef)
            p.grad = None

        for hook, retain in ((count, True), (update, False)):
            handles = [p.register_post_accumulate_grad_hook(hook) for p in trained if id(p) not in self._shared]
            try:
                loss.backward(retain_graph=retain)
            finally:
                for handle in handles:
                    handle.remove()
            for p in trained:
                if id(p) in self._shared and p.grad is not None:
                    hook(p)
            if hook is count:
                norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
                if not bool(torch.isfinite(loss) & torch.isfinite(norm)):
                    return norm  # no update; the retained graph goes with `loss`
                coef = float(torch.clamp(self.cfg.grad_clip / (norm + 1e-6), max=1.0))  # clip_grad_norm_'s
        return norm

    def _skip_nonfinite(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        if self.nonfinite_streak >= self.cfg.max_nonfinite_in_a_row:
            raise FloatingPointError(
                f"train_online: {self.nonfinite_streak} updates in a row had a non-finite loss or gradient, at rollout step "
                f"{self.step + 1}; last good checkpoint: {self.last_checkpoint or 'none yet'}")

    def _same_on_every_rank(self, n: int) -> int:
        """`n` under one process; under ZeRO-3 the largest `n` of all ranks (response blocks of one
        length, so each rank calls the partitioned output layer on as many logits chunks)."""
        return all_max(n, self.device) if self.lockstep else n

    def _sync_engine(self) -> None:
        with gathered(self.policy):
            self.engine.update_weights(self.policy)

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint_dir: Path, before_publish: Callable[[Path], None] | None = None) -> Path:
        """Write <dir>/step_NNNNNN/ (model, tokenizer, optimizer, step), then prune old ones.
        Under DeepSpeed, ds/ holds every rank's shards and rank 0 writes the rest.

        The folder is written under a temporary name and renamed, so a kill mid-write never
        leaves a checkpoint that looks complete; `before_publish` may add files to it first.
        """
        checkpoint_dir = Path(checkpoint_dir)
        final = checkpoint_dir / f"step_{self.step:06d}"
        tmp = checkpoint_dir / f".tmp_step_{self.step:06d}"
        lead = self.rank == 0
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        position = self.data_position(self.n_prompts) if self.n_prompts else None
        state: dict = {"step": self.step, "vstar_hash": self.vstar_hash, "data_position": position}
        # each rank's own RNG streams (under DeepSpeed the ranks draw different numbers)
        torch.save(rng_state(), tmp / f"rng_rank{self.rank:03d}.pt")
        if self.ds is not None:  # every rank writes its own optimizer / parameter shards
            self.ds.save_checkpoint(str(tmp / "ds"), tag="state")
        else:
            state["optimizer"] = self.optimizer.state_dict()
        with gathered(self.policy):  # whole weights also under ZeRO-3 (collective)
            if lead:
                self.policy.save_pretrained(tmp / "model")
        if lead:
            self.tokenizer.save_pretrained(tmp / "model")
            torch.save(state, tmp / STATE_FILE)
            (tmp / "trainer_state.json").write_text(json.dumps({
                "step": self.step, "data_position": position, "world_size": self.world_size,
                "vstar_hash": self.vstar_hash, "vstar_hash_of": "sorted (prompt_id, vstar) pairs of the training prompts",
                "train_config": self.cfg.model_dump(mode="json")}, indent=2))
            if before_publish:
                before_publish(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in list_checkpoints(checkpoint_dir)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        self.last_checkpoint = final
        return final

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def load_checkpoint(self, path: Path, vstar_hash: str | None = None) -> None:
        """Restore model, optimizer (and DeepSpeed's scheduler/shards), step, RNG states and data
        position from `path`. With `vstar_hash`, a checkpoint trained against another V* table
        raises CheckpointMismatch before anything is loaded; train() checks it again against the
        prompts it is given."""
        from safetensors.torch import load_file

        path = Path(path)
        # Every file is read before anything is restored: an unreadable checkpoint changes nothing.
        blob = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        rng_file = path / f"rng_rank{self.rank:03d}.pt"
        rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None  # absent before RNG states were saved
        resumed = {"path": str(path), "vstar_hash": blob.get("vstar_hash"), "data_position": blob.get("data_position")}
        if vstar_hash is not None:
            self._check_resume(resumed, vstar_hash, None)
        if self.ds is not None:  # model, optimizer and scheduler shards of every rank
            self.ds.load_checkpoint(str(path / "ds"), tag="state")
        else:
            state = {}
            for shard in sorted((path / "model").glob("*.safetensors")):
                state.update(load_file(shard))
            optimizer = blob["optimizer"]
            if is_peft(self.policy):  # the checkpoint holds the adapter only; base weights never change
                from peft import set_peft_model_state_dict

                result = set_peft_model_state_dict(self.policy, state)
                missing, unexpected = [m for m in result.missing_keys if "lora_" in m], result.unexpected_keys
            else:
                missing, unexpected = self.policy.load_state_dict(state, strict=False)
            # Tied embeddings are saved once; anything else missing is a real mismatch.
            missing = [m for m in missing if not m.endswith("lm_head.weight")]
            if missing or unexpected:
                raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
            self.optimizer.load_state_dict(optimizer)  # load_state_dict moves the states to the parameters' device
        if rng is not None:
            set_rng_state(rng)
        self.step = int(blob["step"])
        self.resumed_from = resumed
        self.last_checkpoint = path

    def _check_resume(self, resumed: dict, vstar_hash: str, n_prompts: int | None) -> None:
        saved = resumed.get("vstar_hash")
        if saved is not None and saved != vstar_hash:
            raise CheckpointMismatch(
                f"train_online: checkpoint {resumed['path']} trained against V* table {saved}, but this run's V* table is "
                f"{vstar_hash}; refusing to resume (use a new run id, or delete the checkpoints to start over)")
        position = resumed.get("data_position")
        if n_prompts is not None and position and position["prompts"] != n_prompts:
            raise CheckpointMismatch(
                f"train_online: checkpoint {resumed['path']} was trained on {position['prompts']} prompts, this run has "
                f"{n_prompts}; refusing to resume")


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.exists():
        return []
    return sorted(p for p in checkpoint_dir.glob("step_*") if (p / STATE_FILE).exists())
