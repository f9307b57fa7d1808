"""FLOP counts of the model for MFU: per token (6N, PaLM) and per part (vision tower on its patches,
projector, decoder with causal attention), and a square matmul's, used by ursa.bench and
scripts/gpu_check.py; tests/test_parity.py and tests/test_lm.py check them against hand counts.
"""
from __future__ import annotations

from ursa.config import LMConfig, ModelConfig, ViTConfig


def train_flops_per_token(n_params: int, n_layers: int = 0, d_model: int = 0, seq_len: int = 0) -> float:
    """Training FLOPs per token (forward + backward): 6 N, plus PaLM's attention term 12 L d T
    (QK^T and AV, forward and backward, non-causal count) when n_layers, d_model, seq_len are given."""
    return 6.0 * n_params + 12.0 * n_layers * d_model * seq_len


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_s: float) -> float:
    """Model-FLOPs utilisation: flops_per_token * tokens_per_s / peak (a fraction, not a percent)."""
    return flops_per_token * tokens_per_s / peak_flops_per_s


def matmul_flops(n: int) -> float:
    """FLOPs of one [n, n] x [n, n] matmul: n^2 outputs, n multiply-adds each."""
    return 2.0 * n ** 3


def vit_forward_flops(v: ViTConfig) -> float:
    """Forward FLOPs of the SigLIP ViT on ONE image: patch embedding, per block q/k/v/proj and the
    MLP (2 x multiply-adds) and attention over its P patches (QK^T and AV: 2 x 2 x P^2 x D)."""
    P, D, I = v.num_patches, v.hidden_size, v.intermediate_size
    patch = 2.0 * P * (3 * v.patch_size ** 2) * D
    block = 2.0 * P * (4 * D * D + 2 * D * I) + 4.0 * P * P * D
    return patch + v.num_layers * block


def projector_forward_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs of the "mlp" projector on one image's rows: Linear(C, H), Linear(H, H)."""
    N, C, H = cfg.vision.num_tokens, cfg.vision.out_dims[0], cfg.projector.out_dim
    return 2.0 * N * (C * H + H * H)


def lm_forward_flops(c: LMConfig, seq_len: int) -> float:
    """Forward FLOPs of the decoder on one sequence of seq_len real tokens: every layer's matmuls
    and lm_head at every position, and causal attention (query t sees t + 1 keys: QK^T and AV are
    2 x 2 x (t + 1) x Hq x hd each; summed, 2 x Hq x hd x T (T + 1))."""
    H, hd = c.hidden_size, c.head_dim
    per_layer = H * (c.num_heads + 2 * c.num_kv_heads) * hd + c.num_heads * hd * H + 3 * H * c.intermediate_size
    matmuls = 2.0 * seq_len * (c.num_layers * per_layer + H * c.vocab_size)
    attention = c.num_layers * 2.0 * c.num_heads * hd * seq_len * (seq_len + 1)
    return matmuls + attention


def model_train_flops(cfg: ModelConfig, seq_lens, n_images: int) -> float:
    """Training FLOPs (3 x forward) of one step: n_images through the vision tower and projector,
    one LM pass per sequence of the given real lengths. The "siglip" tower only."""
    if cfg.vision.kind != "siglip":
        raise ValueError(f"model_train_flops counts the 'siglip' tower only, not {cfg.vision.kind!r}")
    vis = n_images * (vit_forward_flops(cfg.vision.siglip) + projector_forward_flops(cfg))
    return 3.0 * (vis + sum(lm_forward_flops(cfg.lm, int(t)) for t in seq_lens))
