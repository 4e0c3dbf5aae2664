"""Stage 2: on-policy least-squares regression to the optimal advantage, one sample per prompt.

Each rollout step takes `rollout_batch_size` prompts, samples ONE response per prompt from the
current policy, scores it, scores it under pi_ref, and takes rollout/minibatch AdamW steps on

    loss = mean_B ( beta2 * [log pi(y|x) - log pi_ref(y|x)] - (r(x, y) - V*(x)) )^2

The prompt order and sampling seeds are functions of the step number, so a run resumed from
a checkpoint (apo_core.checkpoints) continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import checkpoints
from .checkpoints import vstar_table_hash
from .config import TrainConfig
from .engines import Completion, GenerationEngine
from .distributed import all_max, gathered, partitioned
from .modeling import (TokenBatch, collate, output_gradient_by_rows, output_matrix, response_logprobs,
                       return_freed_memory_to_os, sparse_tied_embedding_grad)
from .objectives import apo_loss, mean_entropy
from .optim import BF16StateAdamW
from .rewards import RewardFn
from .rollouts import TrainPrompt
from .seeds import ORDER_STRIDE, ROLLOUT_STRIDE, derived_seed

StepCallback = Callable[[int, dict[str, float], list[dict]], None]


@dataclass
class Rollout:
    """One rollout step's responses (one per prompt), their rewards and tokens, log pi_ref of
    the response tokens, and the seconds each part took."""

    completions: list[Completion]
    rewards: list[float]
    tokens: TokenBatch
    ref_logp: torch.Tensor  # (R, T)
    reward: torch.Tensor  # (R,)
    vstar: torch.Tensor  # (R,)
    seconds: dict[str, float]


LARGE_MODEL_PARAMS = 100_000_000  # from here on the memory savings of "auto" are gigabytes


def memory_plan(cfg: TrainConfig, n_params: int, n_trained: int) -> dict:
    """How the trainer holds memory, "auto" settings resolved by model size: the optimizer
    state's dtype (DeepSpeed: always its own fp32), activation checkpointing, whether
    freed tensors go back to the OS at once (a large model on CPU: glibc otherwise keeps
    the freed blocks of one step's temporaries, gigabytes at 0.5B, in the process), and whether
    a tied input embedding's gradient is sparse (modeling.sparse_tied_embedding_grad).

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
            "return_freed_memory": large, "sparse_embedding_grad": large and cfg.deepspeed is None}


def _fused_adamw_ok(params: Sequence[torch.Tensor]) -> bool:
    """torch's fused AdamW takes floating-point parameters on CPU and CUDA."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)


class StopRequested(RuntimeError):
    """Training stopped between two steps because it was asked to (a SIGTERM): the message says
    after which step, and whether a checkpoint was written for it or which one a resume uses."""


class _OutputRows:
    """The output matrix's gradient in one backward pass, as the tiled scorer hands it over a tile of
    rows at a time (modeling.output_gradient_by_rows): rows no input embedding reaches are final on
    arrival and go to use(weight, rows, gradient) at once; the rows of the batch's tokens (`tokens`,
    where the input embedding is the same matrix: it adds its part to them last) are held, a
    (tokens, H) block instead of a (V, H) gradient, and go to `use` after the backward (finish)."""

    def __init__(self, weight: torch.Tensor, tokens: torch.Tensor | None, use: Callable, begin: Callable | None = None):
        self.weight, self.use, self.begin, self.arrived = weight, use, begin, False  # begin(weight): before the first use
        self.late = torch.unique(tokens) if tokens is not None else torch.zeros(0, dtype=torch.long)
        self.late = self.late.to(weight.device)
        self.final = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        self.final[self.late] = False
        self.held = weight.new_zeros(len(self.late), *weight.shape[1:])

    def take(self, first: int, grad: torch.Tensor) -> None:
        if not self.arrived and self.begin is not None:
            self.begin(self.weight)
        self.arrived = True
        rows = slice(first, first + grad.shape[0])
        keep = self.final[rows].nonzero().squeeze(-1)
        self.use(self.weight, keep + first, grad[keep])
        lo, hi = torch.searchsorted(self.late, torch.tensor([rows.start, rows.stop], device=self.late.device)).tolist()
        self.held[lo:hi] = grad[self.late[lo:hi] - first]

    def finish(self) -> None:
        """The held rows, with the input embedding's part (in weight.grad, sparse or dense) added, to `use`."""
        extra, self.weight.grad = self.weight.grad, None
        if extra is not None and extra.is_sparse:
            extra = extra.coalesce()
            self.held.index_add_(0, torch.searchsorted(self.late, extra.indices()[0]), extra.values())
        elif extra is not None:
            self.held += extra[self.late]
        if len(self.late):
            self.use(self.weight, self.late, self.held)


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
        if self.memory["sparse_embedding_grad"]:
            self.memory["sparse_embedding_grad"] = sparse_tied_embedding_grad(policy)
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
        # forwards per minibatch (modeling.length_buckets). The policy's in one graph where each weight
        # is updated as soon as its gradient is final: with two bucket graphs the autograd engine runs
        # the later one's backward first and holds its partial gradient of every weight until the
        # earlier one's arrives (+1.4 GB at 0.5B); the usual backward keeps that sum as the gradient.
        self.ref_buckets = 1 if self.lockstep else cfg.length_buckets
        self.policy_buckets = 1 if self.memory["update_in_backward"] else self.ref_buckets
        self.step = 0  # rollout steps completed
        self.train_seconds = 0.0  # wall-clock seconds spent in train(), summed over resumes (time_budget_s)
        self.last_step_seconds = 0.0  # how long the last rollout step took (what the next one is expected to take)
        self.nonfinite_streak = 0  # optimizer updates skipped in a row for a NaN/inf loss or gradient
        self.last_checkpoint: Path | None = None
        self.save_seconds: float | None = None  # how long the last checkpoint took to write
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
            random.Random(derived_seed(self.cfg.seed, epoch, ORDER_STRIDE)).shuffle(order)
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
        """Sample one response per prompt and score it, then take len(batch) / minibatch_size updates."""
        batch, M = self._rank_share(batch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        rollout = self._rollout(batch)
        t0, sums, skipped = time.perf_counter(), {}, 0
        for rows in (slice(k, k + M) for k in range(0, len(batch), M)):
            loss, metrics = self._minibatch_loss(rollout, rows)
            if self._update(loss, metrics, rollout.tokens.input_ids[rows]):
                sums = {key: sums.get(key, 0.0) + value.detach().float() for key, value in metrics.items()}
            else:
                skipped += 1
        self._sync_engine()  # the next rollout samples from the updated policy
        self.step += 1
        rollout.seconds["update_s"] = time.perf_counter() - t0
        return self._step_metrics(self._mean_over_ranks(sums), len(batch) // M, skipped, rollout), self._samples(batch, rollout)

    def lr_at(self, step: int) -> float:
        """The learning rate of rollout step `step` (0-based): `lr`, after a linear warmup of lr_warmup_steps.

        >>> from types import SimpleNamespace
        >>> warm = SimpleNamespace(cfg=TrainConfig(lr=1.0, lr_warmup_steps=4))
        >>> [OnlineTrainer.lr_at(warm, k) for k in range(5)]
        [0.25, 0.5, 0.75, 1.0, 1.0]
        """
        warmup = self.cfg.lr_warmup_steps
        return self.cfg.lr * min(1.0, (step + 1) / warmup) if warmup else self.cfg.lr

    def _rank_share(self, batch: Sequence[TrainPrompt]) -> tuple[list[TrainPrompt], int]:
        """This rank's rows of every minibatch, and its rows per minibatch."""
        M = self.cfg.minibatch_size
        if self.world_size == 1:
            return list(batch), M
        from .distributed import local_rows

        return [batch[i] for i in local_rows(len(batch), M, self.rank, self.world_size)], M // self.world_size

    def _rollout(self, batch: Sequence[TrainPrompt]) -> Rollout:
        """One response per prompt from the current policy, its reward, and log pi_ref of its tokens."""
        cfg = self.cfg
        t0 = time.perf_counter()
        with gathered(self.policy):  # ZeRO-3 shards the weights; generation needs them whole
            completions = self.engine.generate(
                [p.prompt for p in batch], temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                seed=derived_seed(cfg.seed, self.step, ROLLOUT_STRIDE),
            )
        rewards = self.reward_fn([c.text for c in completions], [p.answer for p in batch])
        t_gen = time.perf_counter()
        tokens = collate(self.engine.prompt_token_ids([p.prompt for p in batch]), [c.token_ids for c in completions],
                         self.tokenizer.pad_token_id).to(self.device)
        tokens = tokens.with_response_len(self._same_on_every_rank(tokens.response_mask.shape[1]))
        with torch.no_grad():
            ref_logp = response_logprobs(self.ref_policy, tokens, buckets=self.ref_buckets)  # (R, T)
        return Rollout(
            completions, rewards, tokens, ref_logp,
            reward=torch.tensor(rewards, dtype=torch.float32, device=self.device),
            vstar=torch.tensor([p.vstar for p in batch], dtype=torch.float32, device=self.device),
            seconds={"generate_s": t_gen - t0, "ref_logprobs_s": time.perf_counter() - t_gen},
        )

    def _minibatch_loss(self, rollout: Rollout, rows: slice) -> tuple[torch.Tensor, dict]:
        """A*-PO's loss on the minibatch `rows` (minus the entropy bonus when entropy_coef > 0), and its metrics."""
        cfg = self.cfg
        mb = rollout.tokens.select(rows)
        # Trim the response block to this minibatch's longest response: less padding compute.
        T = self._same_on_every_rank(int(mb.response_mask.sum(-1).max().item()))
        mb = mb.with_response_len(T)
        trained = self.ds if self.ds is not None else self.policy
        if cfg.entropy_coef > 0:
            logp, token_entropies = response_logprobs(trained, mb, with_entropy=True, buckets=self.policy_buckets)
        else:
            logp = response_logprobs(trained, mb, buckets=self.policy_buckets)
        loss, metrics = apo_loss(logp, rollout.ref_logp[rows, :T], mb.response_mask, rollout.reward[rows], rollout.vstar[rows], cfg.beta2)
        if cfg.entropy_coef > 0:
            entropy = mean_entropy(token_entropies, mb.response_mask)
            loss = loss - cfg.entropy_coef * entropy
            metrics["entropy"] = entropy.detach()
        return loss, metrics

    def _update(self, loss: torch.Tensor, metrics: dict, input_ids: torch.Tensor) -> bool:
        """One optimizer update from `loss` (of a minibatch of the tokens `input_ids`) on this trainer's
        backend; metrics["grad_norm"] gets the global gradient norm before clipping. An update with a NaN/inf loss or gradient is not
        applied: False, counted, and too many in a row stop the run."""
        if self.ds is not None:  # DeepSpeed averages gradients over ranks and clips them itself
            self.ds.backward(loss)
            self.ds.step()
            norm = self.ds.get_global_grad_norm()
            norm = torch.tensor(float(0.0 if norm is None else norm))
            # ZeRO drops a step whose global gradient norm is NaN/inf (a NaN loss on any rank makes
            # it so) and reports the norm as inf; the norm is global, so every rank agrees.
            finite = bool(torch.isfinite(norm))
        elif self.memory["update_in_backward"]:
            norm = self._update_in_backward(loss, input_ids)  # applies the update only when loss and norm are finite
            finite = bool(torch.isfinite(loss) & torch.isfinite(norm))
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
            finite = bool(torch.isfinite(loss) & torch.isfinite(norm))
            if finite:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)  # gradients do not outlive the update (nor sit through the next rollout)
        metrics["grad_norm"] = norm
        if finite:
            self.nonfinite_streak = 0
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        if self.nonfinite_streak >= self.cfg.max_nonfinite_in_a_row:
            raise FloatingPointError(
                f"train_online: {self.nonfinite_streak} updates in a row had a non-finite loss or gradient, at rollout step "
                f"{self.step + 1}; last good checkpoint: {self.last_checkpoint or 'none yet'}")
        return False

    def _mean_over_ranks(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Metric sums of the whole minibatches, not of this rank's share (none if every rank skipped every update)."""
        if self.world_size == 1 or not sums:
            return sums
        keys = sorted(sums)
        flat = torch.stack([sums[k].reshape(()) for k in keys]).to(self.device)
        torch.distributed.all_reduce(flat)
        return {k: v / self.world_size for k, v in zip(keys, flat.cpu())}

    def _step_metrics(self, sums: dict, n_updates: int, skipped: int, rollout: Rollout) -> dict[str, float]:
        completions, rewards = rollout.completions, rollout.rewards
        n_tokens = [len(c.token_ids) for c in completions]
        out = {f"train/{k}": float(v) / max(1, n_updates - skipped) for k, v in sums.items()}  # one sync per step
        out["train/nonfinite_skipped"] = float(skipped)
        out.update({
            "rollout/reward_mean": sum(rewards) / len(rewards),
            "rollout/response_tokens_mean": sum(n_tokens) / len(n_tokens),
            "rollout/truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "vstar/batch_mean": float(rollout.vstar.mean()),
            "train/optimizer_steps": float(self.step * n_updates),
            "train/lr": self.optimizer.param_groups[0]["lr"],
            **{f"time/{k}": v for k, v in rollout.seconds.items()},
            "time/step_s": sum(rollout.seconds.values()),
        })
        return out

    def _samples(self, batch: Sequence[TrainPrompt], rollout: Rollout) -> list[dict]:
        return [
            dict(step=self.step, prompt_id=p.prompt_id, response=c.text, reward=float(r), vstar=p.vstar, n_tokens=len(c.token_ids))
            for p, c, r in zip(batch, rollout.completions, rollout.rewards)
        ]

    def train(
        self,
        prompts: Sequence[TrainPrompt],
        checkpoint_dir: Path,
        on_step: StepCallback | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
        before_publish: Callable[[Path], None] | None = None,
        stop_requested: Callable[[], float | None] | None = None,
    ) -> None:
        """Run rollout steps from self.step up to cfg.steps, checkpointing as configured.

        `stop_requested`: seconds since a stop was asked for (None: not asked), polled after each
        step; then the step is checkpointed when that fits in what is left of cfg.grace_s
        (judged by the last checkpoint's write time) and StopRequested is raised."""
        if not prompts:
            raise ValueError("no training prompts (did the V* filter drop all of them?)")
        self.vstar_hash, self.n_prompts = vstar_table_hash(prompts), len(prompts)
        if self.resumed_from is not None:
            checkpoints.check_resume(self.resumed_from, self.vstar_hash, len(prompts))
        self.policy.train()
        started = time.perf_counter()
        self._sync_engine()  # covers weights restored from a checkpoint
        self.train_seconds += time.perf_counter() - started
        while self.step < self.cfg.steps and not self.out_of_time():
            started = time.perf_counter()
            metrics, samples = self.train_step(self.batch_for_step(prompts, self.step))
            self.last_step_seconds = time.perf_counter() - started
            self.train_seconds += self.last_step_seconds
            if on_step:
                on_step(self.step, metrics, samples)
            due = self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps or self.out_of_time()
            if due:
                started = time.perf_counter()
                path = self.save_checkpoint(checkpoint_dir, before_publish)
                self.train_seconds += time.perf_counter() - started
                if on_checkpoint:
                    on_checkpoint(path)
            if stop_requested is not None:
                since = stop_requested()
                if self.world_size > 1:  # every rank stops after the same step (and saves together)
                    since = all_max(int(1000 * since) if since is not None else -1, self.device) / 1000
                    since = None if since < 0 else since
                if since is not None:
                    self._stop(since, due, checkpoint_dir, before_publish, on_checkpoint)

    def out_of_time(self) -> bool:
        """True when one more rollout step and the checkpoint after it would not end within
        cfg.time_budget_s, judged by the last step's time and the last checkpoint's (or its
        estimate): the budget bounds the training, it is not overrun by a step. Every rank agrees
        (rank 0's clock decides)."""
        if self.cfg.time_budget_s is None:
            return False
        spent = self.train_seconds + self.last_step_seconds + self.checkpoint_seconds() > self.cfg.time_budget_s
        if self.world_size > 1:
            flag = torch.tensor([float(spent)], device=self.device)
            torch.distributed.broadcast(flag, src=0)
            spent = bool(flag.item())
        return spent

    def checkpoint_seconds(self) -> float:
        """How long the next checkpoint takes to write: the last one's time, else an estimate from
        its bytes (weights and optimizer state) at 100 MB/s."""
        if self.save_seconds is not None:
            return self.save_seconds
        weights = sum(p.numel() * p.element_size() for p in self.policy.parameters())
        state = sum(t.numel() * t.element_size() for group in self.optimizer.state.values() for t in group.values()
                    if torch.is_tensor(t))
        return 0.5 + (weights + state) / 100e6

    def _stop(self, since: float, saved: bool, checkpoint_dir: Path, before_publish, on_checkpoint) -> None:
        left, need = self.cfg.grace_s - since, self.checkpoint_seconds()
        if saved:
            done = f"its checkpoint {self.last_checkpoint.name} was due and written"
        elif need <= left:
            path = self.save_checkpoint(checkpoint_dir, before_publish)
            if on_checkpoint:
                on_checkpoint(path)
            done = f"checkpoint {path.name} written in {self.save_seconds:.1f}s"
        else:
            resume = self.last_checkpoint.name if self.last_checkpoint else "step 0 (no checkpoint yet)"
            done = (f"no checkpoint written (one takes ~{need:.1f}s, {max(left, 0):.1f}s of train.grace_s "
                    f"{self.cfg.grace_s:g}s were left); a resume starts from {resume}")
        raise StopRequested(f"train_online stopped after step {self.step}/{self.cfg.steps}, {since:.1f}s after the stop "
                            f"request: {done}")

    def _update_in_backward(self, loss: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Clipped AdamW without a full set of gradients: backward pass 1 keeps only each
        weight's gradient norm (the gradient is dropped once counted); if loss and norm are
        finite, pass 2 (the retained graph) updates each weight with the clipping coefficient as
        soon as its gradient is final. The output matrix's gradient arrives a tile of rows at a
        time (_OutputRows) and is counted, then applied, tile by tile. Any other weight used by
        two modules gets its gradient in two parts, so it is counted and updated after each pass
        instead. Returns the global gradient norm before clipping, as clip_grad_norm_ does."""
        trained = [p for p in self.policy.parameters() if p.requires_grad]
        head = output_matrix(self.policy)
        head = head if head is not None and head.requires_grad else None
        norms: list[torch.Tensor] = []

        def count_rows(p: torch.Tensor, rows: torch.Tensor | None, grad: torch.Tensor) -> None:
            norms.append(torch.linalg.vector_norm(grad))

        def update_rows(p: torch.Tensor, rows: torch.Tensor | None, grad: torch.Tensor) -> None:
            if rows is None:
                self.optimizer.step_weight(p, grad, coef)
            else:  # a part of p's update, which _OutputRows began (advance)
                self.optimizer.step_rows(p, rows, grad, coef)

        def whole(use: Callable) -> Callable[[torch.Tensor], None]:
            def hook(p: torch.Tensor) -> None:
                use(p, None, p.grad)
                p.grad = None
            return hook

        for use, begin, retain in ((count_rows, None, True), (update_rows, self.optimizer.advance, False)):
            hook = whole(use)
            handles = [p.register_post_accumulate_grad_hook(hook) for p in trained if id(p) not in self._shared]
            tiles = _OutputRows(head, input_ids if id(head) in self._shared else None, use, begin) \
                if head is not None else None
            try:
                with output_gradient_by_rows(head, tiles.take) if tiles else contextlib.nullcontext():
                    loss.backward(retain_graph=retain)
            finally:
                for handle in handles:
                    handle.remove()
            if tiles is not None and tiles.arrived:
                tiles.finish()
            for p in trained:
                if id(p) in self._shared and p.grad is not None:
                    hook(p)
            if use is count_rows:
                norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
                if not bool(torch.isfinite(loss) & torch.isfinite(norm)):
                    return norm  # no update; the retained graph goes with `loss`
                coef = float(torch.clamp(self.cfg.grad_clip / (norm + 1e-6), max=1.0))  # clip_grad_norm_'s
        return norm

    def _same_on_every_rank(self, n: int) -> int:
        """`n` under one process; under ZeRO-3 the largest `n` of all ranks (response blocks of one
        length, so each rank calls the partitioned output layer on as many logits chunks)."""
        return all_max(n, self.device) if self.lockstep else n

    def _sync_engine(self) -> None:
        with gathered(self.policy):
            self.engine.update_weights(self.policy)

    # -- checkpoints (apo_core.checkpoints) ---------------------------------------------------
    def save_checkpoint(self, checkpoint_dir: Path, before_publish: Callable[[Path], None] | None = None) -> Path:
        start = time.perf_counter()
        path = checkpoints.save(self, checkpoint_dir, before_publish)
        self.save_seconds = time.perf_counter() - start
        return path

    def load_checkpoint(self, path: Path, vstar_hash: str | None = None) -> None:
        checkpoints.load(self, path, vstar_hash)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()
