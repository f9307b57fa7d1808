"""Vision towers of URSA: a SigLIP ViT, the SAM-B ViTDet encoder, the hybrid tower, preprocessing.

The released URSA-8B architecture (docs/paper.md, "The released architecture"):

    pixels in [0, 1], 1024 x 1024 (preprocess: long side -> 1024, bicubic, pad with the CLIP mean)
      |-- (x - CLIP mean) / CLIP std -------------> SAM-B ViTDet -> neck -> resize 96 -> 2 stride-2
      |                                              convs (+ alpha * the high-detail path) -> [B, 576, 1024]
      '-- bilinear resize to 384, (x - .5) / .5 --> SigLIP-L/16 (timm layout, final norm) -> [B, 576, 1024]

The tower returns the two feature maps as a tuple (high, low); the projector (ursa/model.py) mixes them.
The "siglip" kind (the toy model) is one SigLIP-style ViT and returns a 1-tuple.

References: ViT (Dosovitskiy et al. 2021), SigLIP (Zhai et al. 2023; timm's `vit_large_patch16_siglip_384`
layout), SAM (Kirillov et al. 2023) image encoder, ViTDet windowed attention with decomposed relative
positions (Li et al. 2022, MViTv2 eq. 4), the DeepSeek-VL hybrid tower that URSA-8B reuses. The code here
is written from those descriptions; the parameter names equal the released checkpoint's
(tests/fixtures/ursa8b_weights.tsv, prefix `vision_model.`), so a released file loads with the identity map.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ursa.config import SamConfig, ViTConfig, VisionConfig
from ursa.lm import compute_dtype, fast_path, matmul_attention


# ---- small shared pieces ---------------------------------------------------------------------

def make_gelu(kind: str) -> nn.Module:
    """GELU with the exact erf form ("erf": timm / SAM) or the tanh approximation ("tanh": HF SigLIP)."""
    if kind == "erf":
        return nn.GELU()
    if kind == "tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"vision: gelu must be 'erf' or 'tanh', got {kind!r}")


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel. x: [B, 3, H, W] -> [B, 3, H, W].
    The constants are made on the fly (not buffers) so a tower built on the meta device needs nothing
    but its state_dict to become real."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)  # [1, 3, 1, 1]
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)   # [1, 3, 1, 1]
    return (x - m) / s


def resize_bilinear(x: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """Bilinear resize (align_corners False) to size x size, computed in float32 (bf16-safe).
    x: [B, C, H, W] -> [B, C, size, size]."""
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=antialias).to(x.dtype)


def _check_pixels(x: torch.Tensor, size: int, who: str) -> None:
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
        raise ValueError(f"{who}: expected pixels [B, 3, {size}, {size}], got {list(x.shape)}")


class PatchEmbed(nn.Module):
    """Non-overlapping patches: Conv2d(3 -> D, kernel = stride = patch, bias). [B, 3, H, W] -> [B, D, h, w]."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# ---- SigLIP ViT (timm layout) ----------------------------------------------------------------

class SiglipAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection. x: [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vision: hidden_size {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # [B, N, 3, H, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                           # 3 x [B, H, N, hd]
        if fast_path(x.device, compute_dtype(x), N, N, B).kernel == "matmul":   # the decoder's rule
            x = matmul_attention(q, k, v)                                         # [B, H, N, hd]
        else:
            x = F.scaled_dot_product_attention(q, k, v)                           # [B, H, N, hd]
        x = x.transpose(1, 2).reshape(B, N, D)                                    # [B, N, D]
        return self.proj(x)


class SiglipMlp(nn.Module):
    """fc1 -> GELU -> fc2. [..., D] -> [..., D]."""

    def __init__(self, dim: int, hidden: int, gelu: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_gelu(gelu)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipBlock(nn.Module):
    """Pre-norm transformer block: x += attn(norm1(x)); x += mlp(norm2(x)). [B, N, D] -> [B, N, D]."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.attn = SiglipAttention(D, cfg.num_heads)
        self.norm2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMlp(D, cfg.intermediate_size, cfg.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPoolLatent(nn.Module):
    """timm's attention-pooling head (a learned latent query attends over the tokens), kept ONLY so the
    released checkpoint's `attn_pool.*` tensors have a home. URSA uses the token map, not a pooled
    vector, so this module is saved and loaded but never called (it has no forward on purpose)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.latent = nn.Parameter(torch.zeros(1, 1, D))
        self.q = nn.Linear(D, D)
        self.kv = nn.Linear(D, 2 * D)
        self.proj = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMlp(D, cfg.intermediate_size, cfg.gelu)


class SiglipViT(nn.Module):
    """SigLIP-style ViT, timm layout, no class token, no pooling; the final `norm` is applied.

    forward(x: [B, 3, S, S], already normalised) -> [B, P, D], P = (S / patch)^2, row-major patches."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"vision.siglip: image_size {cfg.image_size} is not a multiple of "
                             f"patch_size {cfg.patch_size}")
        self.cfg = cfg
        D = cfg.hidden_size
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, D))
        self.patch_embed = PatchEmbed(cfg.patch_size, D)
        self.blocks = nn.ModuleList(SiglipBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        if cfg.attn_pool:
            self.attn_pool = AttentionPoolLatent(cfg)   # saved, NOT used in forward (see its docstring)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm-style: trunc-normal(0.02) Linear weights and position embedding, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if self.cfg.attn_pool:
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.cfg.hidden_size ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_pixels(x, self.cfg.image_size, "SiglipViT")
        x = self.patch_embed(x)                  # [B, D, g, g]
        x = x.flatten(2).transpose(1, 2)         # [B, P, D], row-major
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ---- SAM-B ViTDet: windows and decomposed relative positions ------------------------------------

def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad the bottom/right to multiples of `window`, then cut into non-overlapping windows.

    x: [B, H, W, C] -> (windows [B * nH * nW, window, window, C], (Hp, Wp)); windows are ordered
    batch-major, then window row, then window column. No mask is made: pad tokens take part in attention."""
    B, H, W, C = x.shape
    pad_h, pad_w = (-H) % window, (-W) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))                     # [B, Hp, Wp, C]
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window, window, Wp // window, window, C)     # [B, nH, w, nW, w, C]
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C)   # [B * nH * nW, w, w, C]
    return x, (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window: int, pad_hw: tuple[int, int],
                       hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of window_partition: merge windows and crop the padding away.

    windows: [B * nH * nW, window, window, C] -> [B, H, W, C]."""
    (Hp, Wp), (H, W) = pad_hw, hw
    nH, nW = Hp // window, Wp // window
    B = windows.shape[0] // (nH * nW)
    x = windows.view(B, nH, nW, window, window, -1)                  # [B, nH, nW, w, w, C]
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)           # [B, Hp, Wp, C]
    return x[:, :H, :W, :].contiguous()                              # [B, H, W, C]


def get_rel_pos(size: int, table: torch.Tensor) -> torch.Tensor:
    """R[i, j] = table[i - j + size - 1] for query/key coordinates i, j along one axis.

    table: [2 * size - 1, hd] -> [size, size, hd]. The tables always match the grid here (windows use
    the window size, global blocks the full grid), so there is no interpolation."""
    if table.shape[0] != 2 * size - 1:
        raise ValueError(f"relative-position table has {table.shape[0]} rows; a grid side of {size} "
                         f"needs {2 * size - 1}")
    pos = torch.arange(size, device=table.device)
    idx = pos[:, None] - pos[None, :] + (size - 1)                   # [size, size]
    return table[idx]                                                # [size, size, hd]


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 hw: tuple[int, int]) -> torch.Tensor:
    """Decomposed relative-position term of ViTDet / SAM (MViTv2 eq. 4), added to the attention logits.

    For query (qi, qw) and key (ki, kw): bias = q . R_h[qi, ki] + q . R_w[qw, kw], with the UNSCALED q.
    q: [..., N, hd] with N = h * w (row-major) -> [..., N, N] (query index, key index)."""
    h, w = hw
    Rh = get_rel_pos(h, rel_pos_h)                                   # [h, h, hd]
    Rw = get_rel_pos(w, rel_pos_w)                                   # [w, w, hd]
    lead, hd = q.shape[:-2], q.shape[-1]
    r_q = q.reshape(*lead, h, w, hd)                                 # [..., h, w, hd]
    rel_h = torch.einsum("...ijc,ikc->...ijk", r_q, Rh)              # [..., h, w, kh]
    rel_w = torch.einsum("...ijc,jkc->...ijk", r_q, Rw)              # [..., h, w, kw]
    bias = rel_h[..., :, None] + rel_w[..., None, :]                 # [..., h, w, kh, kw]
    return bias.reshape(*lead, h * w, h * w)                         # [..., N, N]


class SamAttention(nn.Module):
    """Attention over a 2-D grid with decomposed relative positions; logits = (q * hd^-0.5) k^T + bias.

    x: [B, h, w, D] -> [B, h, w, D]. `grid` is the side the rel-pos tables are built for (the window
    size, or the full grid for a global block)."""

    def __init__(self, dim: int, num_heads: int, grid: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vision.sam: hidden_size {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, D = x.shape
        N, H = h * w, self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, H, D // H)                  # [B, N, 3, H, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # 3 x [B, H, N, hd]
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))  # [B, H, N, N], unscaled q
        # SDPA's default scale is hd^-0.5 and a float mask is added after scaling: (q s) k^T + bias
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # [B, H, N, hd]
        x = x.transpose(1, 2).reshape(B, h, w, D)                      # [B, h, w, D]
        return self.proj(x)


class SamMlp(nn.Module):
    """lin1 -> GELU (erf) -> lin2. [..., D] -> [..., D]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class SamBlock(nn.Module):
    """ViTDet block: x += Attn(LN1(x)) (in windows, or global when window == 0); x += MLP(LN2(x)).

    x: [B, G, G, D] (channel-last) -> [B, G, G, D]."""

    def __init__(self, cfg: SamConfig, window: int):
        super().__init__()
        D = cfg.hidden_size
        self.window_size = window
        self.norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.attn = SamAttention(D, cfg.num_heads, window if window > 0 else cfg.grid)
        self.norm2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = SamMlp(D, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            x, pad_hw = window_partition(x, self.window_size)   # [B * nW, w, w, D] (zero-padded)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, pad_hw, hw)  # [B, G, G, D]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a [B, C, H, W] map (computed in float32)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        u = xf.mean(1, keepdim=True)                                   # [B, 1, H, W]
        s = (xf - u).pow(2).mean(1, keepdim=True)                      # [B, 1, H, W]
        xf = (xf - u) / torch.sqrt(s + self.eps)
        return (self.weight[:, None, None] * xf + self.bias[:, None, None]).to(x.dtype)


def make_neck(cfg: SamConfig) -> nn.Sequential:
    """conv1x1 D -> neck (no bias), LayerNorm2d, conv3x3 pad 1 (no bias), LayerNorm2d: indices 0..3."""
    n = cfg.neck_dim
    return nn.Sequential(
        nn.Conv2d(cfg.hidden_size, n, kernel_size=1, bias=False),
        LayerNorm2d(n, cfg.layer_norm_eps),
        nn.Conv2d(n, n, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(n, cfg.layer_norm_eps),
    )


class SamViT(nn.Module):
    """SAM-B image encoder with URSA's (DeepSeek-VL's) downsampling head and high-detail path.

    forward(x: [B, 3, S, S], already normalised with the CLIP mean/std) -> [B, out_grid^2, C_out]:
        main = downsamples(resize(neck(last block)))
        hd   = downsamples(resize(neck_hd(first global block)))      (the SAME downsample convs)
        out  = main + hd_alpha_downsamples * hd, flattened row-major.
    hd_alpha_downsamples starts at 0 (as in DeepSeek-VL), so a fresh tower begins on the main path
    alone; the released checkpoint holds the trained value."""

    def __init__(self, cfg: SamConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"vision.sam: image_size {cfg.image_size} is not a multiple of "
                             f"patch_size {cfg.patch_size}")
        if not cfg.global_layers or any(not 0 <= i < cfg.num_layers for i in cfg.global_layers):
            raise ValueError(f"vision.sam: global_layers {cfg.global_layers} must be a non-empty list of "
                             f"block indices below num_layers {cfg.num_layers}")
        if not cfg.downsample_dims:
            raise ValueError("vision.sam: downsample_dims must list at least one width")
        self.cfg = cfg
        D, G = cfg.hidden_size, cfg.grid
        self.pos_embed = nn.Parameter(torch.zeros(1, G, G, D))       # channel-last, no interpolation
        self.hd_alpha_downsamples = nn.Parameter(torch.zeros(1))
        self.patch_embed = PatchEmbed(cfg.patch_size, D)
        self.blocks = nn.ModuleList(
            SamBlock(cfg, 0 if i in cfg.global_layers else cfg.window_size) for i in range(cfg.num_layers))
        self.neck = make_neck(cfg)
        dims = (cfg.neck_dim,) + tuple(cfg.downsample_dims)
        self.downsamples = nn.ModuleList(
            nn.Conv2d(dims[i], dims[i + 1], kernel_size=3, stride=2, padding=1, bias=False)
            for i in range(len(cfg.downsample_dims)))
        self.neck_hd = make_neck(cfg)
        self.first_global = min(cfg.global_layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Trunc-normal(0.02) Linear weights and position embedding, zero biases; rel-pos tables and
        hd_alpha_downsamples start at zero (as in SAM / DeepSeek-VL); convs keep PyTorch's default."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.hd_alpha_downsamples)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, SamAttention):
                nn.init.zeros_(m.rel_pos_h)
                nn.init.zeros_(m.rel_pos_w)

    def head(self, neck: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """neck -> bilinear resize -> the stride-2 downsample convs (no activation between).
        x: [B, G, G, D] -> [B, C_out, out_grid, out_grid]."""
        x = neck(x.permute(0, 3, 1, 2))                               # [B, neck, G, G]
        x = resize_bilinear(x, self.cfg.resize_to)                    # [B, neck, R, R]
        for conv in self.downsamples:
            x = conv(x)                                               # [B, C_i, ceil(R/2), ceil(R/2)]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_pixels(x, self.cfg.image_size, "SamViT")
        x = self.patch_embed(x).permute(0, 2, 3, 1)                   # [B, G, G, D]
        x = x + self.pos_embed
        first_global = None
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == self.first_global:
                first_global = x                                      # [B, G, G, D]
        main = self.head(self.neck, x)                                # [B, C, g, g]
        hd = self.head(self.neck_hd, first_global)                    # [B, C, g, g]
        out = main + self.hd_alpha_downsamples.to(main.dtype) * hd
        return out.flatten(2).transpose(1, 2)                         # [B, g*g, C], row-major


# ---- the tower the model calls -----------------------------------------------------------------

class Branch(nn.Module):
    """One branch of the hybrid tower: [0, 1] pixels -> (optional bilinear antialiased resize) ->
    normalise -> `vision_tower`. The wrapper exists for the released names
    (`vision_tower_high.vision_tower.*`, `vision_tower_low.vision_tower.*`)."""

    def __init__(self, tower: nn.Module, image_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.vision_tower = tower
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = resize_bilinear(x, self.image_size, antialias=True)   # [B, 3, s, s]
        return self.vision_tower(normalize(x, self.mean, self.std))


class VisionTower(nn.Module):
    """The vision tower of the model (held as `vision_model`).

    forward(pixels: [B, 3, S, S] in [0, 1], S = cfg.image_size) ->
        kind "siglip": (features [B, P, D],)
        kind "hybrid": (high [B, N, C_high], low [B, N, C_low]), N = cfg.num_tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "siglip":
            self.vision_tower = SiglipViT(cfg.siglip)
        elif cfg.kind == "hybrid":
            if cfg.sam is None:
                raise ValueError("vision.kind 'hybrid' needs vision.sam")
            sam, sig = cfg.sam, cfg.siglip
            self.vision_tower_high = Branch(SamViT(sam), sam.image_size, sam.image_mean, sam.image_std)
            self.vision_tower_low = Branch(SiglipViT(sig), sig.image_size, sig.image_mean, sig.image_std)
            # saved in the released checkpoint but never applied there either: kept for loading only
            self.high_layer_norm = nn.LayerNorm(sam.downsample_dims[-1])
            self.low_layer_norm = nn.LayerNorm(sig.hidden_size)
        else:
            raise ValueError(f"vision.kind must be 'siglip' or 'hybrid', got {cfg.kind!r}")

    def blocks(self) -> list[nn.Module]:
        """Every transformer block (SAM and SigLIP), for activation checkpointing / FSDP wrapping."""
        if self.cfg.kind == "siglip":
            return list(self.vision_tower.blocks)
        return list(self.vision_tower_high.vision_tower.blocks) + list(self.vision_tower_low.vision_tower.blocks)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _check_pixels(pixels, self.cfg.image_size, f"VisionTower ({self.cfg.kind})")
        if self.cfg.kind == "siglip":
            x = normalize(pixels, self.cfg.siglip.image_mean, self.cfg.siglip.image_std)
            return (self.vision_tower(x),)
        return (self.vision_tower_high(pixels), self.vision_tower_low(pixels))


# ---- preprocessing -----------------------------------------------------------------------------

MIN_SIDE = 14   # the official processor keeps each side of the resized image at least 14 px


WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")   # more than 8 bits per pixel, one channel
U16_TO_U8 = 257                                             # 65535 / 257 = 255


def _wide_to_l(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image -> 8-bit "L", scaled, never clipped:
    16-bit modes and integer values above 255 (up to 65535) are divided by 257; floats in [0, 1]
    are multiplied by 255; values already in 0..255 are kept. Anything else (negative values, more
    than 16 bits) is refused: a silent clip would make the image all white."""
    a = np.asarray(image, dtype=np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0:
        raise ValueError(f"{image.mode} image with values in [{lo}, {hi}]: cannot map to 8 bits")
    if image.mode.startswith("I;16") or (image.mode == "I" and hi > 255):
        if hi > 65535:
            raise ValueError(f"{image.mode} image with values up to {hi:.0f}: more than 16 bits")
        a = a / U16_TO_U8
    elif image.mode == "F" and hi <= 1.0:
        a = a * 255.0
    elif hi > 255:
        raise ValueError(f"{image.mode} image with values up to {hi}: cannot map to 8 bits")
    return Image.fromarray(np.rint(a).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency (RGBA, LA, PA, P/L/RGB with a transparent colour) is
    composited on white; 16-bit / 32-bit / float greyscale is scaled to 8 bits (_wide_to_l); other
    modes (L, P, CMYK, 1, ...) go through PIL's convert."""
    if image.mode in WIDE_MODES:
        image = _wide_to_l(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_and_pad(image: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """Resize so the long side is `size` (each side at least min(14, size) px; int() truncation as in
    the official processor), PIL bicubic, then paste centred on a size x size canvas of `fill`.
    A size x size image is returned unchanged."""
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ValueError(f"image of size {w}x{h} (width x height) has an empty side; cannot preprocess")
    if (w, h) == (size, size):
        return image
    long_side, min_side = max(w, h), min(MIN_SIDE, size)
    new_w = max(int(w / long_side * size), min_side)
    new_h = max(int(h / long_side * size), min_side)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(image, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def canvas_spec(cfg: VisionConfig) -> tuple[int, tuple[int, int, int]]:
    """(canvas side, pad colour) for the tower: SAM size and int(255 * CLIP mean) for "hybrid",
    SigLIP size and int(255 * its mean) for "siglip"."""
    if cfg.kind == "hybrid":
        size, mean = cfg.sam.image_size, cfg.sam.image_mean
    else:
        size, mean = cfg.siglip.image_size, cfg.siglip.image_mean
    return size, tuple(int(255 * m) for m in mean)


def preprocess(image: Image.Image, cfg: VisionConfig) -> torch.Tensor:
    """PIL image -> float tensor [3, S, S] in [0, 1] (no normalisation: each branch does its own)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess: expected a PIL.Image.Image, got {type(image).__name__}")
    size, fill = canvas_spec(cfg)
    image = resize_and_pad(to_rgb(image), size, fill)
    arr = np.array(image, dtype=np.uint8)                             # [S, S, 3]
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)  # [3, S, S]


def preprocess_batch(images: Sequence[Image.Image], cfg: VisionConfig) -> torch.Tensor:
    """A list of PIL images -> [B, 3, S, S] in [0, 1]."""
    if len(images) == 0:
        raise ValueError("preprocess_batch: got an empty list of images")
    return torch.stack([preprocess(im, cfg) for im in images])
