"""The Qwen2 decoder (the LLM of URSA-8B: Qwen2.5-Math-7B-Instruct), with a KV cache.

References: Qwen2 technical report; Hugging Face `modeling_qwen2.py` (the layout whose weights load
here unpermuted); nanoGPT for the shape of the code.

    x = embed_tokens(ids)                                   # [B, T, H]
    for each layer:
        x = x + o_proj(Attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n)))   n = RMSNorm(x)
        x = x + down_proj(silu(gate_proj(n)) * up_proj(n))                   n = RMSNorm(x)
    logits = lm_head(RMSNorm(x))                            # [B, T, V]

Grouped-query attention: num_heads query heads share num_kv_heads key/value heads (head h uses kv
head h // (num_heads / num_kv_heads)). q/k/v projections have a bias, o_proj has none. RoPE uses the
`rotate_half` layout (the first half of each head's channels pairs with the second half).

Padding: `attention_mask` [B, Tk] marks real tokens (1) over the whole key range (cache + new tokens);
`position_ids` [B, T] count real tokens only, so a left-padded row computes exactly what the same row
computes unpadded (tests/test_lm.py checks it). Outputs at padding positions are unspecified (finite).

Speed (docs/speed.md has the measurements). Everything a forward needs besides the weights is built
once per forward and shared by the layers: the attention pattern (`attention_pattern`) and the RoPE
rotation (looked up in a cos/sin table kept per device, `Qwen2LM.rotary`). Which attention code runs
is decided in ONE place, `fast_path`: on a CPU, explicit matmul + softmax for one-token decoding
steps and for short key ranges in half precision (faster there than PyTorch's fused kernel), and
one fused q/k/v matmul; everywhere else (CUDA; CPU fp32 or long sequences)
`scaled_dot_product_attention` (flash / memory-efficient kernels) with separate projections on
CUDA. A batch padded only on the right (training) needs no mask: causality alone keeps every real
token away from the padding after it, so it runs as plain causal attention.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ursa.config import LMConfig


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back before the weight (HF
    Qwen2RMSNorm). [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32:                       # no cast round trip to dispatch
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


# ---- the one rule that picks the attention code ----------------------------------------------------

# On this project's CPUs (docs/speed.md) PyTorch's fused attention kernel is slower than matmul +
# softmax + matmul in bf16 at short lengths, and faster in fp32 and beyond a few hundred keys (it
# skips the masked half of a causal product and never stores the [Tq, Tk] scores).
CPU_MATMUL_MAX_KEYS = 320
# One-token decoding steps: the fused kernel wins for a few rows (one call instead of the matmul
# path's nine ops), the matmul path from about 16 rows on.
CPU_MATMUL_MIN_DECODE_ROWS = 16
HALF_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class FastPath:
    kernel: str       # "sdpa" (scaled_dot_product_attention) | "matmul" (explicit scores + softmax)
    fuse_qkv: bool    # one matmul against the concatenated q/k/v weights (the weights stay separate)


PLAIN = FastPath("sdpa", False)     # the reference code: what CUDA runs, and the bench's baseline
_forced: list = []                   # forced_path's stack


@contextmanager
def forced_path(fp: FastPath):
    """Run every forward inside the block with `fp` instead of fast_path's choice (tests compare the
    paths; `python -m ursa.bench --plain` measures the plain one)."""
    _forced.append(fp)
    try:
        yield
    finally:
        _forced.pop()


def fast_path(device: torch.device, dtype: torch.dtype, q_len: int, k_len: int, batch: int = 1) -> FastPath:
    """The attention code for `batch` rows of q_len queries over k_len keys computing in `dtype`
    on `device`.

    CPU: fused q/k/v projection always (one larger matmul beats three small ones); the matmul
    kernel for one-token decoding steps of at least CPU_MATMUL_MIN_DECODE_ROWS rows (the fused
    kernel's blocking is built for many queries) and for half precision up to CPU_MATMUL_MAX_KEYS
    keys; SDPA otherwise. Any other device (CUDA): SDPA and separate projections, the plain code."""
    if _forced:
        return _forced[-1]
    if device.type != "cpu":
        return PLAIN
    short_half = dtype in HALF_DTYPES and k_len <= CPU_MATMUL_MAX_KEYS
    wide_step = q_len == 1 and batch >= CPU_MATMUL_MIN_DECODE_ROWS
    return FastPath("matmul" if wide_step or short_half else "sdpa", True)


_constant: list = []                 # constant_weights' stack of {id(module): kept tensors}


@contextmanager
def constant_weights():
    """A block in which the weights do not change (one generate call): no-grad forwards inside it
    compute derived weights (the fused q/k/v concatenation) once and reuse them. Anything that
    changes a weight inside the block is not seen by those forwards."""
    _constant.append({})
    try:
        yield
    finally:
        _constant.pop()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in for input x: the autocast dtype where autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ---- masks --------------------------------------------------------------------------------------

def attention_mask_4d(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, Tq, Tk] from a key-padding mask [B, Tk] (1 = real token).

    The queries are the last q_len keys. A key is visible if it is real and not in the future.
    A query at a padding position would see no key at all (NaN in softmax); it is allowed to see
    itself, which keeps it finite and never leaks into real tokens (they never attend to pads)."""
    B, Tk = attention_mask.shape
    dev = attention_mask.device
    if q_len == 1:                                                             # one decoding step
        keep = attention_mask.bool().clone()                                   # [B, Tk]
        keep[:, -1] = True                                                     # self always visible
        return keep[:, None, None, :]                                          # [B, 1, 1, Tk]
    q_pos = torch.arange(Tk - q_len, Tk, device=dev)                          # [Tq]
    k_pos = torch.arange(Tk, device=dev)                                       # [Tk]
    causal = k_pos[None, :] <= q_pos[:, None]                                  # [Tq, Tk]
    mask = causal[None] & attention_mask.bool()[:, None, :]                    # [B, Tq, Tk]
    mask = mask | (k_pos[None, :] == q_pos[:, None])[None]                     # self always visible
    return mask[:, None]                                                       # [B, 1, Tq, Tk]


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row of a key-padding mask [B, T] is ones followed by zeros (no real token
    after a pad). One host sync on an accelerator (once per forward, never per layer)."""
    am = attention_mask.bool()
    return not bool((am[:, 1:] & ~am[:, :-1]).any())


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only: [B, T] (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class AttentionPattern:
    """Which keys each query sees in one forward, built once and shared by every layer.

    kernel  "sdpa" | "matmul" (fast_path)
    causal  plain causal attention over Tq == Tk keys (no tensor; SDPA's is_causal)
    mask    sdpa: bool [B, 1, Tq, Tk] (True = visible), None when causal; matmul: additive fp32
            broadcastable to [B, 1, 1, Tq, Tk] (0 visible, -inf hidden; the axis before Tq is the
            query-head group), [1, T, T] when causal. None with causal False: every query sees
            every key (one decoding step without padding)."""
    kernel: str
    fuse_qkv: bool
    causal: bool
    mask: Optional[torch.Tensor]

    def __post_init__(self):
        self._cast: dict = {}

    def bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The additive mask in `dtype` (cast once per forward, then shared by the layers)."""
        if self.mask is None or self.mask.dtype == dtype:
            return self.mask
        if dtype not in self._cast:
            self._cast[dtype] = self.mask.to(dtype)
        return self._cast[dtype]


def additive_mask(visible: torch.Tensor) -> torch.Tensor:
    """bool [..., Tq, Tk] -> fp32 [..., 1, Tq, Tk] with 0 where visible and -inf elsewhere (the new
    axis broadcasts over the query heads that share a kv head)."""
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
    return bias.masked_fill_(~visible, float("-inf")).unsqueeze(-3)


def attention_pattern(attention_mask: Optional[torch.Tensor], q_len: int, past: int,
                      device: torch.device, dtype: torch.dtype, batch: int = 1) -> AttentionPattern:
    """The pattern for `batch` rows of q_len new tokens after `past` cached ones. attention_mask
    [batch, past + q_len] or None (all real). No cache and no padding before a real token: plain
    causal."""
    fp = fast_path(device, dtype, q_len, past + q_len, batch)
    if past == 0 and (attention_mask is None or is_right_padded(attention_mask)):
        if fp.kernel == "sdpa":
            return AttentionPattern(fp.kernel, fp.fuse_qkv, True, None)
        visible = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        return AttentionPattern(fp.kernel, fp.fuse_qkv, True, additive_mask(visible))   # [1, T, T]
    if attention_mask is None and q_len == 1:
        return AttentionPattern(fp.kernel, fp.fuse_qkv, False, None)
    if attention_mask is None:
        attention_mask = torch.ones(1, past + q_len, dtype=torch.bool, device=device)
    visible = attention_mask_4d(attention_mask, q_len)                         # [B, 1, Tq, Tk]
    mask = visible if fp.kernel == "sdpa" else additive_mask(visible[:, 0])[:, None]
    return AttentionPattern(fp.kernel, fp.fuse_qkv, False, mask)


# ---- RoPE -----------------------------------------------------------------------------------------

def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of shape [*position_ids.shape, head_dim] for integer positions (computed in fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / head_dim))   # [hd/2]
    freqs = position_ids.float()[..., None] * inv_freq                           # [..., hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)                                      # [..., hd]
    return emb.cos(), emb.sin()


class Rotary:
    """One forward's RoPE: cos and sign-folded sin [B, 1, T, hd] (for the [B, heads, T, hd] layout),
    cast to a compute dtype once and kept for every layer.

    rotate_half(x) * sin == roll(x, hd/2) * [-sin_lo, sin_hi]: the same products, fewer ops."""

    def __init__(self, cos: torch.Tensor, signed_sin: torch.Tensor):
        self._by_dtype = {torch.float32: (cos.unsqueeze(1), signed_sin.unsqueeze(1))}   # [B, 1, T, hd]

    def get(self, dtype: torch.dtype):
        if dtype not in self._by_dtype:
            c, s = self._by_dtype[torch.float32]
            self._by_dtype[dtype] = (c.to(dtype), s.to(dtype))
        return self._by_dtype[dtype]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, heads, T, hd] (any strides) -> rotated, same shape, contiguous."""
        cos, sin = self.get(x.dtype)
        return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


def rope_table(length: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin [length, head_dim] of positions 0..length-1 (fp32): the values
    rope_cos_sin gives, with the first half of sin negated (what `Rotary` multiplies)."""
    cos, sin = rope_cos_sin(torch.arange(length, device=device), head_dim, theta)
    sin[:, :head_dim // 2].neg_()
    return cos, sin


# ---- cache and layers ---------------------------------------------------------------------------------

class KVCache:
    """Preallocated keys/values for every layer: [B, num_kv_heads, max_len, head_dim] each.

    `length` is how many positions are filled (the same for every row; padding is handled by the
    attention mask, not by ragged lengths)."""

    def __init__(self, cfg: LMConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k, v):
        """Write k/v [B, Hkv, t, hd] at the current end; return the filled prefix [B, Hkv, len+t, hd]."""
        t = k.shape[2]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {t} > max_len {self.max_len}")
        kb, vb = self.k[layer], self.v[layer]
        kb.narrow(2, self.length, t).copy_(k)
        vb.narrow(2, self.length, t).copy_(v)
        return kb.narrow(2, 0, self.length + t), vb.narrow(2, 0, self.length + t)

    def advance(self, t: int):
        self.length += t

    def repeat_interleave(self, g: int):
        """Expand every row to g consecutive rows (prompt prefilled once, sampled G times)."""
        self.k = [k.repeat_interleave(g, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(g, dim=0) for v in self.v]

    def select(self, rows: torch.Tensor):
        """Keep only `rows` (long [n'], in this order): finished rows leave a decoding batch."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + bias) v with grouped-query heads, without copying k/v per head.

    q [B, Hq, Tq, hd], k/v [B, Hkv, Tk, hd], bias additive [B or 1, 1, 1, Tq, Tk] or None ->
    [B, Hq, Tq, hd]. Query head h = kv * G + g, so the G heads of one kv head are consecutive and
    become G * Tq rows of one matmul. The softmax is taken in the scores' dtype: PyTorch's CPU
    kernel accumulates half precision in fp32, so its bf16 result is the fp32 softmax rounded; the
    backward then reads the bf16 probabilities (an fp32 copy of the scores made the kernel 1.85x
    slower at the toy's sizes, docs/speed.md)."""
    B, Hq, Tq, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = (q * hd ** -0.5).reshape(B, Hkv, G * Tq, hd)                         # [B, Hkv, G*Tq, hd]
    s = torch.matmul(qg, k.transpose(-1, -2)).view(B, Hkv, G, Tq, Tk)          # [B, Hkv, G, Tq, Tk]
    if bias is not None:
        s = s + bias
    p = torch.softmax(s, dim=-1)
    if p.dtype != v.dtype:
        p = p.to(v.dtype)
    y = torch.matmul(p.view(B, Hkv, G * Tq, Tk), v)                            # [B, Hkv, G*Tq, hd]
    return y.view(B, Hq, Tq, hd)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        h, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * hd, bias=True)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * hd, h, bias=False)

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The q/k/v weights and biases concatenated: [(Hq + 2 Hkv) hd, H], [(Hq + 2 Hkv) hd].

        Concatenated at each call (autograd reaches the parameters), except inside
        `constant_weights()` without grad (a generate call): there once per block."""
        if _constant and not torch.is_grad_enabled():
            kept = _constant[-1]
            if id(self) not in kept:
                kept[id(self)] = self._concat()
            return kept[id(self)]
        return self._concat()

    def _concat(self):
        return (torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]),
                torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))

    def qkv(self, x: torch.Tensor, rope: Rotary, fused: bool):
        """x [B, T, H] -> q [B, Hq, T, hd], k [B, Hkv, T, hd] (both rotated), v [B, Hkv, T, hd].

        Rotating after the head transpose leaves q and k contiguous per head, the layout both
        attention kernels read without a copy."""
        B, T, _ = x.shape
        Hq, Hkv, hd = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        if not fused:
            q = rope(self.q_proj(x).view(B, T, Hq, hd).transpose(1, 2))
            k = rope(self.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2))
            return q, k, self.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
        w, b = self.fused_weights()
        qkv = F.linear(x, w, b).view(B, T, Hq + 2 * Hkv, hd).transpose(1, 2)   # [B, Hq+2Hkv, T, hd]
        qk, v = qkv.split((Hq + Hkv, Hkv), dim=1)
        q, k = rope(qk).split((Hq, Hkv), dim=1)                                # [B, Hq+Hkv, T, hd]
        return q, k, v

    def forward(self, x, rope: Rotary, attn: AttentionPattern, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, rope, attn.fuse_qkv)                             # [B, heads, T, hd]
        if cache is not None:
            k, v = cache.update(layer, k, v)                                   # [B, Hkv, Tk, hd]
        if attn.kernel == "matmul":
            y = matmul_attention(q, k, v, attn.bias(q.dtype))
        else:
            # grouped-query attention: SDPA maps query head h to kv head h // (Hq / Hkv) itself
            # (enable_gqa), so the cache is never copied per query head
            gqa = self.cfg.num_heads != self.cfg.num_kv_heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask, is_causal=attn.causal,
                                               enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.cfg.num_heads * self.cfg.head_dim)   # [B, T, H]
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope: Rotary, attn: AttentionPattern, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), rope, attn, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Embeddings, decoder layers, final norm (HF `Qwen2Model`)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2LM(nn.Module):
    """HF `Qwen2ForCausalLM`: `model` + `lm_head` (untied in Qwen2.5-7B)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope_tables: dict = {}          # device -> (cos, sin) [L, hd]; not state, rebuilt on demand

    def head(self, hidden):
        w = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, w)

    def rotary(self, position_ids: torch.Tensor, length: int) -> Rotary:
        """RoPE for position_ids [B, T], looked up in this device's table (positions below
        max(max_position_embeddings, length); the table grows when a longer sequence comes)."""
        dev = position_ids.device
        need = max(self.cfg.max_position_embeddings, length)
        table = self._rope_tables.get(dev)
        if table is None or table[0].shape[0] < need:
            table = rope_table(need, self.cfg.head_dim, self.cfg.rope_theta, dev)
            self._rope_tables[dev] = table
        return Rotary(table[0][position_ids], table[1][position_ids])          # [B, T, hd] each

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                checkpoint_fn=None):
        """inputs_embeds [B, T, H] -> final hidden states [B, T, H] (after the final RMSNorm).

        attention_mask [B, past + T] (None: all real, plain causal); position_ids [B, T] (None:
        derived from the mask). checkpoint_fn wraps each layer call (activation checkpointing)."""
        B, T, _ = inputs_embeds.shape
        dev = inputs_embeds.device
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"{(B, past + T)} (cache {past} + new {T})")
        attn = attention_pattern(attention_mask, T, past, dev, compute_dtype(inputs_embeds), B)
        if position_ids is None:
            if attention_mask is None or attn.causal:                          # no pad before a real token
                position_ids = torch.arange(past, past + T, device=dev).expand(B, T)
            else:
                position_ids = position_ids_from_mask(attention_mask)[:, past:]
        rope = self.rotary(position_ids, past + T)
        x = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            if checkpoint_fn is not None and cache is None:
                x = checkpoint_fn(layer, x, rope, attn)
            else:
                x = layer(x, rope, attn, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)
