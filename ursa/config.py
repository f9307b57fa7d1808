"""Dataclass configs for the URSA model and its presets.

The model is LLaVA-style (docs/paper.md, "The released architecture"):

    vision tower  ->  projector ("aligner")  ->  Qwen2 decoder ("language_model")

Presets
    micro        a few thousand parameters, for unit tests
    tiny         the toy world's model: trains in minutes on 2 CPU cores (SigLIP-style ViT)
    tiny-hybrid  the released hybrid SAM-B + SigLIP tower, scaled down, for tests
    ursa-8b      the released URSA-8B numbers (8,044,783,361 parameters)
    ursa-rm-8b   URSA-RM-8B: ursa-8b plus the scalar value head `score`

State-dict names follow the released URSA checkpoints (`vision_model.*`, `aligner.*`,
`language_model.model.layers.N.*`, `language_model.lm_head.*`, `score.*`), so a released file loads
with the identity map; ursa/weights.py maps the Hugging Face Qwen2 / SigLIP layouts onto them.

Parameter counts and the FSDP2 memory plan of a preset: `python -m ursa.memory ursa-8b` (ursa/memory.py).
This module imports only the standard library.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ViTConfig:
    """A SigLIP-style ViT in timm layout (patch_embed.proj, pos_embed, blocks.N, norm); no class token."""
    image_size: int = 48            # input side in pixels (square)
    patch_size: int = 12
    hidden_size: int = 96
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    layer_norm_eps: float = 1e-6
    gelu: str = "tanh"              # "tanh" (HF SigLIP) or "erf" (timm SigLIP inside URSA-8B)
    attn_pool: bool = False         # the released low tower saves an unused attention-pool head
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass
class SamConfig:
    """SAM-B image encoder (ViTDet-style) of the high-resolution branch (docs/paper.md, "The released architecture")."""
    image_size: int = 1024
    patch_size: int = 16
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    window_size: int = 14
    global_layers: tuple = (2, 5, 8, 11)
    neck_dim: int = 256
    resize_to: int = 96             # bilinear resize of the neck output before the downsamples
    downsample_dims: tuple = (512, 1024)
    layer_norm_eps: float = 1e-6
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)   # CLIP mean
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)   # CLIP std

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def out_grid(self) -> int:      # two stride-2 convs after the resize
        g = self.resize_to
        for _ in self.downsample_dims:
            g = (g + 1) // 2
        return g


@dataclass
class VisionConfig:
    kind: str = "siglip"            # "siglip" (one ViT) or "hybrid" (SAM-B high + SigLIP low)
    siglip: ViTConfig = field(default_factory=ViTConfig)
    sam: Optional[SamConfig] = None  # only for kind == "hybrid"

    @property
    def image_size(self) -> int:    # the canvas the preprocessor produces
        return self.sam.image_size if self.kind == "hybrid" else self.siglip.image_size

    @property
    def num_tokens(self) -> int:    # positions one <|image|> placeholder expands to
        return self.siglip.num_patches

    @property
    def out_dims(self) -> tuple:    # feature width(s) handed to the projector
        if self.kind == "hybrid":
            return (self.sam.downsample_dims[-1], self.siglip.hidden_size)
        return (self.siglip.hidden_size,)


@dataclass
class ProjectorConfig:
    """"mlp": LLaVA's mlp2x_gelu, layers = [Linear(in, out), GELU, Linear(out, out)].
    "hybrid_split": URSA's low_high_hybrid_split_mlp_gelu:
        z = layers.1(GELU([high_up_proj(x_sam) ; low_up_proj(x_siglip)])), each up_proj -> out/2."""
    kind: str = "mlp"
    out_dim: int = 128


@dataclass
class LMConfig:
    """Qwen2 decoder (Qwen2.5-Math-7B-Instruct at full size)."""
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    image_token_id: int = 3         # <|image|>; 151665 in the released tokenizer
    value_head: bool = False        # PRM: dropout -> Linear(hidden, 1) named `score`
    value_head_dropout: float = 0.1
    name: str = "custom"

    # ---- (de)serialisation: config.json -------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "ModelConfig":
        return _build(cls, d, where)

    def validate(self) -> "ModelConfig":
        lm, v = self.lm, self.vision
        if lm.hidden_size % lm.num_heads or lm.num_heads % lm.num_kv_heads:
            raise ValueError(f"lm: hidden_size {lm.hidden_size} / num_heads {lm.num_heads} / "
                             f"num_kv_heads {lm.num_kv_heads} must divide evenly")
        if v.kind not in ("siglip", "hybrid"):
            raise ValueError(f"vision.kind must be 'siglip' or 'hybrid', got {v.kind!r}")
        if v.kind == "hybrid" and v.sam is None:
            raise ValueError("vision.kind 'hybrid' needs vision.sam")
        if v.siglip.image_size % v.siglip.patch_size:
            raise ValueError(f"vision.siglip: image_size {v.siglip.image_size} is not a multiple "
                             f"of patch_size {v.siglip.patch_size}")
        if v.kind == "hybrid" and v.sam.out_grid ** 2 != v.num_tokens:
            raise ValueError(f"hybrid tower: SAM yields {v.sam.out_grid ** 2} tokens but SigLIP "
                             f"{v.num_tokens}; they must agree")
        if self.projector.kind not in ("mlp", "hybrid_split"):
            raise ValueError(f"projector.kind must be 'mlp' or 'hybrid_split', got {self.projector.kind!r}")
        if (self.projector.kind == "hybrid_split") != (v.kind == "hybrid"):
            raise ValueError("projector 'hybrid_split' goes with vision 'hybrid' (and 'mlp' with 'siglip')")
        if self.projector.out_dim != lm.hidden_size:
            raise ValueError(f"projector.out_dim {self.projector.out_dim} != lm.hidden_size {lm.hidden_size}")
        if not 0 <= self.image_token_id < lm.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} outside vocab {lm.vocab_size}")
        return self


def _build(cls, d: Any, where: str):
    """Nested dataclass from a dict; unknown keys are an error naming the key."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}")
    kw = {}
    for k, v in d.items():
        sub = {"vision": VisionConfig, "siglip": ViTConfig, "sam": SamConfig,
               "projector": ProjectorConfig, "lm": LMConfig}.get(k)
        if sub is not None and v is not None:
            kw[k] = _build(sub, v, f"{where}.{k}")
        elif isinstance(v, list):
            kw[k] = tuple(v)
        else:
            kw[k] = v
    return cls(**kw)


# ---- presets ---------------------------------------------------------------------------------

def _micro() -> ModelConfig:
    return ModelConfig(
        name="micro",
        vision=VisionConfig(siglip=ViTConfig(image_size=16, patch_size=8, hidden_size=16,
                                             intermediate_size=32, num_layers=1, num_heads=2)),
        projector=ProjectorConfig(out_dim=32),
        lm=LMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, max_position_embeddings=256),
        image_token_id=3)


def _tiny() -> ModelConfig:
    # vocab_size is set from the trained toy tokenizer (ursa/tokenizer.py) before the model is built
    return ModelConfig(
        name="tiny",
        vision=VisionConfig(siglip=ViTConfig(image_size=48, patch_size=12, hidden_size=192,
                                             intermediate_size=768, num_layers=4, num_heads=4)),
        projector=ProjectorConfig(out_dim=160),
        lm=LMConfig(vocab_size=512, hidden_size=160, intermediate_size=432, num_layers=4,
                    num_heads=4, num_kv_heads=2, max_position_embeddings=512),
        image_token_id=3)


def _tiny_hybrid() -> ModelConfig:
    sam = SamConfig(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=4,
                    num_heads=2, window_size=3, global_layers=(1, 3), neck_dim=16, resize_to=16,
                    downsample_dims=(24, 32))
    sig = ViTConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=2, gelu="erf", attn_pool=True)
    return ModelConfig(
        name="tiny-hybrid",
        vision=VisionConfig(kind="hybrid", siglip=sig, sam=sam),
        projector=ProjectorConfig(kind="hybrid_split", out_dim=48),
        lm=LMConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=256),
        image_token_id=90)


def _ursa_8b() -> ModelConfig:
    return ModelConfig(
        name="ursa-8b",
        vision=VisionConfig(
            kind="hybrid",
            siglip=ViTConfig(image_size=384, patch_size=16, hidden_size=1024, intermediate_size=4096,
                             num_layers=24, num_heads=16, gelu="erf", attn_pool=True),
            sam=SamConfig()),
        projector=ProjectorConfig(kind="hybrid_split", out_dim=3584),
        lm=LMConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                    num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0,
                    max_position_embeddings=32768, tie_word_embeddings=False),
        image_token_id=151665)


def _ursa_rm_8b() -> ModelConfig:
    c = _ursa_8b()
    c.name, c.value_head = "ursa-rm-8b", True
    return c


PRESETS = {"micro": _micro, "tiny": _tiny, "tiny-hybrid": _tiny_hybrid,
           "ursa-8b": _ursa_8b, "ursa-rm-8b": _ursa_rm_8b}


def get_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]().validate()
