"""Batched sampling loops for TransformersEngine: a KV-cached decoder for Llama-family models
(Qwen2, Llama) and a plain loop over any causal LM's forward for everything else.

Why not transformers' `generate`: at the sizes this runs on CPUs, a decode step is dominated by
per-token framework work (mask and cache-position rebuilding, cache concatenation, module
dispatch), not by the matrix products. `KVDecoder` keeps the cache in preallocated tensors and
runs each layer as a few tensor ops on the model's own modules; on the embedded model (64
prompts x 44 tokens, 2 threads) it samples in ~0.6x of the plain loop's time. Greedy decoding
gives `generate`'s tokens on every path; sampling draws from the same distribution (inverse CDF,
not torch.multinomial), and both paths draw the same tokens for the same seed (tests check both).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import everywhere, partitioned
from .modeling import accepts_logits_to_keep, causal_lm, left_pad_positions
from .seeds import uniform_stream

KV_DECODER_MODEL_TYPES = ("qwen2", "llama")


def next_tokens(logits: Tensor, temperature: float, top_p: float = 1.0, consume: bool = False, u: Tensor | None = None) -> Tensor:
    """One token per row from the last position's logits: (B, V) -> (B,). temperature 0 is
    greedy; top_p < 1 samples from the smallest set of tokens whose probability reaches top_p.
    `consume`: `logits` (float32) may be overwritten, so no new (B, V) block is made. `u`: the
    rows' uniforms in [0, 1) (B,), e.g. from seeds.uniform_stream; None draws them from torch's
    global generator."""
    if temperature <= 0:
        return logits.argmax(-1)
    # At most one new (B, V) block, worked on in place: at a 151,936-token vocabulary one is 150 MB
    # at 256 rows, and on CPU every fresh one is page-faulted in (glibc maps it anew).
    weights = logits.div_(temperature) if consume and logits.dtype == torch.float32 else logits.float() / temperature
    weights = weights.sub_(weights.amax(-1, keepdim=True)).exp_()  # softmax numerators: the cdf is normalised by u
    if top_p < 1.0:
        probs = weights / weights.sum(-1, keepdim=True)
        sorted_probs, index = probs.sort(dim=-1, descending=True)
        # drop a token when the ones ranked above it already reach top_p (the top one always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        weights = probs.scatter(-1, index, sorted_probs.masked_fill(outside, 0.0))
    # inverse-CDF draw, one uniform per row (torch.multinomial takes ~15x longer on CPU at 512 x 264)
    cdf = weights.cumsum_(-1)
    u = torch.rand((cdf.shape[0], 1), dtype=cdf.dtype, device=cdf.device) if u is None else u.to(cdf.dtype).clamp(max=1 - 2**-24)[:, None]
    u = u * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def decode(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    temperature: float,
    top_p: float = 1.0,
    kv_decoder: bool = True,
    row_seeds: Sequence[int] | None = None,
) -> Tensor:
    """Sample up to max_new_tokens per row of a left-padded batch. input_ids, attention_mask:
    (B, P) -> new tokens (B, T <= max_new_tokens), `pad_token_id` after a row's stop token (any of
    `eos_token_id`: one id or several, e.g. <|im_end|> and <|endoftext|>). Uses
    `KVDecoder` where the model supports it (and `kv_decoder`), else the model's own forward
    with its KV cache; any transformers causal LM works (PEFT- or DeepSpeed-wrapped too).

    With `KVDecoder`, rows that finished are dropped from the forward once a quarter of the
    active rows have finished since the last drop. Uniforms are still drawn for all B rows every
    step and the finished rows' discarded, so the random stream, and every token, is the same as
    without dropping.

    `row_seeds` (one per row): row r draws token t with uniform t of its own stream
    (seeds.uniform_stream), so its tokens do not depend on the other rows; None: torch's
    global generator.

    Under ZeRO-3 every forward is a collective: ranks stop together, when every rank's rows have
    finished (a rank whose rows are done keeps stepping them, discarding the tokens)."""
    fast = KVDecoder.of(model) if kv_decoder else None
    lockstep = partitioned(model)
    B, device = input_ids.shape[0], input_ids.device
    step = fast.step_fn(B, input_ids.shape[1] + max_new_tokens) if fast else _forward_step(model)
    positions = left_pad_positions(attention_mask)
    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stops = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    rows = torch.arange(B, device=device)  # the batch rows the forward still computes
    step_ids, mask = input_ids, attention_mask
    uniforms = None
    if row_seeds is not None and temperature > 0:
        if len(row_seeds) != B:
            raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {B} rows")
        uniforms = torch.from_numpy(uniform_stream(row_seeds, max_new_tokens)).to(device)
    t = 0
    for t in range(max_new_tokens):
        logits = step(step_ids, positions, mask)  # (len(rows), V)
        u = None
        if temperature > 0:  # B uniforms a step whatever the rows left: the stream of a batch without drops
            u = uniforms[:, t] if uniforms is not None else torch.rand((B, 1), device=device)[:, 0]
        drawn = next_tokens(logits, temperature, top_p, consume=True, u=None if u is None else u[rows])
        token = drawn if len(rows) == B else torch.full((B,), pad_token_id, device=device).index_copy_(0, rows, drawn)
        token = token.masked_fill(finished, pad_token_id)
        out[:, t] = token
        finished |= torch.isin(token, stops)
        done = bool(finished.all())  # a device sync per token, as generate's stopping check
        if (everywhere(done, device) if lockstep else done) or t + 1 == max_new_tokens:
            break
        running = ~finished[rows]
        if fast is not None and 0 < int(running.sum()) <= 0.75 * len(rows):  # never drop the last rows
            keep = running.nonzero().squeeze(1)
            step.keep_rows(keep)
            rows, positions, mask = rows[keep], positions[keep], mask[keep]
        step_ids, positions = token[rows][:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
    return out[:, : t + 1]


def _forward_step(model):
    """Next-token logits (B, V) from the model's forward, carrying its KV cache between calls.
    Each call takes the new tokens and positions and the attention mask of everything so far."""
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    past = None

    def step(ids: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        nonlocal past
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True, **keep)
        past = out.past_key_values
        return out.logits[:, -1]

    return step


def _rms_norm(norm: torch.nn.Module, x: Tensor) -> Tensor:
    """Llama/Qwen2 RMSNorm, computed as their modules do (in fp32, weight applied after the cast back)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on (B, heads, S, D) with cos/sin (B, 1, S, D): x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attention(q: Tensor, k: Tensor, v: Tensor, attend: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) v, each of the K key/value heads shared by H/K query heads.
    q: (A, H, S_new, D); k, v: (A, K, S, D); attend: bool, broadcastable to (A, 1, S_new, S)."""
    A, H, S_new, D = q.shape
    K, S = k.shape[1], k.shape[2]
    if S_new > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attend, enable_gqa=H != K)
    # one new token: two batched matmuls over the grouped heads (~25% faster than SDPA's CPU path here)
    scores = torch.matmul(q.reshape(A, K, H // K, D), k.transpose(-1, -2)) * D**-0.5  # (A, K, H/K, S)
    scores = scores.masked_fill(~attend.reshape(A, 1, 1, S), float("-inf"))
    return torch.matmul(scores.softmax(-1), v).reshape(A, H, 1, D)


class KVDecoder:
    """Incremental forward of a Llama-family causal LM (embedding, pre-norm attention with RoPE
    and grouped KV heads, gated MLP, final norm, LM head) over a preallocated KV cache.

    It calls the model's own projection, activation and embedding modules, so LoRA adapters
    apply and the weights are always the current ones; only the glue (norms, RoPE, cache,
    masking, attention) is written here. Notation: B rows, P prompt width, S positions in the
    cache so far, H query heads, K key/value heads, D head dim."""

    def __init__(self, lm) -> None:
        self.lm = lm
        c = lm.config
        self.H, self.K = c.num_attention_heads, c.num_key_value_heads
        self.D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rotary = lm.model.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq, rotary.attention_scaling

    @classmethod
    def of(cls, model) -> "KVDecoder | None":
        """A decoder for `model` (unwrapping DeepSpeed and PEFT), or None where its architecture
        or settings are not the plain Llama family this implements (the caller falls back)."""
        lm = causal_lm(model)
        c = getattr(lm, "config", None)
        if c is None or getattr(c, "model_type", None) not in KV_DECODER_MODEL_TYPES:
            return None
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            return None  # scaled RoPE variants: use the model's own forward
        if getattr(c, "use_sliding_window", False) or any(t != "full_attention" for t in getattr(c, "layer_types", None) or []):
            return None
        if getattr(c, "_attn_implementation", "sdpa") not in ("sdpa", "eager", None):
            return None
        inner = getattr(lm, "model", None)
        if inner is None or not hasattr(getattr(inner, "rotary_emb", None), "inv_freq") or not hasattr(lm, "lm_head"):
            return None
        return cls(lm)

    def step_fn(self, B: int, capacity: int) -> "_CachedSteps":
        """A step function for `decode` over a cache of `capacity` positions per row."""
        return _CachedSteps(self, B, capacity)

    def _forward(self, ids: Tensor, positions: Tensor, attend: Tensor, keys, values, start: int,
                 out: Tensor | None = None) -> Tensor:
        B, S_new = ids.shape
        H, K, D = self.H, self.K, self.D
        end = start + S_new
        x = self.lm.model.embed_tokens(ids)
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, S_new, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(x.dtype)[:, None]
        sin = (emb.sin() * self.rope_scale).to(x.dtype)[:, None]
        for i, layer in enumerate(self.lm.model.layers):
            a, m = layer.self_attn, layer.mlp
            h = _rms_norm(layer.input_layernorm, x)
            q = _rotate(a.q_proj(h).view(B, S_new, H, D).transpose(1, 2), cos, sin)
            keys[i][:, :, start:end] = _rotate(a.k_proj(h).view(B, S_new, K, D).transpose(1, 2), cos, sin)
            values[i][:, :, start:end] = a.v_proj(h).view(B, S_new, K, D).transpose(1, 2)
            att = _attention(q, keys[i][:, :, :end], values[i][:, :, :end], attend)
            x = x + a.o_proj(att.transpose(1, 2).reshape(B, S_new, H * D))
            h = _rms_norm(layer.post_attention_layernorm, x)
            x = x + m.down_proj(m.act_fn(m.gate_proj(h)) * m.up_proj(h))
        h, head = _rms_norm(self.lm.model.norm, x[:, -1]), self.lm.lm_head
        if out is None or type(head) is not torch.nn.Linear or torch.is_autocast_enabled(h.device.type) \
                or out.dtype != h.dtype or head.weight.dtype != h.dtype or head.weight.shape != (out.shape[1], h.shape[-1]):
            return head(h)  # an adapter or a cast around the head: its own forward
        # the (rows, V) logits into a block kept across steps: at a 151,936-row vocabulary a fresh
        # one each step is 150 MB at 256 rows, which on CPU glibc maps anew and page-faults in
        torch.matmul(h, head.weight.t(), out=out)
        return out if head.bias is None else out.add_(head.bias)


class _CachedSteps:
    """`KVDecoder`'s step function: (ids (A, S_new), positions (A, S_new), mask (A, S)) -> next-token
    logits (A, V) for the A rows still decoding, with the cache and the logits kept in preallocated tensors."""

    def __init__(self, decoder: KVDecoder, B: int, capacity: int) -> None:
        weight = decoder.lm.model.embed_tokens.weight
        shape = (B, decoder.K, capacity, decoder.D)
        n_layers = len(decoder.lm.model.layers)
        self.decoder = decoder
        self.keys = [torch.empty(shape, dtype=weight.dtype, device=weight.device) for _ in range(n_layers)]
        self.values = [torch.empty(shape, dtype=weight.dtype, device=weight.device) for _ in range(n_layers)]
        self.filled = 0
        head = decoder.lm.lm_head.weight  # under ZeRO-3 a rank holds an empty placeholder: no block, the head's own forward
        self.logits = torch.empty((B, head.shape[0]), dtype=head.dtype, device=head.device) if head.dim() == 2 else None

    def keep_rows(self, keep: Tensor) -> None:
        """Drop every cache row but `keep` (indices into the current rows), up to what is filled."""
        self.keys = [self._rows(k, keep) for k in self.keys]
        self.values = [self._rows(v, keep) for v in self.values]

    def _rows(self, cache: Tensor, keep: Tensor) -> Tensor:
        out = cache.new_empty((len(keep), *cache.shape[1:]))
        out[:, :, : self.filled] = cache[keep, :, : self.filled]
        return out

    def __call__(self, ids: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        S_new, S = ids.shape[1], mask.shape[1]
        valid = mask.bool()[:, None, None, :]  # (A, 1, 1, S): keys a row may see
        if S_new > 1:  # prompt: causal within the new block; pad queries see themselves (no empty rows, no NaN)
            query_at = torch.arange(S - S_new, S, device=ids.device)[:, None]
            key_at = torch.arange(S, device=ids.device)[None, :]
            attend = (valid & (key_at <= query_at)) | (key_at == query_at)
        else:
            attend = valid
        logits = self.decoder._forward(ids, positions, attend, self.keys, self.values, self.filled, out=None if self.logits is None else self.logits[: len(ids)])
        self.filled += S_new
        return logits
