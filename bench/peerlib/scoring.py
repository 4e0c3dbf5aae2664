"""The measurements every method is scored with, in its child process: the training clock that
evaluation pauses, held-out accuracy, the policy's KL to the reference, and the task's records."""

from __future__ import annotations

import contextlib
import time
from typing import Sequence


class Clock:
    """Wall clock of one method's training that evaluation pauses."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._paused = 0.0

    def start(self) -> None:
        self._start, self._paused = time.perf_counter(), 0.0  # a pause before the start (scoring the reference) is not training time

    def elapsed(self) -> float:
        return 0.0 if self._start is None else time.perf_counter() - self._start - self._paused

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0


def task_records(train: int, test: int, tokenizer=None, template: str = "auto"):
    """(training, held-out) prompt records of the embedded task, exactly as preprocess makes them
    (template `chat`: each expression a user turn through `tokenizer`'s chat template)."""
    from apo_core.config import DataConfig
    from apo_core.data import chat_prompt, embedded_prompt_set

    chat = (lambda content: chat_prompt(tokenizer, content)) if template == "chat" else None
    records = embedded_prompt_set(DataConfig(train_size=train, test_size=test, template=template), chat)
    return [r for r in records if r.split == "train"], [r for r in records if r.split == "test"]


def heldout_accuracy(model, tokenizer, records, max_new_tokens: int) -> float:
    """Greedy held-out accuracy: the one evaluation every method is scored with."""
    from apo_core.engines import TransformersEngine
    from apo_core.rewards import get_reward
    from apo_core.rollouts import evaluate

    engine = TransformersEngine(model, tokenizer, batch_size=512, autocast_bf16=False)
    _, metrics = evaluate(engine, records, get_reward("embedded"), max_new_tokens=max_new_tokens)
    return float(metrics["accuracy"])


def policy_kl(model, reference, tokenizer, records, max_new_tokens: int, seed: int = 0) -> float:
    """Mean over response tokens of log pi - log pi_ref, on one response per held-out prompt
    sampled from the policy at temperature 1 (the paper's logged KL)."""
    import torch

    from apo_core.engines import TransformersEngine
    from apo_core.modeling import collate, response_logprobs

    engine = TransformersEngine(model, tokenizer, batch_size=512, autocast_bf16=False)
    prompts = [r.prompt for r in records]
    completions = engine.generate(prompts, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    batch = collate(engine.prompt_token_ids(prompts), [c.token_ids for c in completions], tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(prompts), 256):  # 256 rows a forward, in length buckets: less padding
            part = batch.select(slice(start, start + 256)).compact()
            diff = response_logprobs(model, part, buckets=4) - response_logprobs(reference, part, buckets=4)
            total += float(torch.where(part.response_mask.bool(), diff, 0.0).sum())
            count += int(part.response_mask.sum())
    model.train(was_training)
    return total / max(count, 1)


class Scorer:
    """Scores the held-out set with the clock paused: at t = 0 (the reference), at each time in
    `at_s` (training seconds), then every `every_s` after the last of them (None: no more until
    the end), and at the end; says when time is up. A schedule dense early and sparse later
    resolves the race's times to the targets without scoring a large held-out set every few seconds.
    With `reference` (an exact copy of the starting model), each point also has the policy's KL
    to it (`policy_kl`) on the first `kl_records` held-out prompts."""

    def __init__(self, clock: Clock, model_fn, tokenizer, records, max_new_tokens: int,
                 every_s: float | None, budget_s: float | None, reference=None, kl_records: int = 512, seed: int = 0,
                 at_s: Sequence[float] = ()):
        self.clock, self.model_fn, self.tokenizer, self.records = clock, model_fn, tokenizer, records
        self.max_new_tokens, self.every_s, self.budget_s = max_new_tokens, every_s, budget_s
        self.reference, self.kl_records, self.seed = reference, records[:kl_records], seed
        self.points: list[dict] = []
        self.eval_seconds = 0.0
        self._times = sorted(at_s)
        self._next = self._times.pop(0) if self._times else every_s

    def score(self, step: int) -> float:
        t0 = time.perf_counter()
        with self.clock.paused():
            model = self.model_fn()
            point = {"t_s": round(self.clock.elapsed(), 3), "step": step,
                     "accuracy": heldout_accuracy(model, self.tokenizer, self.records, self.max_new_tokens)}
            if self.reference is not None:
                point["kl"] = policy_kl(model, self.reference, self.tokenizer, self.kl_records, self.max_new_tokens, seed=self.seed)
        self.eval_seconds += time.perf_counter() - t0
        self.points.append(point)
        return point["accuracy"]

    def start(self) -> float:
        """The reference's accuracy, then the clock starts."""
        acc = self.score(0)
        self.clock.start()
        return acc

    def after_step(self, step: int) -> bool:
        """Score if an interval has passed; True when the time budget is spent."""
        if self._next is not None and self.clock.elapsed() >= self._next:
            self.score(step)
            while self._next is not None and self._next <= self.clock.elapsed():
                self._next = self._times.pop(0) if self._times else None if self.every_s is None else self._next + self.every_s
        return self.budget_s is not None and self.clock.elapsed() >= self.budget_s

    def finish(self, step: int) -> float:
        if not self.points or self.points[-1]["step"] != step or len(self.points) == 1:
            self.score(step)
        return self.points[-1]["accuracy"]

