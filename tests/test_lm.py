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


# ---- the attention paths (ursa.lm.fast_path) ------------------------------------------------------

from ursa import lm as lm_mod                                                    # noqa: E402

PATHS = [lm_mod.FastPath("sdpa", True), lm_mod.FastPath("matmul", False), lm_mod.FastPath("matmul", True)]


def _padded_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50, (3, 9), generator=g)
    left = torch.ones(3, 9, dtype=torch.long)
    left[0, :4], left[2, :1] = 0, 0                       # rows 0 and 2 left-padded
    right = torch.ones(3, 9, dtype=torch.long)
    right[1, 5:], right[2, 8:] = 0, 0                     # rows 1 and 2 right-padded
    return ids, left, right


def _decode(lm, ids, mask, split=5):
    """Prefill ids[:, :split] then one token at a time; logits [B, T, V] of every step."""
    cache = KVCache(lm.cfg, ids.shape[0], ids.shape[1], torch.float32, "cpu")
    out = [_logits(lm, ids[:, :split], attention_mask=mask[:, :split], cache=cache)]
    for t in range(split, ids.shape[1]):
        out.append(_logits(lm, ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    return torch.cat(out, 1)


def test_every_attention_path_computes_the_plain_result():
    lm = _lm(4)
    ids, left, right = _padded_inputs()
    with lm_mod.forced_path(lm_mod.PLAIN):
        want = [_logits(lm, ids), _logits(lm, ids, attention_mask=left), _logits(lm, ids, attention_mask=right),
                _decode(lm, ids, left)]
    real_l, real_r = left.bool(), right.bool()
    for fp in PATHS:
        with lm_mod.forced_path(fp):
            got = [_logits(lm, ids), _logits(lm, ids, attention_mask=left), _logits(lm, ids, attention_mask=right),
                   _decode(lm, ids, left)]
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5, msg=str(fp))
        torch.testing.assert_close(got[1][real_l], want[1][real_l], atol=1e-5, rtol=1e-5, msg=str(fp))
        torch.testing.assert_close(got[2][real_r], want[2][real_r], atol=1e-5, rtol=1e-5, msg=str(fp))
        torch.testing.assert_close(got[3][real_l], want[3][real_l], atol=1e-5, rtol=1e-5, msg=str(fp))
        assert torch.isfinite(got[1]).all() and torch.isfinite(got[3]).all()


def test_fast_path_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fp = lm_mod.fast_path
    assert fp(cpu, torch.float32, 140, 140) == lm_mod.FastPath("sdpa", True)          # fp32 training
    assert fp(cpu, torch.bfloat16, 140, 140) == lm_mod.FastPath("matmul", True)       # bf16, short
    assert fp(cpu, torch.bfloat16, 321, 321).kernel == "sdpa"                          # bf16, long
    assert fp(cpu, torch.bfloat16, 320, 320).kernel == "matmul"
    assert fp(cpu, torch.float32, 1, 4000, batch=16).kernel == "matmul"                # a wide decoding step
    assert fp(cpu, torch.float32, 1, 4000, batch=15).kernel == "sdpa"                  # a narrow one
    assert fp(cuda, torch.bfloat16, 1, 10) == lm_mod.PLAIN == fp(cuda, torch.float32, 4096, 4096)
    with lm_mod.forced_path(lm_mod.FastPath("matmul", False)):
        assert fp(cuda, torch.float32, 4096, 4096) == lm_mod.FastPath("matmul", False)
    assert fp(cuda, torch.float32, 4096, 4096) == lm_mod.PLAIN                         # the block ended


def test_right_padded_batch_runs_as_plain_causal_and_matches_each_row_alone():
    lm = _lm(5)
    ids, left, right = _padded_inputs(4)
    for path in (lm_mod.PLAIN, lm_mod.FastPath("matmul", True)):
        with lm_mod.forced_path(path):
            pat = lm_mod.attention_pattern(right, 9, 0, torch.device("cpu"), torch.float32)
            assert pat.causal and (pat.mask is None) == (path.kernel == "sdpa")
            assert not lm_mod.attention_pattern(left, 9, 0, torch.device("cpu"), torch.float32).causal
            out = _logits(lm, ids, attention_mask=right)
            for b in range(3):
                n = int(right[b].sum())
                torch.testing.assert_close(out[b, :n], _logits(lm, ids[b:b + 1, :n])[0], atol=1e-5, rtol=1e-5)
    assert lm_mod.is_right_padded(torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]]))
    assert not lm_mod.is_right_padded(torch.tensor([[1, 1, 0], [0, 1, 1]]))


def test_rope_table_equals_the_formula_and_grows_past_max_positions():
    lm = _lm()
    pos = torch.tensor([[0, 5, 127], [3, 3, 1]])
    cos, sin = lm_mod.rope_cos_sin(pos, lm.cfg.head_dim, lm.cfg.rope_theta)
    rot = lm.rotary(pos, 128)
    c, s = rot.get(torch.float32)
    half = lm.cfg.head_dim // 2
    assert torch.equal(c[:, 0], cos)
    assert torch.equal(s[:, 0, :, :half], -sin[..., :half]) and torch.equal(s[:, 0, :, half:], sin[..., half:])
    far = torch.tensor([[300]])                            # max_position_embeddings is 128
    c2, _ = lm.rotary(far, 301).get(torch.float32)
    assert torch.equal(c2[:, 0], lm_mod.rope_cos_sin(far, lm.cfg.head_dim, lm.cfg.rope_theta)[0])
    # the rotation itself: x * cos + rotate_half(x) * sin
    x = torch.randn(2, 3, 3, lm.cfg.head_dim)
    x1, x2 = x.chunk(2, -1)
    torch.testing.assert_close(rot(x), x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None], atol=0, rtol=0)


def test_fused_weights_are_kept_only_inside_a_constant_weights_block():
    lm = _lm(6)
    at = lm.model.layers[0].self_attn
    ids = torch.randint(0, 50, (2, 5))
    with lm_mod.forced_path(lm_mod.FastPath("sdpa", True)), torch.no_grad():
        assert at.fused_weights()[0] is not at.fused_weights()[0]          # outside: rebuilt per call
        before = _logits(lm, ids)
        for p in at.k_proj.parameters():
            p.add_(0.5)
        after = _logits(lm, ids)                                            # the update is seen
        with lm_mod.forced_path(lm_mod.PLAIN):
            want = _logits(lm, ids)
        with lm_mod.constant_weights():
            w = at.fused_weights()[0]
            assert at.fused_weights()[0] is w                               # inside: built once
            torch.testing.assert_close(_logits(lm, ids), want, atol=1e-5, rtol=1e-5)
        with torch.enable_grad(), lm_mod.constant_weights():
            assert at.fused_weights()[0] is not at.fused_weights()[0]      # grad: autograd needs the cat
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]))


def test_bf16_autocast_paths_stay_close_to_fp32():
    lm = _lm(7)
    ids, left, _ = _padded_inputs(5)
    want = _logits(lm, ids, attention_mask=left)
    real = left.bool()
    for path in (lm_mod.PLAIN, lm_mod.FastPath("matmul", True)):
        with lm_mod.forced_path(path), torch.autocast("cpu", dtype=torch.bfloat16):
            got = _logits(lm, ids, attention_mask=left).float()
        assert (got[real] - want[real]).abs().max() < 0.05, path


# ---- the FLOP counts of ursa.flops (the bench's MFU) (hand-computed) ---------------------------------------------

def test_bench_model_flops_by_hand():
    from ursa.flops import lm_forward_flops, model_train_flops, projector_forward_flops, vit_forward_flops
    from ursa.config import ModelConfig, ProjectorConfig, ViTConfig, VisionConfig
    c = LMConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=1, num_heads=2, num_kv_heads=1)
    # per position: q/k/v 4 x (2 + 1 + 1) x 2 = 32, o 16, MLP 3 x 4 x 6 = 72, head 40 -> 160 mul-adds;
    # causal attention over T = 3: query t sees t + 1 keys, 4 x hd x heads x (1 + 2 + 3) = 96
    assert lm_forward_flops(c, 3) == 2 * 160 * 3 + 96
    v = ViTConfig(image_size=8, patch_size=4, hidden_size=2, intermediate_size=3, num_layers=1, num_heads=1)
    # 4 patches: embedding 2 x 4 x 48 x 2 = 768; block 2 x 4 x (16 + 12) = 224; attention 4 x 16 x 2 = 128
    assert vit_forward_flops(v) == 768 + 224 + 128
    cfg = ModelConfig(vision=VisionConfig(siglip=v), projector=ProjectorConfig(out_dim=4), lm=c)
    assert projector_forward_flops(cfg) == 2 * 4 * (2 * 4 + 4 * 4)
    want = 3 * (2 * (1120 + 192) + lm_forward_flops(c, 3) + lm_forward_flops(c, 5))
    assert model_train_flops(cfg, [3, 5], n_images=2) == want
