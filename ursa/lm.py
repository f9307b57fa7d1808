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
computes unpadded (tests/test_lm.py checks it).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ursa.config import LMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of shape [B, T, head_dim] for integer positions [B, T] (computed in fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / head_dim))   # [hd/2]
    freqs = position_ids.float()[..., None] * inv_freq                           # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)                                      # [B, T, hd]
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x [B, heads, T, hd]; cos/sin [B, T, hd]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)               # [B, 1, T, hd]
    return x * cos + rotate_half(x) * sin


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
        self.k[layer][:, :, self.length:self.length + t] = k
        self.v[layer][:, :, self.length:self.length + t] = v
        return (self.k[layer][:, :, :self.length + t], self.v[layer][:, :, :self.length + t])

    def advance(self, t: int):
        self.length += t

    def repeat_interleave(self, g: int):
        """Expand every row to g consecutive rows (prompt prefilled once, sampled G times)."""
        self.k = [k.repeat_interleave(g, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(g, dim=0) for v in self.v]


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        h, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * hd, bias=True)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * hd, h, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        cfg, hd = self.cfg, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, cfg.num_heads, hd).transpose(1, 2)      # [B, Hq, T, hd]
        k = self.k_proj(x).view(B, T, cfg.num_kv_heads, hd).transpose(1, 2)   # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, cfg.num_kv_heads, hd).transpose(1, 2)   # [B, Hkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)                                   # [B, Hkv, Tk, hd]
        # grouped-query attention: SDPA maps query head h to kv head h // (Hq / Hkv) itself
        # (enable_gqa), so the cache is never copied per query head
        gqa = cfg.num_heads != cfg.num_kv_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, cfg.num_heads * hd)                # [B, T, H]
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

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Embeddings, decoder layers, final norm (HF `Qwen2Model`)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_mask_4d(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, Tq, Tk] from a key-padding mask [B, Tk] (1 = real token).

    The queries are the last q_len keys. A key is visible if it is real and not in the future.
    A query at a padding position would see no key at all (NaN in softmax); it is allowed to see
    itself, which keeps it finite and never leaks into real tokens (they never attend to pads)."""
    B, Tk = attention_mask.shape
    dev = attention_mask.device
    q_pos = torch.arange(Tk - q_len, Tk, device=dev)                          # [Tq]
    k_pos = torch.arange(Tk, device=dev)                                       # [Tk]
    causal = k_pos[None, :] <= q_pos[:, None]                                  # [Tq, Tk]
    mask = causal[None] & attention_mask.bool()[:, None, :]                    # [B, Tq, Tk]
    mask = mask | (k_pos[None, :] == q_pos[:, None])[None]                     # self always visible
    return mask[:, None]                                                       # [B, 1, Tq, Tk]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only: [B, T] (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Qwen2LM(nn.Module):
    """HF `Qwen2ForCausalLM`: `model` + `lm_head` (untied in Qwen2.5-7B)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def head(self, hidden):
        w = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, w)

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                checkpoint_fn=None):
        """inputs_embeds [B, T, H] -> final hidden states [B, T, H] (after the final RMSNorm).

        attention_mask [B, past + T] (None: all real, plain causal); position_ids [B, T] (None:
        derived from the mask). checkpoint_fn wraps each layer call (activation checkpointing)."""
        B, T, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None and past == 0:
            mask = None                                                        # plain causal
            if position_ids is None:
                position_ids = torch.arange(T, device=inputs_embeds.device).expand(B, T)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=inputs_embeds.device)
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{(B, past + T)} (cache {past} + new {T})")
            mask = attention_mask_4d(attention_mask, T)
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask)[:, past:]
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        x = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            if checkpoint_fn is not None and cache is None:
                x = checkpoint_fn(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)
