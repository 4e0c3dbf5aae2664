"""Stage 1 (reference samples -> V*), the hand-off to stage 2 (training prompts), and
evaluation: sampling loops over a GenerationEngine."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from .data import PromptRecord
from .engines import GenerationEngine
from .objectives import vstar
from .rewards import RewardFn
from .seeds import keyed_seed


@dataclass(frozen=True)
class TrainPrompt:
    """One prompt of stage 2: the record's prompt and gold answer, and its V*."""

    prompt_id: str
    prompt: str
    answer: str
    vstar: float

    @classmethod
    def of(cls, record: PromptRecord, vstar: float) -> "TrainPrompt":
        return cls(record.prompt_id, record.prompt, record.answer, float(vstar))


def sample_reference(
    engine: GenerationEngine,
    records: Sequence[PromptRecord],
    reward_fn: RewardFn,
    *,
    n_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    indices: Sequence[Sequence[int]] | None = None,
) -> list[dict]:
    """Scored reference samples, drawn in ONE engine call: samples 0..N-1 of every record, or
    `indices[k]` of record k (what a reference-sample store lacks). Sample i of a prompt is drawn
    with `keyed_seed(seed, prompt, i)` (the `seed` column), on either engine, so it is the same
    sample whichever shard, batch or run draws it.

    Rows: prompt_id, sample_idx, seed, response, reward, n_tokens, finish_reason.
    """
    wanted = [range(n_samples)] * len(records) if indices is None else indices
    items = [(rec, i, keyed_seed(seed, rec.prompt, i)) for rec, idx in zip(records, wanted) for i in idx]
    completions = engine.generate([rec.prompt for rec, _, _ in items], temperature=temperature, top_p=top_p,
                                  max_new_tokens=max_new_tokens, seeds=[s for _, _, s in items])
    rewards = reward_fn([comp.text for comp in completions], [rec.answer for rec, _, _ in items])
    return [
        dict(prompt_id=rec.prompt_id, sample_idx=i, seed=s, response=comp.text, reward=float(reward),
             n_tokens=len(comp.token_ids), finish_reason=comp.finish_reason)
        for (rec, i, s), comp, reward in zip(items, completions, rewards)
    ]


def aggregate_vstar(prompt_ids: Sequence[str], rewards: Sequence[float], beta1: float) -> list[dict]:
    """Per prompt: n, mean_reward, pass_at_n, vstar. Every prompt must have the same N."""
    by_prompt: dict[str, list[float]] = defaultdict(list)
    for pid, r in zip(prompt_ids, rewards):
        by_prompt[pid].append(float(r))
    if not by_prompt:
        return []
    sizes = {len(v) for v in by_prompt.values()}
    if len(sizes) != 1:
        raise ValueError(f"prompts have different sample counts {sorted(sizes)}; V* needs the same N for all")
    ids = list(by_prompt)
    table = torch.tensor([by_prompt[p] for p in ids], dtype=torch.float64)  # (B, N)
    values = vstar(table, beta1).tolist()
    means = table.mean(-1).tolist()
    passes = (table.max(-1).values > 0).double().tolist()
    return [
        dict(prompt_id=p, n=table.shape[1], mean_reward=m, pass_at_n=s, vstar=v)
        for p, m, s, v in zip(ids, means, passes, values)
    ]


def is_kept(row: Mapping, filter_all_zero: bool) -> bool:
    """Whether stage 2 trains on the prompt of this aggregate_vstar row: always, unless the
    filter is on and none of its N reference samples was right (pass_at_n 0, V* 0)."""
    return row["pass_at_n"] > 0 or not filter_all_zero


def training_prompts(records: Iterable[PromptRecord], vstar_rows: Iterable[Mapping], filter_all_zero: bool) -> list[TrainPrompt]:
    """Stage 2's prompts: each record whose aggregate_vstar row is kept (`kept` column where the
    table has one, and the filter), with its V*, in the records' order. None left is an error.

    >>> recs = [PromptRecord("a", "1+1=?", "2", "train"), PromptRecord("b", "2+2=?", "4", "train")]
    >>> rows = [dict(prompt_id="b", vstar=0.0, pass_at_n=0.0), dict(prompt_id="a", vstar=0.7, pass_at_n=1.0)]
    >>> [(p.prompt_id, p.vstar) for p in training_prompts(recs, rows, filter_all_zero=False)]
    [('a', 0.7), ('b', 0.0)]
    >>> [p.prompt_id for p in training_prompts(recs, rows, filter_all_zero=True)]
    ['a']
    """
    v_of = {row["prompt_id"]: row["vstar"] for row in vstar_rows if row.get("kept", True) and is_kept(row, filter_all_zero)}
    prompts = [TrainPrompt.of(r, v_of[r.prompt_id]) for r in records if r.prompt_id in v_of]
    if not prompts:
        raise ValueError("no training prompts (did the V* filter drop all of them?)")
    return prompts


def evaluate(
    engine: GenerationEngine,
    records: Sequence[PromptRecord],
    reward_fn: RewardFn,
    *,
    max_new_tokens: int,
    samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> tuple[list[dict], dict[str, float]]:
    """Greedy accuracy, plus avg@K and pass@K over K sampled responses when samples > 1.

    Returns per-prompt rows and {accuracy, avg@K, pass@K, response_tokens_mean, truncated_frac}.
    """
    prompts, answers = [r.prompt for r in records], [r.answer for r in records]
    completions = engine.generate(prompts, temperature=0.0, max_new_tokens=max_new_tokens)
    rewards = reward_fn([c.text for c in completions], answers)
    rows = [
        dict(prompt_id=r.prompt_id, prompt=r.prompt, answer=r.answer, response=c.text, reward=float(x),
             n_tokens=len(c.token_ids), finish_reason=c.finish_reason)
        for r, c, x in zip(records, completions, rewards)
    ]
    n = max(1, len(rows))
    metrics = {
        "accuracy": sum(rewards) / n,
        "n": float(len(rows)),
        "response_tokens_mean": sum(len(c.token_ids) for c in completions) / n,
        "truncated_frac": sum(c.finish_reason == "length" for c in completions) / n,
    }
    if samples > 1:
        correct = [0.0] * len(records)
        for k in range(samples):
            sampled = engine.generate(prompts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed + k)
            for i, x in enumerate(reward_fn([c.text for c in sampled], answers)):
                correct[i] += x
        for row, c in zip(rows, correct):
            row.update(samples=samples, sampled_correct=c, avg_at_k=c / samples, pass_at_k=float(c > 0))
        metrics[f"avg@{samples}"] = sum(correct) / samples / n
        metrics[f"pass@{samples}"] = sum(c > 0 for c in correct) / n
    return rows, metrics
