"""Generation behind one interface, so stages do not care which backend samples.

`TransformersEngine` runs batched `generate` on the policy module itself (no weight copy:
on-policy samples always come from the current weights). A vLLM engine plugs in through the
same `GenerationEngine` protocol and `ENGINES` registry, with `update_weights` pushing the
trained weights into the serving engine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch


@dataclass
class Completion:
    """One sampled response. token_ids include the EOS token when the model stopped."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length" (hit max_new_tokens)


class GenerationEngine(Protocol):
    name: str

    def prompt_token_ids(self, prompts: Sequence[str]) -> list[list[int]]: ...

    def generate(
        self,
        prompts: Sequence[str],
        *,
        temperature: float,
        top_p: float = 1.0,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[Completion]:
        """One completion per prompt, in order. temperature 0 means greedy."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights."""
        ...


class TransformersEngine:
    """Batched `model.generate` with left padding; prompts sorted by length to cut padding."""

    name = "transformers"

    def __init__(self, model, tokenizer, batch_size: int = 256, autocast_bf16: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.autocast_bf16 = autocast_bf16
        self._prompt_cache: dict[str, list[int]] = {}

    def prompt_token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            for prompt, ids in zip(missing, self.tokenizer(missing, add_special_tokens=False)["input_ids"]):
                self._prompt_cache[prompt] = list(ids)
        return [self._prompt_cache[p] for p in prompts]

    def update_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # same module: nothing to copy

    def _autocast(self):
        device = next(self.model.parameters()).device
        if self.autocast_bf16 and device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def generate(self, prompts, *, temperature, top_p=1.0, max_new_tokens, seed=None):
        ids = self.prompt_token_ids(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        results: list[Completion | None] = [None] * len(prompts)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
        try:
            for chunk_idx, start in enumerate(range(0, len(order), self.batch_size)):
                rows = order[start : start + self.batch_size]
                if seed is not None:
                    # Reproducible per (seed, chunk): sampling draws from the global generator.
                    torch.manual_seed(seed * 1_000_003 + chunk_idx)
                width = max(len(ids[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
                attention = torch.zeros_like(input_ids)
                for j, i in enumerate(rows):
                    input_ids[j, width - len(ids[i]) :] = torch.as_tensor(ids[i])
                    attention[j, width - len(ids[i]) :] = 1
                with self._autocast():
                    out = self.model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention.to(device),
                        max_new_tokens=max_new_tokens,
                        eos_token_id=eos,
                        pad_token_id=pad,
                        **sampling,
                    )
                new_tokens = out[:, width:].tolist()  # one device sync per chunk
                for j, i in enumerate(rows):
                    results[i] = self._completion(new_tokens[j], eos)
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _completion(self, tokens: list[int], eos: int) -> Completion:
        if eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
            reason = "stop"
        else:
            reason = "length"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(text=text, token_ids=tokens, finish_reason=reason)


EngineFactory = Callable[..., GenerationEngine]
ENGINES: dict[str, EngineFactory] = {"transformers": TransformersEngine}


def make_engine(name: str, model, tokenizer, **kwargs) -> GenerationEngine:
    """Engine registered under `name`; an unknown name lists the valid ones."""
    try:
        factory = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown generation engine {name!r}; valid: {', '.join(sorted(ENGINES))}") from None
    return factory(model, tokenizer, **kwargs)
