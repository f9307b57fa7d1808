"""The released models: load URSA-8B / URSA-RM-8B / URSA-8B-PS-GRPO (and the public Qwen2.5 / SigLIP
parts Stage I starts from), score solutions with URSA-RM-8B, run the six benchmarks.

References
- PAPER.md: "The released URSA-8B architecture", "The hybrid vision tower, precisely", "PRM readout
  detail", "Evaluation protocol"; best-of-N is Eq. 10 (ursa.prm.best_of_n).
- URSA-MATH/URSA-MATH (official code): inference/vllm_infer.py (evaluation prompt and ChatML template,
  max_tokens 2048, sampling temperature 0.2 in its script), inference/prm_infer_score.py (PRM input
  `PROMPT + question + "\\n" + response` with ' и' tags, sigmoid of the token-classification logit at
  every tag token, min / avg, 0 without a tag), vllm/.../configs/ursa.py and models/ursa.py (the
  config.json fields read below; the model hard-codes <|image|> = 151665 and 576 image positions).

A released directory (Hugging Face layout, what `huggingface-cli download URSA-MATH/URSA-8B` gives):

    config.json      {"model_type": "ursa", "image_token_index": 151665,
                      "text_config": {Qwen2 fields: hidden_size, intermediate_size, num_hidden_layers,
                                      num_attention_heads, num_key_value_heads, vocab_size, rms_norm_eps,
                                      rope_theta, max_position_embeddings, tie_word_embeddings},
                      "vision_config": {"cls": "HybridVisionTower", "params": {"concat_type": "tuple",
                          "high_res_cfg": {"model_name": "sam_b_downsample", "image_size": 1024,
                                           "output_dim": 1024, "pixel_mean": CLIP, "pixel_std": CLIP},
                          "low_res_cfg": {"model_name": "siglip_large_patch16_384", "image_size": 384,
                                          "output_dim": 1024, "pixel_mean": .5, "pixel_std": .5}}},
                      "aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": 1024,
                          "n_embed": 3584, "projector_type": "low_high_hybrid_split_mlp_gelu"}}}
    model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json   Qwen2.5's BPE plus <|image|> (id 151665)

The real config.json could not be read (PAPER.md): the fields above are the ones the official model
code reads. A field that is absent falls back to the preset (`ursa-8b`, the released numbers) and the
loader says so (one warning; `model.release_info["fallbacks"]`). The vision ARCHITECTURE (depths,
widths, heads, windows) always comes from the preset: config.json only names it (`model_name`), and a
name other than the released ones is an error. Tensor names are the native names (identity map); the
RM is recognised by its `score.weight`. Loading is strict (every tensor found, none unused, shapes
equal) and streams shard by shard into a model built on the meta device, so host memory peaks at
about the model plus one tensor.

    python -m ursa.release inspect  DIR                      # check config + every tensor header, no weights read
    python -m ursa.release generate --model DIR --benchmark mathvista --data FILE --image-root DIR --out OUT
    python -m ursa.release best-of-n --prm DIR --benchmark mathvista --responses OUT --image-root DIR --out BON
    python -m ursa.benchmarks rescore BON --benchmark mathvista
(docs/released_models.md has the download commands and the full evaluation recipe.)
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image
from safetensors import safe_open

from ursa.benchmarks import BENCHMARKS, build_prompt, question_text
from ursa.config import ModelConfig, get_config
from ursa.data import load_image
from ursa.generate import generate
from ursa.model import URSAModel
from ursa.prm import AGGREGATIONS, aggregate, best_of_n, insert_tags, prm_user_text
from ursa.tokenizer import Tokenizer
from ursa.vision import preprocess
from ursa.weights import INDEX_NAME, SINGLE_NAME, CheckpointError

HIGH_TOWERS = ("sam_b_downsample",)              # official model names of the two branches
LOW_TOWERS = ("siglip_large_patch16_384",)
PROJECTOR_TYPE = "low_high_hybrid_split_mlp_gelu"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _names(names: Sequence[str], k: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


# ================================================================================================
# weight files: resolve, plan (file tensor -> native tensor pieces), check strictly, stream
# ================================================================================================

def weight_files(model_dir) -> dict[str, tuple[Path, tuple]]:
    """Every tensor of a directory's safetensors: name -> (file, shape), from the headers only.

    Sharded: the index's weight_map must name existing shards, each named tensor must be in its
    shard, and a shard must hold no tensor the index leaves out. Each problem is a one-line
    CheckpointError naming the file."""
    d = Path(model_dir)
    index, single = d / INDEX_NAME, d / SINGLE_NAME
    out: dict[str, tuple[Path, tuple]] = {}
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        by_shard: dict[str, list[str]] = {}
        for n, f in wm.items():
            by_shard.setdefault(f, []).append(n)
        for f, listed in sorted(by_shard.items()):
            shard = d / f
            if not shard.exists():
                raise CheckpointError(f"{shard}: missing shard (the index {index.name} maps "
                                      f"{len(listed)} tensor(s) to it, e.g. {_names(listed, 3)})")
            with safe_open(str(shard), "pt") as fh:
                held = {n: tuple(fh.get_slice(n).get_shape()) for n in fh.keys()}
            lost = [n for n in listed if n not in held]
            if lost:
                raise CheckpointError(f"{index}: names tensor(s) that {f} does not hold: {_names(lost)}")
            extra = sorted(set(held) - set(listed))
            if extra:
                raise CheckpointError(f"{shard}: holds tensor(s) the index does not list: {_names(extra)}")
            for n in listed:
                out[n] = (shard, held[n])
        return out
    if single.exists():
        with safe_open(str(single), "pt") as fh:
            return {n: (single, tuple(fh.get_slice(n).get_shape())) for n in fh.keys()}
    found = sorted(p.name for p in d.glob("*.safetensors"))
    if found:
        raise CheckpointError(f"{d}: has {_names(found, 4)} but no {INDEX_NAME}")
    raise CheckpointError(f"{d}: no {SINGLE_NAME} or {INDEX_NAME}")


@dataclass(frozen=True)
class Piece:
    """Where one file tensor goes: native tensor `dst` (only its rows `rows` when given), from the
    file tensor's rows `src_rows` (when given), viewed as `view` (when given)."""
    dst: str
    rows: Optional[tuple] = None
    src_rows: Optional[tuple] = None
    view: Optional[tuple] = None


def check_plan(expected: dict, files: dict, plan: dict, ignored: set, source: str):
    """Strictness: every expected native tensor fully covered, every file tensor used (or listed in
    `ignored`), every shape equal. expected: native -> shape; files: name -> (file, shape);
    plan: file name -> [Piece]. Raises one CheckpointError line naming files and tensors."""
    unused = sorted(n for n in files if (n not in plan and n not in ignored)
                    or any(p.dst not in expected for p in plan.get(n, ())))
    if unused:
        f = files[unused[0]][0]
        raise CheckpointError(f"{f}: has {len(unused)} tensor(s) the model does not use: {_names(unused)}")
    cover: dict[str, list] = {}
    bad = []
    for src, pieces in plan.items():
        f, shape = files[src]
        for p in pieces:
            s = list(shape)
            if p.src_rows:
                s[0] = p.src_rows[1] - p.src_rows[0]
            if p.view:
                if torch.Size(s).numel() != torch.Size(p.view).numel():
                    bad.append(f"{src} {s} cannot be viewed as {list(p.view)}")
                    continue
                s = list(p.view)
            want = list(expected[p.dst])
            rows = p.rows or (0, want[0] if want else 1)
            if p.rows:
                want[0] = rows[1] - rows[0]
            if s != want:
                bad.append(f"{src} {list(shape)} -> {p.dst} needs {want}" if (p.rows or p.src_rows or p.view)
                           else f"{src} {list(shape)} (model: {want})")
            cover.setdefault(p.dst, []).append(rows)
    if bad:
        raise CheckpointError(f"{source}: shape mismatch: {_names(bad, 6)}")
    missing = sorted(n for n in expected if n not in cover)
    if missing:
        raise CheckpointError(f"{source}: lacks {len(missing)} tensor(s): {_names(missing)}")
    for n, spans in cover.items():
        full = expected[n][0] if expected[n] else 1
        spans = sorted(spans)
        ok = spans[0][0] == 0 and spans[-1][1] == full and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        if not ok:
            raise CheckpointError(f"{source}: {n} is covered by rows {spans}, not exactly once over 0..{full}")


@torch.no_grad()
def stream_plan(model: torch.nn.Module, files: dict, plan: dict):
    """Copy the planned tensors file by file, one tensor in memory at a time (cast to the model's dtype)."""
    own = model.state_dict()
    by_file: dict[Path, list[str]] = {}
    for src in plan:
        by_file.setdefault(files[src][0], []).append(src)
    for f, srcs in by_file.items():
        with safe_open(str(f), "pt") as fh:
            for src in srcs:
                for p in plan[src]:
                    t = fh.get_slice(src)[p.src_rows[0]:p.src_rows[1]] if p.src_rows else fh.get_tensor(src)
                    if p.view:
                        t = t.reshape(p.view)
                    dst = own[p.dst]
                    (dst[p.rows[0]:p.rows[1]] if p.rows else dst).copy_(t)
                    del t


# ================================================================================================
# config.json of a released directory -> ModelConfig
# ================================================================================================

class _Fields:
    """Reads fields of one JSON object, recording every fallback to the preset."""

    def __init__(self, obj, label: str, where: str, notes: list, preset: str):
        if obj is not None and not isinstance(obj, dict):
            raise CheckpointError(f"{where}: {label} must be an object, got {type(obj).__name__}")
        self.obj, self.label, self.where, self.notes, self.preset = obj or {}, label, where, notes, preset

    def get(self, key, default, kind=None):
        if key not in self.obj:
            self.notes.append(f"{self.label}.{key} absent: preset {self.preset} value {default!r}")
            return default
        v = self.obj[key]
        if kind == "posint" and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise CheckpointError(f"{self.where}: {self.label}.{key} must be a positive integer, got {v!r}")
        if kind == "float" and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            raise CheckpointError(f"{self.where}: {self.label}.{key} must be a positive number, got {v!r}")
        if kind == "triple" and not (isinstance(v, list) and len(v) == 3):
            raise CheckpointError(f"{self.where}: {self.label}.{key} must be a list of 3 numbers, got {v!r}")
        return tuple(float(x) for x in v) if kind == "triple" else v


LM_FIELDS = [("hidden_size", "hidden_size", "posint"), ("intermediate_size", "intermediate_size", "posint"),
             ("num_hidden_layers", "num_layers", "posint"), ("num_attention_heads", "num_heads", "posint"),
             ("num_key_value_heads", "num_kv_heads", "posint"), ("vocab_size", "vocab_size", "posint"),
             ("rms_norm_eps", "rms_norm_eps", "float"), ("rope_theta", "rope_theta", "float"),
             ("max_position_embeddings", "max_position_embeddings", "posint"),
             ("tie_word_embeddings", "tie_word_embeddings", None)]


def released_config(d: dict, has_score: bool, preset: str = "ursa-8b",
                    where: str = "config.json") -> tuple[ModelConfig, list[str], Optional[int]]:
    """A released config.json (dict) -> (ModelConfig, fallback notes, image_token_index or None).

    LM numbers come from text_config (or language_config); the vision architecture from the preset,
    with image sizes and pixel mean/std from vision_config; the projector is checked against
    aligner_config. Unsupported values (another projector type or depth, another tower, sliding
    window attention, RoPE scaling) are errors naming the field."""
    cfg, notes = get_config(preset), []
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    cfg.name, cfg.value_head = f"released ({preset} architecture)", has_score

    tkey = "text_config" if "text_config" in d else "language_config"
    if tkey not in d:
        notes.append(f"text_config absent: every LM number from preset {preset}")
    else:
        tc = _Fields(d[tkey], tkey, where, notes, preset)
        if tc.obj.get("model_type", "qwen2") != "qwen2":
            raise CheckpointError(f"{where}: {tkey}.model_type {tc.obj['model_type']!r} is not supported (qwen2)")
        if tc.obj.get("use_sliding_window") or tc.obj.get("rope_scaling"):
            raise CheckpointError(f"{where}: {tkey}: sliding-window attention / rope_scaling are not supported")
        if tc.obj.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: {tkey}.hidden_act {tc.obj['hidden_act']!r} is not supported (silu)")
        for hf, ours, kind in LM_FIELDS:
            setattr(cfg.lm, ours, tc.get(hf, getattr(cfg.lm, ours), kind))
        cfg.lm.rms_norm_eps, cfg.lm.rope_theta = float(cfg.lm.rms_norm_eps), float(cfg.lm.rope_theta)
        cfg.lm.tie_word_embeddings = bool(cfg.lm.tie_word_embeddings)

    if "vision_config" not in d:
        notes.append(f"vision_config absent: the hybrid tower of preset {preset}")
    else:
        vc = _Fields(d["vision_config"], "vision_config", where, notes, preset)
        if "HybridVisionTower" not in str(vc.obj.get("cls", "HybridVisionTower")):
            raise CheckpointError(f"{where}: vision_config.cls {vc.obj['cls']!r} is not supported (HybridVisionTower)")
        params = _Fields(vc.get("params", {}), "vision_config.params", where, notes, preset)
        if params.obj.get("concat_type", "tuple") != "tuple":
            raise CheckpointError(f"{where}: vision_config.params.concat_type must be 'tuple'")
        sam, sig = cfg.vision.sam, cfg.vision.siglip
        for key, tower, names, out_dim in (("high_res_cfg", sam, HIGH_TOWERS, sam.downsample_dims[-1]),
                                           ("low_res_cfg", sig, LOW_TOWERS, sig.hidden_size)):
            b = _Fields(params.get(key, {}), f"vision_config.params.{key}", where, notes, preset)
            name = b.get("model_name", names[0])
            if name not in names:
                raise CheckpointError(f"{where}: vision_config.params.{key}.model_name {name!r} is not "
                                      f"supported ({', '.join(names)})")
            tower.image_size = b.get("image_size", tower.image_size, "posint")
            tower.image_mean = b.get("pixel_mean", tuple(tower.image_mean), "triple")
            tower.image_std = b.get("pixel_std", tuple(tower.image_std), "triple")
            od = b.get("output_dim", out_dim, "posint")
            if od != out_dim:
                raise CheckpointError(f"{where}: vision_config.params.{key}.output_dim {od} but the "
                                      f"{preset} tower yields {out_dim}")

    if "aligner_config" not in d:
        notes.append(f"aligner_config absent: the {PROJECTOR_TYPE} projector of preset {preset}")
    else:
        ac = _Fields(d["aligner_config"], "aligner_config", where, notes, preset)
        ap = _Fields(ac.get("params", {}), "aligner_config.params", where, notes, preset)
        checks = [("projector_type", PROJECTOR_TYPE), ("depth", 2),
                  ("input_dim", cfg.vision.out_dims[0]), ("n_embed", cfg.lm.hidden_size)]
        for key, want in checks:
            got = ap.get(key, want)
            if got != want:
                raise CheckpointError(f"{where}: aligner_config.params.{key} is {got!r}; this model needs {want!r}")
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


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


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
    check_plan(expected, files, {n: [Piece(n)] for n in files}, set(), str(d))
    return {"cfg": cfg, "files": files, "notes": notes, "kind": "prm" if cfg.value_head else "policy",
            "num_params": sum(int(torch.Size(s).numel()) for s in expected.values())}


def load_released(model_dir, dtype: torch.dtype = torch.bfloat16, device="cpu", preset: str = "ursa-8b",
                  quiet: bool = False) -> tuple[URSAModel, Tokenizer]:
    """A released URSA directory -> (model in eval mode, tokenizer). See the module docstring.

    The model is built on the meta device, cast to `dtype`, materialised with to_empty on `device`,
    then filled tensor by tensor, shard by shard (strictly). URSA-RM-8B (a `score.weight` in the
    files) gets the value head. Fallbacks to the preset are listed in model.release_info and warned
    about once unless quiet."""
    if dtype not in DTYPES.values():
        raise ValueError(f"load_released: dtype must be one of {list(DTYPES.values())}, got {dtype}")
    tok = load_released_tokenizer(model_dir)
    info = check_released(model_dir, preset, tok)
    with torch.device("meta"):
        model = URSAModel(info["cfg"])
    model = model.to(dtype).to_empty(device=device)
    stream_plan(model, info["files"], {n: [Piece(n)] for n in info["files"]})
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


def load_qwen2_lm_into(model: URSAModel, qwen_dir) -> URSAModel:
    """Strictly load a Hugging Face Qwen2ForCausalLM directory into model.language_model (streaming).

    `model.*` -> `language_model.model.*`, `lm_head.*` -> `language_model.lm_head.*`; stale
    `rotary_emb.inv_freq` buffers are skipped. config.json, when present, must agree with the model's
    LM numbers that shapes cannot show (rope_theta, rms_norm_eps)."""
    _materialised(model)
    d = Path(qwen_dir)
    cpath = d / "config.json"
    if cpath.exists():
        c, lm = _read_json(cpath), model.cfg.lm
        for key in ("rope_theta", "rms_norm_eps"):
            if key in c and float(c[key]) != float(getattr(lm, key)):
                raise CheckpointError(f"{cpath}: {key} {c[key]} differs from the model's lm.{key} {getattr(lm, key)}")
    files = weight_files(d)
    plan, ignored = {}, set()
    for n in files:
        if n.endswith("rotary_emb.inv_freq"):
            ignored.add(n)
        elif n.startswith(("model.", "lm_head.")):
            plan[n] = [Piece("language_model." + n)]
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items() if n.startswith("language_model.")}
    check_plan(expected, files, plan, ignored, str(d))
    stream_plan(model, files, plan)
    return model


def siglip_prefix(model: URSAModel) -> str:
    """Native prefix of the SigLIP tower: the hybrid tower's low branch, or the single tower."""
    return ("vision_model.vision_tower_low.vision_tower." if model.cfg.vision.kind == "hybrid"
            else "vision_model.vision_tower.")


def hf_siglip_plan(files: dict, P: str, D: int, attn_pool: bool) -> tuple[dict, set]:
    """Hugging Face SiglipVisionModel / SiglipModel names -> timm-layout native pieces.

    q/k/v_proj fill rows [0, D), [D, 2D), [2D, 3D) of the fused qkv; the position embedding [P, D] is
    viewed as [1, P, D]; the pooling head (head.probe, head.attention.in_proj_*, ...) maps to timm's
    attn_pool (in_proj rows [0, D) -> q, [D, 3D) -> kv). The text tower and logit_scale/bias of a
    full SiglipModel are skipped (not this part)."""
    plan, ignored, v = {}, set(), "vision_model."
    simple = {"embeddings.patch_embedding.": "patch_embed.proj.", "post_layernorm.": "norm.",
              "head.attention.out_proj.": "attn_pool.proj.", "head.layernorm.": "attn_pool.norm.",
              "head.mlp.": "attn_pool.mlp."}
    block = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "mlp.": "mlp.", "self_attn.out_proj.": "attn.proj."}
    for n, (_, shape) in files.items():
        if n.startswith("text_model.") or n in ("logit_scale", "logit_bias") or n.endswith("position_ids"):
            ignored.add(n)
            continue
        if not n.startswith(v):
            continue                                  # left unplanned: check_plan reports it as unused
        r = n[len(v):]
        if r.startswith("head.") and not attn_pool:
            ignored.add(n)
            continue
        if r == "embeddings.position_embedding.weight":
            plan[n] = [Piece(P + "pos_embed", view=(1,) + tuple(shape))]
        elif r == "head.probe":
            plan[n] = [Piece(P + "attn_pool.latent")]
        elif r.startswith("head.attention.in_proj_"):
            w = r.rsplit("_", 1)[1]                   # weight | bias
            plan[n] = [Piece(P + f"attn_pool.q.{w}", src_rows=(0, D)),
                       Piece(P + f"attn_pool.kv.{w}", src_rows=(D, 3 * D))]
        elif r.startswith("encoder.layers."):
            i, rest = r[len("encoder.layers."):].split(".", 1)
            j = next((k for k, x in enumerate("qkv") if rest.startswith(f"self_attn.{x}_proj.")), None)
            if j is not None:
                plan[n] = [Piece(P + f"blocks.{i}.attn.qkv.{rest.rsplit('.', 1)[1]}", rows=(j * D, (j + 1) * D))]
            else:
                a = next((a for a in block if rest.startswith(a)), None)
                if a is not None:
                    plan[n] = [Piece(P + f"blocks.{i}." + block[a] + rest[len(a):])]
        else:
            a = next((a for a in simple if r.startswith(a)), None)
            if a is not None:
                plan[n] = [Piece(P + simple[a] + r[len(a):])]
    return plan, ignored


def load_siglip_into(model: URSAModel, siglip_dir) -> URSAModel:
    """Strictly load SigLIP weights into the model's SigLIP tower (streaming), from either layout:
    Hugging Face (google/siglip-large-patch16-384: `vision_model.*`, text tower skipped) or timm /
    open_clip (`[visual.trunk.]patch_embed.proj.weight`, `blocks.N.attn.qkv`, `attn_pool.*`: identity
    after the prefix). Every tensor of the tower must be found; every vision tensor must be used.
    Note: HF SigLIP computes GELU with tanh, the URSA tower (timm) with erf (config gelu)."""
    _materialised(model)
    d = Path(siglip_dir)
    files = weight_files(d)
    P = siglip_prefix(model)
    vit = model.cfg.vision.siglip
    if any(n.endswith("embeddings.patch_embedding.weight") for n in files):
        plan, ignored = hf_siglip_plan(files, P, vit.hidden_size, vit.attn_pool)
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


# ================================================================================================
# prompts, images
# ================================================================================================

def generation_prompt(benchmark: str, rec: dict, image: bool = True) -> str:
    """The full ChatML text URSA-8B is evaluated with (official vllm_infer.py template + prompt)."""
    return Tokenizer.chat_prompt(build_prompt(benchmark, rec), image)


def prm_prompt(question: str, response: str, image: bool = True) -> tuple[str, int]:
    """(the full ChatML text URSA-RM-8B scores, char offset where the tagged solution starts).

    User turn: `<|image|>` + PRM_INSTRUCTION + "\\nQuestion:" + question + "\\n" + insert_tags(response)
    (PAPER.md 'PRM readout detail'; tags only in the solution, see ursa.prm)."""
    marked = Tokenizer.chat_prompt(prm_user_text(question, "\x00"), image)
    start = marked.rfind("\x00")
    return marked[:start] + insert_tags(response) + marked[start + 1:], start


def _expand(ids: list[int], flags: list[bool], image_id: int, n: int) -> tuple[list[int], list[int]]:
    """Expand each <|image|> to n positions; return (ids, indices of flagged tokens after expansion)."""
    out, pos = [], []
    for t, f in zip(ids, flags):
        if f:
            pos.append(len(out))
        out.extend([t] * n if t == image_id else [t])
    return out, pos


def prm_inputs(tok: Tokenizer, cfg: ModelConfig, question: str, response: str,
               image: bool = True) -> tuple[list[int], list[int]]:
    """(input ids with <|image|> expanded to cfg.vision.num_tokens positions, readout positions):
    the step-tag tokens of the tagged solution (a tag token inside the question is not read)."""
    text, start = prm_prompt(question, response, image)
    enc = tok.tok.encode(text, add_special_tokens=False)
    flags = [t == tok.tag_id and s >= start for t, (s, _) in zip(enc.ids, enc.offsets)]
    return _expand(enc.ids, flags, tok.image_id, cfg.vision.num_tokens)


ImageLike = Union[None, str, Path, Image.Image, torch.Tensor]


def pixels_of(image: ImageLike, cfg: ModelConfig, where: str = "") -> Optional[torch.Tensor]:
    """None -> None; a path or PIL image -> preprocess (ursa.vision) -> [3, S, S]; a [3, S, S] tensor as is."""
    if image is None:
        return None
    if isinstance(image, torch.Tensor):
        S = cfg.vision.image_size
        if tuple(image.shape) != (3, S, S):
            raise ValueError(f"{where}: image tensor must be [3, {S}, {S}] in [0, 1], got {tuple(image.shape)}")
        return image
    if isinstance(image, (str, Path)):
        image = load_image(image, where)
    return preprocess(image, cfg.vision)


def record_image(benchmark: str, rec: dict, image_root, where: str = "") -> Optional[Path]:
    """A benchmark record's image path (official vllm_infer.py): WE-MATH `image_path`, DynaMath
    `image_dir`/`image`, the others `image`; empty -> None (a text-only item: no <|image|>)."""
    if benchmark == "wemath":
        name = rec.get("image_path", rec.get("image"))
    else:
        name = rec.get("image", rec.get("image_path"))
    if name is None:
        raise ValueError(f'{where}: missing field "{"image_path" if benchmark == "wemath" else "image"}"')
    if not name:
        return None
    if benchmark == "dynamath" and rec.get("image_dir"):
        name = str(Path(rec["image_dir"]) / name)
    return Path(image_root) / name


def _records(records) -> list[tuple[str, dict]]:
    """Dicts, or (where, dict) pairs as ursa.benchmarks.read_records gives."""
    out = []
    for i, r in enumerate(records):
        out.append(r if isinstance(r, tuple) else (r.get("_where", f"record {i}"), r))
    return out


def _device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


def _stack(px: list, model) -> Optional[torch.Tensor]:
    px = [p for p in px if p is not None]
    if not px:
        return None
    dev, dt = _device_dtype(model)
    return torch.stack(px).to(device=dev, dtype=dt)


# ================================================================================================
# URSA-RM-8B scoring and best-of-N
# ================================================================================================

@torch.no_grad()
def prm_score_batch(model: URSAModel, tok: Tokenizer, items: Sequence[tuple], batch_size: int = 8
                    ) -> list[tuple[list[float], float, float]]:
    """Score (image, question, response) triples with the PRM: per item (step scores, min, mean).

    A step score is sigmoid(score(h)) at a tag token, h its hidden state after the final RMSNorm; a
    response without a tag scores ([], 0.0, 0.0). Rows are right-padded and masked (positions count
    real tokens), so a batch computes what each row computes alone. image: see pixels_of."""
    if not model.cfg.value_head:
        raise ValueError("prm_score: this model has no value head (`score`); load URSA-RM-8B")
    was_training = model.training
    model.eval()
    dev, _ = _device_dtype(model)
    out = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        px = [pixels_of(img, model.cfg, f"item {s + i}") for i, (img, _, _) in enumerate(chunk)]
        enc = [prm_inputs(tok, model.cfg, q, r, image=p is not None) for p, (_, q, r) in zip(px, chunk)]
        T = max(len(ids) for ids, _ in enc)
        ids = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, (row, _) in enumerate(enc):
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
        values = model(ids.to(dev), _stack(px, model), attention_mask=mask.to(dev),
                       logits=False, values=True).values.float()                    # [B, T]
        for b, (_, pos) in enumerate(enc):
            sc = torch.sigmoid(values[b, pos]).tolist()
            out.append((sc, aggregate(sc, "min"), aggregate(sc, "mean")))
    if was_training:
        model.train()
    return out


def prm_score(model: URSAModel, tok: Tokenizer, image: ImageLike, question: str, response: str
              ) -> tuple[list[float], float, float]:
    """URSA-RM-8B on one solution: (step scores, min, mean). See prm_score_batch."""
    return prm_score_batch(model, tok, [(image, question, response)])[0]


def best_of_n_with_prm(rm: URSAModel, tok: Tokenizer, records, responses=None, how: str = "mean", *,
                       benchmark: str, image_root, batch_size: int = 8, progress: bool = False) -> list[dict]:
    """Eq. 10: per record, the candidate with the largest aggregated step score (`how`: min | mean |
    last | product; ties -> the first). responses: per record a list of candidate texts (None: each
    record's own "response" list, as run_benchmark writes it with n > 1).

    Returns the records with "response" = the chosen text, plus "candidates", "prm_step_scores",
    "prm_aggregate" (per candidate) and "prm_choice" (index) — ready for ursa.benchmarks.rescore."""
    if how not in AGGREGATIONS:
        raise ValueError(f"best_of_n_with_prm: how must be one of {AGGREGATIONS}, got {how!r}")
    recs = _records(records)
    if responses is not None and len(responses) != len(recs):
        raise ValueError(f"best_of_n_with_prm: {len(recs)} records but {len(responses)} response lists")
    from tqdm import tqdm
    out = []
    for i, (where, rec) in enumerate(tqdm(recs, desc="PRM best-of-N", disable=not progress)):
        cands = responses[i] if responses is not None else rec.get("response")
        if isinstance(cands, str):
            cands = [cands]
        if not cands:
            raise ValueError(f"{where}: no candidate responses to choose from")
        px = pixels_of(record_image(benchmark, rec, image_root, where), rm.cfg, where)
        q = question_text(benchmark, rec)
        scored = prm_score_batch(rm, tok, [(px, q, c) for c in cands], batch_size)
        steps = [s for s, _, _ in scored]
        k = best_of_n(steps, how)
        out.append({**rec, "response": cands[k], "candidates": list(cands), "prm_step_scores": steps,
                    "prm_aggregate": [aggregate(s, how) for s in steps], "prm_choice": k, "prm_how": how})
    return out


# ================================================================================================
# benchmarks: generation
# ================================================================================================

@torch.no_grad()
def run_benchmark(model: URSAModel, tok: Tokenizer, records, benchmark: str, image_root, n: int = 1,
                  temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 2048,
                  batch_size: int = 8, seed: int = 0, progress: bool = False) -> list[dict]:
    """Sample n responses per benchmark record with URSA's evaluation prompt (ursa.benchmarks.build_prompt,
    ChatML, one <|image|> expanded to the tower's positions) and the record's preprocessed image.

    records: the benchmark's own records (dicts or read_records pairs). Returns them with "response":
    the text (n == 1) or the list of n texts (n > 1; rescore scores the first, best_of_n_with_prm
    chooses). Generation stops at <|im_end|> / <|endoftext|> or max_new_tokens (official: 2048)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    from tqdm import tqdm
    recs = _records(records)
    dev, _ = _device_dtype(model)
    gen = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
    texts: list = []
    bar = tqdm(total=len(recs), desc=f"{benchmark} x{n}", disable=not progress)
    for s in range(0, len(recs), batch_size):
        chunk = recs[s:s + batch_size]
        px = [pixels_of(record_image(benchmark, r, image_root, w), model.cfg, w) for w, r in chunk]
        prompts = [tok.encode_prompt(build_prompt(benchmark, r), image=p is not None,
                                     num_image_tokens=model.cfg.vision.num_tokens)
                   for p, (_, r) in zip(px, chunk)]
        g = generate(model, prompts, _stack(px, model), num_samples=n, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, stop_ids=(tok.im_end_id, tok.eos_id),
                     pad_id=tok.pad_id, generator=gen)
        rows = [tok.decode(g.row(i)) for i in range(g.tokens.shape[0])]
        texts.extend(rows[i:i + n] for i in range(0, len(rows), n))
        bar.update(len(chunk))
    bar.close()
    return [{**r, "response": t[0] if n == 1 else t} for (_, r), t in zip(recs, texts)]


# ================================================================================================
# command line
# ================================================================================================

def _write_jsonl(path, recs):
    from ursa.data import write_jsonl_atomic
    write_jsonl_atomic(path, recs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ursa.release", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="check a released directory (config, tokenizer, every tensor header)")
    i.add_argument("model", help="released directory (config.json, safetensors, tokenizer.json)")
    i.add_argument("--preset", default="ursa-8b", help="architecture preset for absent fields")
    for name, hlp in (("generate", "sample responses on a benchmark file"),
                      ("best-of-n", "choose among sampled responses with URSA-RM-8B")):
        a = sub.add_parser(name, help=hlp)
        if name == "generate":
            a.add_argument("--model", required=True, help="URSA-8B or URSA-8B-PS-GRPO directory")
            a.add_argument("--data", required=True, help="the benchmark's own .json / .jsonl file")
            a.add_argument("--n", type=int, default=1, help="responses per record")
            a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (official script: 0.2)")
            a.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
            a.add_argument("--max-new-tokens", type=int, default=2048, help="official: 2048")
            a.add_argument("--seed", type=int, default=0, help="sampling seed")
            a.add_argument("--limit", type=int, default=0, help="only the first N records (0 = all)")
        else:
            a.add_argument("--prm", required=True, help="URSA-RM-8B directory")
            a.add_argument("--responses", required=True, help="output of `generate` with --n > 1")
            a.add_argument("--how", default="mean", choices=AGGREGATIONS, help="step-score aggregation (Eq. 10)")
        a.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="record format")
        a.add_argument("--image-root", required=True, help="folder the records' image paths are relative to")
        a.add_argument("--out", required=True, help="output .jsonl (records + response)")
        a.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
        a.add_argument("--dtype", default="bf16", choices=DTYPES, help="weight dtype")
        a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = p.parse_args(argv)
    from ursa.benchmarks import read_records
    try:
        if args.cmd == "inspect":
            info = check_released(args.model, args.preset)
            layout = "URSA-RM-8B layout" if info["kind"] == "prm" else "URSA-8B layout"
            n_files = len({f for f, _ in info["files"].values()})
            print(f"{args.model}: {info['kind']} ({layout}), {info['num_params']:,} parameters in {n_files} file(s); "
                  f"every tensor present, used and of the right shape")
            for note in info["notes"]:
                print(f"  fallback: {note}")
            return 0
        if args.cmd == "generate":
            model, tok = load_released(args.model, DTYPES[args.dtype], args.device)
            recs = read_records(args.data)
            recs = recs[:args.limit] if args.limit else recs
            out = run_benchmark(model, tok, recs, args.benchmark, args.image_root, n=args.n,
                                temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                seed=args.seed, progress=True)
        else:
            rm, tok = load_released(args.prm, DTYPES[args.dtype], args.device)
            out = best_of_n_with_prm(rm, tok, read_records(args.responses), None, args.how,
                                     benchmark=args.benchmark, image_root=args.image_root,
                                     batch_size=args.batch_size, progress=True)
        _write_jsonl(args.out, out)
        print(f"wrote {len(out)} records to {args.out}; score: python -m ursa.benchmarks rescore {args.out} "
              f"--benchmark {args.benchmark}")
        return 0
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
