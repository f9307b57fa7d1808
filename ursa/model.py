"""URSA: vision tower -> projector ("aligner") -> Qwen2 decoder, plus the PRM value head.

References: LLaVA (Liu et al. 2023) and nanoVLM for the three-part layout; the released URSA-8B
architecture (docs/paper.md) for the hybrid projector and the merge; URSA-RM-8B for the value head.

    pixels [n_img, 3, S, S] in [0, 1]
      -> vision_model (ursa/vision.py)  -> (features [n_img, N, C], ...)   (two branches if hybrid)
      -> aligner                        -> [n_img, N, H]
    input_ids [B, T] holds N copies of <|image|> per image (the tokenizer expands one placeholder
    to N positions); the projected rows replace the embeddings at exactly those positions, in
    row-major grid order, image after image.
      -> language_model                 -> hidden [B, T, H] -> lm_head -> logits [B, T, V]
      -> score (PRM only)               -> values [B, T]  (sigmoid(values) = step score at tag tokens)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ursa.config import ModelConfig
from ursa.lm import KVCache, Qwen2LM
from ursa.vision import VisionTower


class Projector(nn.Module):
    """"mlp": layers = Linear(C, H) -> GELU -> Linear(H, H)  (LLaVA mlp2x_gelu).
    "hybrid_split" (URSA-8B): z = [high_up_proj(x_sam) ; low_up_proj(x_siglip)] (high first),
    out = layers.1(GELU(z)); layers.0 is the GELU (no weights), as in the released names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.projector.kind
        H, dims = cfg.projector.out_dim, cfg.vision.out_dims
        if self.kind == "mlp":
            self.layers = nn.Sequential(nn.Linear(dims[0], H), nn.GELU(), nn.Linear(H, H))
        else:
            self.high_up_proj = nn.Linear(dims[0], H // 2)
            self.low_up_proj = nn.Linear(dims[1], H // 2)
            self.layers = nn.Sequential(nn.GELU(), nn.Linear(H, H))

    def forward(self, feats: tuple) -> torch.Tensor:
        if self.kind == "mlp":
            return self.layers(feats[0])                                       # [n, N, H]
        z = torch.cat([self.high_up_proj(feats[0]), self.low_up_proj(feats[1])], dim=-1)  # [n, N, H]
        return self.layers(z)


@dataclass
class ModelOutput:
    hidden: torch.Tensor                   # [B, T, H] after the final norm
    logits: Optional[torch.Tensor] = None  # [B, T, V]
    values: Optional[torch.Tensor] = None  # [B, T] value-head logits (PRM)


class URSAModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vision_model = VisionTower(cfg.vision)
        self.aligner = Projector(cfg)
        self.language_model = Qwen2LM(cfg.lm)
        if cfg.value_head:
            self.score_dropout = nn.Dropout(cfg.value_head_dropout)
            self.score = nn.Linear(cfg.lm.hidden_size, 1)

    # ---- the merge ---------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels [n_img, 3, S, S] in [0, 1] -> projected rows [n_img, N, H]."""
        S = self.cfg.vision.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(f"pixel_values must be [n_images, 3, {S}, {S}] in [0, 1] (see "
                             f"ursa.vision.preprocess), got {tuple(pixel_values.shape)}")
        return self.aligner(self.vision_model(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None):
        """Token embeddings with the image rows placed at the <|image|> positions: [B, T, H]."""
        emb = self.language_model.model.embed_tokens(input_ids)                # [B, T, H]
        is_img = input_ids == self.cfg.image_token_id                          # [B, T]
        n_pos = int(is_img.sum())
        if pixel_values is None:
            if n_pos:
                raise ValueError(f"input has {n_pos} <|image|> positions but no pixel_values")
            return emb
        feats = self.image_features(pixel_values)                              # [n_img, N, H]
        if n_pos != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"input has {n_pos} <|image|> positions but {feats.shape[0]} image(s) x "
                             f"{feats.shape[1]} tokens = {feats.shape[0] * feats.shape[1]} rows")
        # boolean-mask assignment fills positions in row-major (batch, time) order
        emb = emb.masked_scatter(is_img[..., None], feats.reshape(-1, feats.shape[-1]).to(emb.dtype))
        return emb

    def forward(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                cache: Optional[KVCache] = None, logits: bool = True, values: bool = False,
                checkpoint_fn=None) -> ModelOutput:
        x = self.embed(input_ids, pixel_values)
        h = self.language_model(x, attention_mask, position_ids, cache, checkpoint_fn=checkpoint_fn)
        out = ModelOutput(hidden=h)
        if logits:
            out.logits = self.language_model.head(h)
        if values:
            if not self.cfg.value_head:
                raise ValueError("this model has no value head (config value_head = false)")
            out.values = self.score(self.score_dropout(h)).squeeze(-1)         # [B, T]
        return out

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.cfg.lm, batch, max_len, p.dtype, p.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def init_weights(model: URSAModel, std: float = 0.02, seed: Optional[int] = None):
    """Normal(0, std) for Linear/Embedding weights, zeros for biases, ones for norms (Qwen2 init)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:                   # norm weights, scalars
                if "hd_alpha" in name:
                    p.zero_()
                else:
                    p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# The fresh PRM head (Stage II starts from the SFT policy, which has none): Normal(0, 0.02) is the
# std init_weights gives every Linear (Qwen2's initializer_range), so the head's logits start near 0
# and every step score near 0.5; a zero bias adds no prior toward "correct" or "wrong".
VALUE_HEAD_STD = 0.02


def value_head_tensors(hidden_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(score.weight [1, hidden_size] ~ Normal(0, VALUE_HEAD_STD), score.bias [1] = 0), fp32 on CPU,
    drawn from a torch.Generator seeded with `seed`: the same values on every call, on every
    machine and device, and the global RNG is never touched."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, hidden_size), generator=g) * VALUE_HEAD_STD, torch.zeros(1)


def init_value_head(model: URSAModel, seed: int = 0) -> URSAModel:
    """Set model.score to value_head_tensors(hidden, seed) (cast to the head's dtype and device)."""
    if not model.cfg.value_head:
        raise ValueError("init_value_head: this model has no value head (config value_head = false)")
    w, b = value_head_tensors(model.cfg.lm.hidden_size, seed)
    with torch.no_grad():
        model.score.weight.copy_(w)
        model.score.bias.copy_(b)
    return model
