"""The released models: load URSA-8B / URSA-RM-8B / URSA-8B-PS-GRPO in their Hugging Face layout, and
the public Qwen2.5 / SigLIP parts Stage I starts from. Generation on benchmark files and URSA-RM-8B
best-of-N live in ursa/benchmark_run.py; eval.py is the command line (docs/released_models.md).

References: the URSA paper (Luo, Zheng et al., "Unlocking Multimodal Mathematical Reasoning via
Process Reward Model", arXiv 2501.04686), its architecture section; URSA-MATH/URSA-MATH (official
code): vllm/.../configs/ursa.py and models/ursa.py (the config.json fields read below; the model
hard-codes <|image|> = 151665 and 576 image positions).

A released directory (what `huggingface-cli download URSA-MATH/URSA-8B` gives):

    config.json      {"model_type": "ursa", "image_token_index": 151665,
                      "text_config": {Qwen2 fields, read by ursa.weights.lm_config_from_hf},
                      "vision_config": {"cls": "HybridVisionTower", "params": {"concat_type": "tuple",
                          "high_res_cfg": {"model_name": "sam_b_downsample", "image_size": 1024,
                                           "output_dim": 1024, "pixel_mean": CLIP, "pixel_std": CLIP},
                          "low_res_cfg": {"model_name": "siglip_large_patch16_384", "image_size": 384,
                                          "output_dim": 1024, "pixel_mean": .5, "pixel_std": .5}}},
                      "aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": 1024,
                          "n_embed": 3584, "projector_type": "low_high_hybrid_split_mlp_gelu"}}}
    model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json   Qwen2.5's BPE plus <|image|> (id 151665)

A field that is absent falls back to the preset (`ursa-8b`, the released numbers) and the loader says
so (one warning; `model.release_info["fallbacks"]`). The vision ARCHITECTURE (depths, widths, heads,
windows) always comes from the preset: config.json only names it (`model_name`), and a name other
than the released ones is an error. Tensor names are the native names (identity plan); the RM is
recognised by its `score.weight`. Loading is strict and streams shard by shard into a model built on
the meta device, so host memory peaks at about the model plus one tensor.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch

from ursa import io
from ursa.config import ModelConfig, get_config
from ursa.model import URSAModel
from ursa.tokenizer import Tokenizer
from ursa.weights import (CheckpointError, Fields, Piece, check_plan, hf_qwen2_plan, hf_siglip_plan,
                          hf_siglip_root, identity_plan, lm_config_from_hf, stream_plan, vit_config_from_hf,
                          weight_files)

HIGH_TOWERS = ("sam_b_downsample",)              # official model names of the two branches
LOW_TOWERS = ("siglip_large_patch16_384",)
PROJECTOR_TYPE = "low_high_hybrid_split_mlp_gelu"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _read_json(path: Path) -> dict:
    try:
        return io.read_json(path, "config.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from None


# ================================================================================================
# config.json of a released directory -> ModelConfig
# ================================================================================================

def released_config(d: dict, has_score: bool, preset: str = "ursa-8b",
                    where: str = "config.json") -> tuple[ModelConfig, list[str], Optional[int]]:
    """A released config.json (dict) -> (ModelConfig, fallback notes, image_token_index or None).

    LM numbers come from text_config (or language_config) through ursa.weights.lm_config_from_hf;
    the vision architecture from the preset, with image sizes and pixel mean/std from vision_config;
    the projector is checked against aligner_config. Unsupported values (another projector type or
    depth, another tower, RoPE scaling, sliding-window attention) are errors naming the field."""
    cfg, notes = get_config(preset), []
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    cfg.name, cfg.value_head = f"released ({preset} architecture)", has_score
    src = f"preset {preset}"

    tkey = "text_config" if "text_config" in d else "language_config"
    if tkey not in d:
        notes.append(f"text_config absent: every LM number from preset {preset}")
    else:
        cfg.lm = lm_config_from_hf(d[tkey], where, f"{tkey}.", fallback=cfg.lm, notes=notes, source=src)

    if "vision_config" not in d:
        notes.append(f"vision_config absent: the hybrid tower of preset {preset}")
    else:
        vc = Fields(d["vision_config"], where, "vision_config.", notes, src)
        cls = vc.get("cls", "str", "HybridVisionTower")
        if "HybridVisionTower" not in cls:
            raise vc.error("cls", f"{cls!r} is not supported (HybridVisionTower)")
        params = Fields(vc.obj.get("params", {}), where, "vision_config.params.", notes, src)
        if params.get("concat_type", "str", "tuple") != "tuple":
            raise params.error("concat_type", "must be 'tuple'")
        sam, sig = cfg.vision.sam, cfg.vision.siglip
        for key, tower, names, out_dim in (("high_res_cfg", sam, HIGH_TOWERS, sam.downsample_dims[-1]),
                                           ("low_res_cfg", sig, LOW_TOWERS, sig.hidden_size)):
            b = Fields(params.obj.get(key, {}), where, f"vision_config.params.{key}.", notes, src)
            name = b.get("model_name", "str", names[0])
            if name not in names:
                raise b.error("model_name", f"{name!r} is not supported ({', '.join(names)})")
            tower.image_size = b.get("image_size", "posint", tower.image_size)
            tower.image_mean = b.get("pixel_mean", "triple", tuple(tower.image_mean))
            tower.image_std = b.get("pixel_std", "triple", tuple(tower.image_std))
            od = b.get("output_dim", "posint", out_dim)
            if od != out_dim:
                raise b.error("output_dim", f"{od} but the {preset} tower yields {out_dim}")

    if "aligner_config" not in d:
        notes.append(f"aligner_config absent: the {PROJECTOR_TYPE} projector of preset {preset}")
    else:
        ac = Fields(d["aligner_config"], where, "aligner_config.", notes, src)
        ap = Fields(ac.obj.get("params", {}), where, "aligner_config.params.", notes, src)
        checks = [("projector_type", "str", PROJECTOR_TYPE), ("depth", "posint", 2),
                  ("input_dim", "posint", cfg.vision.out_dims[0]), ("n_embed", "posint", cfg.lm.hidden_size)]
        for key, kind, want in checks:
            got = ap.get(key, kind, want)
            if got != want:
                raise ap.error(key, f"is {got!r}; this model needs {want!r}")
        if cfg.vision.out_dims[0] != cfg.vision.out_dims[1]:
            raise CheckpointError(f"{where}: the two towers yield {cfg.vision.out_dims}; input_dim must fit both")
    cfg.projector.out_dim = cfg.lm.hidden_size

    image_index = d.get("image_token_index", d.get("image_token_id"))
    if image_index is None:
        notes.append("image_token_index absent: the tokenizer's <|image|> id is used")
    try:
        cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg, notes, image_index


def load_released_tokenizer(model_dir) -> Tokenizer:
    """tokenizer.json of a released directory; without <|image|> (or the one-token step tag ' и')
    it is a one-line error naming the file (raised by ursa.tokenizer.Tokenizer)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing (a released directory holds Qwen2.5's tokenizer.json "
                              f"with <|image|>)")
    return Tokenizer.from_file(path)


def check_released(model_dir, preset: str = "ursa-8b", tok: Optional[Tokenizer] = None) -> dict:
    """Everything load_released checks, from the headers only (no weights read): returns
    {"cfg", "files", "notes", "kind", "num_params"}. tok: the directory's tokenizer (read if None)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    tok = tok or load_released_tokenizer(d)
    files = weight_files(d)
    cfg, notes, image_index = released_config(_read_json(d / "config.json"), "score.weight" in files,
                                              preset, str(d / "config.json"))
    if image_index is not None and image_index != tok.image_id:
        notes.append(f"config.json image_token_index {image_index} differs from the tokenizer's <|image|> "
                     f"id {tok.image_id}; the tokenizer's is used (the official code hard-codes 151665)")
    cfg.image_token_id = tok.image_id
    if tok.vocab_size > cfg.lm.vocab_size:
        raise CheckpointError(f"{d / 'tokenizer.json'}: {tok.vocab_size} tokens but the model's vocab_size "
                              f"is {cfg.lm.vocab_size}")
    with torch.device("meta"):
        meta = URSAModel(cfg)
    expected = {n: tuple(t.shape) for n, t in meta.state_dict().items()}
    check_plan(expected, files, identity_plan(files), set(), str(d))
    return {"cfg": cfg, "files": files, "notes": notes, "kind": "prm" if cfg.value_head else "policy",
            "num_params": sum(int(torch.Size(s).numel()) for s in expected.values())}


def inspect_released(model_dir, preset: str = "ursa-8b") -> str:
    """check_released as a one-paragraph report: kind, parameter count, files, every fallback."""
    info = check_released(model_dir, preset)
    layout = "URSA-RM-8B layout: value head `score`" if info["kind"] == "prm" else "URSA-8B layout"
    n_files = len({f for f, _ in info["files"].values()})
    text = (f"{model_dir}: {info['kind']} ({layout}), {info['num_params']:,} parameters in {n_files} "
            f"safetensors file(s); config.json, tokenizer.json and every tensor header check out (each "
            f"tensor present, used and of the right shape; weights not read).")
    if info["notes"]:
        text += f" Fallbacks to preset {preset}: " + "; ".join(info["notes"]) + "."
    else:
        text += " No field fell back to the preset."
    return text


def load_released(model_dir, dtype: torch.dtype = torch.bfloat16, device="cpu", preset: str = "ursa-8b",
                  quiet: bool = False) -> tuple[URSAModel, Tokenizer]:
    """A released URSA directory -> (model in eval mode, tokenizer). See the module docstring.

    The model is built on the meta device, cast to `dtype`, materialised with to_empty on `device`,
    then filled tensor by tensor, shard by shard (strictly; a NaN / inf tensor is refused by name).
    URSA-RM-8B (a `score.weight` in the files) gets the value head. Fallbacks to the preset are
    listed in model.release_info and warned about once unless quiet."""
    if dtype not in DTYPES.values():
        raise ValueError(f"load_released: dtype must be one of {list(DTYPES.values())}, got {dtype}")
    tok = load_released_tokenizer(model_dir)
    info = check_released(model_dir, preset, tok)
    with torch.device("meta"):
        model = URSAModel(info["cfg"])
    model = model.to(dtype).to_empty(device=device)
    stream_plan(model, info["files"], identity_plan(info["files"]))
    model.eval()
    model.release_info = {"dir": str(model_dir), "kind": info["kind"], "fallbacks": info["notes"],
                          "num_params": info["num_params"]}
    if info["notes"] and not quiet:
        warnings.warn(f"{model_dir}: config.json fallbacks: " + "; ".join(info["notes"]), stacklevel=2)
    return model, tok


# ================================================================================================
# Stage I from public parts: Qwen2.5-Math-7B-Instruct (HF Qwen2ForCausalLM) and SigLIP-L/16-384
# ================================================================================================

def _materialised(model):
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model is on the meta device: materialise it first (model.to_empty(device=...))")


# (LMConfig field, the Qwen2 config.json field it comes from)
QWEN2_COMPARED = (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                  ("intermediate_size", "intermediate_size"), ("num_layers", "num_hidden_layers"),
                  ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                  ("rms_norm_eps", "rms_norm_eps"), ("rope_theta", "rope_theta"),
                  ("tie_word_embeddings", "tie_word_embeddings"))


def load_qwen2_lm_into(model: URSAModel, qwen_dir) -> URSAModel:
    """Strictly load a Hugging Face Qwen2ForCausalLM directory into model.language_model (streamed;
    ursa.weights.hf_qwen2_plan). Its config.json, when present, is read by lm_config_from_hf (both
    transformers layouts: `rope_theta` or `rope_parameters`) and every field that changes the
    computation must equal the model's (head counts and the RoPE base do not show in the shapes)."""
    _materialised(model)
    d = Path(qwen_dir)
    cpath = d / "config.json"
    if cpath.exists():
        got, lm = lm_config_from_hf(_read_json(cpath), str(cpath)), model.cfg.lm
        for ours, hf in QWEN2_COMPARED:
            if getattr(got, ours) != getattr(lm, ours):
                raise CheckpointError(f"{cpath}: {hf} {getattr(got, ours)} differs from the model's "
                                      f"lm.{ours} {getattr(lm, ours)}")
    files = weight_files(d)
    plan, ignored = hf_qwen2_plan(files)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items() if n.startswith("language_model.")}
    check_plan(expected, files, plan, ignored, str(d))
    stream_plan(model, files, plan)
    return model


def siglip_prefix(model: URSAModel) -> str:
    """Native prefix of the SigLIP tower: the hybrid tower's low branch, or the single tower."""
    return ("vision_model.vision_tower_low.vision_tower." if model.cfg.vision.kind == "hybrid"
            else "vision_model.vision_tower.")


SIGLIP_COMPARED = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers",
                   "num_heads", "layer_norm_eps")


def _check_siglip_config(cpath: Path, vit, allow_gelu_mismatch: bool):
    """A Hugging Face SigLIP config.json against the tower's ViTConfig: every field that changes the
    computation must agree (the GELU form too, unless allow_gelu_mismatch)."""
    got = vit_config_from_hf(_read_json(cpath), str(cpath))
    for k in SIGLIP_COMPARED:
        if getattr(got, k) != getattr(vit, k):
            raise CheckpointError(f"{cpath}: {k} {getattr(got, k)} differs from the tower's {k} {getattr(vit, k)}")
    if got.gelu != vit.gelu and not allow_gelu_mismatch:
        raise CheckpointError(f"{cpath}: hidden_act computes the {got.gelu} GELU but the tower the {vit.gelu} "
                              f"one (vision.siglip.gelu); build the tower with gelu {got.gelu!r}, or pass "
                              f"allow_gelu_mismatch=True to keep it (the released URSA-8B tower uses erf)")


def load_siglip_into(model: URSAModel, siglip_dir, allow_gelu_mismatch: bool = False) -> URSAModel:
    """Strictly load SigLIP weights into the model's SigLIP tower (streamed), from any layout:
    Hugging Face SiglipVisionModel / SiglipModel, with the `vision_model.` prefix (transformers 4.x,
    google/siglip-large-patch16-384) or without it (transformers 5.x SiglipVisionModel), text tower
    ignored; or timm / open_clip (`[visual.trunk.]patch_embed.proj.weight`, `blocks.N.attn.qkv`,
    `attn_pool.*`: identity after the prefix). A Hugging Face config.json, when present, must agree
    with the tower (_check_siglip_config). Every tensor of the tower must be found; every vision
    tensor must be used."""
    _materialised(model)
    d = Path(siglip_dir)
    files = weight_files(d)
    P = siglip_prefix(model)
    vit = model.cfg.vision.siglip
    if any(n.endswith("embeddings.patch_embedding.weight") for n in files):
        if (d / "config.json").exists():
            _check_siglip_config(d / "config.json", vit, allow_gelu_mismatch)
        root = hf_siglip_root(files, str(d))
        plan, ignored = hf_siglip_plan(files, P, vit.hidden_size, vit.attn_pool, root)
    else:
        roots = [n[:-len("patch_embed.proj.weight")] for n in files if n.endswith("patch_embed.proj.weight")]
        if len(roots) != 1:
            raise CheckpointError(f"{d}: neither a Hugging Face SigLIP (embeddings.patch_embedding) nor "
                                  f"one timm ViT (patch_embed.proj.weight); found {len(roots)} of the latter")
        root = roots[0]
        plan = {n: [Piece(P + n[len(root):])] for n in files if n.startswith(root)}
        ignored = {n for n in files if not n.startswith(root)
                   and (n.startswith(("text.", "text_model.")) or n in ("logit_scale", "logit_bias"))}
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items() if n.startswith(P)}
    check_plan(expected, files, plan, ignored, str(d))
    stream_plan(model, files, plan)
    return model
