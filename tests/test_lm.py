"""The Qwen2 decoder: KV cache == full forward, left padding == no padding, RoPE/GQA by a slow formula."""
import math

import torch
import torch.nn.functional as F

from ursa.config import LMConfig
from ursa.lm import KVCache, Qwen2LM


def _lm(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=128, **kw)
    lm = Qwen2LM(cfg).eval()
    with torch.no_grad():           # non-trivial norms and biases
        for n, p in lm.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.1 * torch.randn_like(p))
    return lm


def _logits(lm, ids, **kw):
    return lm.head(lm(lm.model.embed_tokens(ids), **kw))


def test_cached_decoding_equals_full_forward():
    lm = _lm()
    ids = torch.randint(0, 50, (2, 12))
    full = _logits(lm, ids)
    # one prefill of 7, then token by token
    cache = KVCache(lm.cfg, 2, 12, torch.float32, "cpu")
    parts = [_logits(lm, ids[:, :7], cache=cache)]
    for t in range(7, 12):
        parts.append(_logits(lm, ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    # one step: prefill all but the last, then the last
    cache = KVCache(lm.cfg, 2, 12, torch.float32, "cpu")
    _logits(lm, ids[:, :11], cache=cache)
    torch.testing.assert_close(_logits(lm, ids[:, 11:], cache=cache), full[:, 11:], atol=1e-5, rtol=1e-5)


def test_left_padding_gives_same_outputs_as_no_padding():
    lm = _lm(1)
    a, b = torch.randint(4, 50, (7,)), torch.randint(4, 50, (10,))
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    ids[0, 3:], mask[0, 3:] = a, 1
    ids[1], mask[1] = b, 1
    out = _logits(lm, ids, attention_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 3:], _logits(lm, a[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], _logits(lm, b[None])[0], atol=1e-5, rtol=1e-5)


def _slow_forward(lm, ids):
    """An independent per-head, per-position loop: RoPE as complex rotation of (i, i + hd/2) pairs."""
    cfg = lm.cfg
    hd, T = cfg.head_dim, ids.shape[0]
    x = lm.model.embed_tokens.weight[ids].double()                             # [T, H]

    def rms(v, w):
        return w.double() * v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def rope(v, pos):                                                          # v [hd]
        out = v.clone()
        for i in range(hd // 2):
            ang = pos / (cfg.rope_theta ** (2 * i / hd))
            c, s = math.cos(ang), math.sin(ang)
            out[i] = v[i] * c - v[i + hd // 2] * s
            out[i + hd // 2] = v[i + hd // 2] * c + v[i] * s
        return out

    for layer in lm.model.layers:
        at = layer.self_attn
        n = rms(x, layer.input_layernorm.weight)
        q = n @ at.q_proj.weight.double().T + at.q_proj.bias.double()
        k = n @ at.k_proj.weight.double().T + at.k_proj.bias.double()
        v = n @ at.v_proj.weight.double().T + at.v_proj.bias.double()
        y = torch.zeros(T, cfg.num_heads * hd, dtype=torch.float64)
        for h in range(cfg.num_heads):
            kv = h // (cfg.num_heads // cfg.num_kv_heads)
            for t in range(T):
                qt = rope(q[t, h * hd:(h + 1) * hd], t)
                scores = torch.stack([rope(k[s, kv * hd:(kv + 1) * hd], s) @ qt for s in range(t + 1)])
                p = torch.softmax(scores / math.sqrt(hd), 0)
                y[t, h * hd:(h + 1) * hd] = sum(p[s] * v[s, kv * hd:(kv + 1) * hd] for s in range(t + 1))
        x = x + y @ at.o_proj.weight.double().T
        n = rms(x, layer.post_attention_layernorm.weight)
        m = layer.mlp
        x = x + (F.silu(n @ m.gate_proj.weight.double().T) * (n @ m.up_proj.weight.double().T)) \
            @ m.down_proj.weight.double().T
    return rms(x, lm.model.norm.weight) @ lm.lm_head.weight.double().T


def test_decoder_matches_slow_reference():
    lm = _lm(2)
    ids = torch.randint(0, 50, (6,))
    torch.testing.assert_close(_logits(lm, ids[None])[0].double(), _slow_forward(lm, ids), atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_is_an_error():
    lm = _lm()
    cache = KVCache(lm.cfg, 1, 4, torch.float32, "cpu")
    try:
        _logits(lm, torch.randint(0, 50, (1, 5)), cache=cache)
    except ValueError as e:
        assert "KV cache overflow" in str(e)
    else:
        raise AssertionError("expected an overflow error")
