"""Tests of ursa/vision.py: windows, relative positions, SAM / SigLIP blocks against slow float64 numpy
references, the hybrid tower's wiring and gradients, the released parameter manifest, preprocessing."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ursa.config import ViTConfig, get_config
from ursa.vision import (SamBlock, SamViT, SiglipViT, VisionTower, preprocess, preprocess_batch,
                         rel_pos_bias, window_partition, window_unpartition)

torch.set_num_threads(1)
FIXTURE = Path(__file__).parent / "fixtures" / "ursa8b_weights.tsv"
CLIP_FILL = (122, 116, 104)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Every parameter random (rel-pos tables and hd_alpha included), so no term can hide at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


# ---- slow float64 references ------------------------------------------------------------------

def np_params(module):
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


def ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


erf = np.vectorize(math.erf)


def gelu(x, kind):
    if kind == "erf":
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def slow_sam_block(blk: SamBlock, x: np.ndarray, eps: float) -> np.ndarray:
    """x: [B, G, G, D] float64. Window by window, head by head, pair by pair."""
    p = np_params(blk)
    B, G, _, D = x.shape
    H = blk.attn.num_heads
    hd = D // H
    y = ln(x, p["norm1.weight"], p["norm1.bias"], eps)
    ws = blk.window_size if blk.window_size > 0 else G
    Gp = -(-G // ws) * ws
    yp = np.zeros((B, Gp, Gp, D))
    yp[:, :G, :G] = y                                   # zero pad bottom / right, no mask
    out = np.zeros_like(yp)
    Th, Tw = p["attn.rel_pos_h"], p["attn.rel_pos_w"]
    for b in range(B):
        for r0 in range(0, Gp, ws):
            for c0 in range(0, Gp, ws):
                coords = [(r, c) for r in range(ws) for c in range(ws)]
                tok = np.stack([yp[b, r0 + r, c0 + c] for r, c in coords])    # [n, D]
                qkv = tok @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]      # [n, 3D]
                heads = []
                for h in range(H):
                    q = qkv[:, h * hd:(h + 1) * hd]
                    k = qkv[:, D + h * hd:D + (h + 1) * hd]
                    v = qkv[:, 2 * D + h * hd:2 * D + (h + 1) * hd]
                    logits = np.zeros((len(coords), len(coords)))
                    for i, (qi, qw) in enumerate(coords):
                        for j, (ki, kw) in enumerate(coords):
                            logits[i, j] = (q[i] @ k[j]) / math.sqrt(hd) \
                                + q[i] @ Th[qi - ki + ws - 1] + q[i] @ Tw[qw - kw + ws - 1]
                    heads.append(softmax(logits) @ v)
                o = np.concatenate(heads, -1) @ p["attn.proj.weight"].T + p["attn.proj.bias"]
                for i, (r, c) in enumerate(coords):
                    out[b, r0 + r, c0 + c] = o[i]
    x = x + out[:, :G, :G]
    z = ln(x, p["norm2.weight"], p["norm2.bias"], eps)
    z = gelu(z @ p["mlp.lin1.weight"].T + p["mlp.lin1.bias"], "erf")
    return x + z @ p["mlp.lin2.weight"].T + p["mlp.lin2.bias"]


def slow_siglip(vit: SiglipViT, img: np.ndarray, kind: str) -> np.ndarray:
    """img: [B, 3, S, S] float64 -> [B, P, D], patches cut out by hand in row-major order."""
    cfg = vit.cfg
    p = np_params(vit)
    B, P, D, ps, g = img.shape[0], cfg.num_patches, cfg.hidden_size, cfg.patch_size, cfg.grid
    Wc = p["patch_embed.proj.weight"].reshape(D, -1)
    x = np.zeros((B, P, D))
    for b in range(B):
        for r in range(g):
            for c in range(g):
                patch = img[b, :, r * ps:(r + 1) * ps, c * ps:(c + 1) * ps].reshape(-1)
                x[b, r * g + c] = Wc @ patch + p["patch_embed.proj.bias"]
    x = x + p["pos_embed"][0]
    H = cfg.num_heads
    hd = D // H
    eps = cfg.layer_norm_eps
    for i in range(cfg.num_layers):
        pre = f"blocks.{i}."
        y = ln(x, p[pre + "norm1.weight"], p[pre + "norm1.bias"], eps)
        qkv = y @ p[pre + "attn.qkv.weight"].T + p[pre + "attn.qkv.bias"]
        heads = []
        for h in range(H):
            q, k, v = (qkv[..., s * D + h * hd:s * D + (h + 1) * hd] for s in range(3))
            a = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(hd))
            heads.append(a @ v)
        x = x + np.concatenate(heads, -1) @ p[pre + "attn.proj.weight"].T + p[pre + "attn.proj.bias"]
        y = ln(x, p[pre + "norm2.weight"], p[pre + "norm2.bias"], eps)
        y = gelu(y @ p[pre + "mlp.fc1.weight"].T + p[pre + "mlp.fc1.bias"], kind)
        x = x + y @ p[pre + "mlp.fc2.weight"].T + p[pre + "mlp.fc2.bias"]
    return ln(x, p["norm.weight"], p["norm.bias"], eps)


# ---- windows and relative positions ------------------------------------------------------------

def test_window_partition_pads_orders_and_round_trips():
    x = torch.arange(2 * 8 * 8 * 5, dtype=torch.float32).view(2, 8, 8, 5) + 1   # no zeros inside
    win, pad_hw = window_partition(x, 3)
    assert pad_hw == (9, 9) and win.shape == (2 * 9, 3, 3, 5)
    assert torch.equal(win[0], x[0, 0:3, 0:3])            # batch 0, window (0, 0)
    assert torch.equal(win[1], x[0, 0:3, 3:6])            # window (0, 1): columns advance first
    assert torch.equal(win[3], x[0, 3:6, 0:3])            # window (1, 0)
    assert torch.equal(win[9 + 4], x[1, 3:6, 3:6])        # batch 1, window (1, 1)
    corner = win[8]                                       # batch 0, window (2, 2): rows/cols 6, 7, pad
    assert torch.equal(corner[:2, :2], x[0, 6:8, 6:8])
    assert (corner[2] == 0).all() and (corner[:, 2] == 0).all()
    assert torch.equal(window_unpartition(win, 3, pad_hw, (8, 8)), x)
    win2, pad2 = window_partition(x[:, :6, :6], 3)        # already a multiple: no padding
    assert pad2 == (6, 6) and torch.equal(window_unpartition(win2, 3, pad2, (6, 6)), x[:, :6, :6])


@pytest.mark.parametrize("h,w", [(3, 3), (3, 4)])
def test_rel_pos_bias_matches_pair_loop(h, w):
    g = torch.Generator().manual_seed(1)
    hd = 4
    q = torch.randn(2, 3, h * w, hd, generator=g)
    th = torch.randn(2 * h - 1, hd, generator=g)
    tw = torch.randn(2 * w - 1, hd, generator=g)
    got = rel_pos_bias(q, th, tw, (h, w))
    want = torch.zeros(2, 3, h * w, h * w)
    for b in range(2):
        for n in range(3):
            for i in range(h * w):
                qi, qw = divmod(i, w)
                for j in range(h * w):
                    ki, kw = divmod(j, w)
                    want[b, n, i, j] = q[b, n, i] @ th[qi - ki + h - 1] + q[b, n, i] @ tw[qw - kw + w - 1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs"):
        rel_pos_bias(q, th[:-1], tw, (h, w))


@pytest.mark.parametrize("window", [3, 0])
def test_sam_block_matches_slow_reference(window):
    cfg = get_config("tiny-hybrid").vision.sam                 # grid 8, width 32, 2 heads
    blk = SamBlock(cfg, window).double()
    randomize(blk, seed=window)
    x = torch.randn(2, cfg.grid, cfg.grid, cfg.hidden_size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    got = blk(x).detach().numpy()
    want = slow_sam_block(blk, x.numpy(), cfg.layer_norm_eps)
    np.testing.assert_allclose(got, want, atol=1e-8, rtol=0)


# ---- SigLIP ------------------------------------------------------------------------------------

def test_siglip_matches_slow_reference_and_gelu_flag_is_honoured():
    base = ViTConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32, num_layers=2,
                     num_heads=2)
    vits = {}
    for kind in ("erf", "tanh"):
        vits[kind] = SiglipViT(ViTConfig(**{**base.__dict__, "gelu": kind})).double()
        randomize(vits[kind], seed=5, std=0.5)                # same weights for both
    img = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    outs = {k: v(img).detach().numpy() for k, v in vits.items()}
    for kind in ("erf", "tanh"):
        np.testing.assert_allclose(outs[kind], slow_siglip(vits[kind], img.numpy(), kind), atol=1e-8, rtol=0)
    assert np.abs(outs["erf"] - outs["tanh"]).max() > 1e-5
    with pytest.raises(ValueError, match="gelu"):
        SiglipViT(ViTConfig(**{**base.__dict__, "gelu": "relu"}))


def test_siglip_matmul_attention_path_matches_slow_reference():
    from ursa.lm import FastPath, fast_path, forced_path
    vit = SiglipViT(ViTConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                              num_layers=2, num_heads=2)).double()
    randomize(vit, seed=6, std=0.5)
    img = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with forced_path(FastPath("matmul", True)):
        got = vit(img).detach().numpy()
    np.testing.assert_allclose(got, slow_siglip(vit, img.numpy(), "tanh"), atol=1e-8, rtol=0)
    # the rule the tower shares with the decoder: bf16 on a CPU takes the matmul kernel
    assert fast_path(torch.device("cpu"), torch.bfloat16, 16, 16).kernel == "matmul"


# ---- the hybrid tower ------------------------------------------------------------------------

def manual_head(sam: SamViT, neck_idx: str, x: torch.Tensor) -> torch.Tensor:
    """neck (by hand) -> bilinear resize -> the downsample convs, with F.conv2d on the saved weights."""
    sd = sam.state_dict()
    eps = sam.cfg.layer_norm_eps

    def ln2d(y, w, b):
        u = y.mean(1, keepdim=True)
        s = ((y - u) ** 2).mean(1, keepdim=True)
        return (y - u) / torch.sqrt(s + eps) * w[:, None, None] + b[:, None, None]

    y = x.permute(0, 3, 1, 2)
    y = ln2d(F.conv2d(y, sd[f"{neck_idx}.0.weight"]), sd[f"{neck_idx}.1.weight"], sd[f"{neck_idx}.1.bias"])
    y = ln2d(F.conv2d(y, sd[f"{neck_idx}.2.weight"], padding=1), sd[f"{neck_idx}.3.weight"],
             sd[f"{neck_idx}.3.bias"])
    y = F.interpolate(y, size=(sam.cfg.resize_to,) * 2, mode="bilinear", align_corners=False)
    for i in range(len(sam.cfg.downsample_dims)):
        y = F.conv2d(y, sd[f"downsamples.{i}.weight"], stride=2, padding=1)
    return y


def test_sam_output_is_main_plus_alpha_times_first_global_hd_path():
    cfg = get_config("tiny-hybrid").vision.sam                 # global layers (1, 3)
    sam = SamViT(cfg)
    randomize(sam, seed=7, std=0.2)
    feats = {}
    for i in (1, 3):
        sam.blocks[i].register_forward_hook(lambda m, a, out, i=i: feats.__setitem__(i, out))
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = sam(x)
        main = manual_head(sam, "neck", feats[3])
        hd = manual_head(sam, "neck_hd", feats[1])             # the FIRST global block, not the last
    want = (main + sam.hd_alpha_downsamples * hd).flatten(2).transpose(1, 2)
    assert out.shape == (2, cfg.out_grid ** 2, cfg.downsample_dims[-1])
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert (hd - manual_head(sam, "neck_hd", feats[3])).abs().max() > 1e-3   # the choice matters
    # row-major flattening: token r * g + c is grid cell (r, c)
    g = cfg.out_grid
    torch.testing.assert_close(out[:, 1 * g + 2], want.transpose(1, 2).reshape(2, -1, g, g)[:, :, 1, 2])


def test_hybrid_tower_branch_inputs_and_shapes():
    vcfg = get_config("tiny-hybrid").vision
    tower = VisionTower(vcfg)
    randomize(tower, seed=8, std=0.2)
    pix = torch.rand(2, 3, vcfg.image_size, vcfg.image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        high, low = tower(pix)
        sam, sig = vcfg.sam, vcfg.siglip
        m = torch.tensor(sam.image_mean).view(1, 3, 1, 1)
        s = torch.tensor(sam.image_std).view(1, 3, 1, 1)
        want_high = tower.vision_tower_high.vision_tower((pix - m) / s)
        small = F.interpolate(pix, size=(sig.image_size,) * 2, mode="bilinear", align_corners=False,
                              antialias=True)
        want_low = tower.vision_tower_low.vision_tower((small - 0.5) / 0.5)
        no_aa = F.interpolate(pix, size=(sig.image_size,) * 2, mode="bilinear", align_corners=False)
        low_no_aa = tower.vision_tower_low.vision_tower((no_aa - 0.5) / 0.5)
    assert high.shape == (2, vcfg.num_tokens, vcfg.out_dims[0])
    assert low.shape == (2, vcfg.num_tokens, vcfg.out_dims[1])
    torch.testing.assert_close(high, want_high)
    torch.testing.assert_close(low, want_low)
    assert (low - low_no_aa).abs().max() > 1e-4                # antialias actually matters here
    assert len(tower.blocks()) == sam.num_layers + sig.num_layers
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        tower(torch.rand(1, 3, 32, 32))


def test_siglip_tower_normalises_and_returns_one_tuple():
    vcfg = get_config("tiny").vision
    tower = VisionTower(vcfg)
    pix = torch.rand(2, 3, 48, 48)
    out = tower(pix)
    assert isinstance(out, tuple) and len(out) == 1
    assert out[0].shape == (2, vcfg.num_tokens, vcfg.siglip.hidden_size)
    torch.testing.assert_close(out[0], tower.vision_tower((pix - 0.5) / 0.5))


def test_hybrid_backward_gives_finite_grads_everywhere():
    vcfg = get_config("tiny-hybrid").vision
    tower = VisionTower(vcfg)                                   # fresh init: hd_alpha = 0
    assert tower.vision_tower_high.vision_tower.hd_alpha_downsamples.item() == 0.0
    pix = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    unused = ("high_layer_norm.", "low_layer_norm.", "vision_tower_low.vision_tower.attn_pool.")
    for alpha in (0.0, 0.5):
        tower.zero_grad(set_to_none=True)
        with torch.no_grad():
            tower.vision_tower_high.vision_tower.hd_alpha_downsamples.fill_(alpha)
        high, low = tower(pix)
        (high.square().mean() + low.square().mean() + high.sum() * 1e-2).backward()
        for name, p in tower.named_parameters():
            if name.startswith(unused):
                assert p.grad is None, f"{name} is documented unused but got a gradient"
                continue
            assert p.grad is not None, f"{name}: no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        alpha_grad = tower.vision_tower_high.vision_tower.hd_alpha_downsamples.grad
        assert alpha_grad.abs().item() > 0                     # d out / d alpha = hd path != 0
        hd_grad = tower.vision_tower_high.vision_tower.neck_hd[0].weight.grad.abs().max().item()
        assert (hd_grad > 0) == (alpha > 0)


# ---- the released manifest ---------------------------------------------------------------------

def test_ursa8b_manifest_names_shapes_and_counts():
    rows = [line.rstrip("\n").split("\t") for line in FIXTURE.read_text().splitlines()
            if line.startswith("vision_model.")]
    want = [(name[len("vision_model."):], tuple(int(d) for d in shape.split("x"))) for name, shape, _ in rows]
    assert sum(int(n) for _, _, n in rows) == 96_356_609 + 316_283_904 + 4_096
    with torch.device("meta"):
        tower = VisionTower(get_config("ursa-8b").vision)
    got = [(k, tuple(v.shape)) for k, v in tower.state_dict().items()]
    assert set(got) == set(want)
    assert got == want                                          # same order as the released file
    count = lambda prefix: sum(v.numel() for k, v in tower.state_dict().items() if k.startswith(prefix))
    assert count("vision_tower_high.") == 96_356_609
    assert count("vision_tower_low.") == 316_283_904
    assert count("high_layer_norm.") + count("low_layer_norm.") == 4_096
    assert len(tower.blocks()) == 12 + 24


# ---- preprocessing -----------------------------------------------------------------------------

def two_colour(w, h):
    """Left half red, right half blue (wide), or top red / bottom blue (tall)."""
    im = Image.new("RGB", (w, h), (255, 0, 0))
    im.paste((0, 0, 255), (w // 2, 0, w, h) if w >= h else (0, h // 2, w, h))
    return im


def as_uint8(t):
    return (t * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()      # [S, S, 3]


def test_wide_image_resized_long_side_and_padded_with_clip_mean():
    vcfg = get_config("tiny-hybrid").vision                    # canvas 64
    a = as_uint8(preprocess(two_colour(40, 20), vcfg))        # -> 64 x 32 content, rows 16..47
    assert a.shape == (64, 64, 3)
    assert (a[:16] == CLIP_FILL).all() and (a[48:] == CLIP_FILL).all()
    assert (a[16:48, :26] == (255, 0, 0)).all() and (a[16:48, 38:] == (0, 0, 255)).all()


def test_tall_image_and_min_side():
    vcfg = get_config("tiny-hybrid").vision
    a = as_uint8(preprocess(two_colour(20, 40), vcfg))        # -> 32 x 64 content, columns 16..47
    assert (a[:, :16] == CLIP_FILL).all() and (a[:, 48:] == CLIP_FILL).all()
    assert (a[:26, 16:48] == (255, 0, 0)).all() and (a[38:, 16:48] == (0, 0, 255)).all()
    b = as_uint8(preprocess(Image.new("RGB", (100, 2), (0, 255, 0)), vcfg))
    rows = np.where((b == (0, 255, 0)).all(-1).all(-1))[0]   # 2 * 64 / 100 -> 1, raised to 14 rows
    assert rows.tolist() == list(range(25, 39))


def test_square_siglip_image_passes_bit_exact_and_siglip_fill():
    vcfg = get_config("tiny").vision                          # canvas 48, mean 0.5 -> fill 127
    arr = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    t = preprocess(Image.fromarray(arr), vcfg)
    assert t.dtype == torch.float32 and t.shape == (3, 48, 48)
    assert torch.equal(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    a = as_uint8(preprocess(Image.new("RGB", (48, 24), (9, 9, 9)), vcfg))
    assert (a[:12] == 127).all() and (a[36:] == 127).all() and (a[12:36] == 9).all()
    batch = preprocess_batch([Image.fromarray(arr), Image.new("RGB", (10, 30))], vcfg)
    assert batch.shape == (2, 3, 48, 48)
    with pytest.raises(ValueError, match="empty"):
        preprocess_batch([], vcfg)


def test_empty_image_raises_naming_the_size():
    with pytest.raises(ValueError, match="0x5"):
        preprocess(Image.new("RGB", (0, 5)), get_config("tiny").vision)


def test_modes_convert_to_rgb():
    vcfg = get_config("tiny").vision                          # 48 x 48: no resampling
    rgba = np.zeros((48, 48, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)         # transparent -> white
    rgba[0, 1] = (10, 20, 30, 255)       # opaque -> itself
    rgba[0, 2] = (0, 0, 200, 128)        # half -> blend with white
    a = as_uint8(preprocess(Image.fromarray(rgba, "RGBA"), vcfg))
    assert a[0, 0].tolist() == [255, 255, 255] and a[0, 1].tolist() == [10, 20, 30]
    blend = 255 * (1 - 128 / 255) + np.array([0, 0, 200]) * 128 / 255
    assert np.abs(a[0, 2].astype(float) - blend).max() <= 1
    la = Image.fromarray(np.dstack([np.full((48, 48), 40, np.uint8), np.zeros((48, 48), np.uint8)]), "LA")
    assert (as_uint8(preprocess(la, vcfg)) == 255).all()
    gray = as_uint8(preprocess(Image.fromarray(np.full((48, 48), 77, np.uint8), "L"), vcfg))
    assert (gray == 77).all()
    pal = Image.new("P", (48, 48), 1)
    pal.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    assert (as_uint8(preprocess(pal, vcfg)) == (12, 34, 56)).all()
    pal.info["transparency"] = 1                              # palette entry 1 transparent -> white
    assert (as_uint8(preprocess(pal, vcfg)) == 255).all()
    cmyk = Image.new("CMYK", (48, 48), (0, 255, 255, 0))      # pure red in CMYK
    assert (as_uint8(preprocess(cmyk, vcfg)) == (255, 0, 0)).all()
    with pytest.raises(TypeError, match="PIL"):
        preprocess(np.zeros((4, 4, 3)), vcfg)
