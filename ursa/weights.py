"""Checkpoint I/O, one stack for every layout: headers -> plan -> strict check -> streamed copy.

    files = weight_files(dir)            name -> (file, shape), from the safetensors headers only
    plan  = {file tensor: [Piece(native name, rows, src_rows, view)]}
    check_plan(expected, files, plan, ignored, source)     every tensor found, used, of its shape
    stream_plan(model, files, plan)      file by file, one tensor in memory at a time, cast to the
                                         model's dtype; a NaN / inf tensor is refused by name

Plans: identity_plan (this project's and the released URSA directories), hf_qwen2_plan
(Qwen2ForCausalLM) and hf_siglip_plan (SigLIP, with or without transformers 4.x's `vision_model.`
prefix). lm_config_from_hf / vit_config_from_hf read those parts' config.json: every field that
changes the computation is read or refused by name (tests/test_parity.py checks them against
transformers' outputs). A model directory of this project (config.json {"ursa_config": ...} +
safetensors, sharded with an index above SHARD_BYTES) is written through ursa.io.atomic_dir and read
after ursa.io.recover_dir. Nothing is unpickled (a pickle named *.safetensors fails at its header).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ursa import io
from ursa.config import LMConfig, ModelConfig, ViTConfig
from ursa.model import URSAModel, init_value_head

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_BYTES = 5 * 2**30          # the shard size Hugging Face checkpoints use


class CheckpointError(ValueError):
    """A checkpoint or config.json problem; the message is one line naming the file."""


def name_list(names: Sequence[str], k: int = 8) -> str:
    """The first k names joined, with "and N more" for the rest."""
    names = list(names)
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


# ---- safetensors files -------------------------------------------------------------------------

@contextlib.contextmanager
def open_safetensors(path) -> Iterator:
    """safe_open(path) whose failures are one CheckpointError line naming the file."""
    try:
        fh = safe_open(str(path), "pt")
        fh.__enter__()
    except SafetensorError as e:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        yield fh
    finally:
        fh.__exit__(None, None, None)


def _header(path: Path) -> dict:
    """name -> shape of one safetensors file, from its header."""
    with open_safetensors(path) as fh:
        return {n: tuple(fh.get_slice(n).get_shape()) for n in fh.keys()}


def weight_files(model_dir) -> dict[str, tuple[Path, tuple]]:
    """Every tensor of a directory's safetensors: name -> (file, shape), from the headers only.

    Sharded: the index's weight_map must name existing shards, each named tensor must be in its
    shard, and a shard must hold no tensor the index leaves out. Each problem is one CheckpointError
    line naming the file."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a folder")
    index, single = d / INDEX_NAME, d / SINGLE_NAME
    if index.exists():
        try:
            wm = io.read_json(index, "safetensors index")["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("weight_map is not an object")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        by_shard: dict[str, list[str]] = {}
        for n, f in wm.items():
            by_shard.setdefault(f, []).append(n)
        out: dict[str, tuple[Path, tuple]] = {}
        for f, listed in sorted(by_shard.items()):
            shard = d / f
            if not shard.exists():
                raise CheckpointError(f"{shard}: missing shard (the index {index.name} maps "
                                      f"{len(listed)} tensor(s) to it, e.g. {name_list(listed, 3)})")
            held = _header(shard)
            lost = [n for n in listed if n not in held]
            if lost:
                raise CheckpointError(f"{index}: names tensor(s) that {f} does not hold: {name_list(lost)}")
            extra = sorted(set(held) - set(listed))
            if extra:
                raise CheckpointError(f"{shard}: holds tensor(s) the index does not list: {name_list(extra)}")
            out.update({n: (shard, held[n]) for n in listed})
        return out
    if single.exists():
        return {n: (single, s) for n, s in _header(single).items()}
    found = sorted(p.name for p in d.glob("*.safetensors"))
    if found:
        raise CheckpointError(f"{d}: has {name_list(found, 4)} but no {INDEX_NAME}")
    raise CheckpointError(f"{d}: no {SINGLE_NAME} or {INDEX_NAME}")


# ---- plans: check, stream, read ------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """Where one file tensor goes: native tensor `dst` (only its rows `rows` when given), from the
    file tensor's rows `src_rows` (when given), viewed as `view` (when given)."""
    dst: str
    rows: Optional[tuple] = None
    src_rows: Optional[tuple] = None
    view: Optional[tuple] = None


def identity_plan(files: dict) -> dict:
    """Every file tensor to the native tensor of the same name."""
    return {n: [Piece(n)] for n in files}


def check_plan(expected: dict, files: dict, plan: dict, ignored: set, source: str):
    """Strictness: every expected native tensor covered exactly once, every file tensor used (or
    listed in `ignored`), every shape equal. expected: native -> shape; files: name -> (file, shape);
    plan: file name -> [Piece]. Raises one CheckpointError line naming files and tensors (missing
    and unused tensors together, then shape mismatches, then partial coverage)."""
    unused = sorted(n for n in files if (n not in plan and n not in ignored)
                    or any(p.dst not in expected for p in plan.get(n, ())))
    planned = {p.dst for pieces in plan.values() for p in pieces}
    missing = sorted(n for n in expected if n not in planned)
    problems = [f"{source}: lacks {len(missing)} tensor(s): {name_list(missing)}"] if missing else []
    if unused:
        problems.append(f"{files[unused[0]][0]}: has {len(unused)} tensor(s) the model does not use: "
                        f"{name_list(unused)}")
    if problems:
        raise CheckpointError("; ".join(problems))
    cover: dict[str, list] = {}
    bad = []
    for src, pieces in plan.items():
        shape = files[src][1]
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
        raise CheckpointError(f"{source}: shape mismatch: {name_list(bad, 6)}")
    for n, spans in cover.items():
        full = expected[n][0] if expected[n] else 1
        spans = sorted(spans)
        ok = spans[0][0] == 0 and spans[-1][1] == full and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        if not ok:
            raise CheckpointError(f"{source}: {n} is covered by rows {spans}, not exactly once over 0..{full}")


def _planned(files: dict, plan: dict) -> Iterator[tuple[Path, str, Piece, torch.Tensor]]:
    """(file, file tensor name, piece, the piece's tensor) file by file; a tensor holding NaN or
    inf is refused here (one isfinite pass per tensor, small beside reading it)."""
    by_file: dict[Path, list[str]] = {}
    for src in plan:
        by_file.setdefault(files[src][0], []).append(src)
    for f, srcs in by_file.items():
        with open_safetensors(f) as fh:
            for src in srcs:
                for p in plan[src]:
                    t = fh.get_slice(src)[p.src_rows[0]:p.src_rows[1]] if p.src_rows else fh.get_tensor(src)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise CheckpointError(f"{f}: {src} has NaN/inf values")
                    yield f, src, p, (t.reshape(p.view) if p.view else t)


@torch.no_grad()
def stream_plan(model: torch.nn.Module, files: dict, plan: dict):
    """Copy the planned (already checked) tensors into the model, one in memory at a time, cast to
    the model's dtype; a value the cast turns into inf (float16 overflow) is an error too."""
    own = model.state_dict()
    for f, src, p, t in _planned(files, plan):
        dst = own[p.dst]
        v = t.to(dst.dtype)
        if v.dtype != t.dtype and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{f}: {src} overflows {dst.dtype}")
        (dst[p.rows[0]:p.rows[1]] if p.rows else dst).copy_(v)
        del t, v


def read_plan(files: dict, plan: dict) -> dict:
    """The planned tensors as a native-name state dict (pieces with `rows` are not supported)."""
    out = {}
    for _, src, p, t in _planned(files, plan):
        if p.rows:
            raise ValueError(f"read_plan: {src} fills rows of {p.dst}; stream it into a model instead")
        out[p.dst] = t
    return out


# ---- Hugging Face parts: name plans ----------------------------------------------------------------

def hf_qwen2_plan(files: dict) -> tuple[dict, set]:
    """Qwen2ForCausalLM names -> native: `model.*` -> `language_model.model.*`, `lm_head.*` ->
    `language_model.lm_head.*`; stale `rotary_emb.inv_freq` buffers are ignored."""
    plan, ignored = {}, set()
    for n in files:
        if n.endswith("rotary_emb.inv_freq"):
            ignored.add(n)
        elif n.startswith(("model.", "lm_head.")):
            plan[n] = [Piece("language_model." + n)]
    return plan, ignored


_SIGLIP_SIMPLE = {"embeddings.patch_embedding.": "patch_embed.proj.", "post_layernorm.": "norm.",
                  "head.attention.out_proj.": "attn_pool.proj.", "head.layernorm.": "attn_pool.norm.",
                  "head.mlp.": "attn_pool.mlp."}
_SIGLIP_BLOCK = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "mlp.": "mlp.",
                 "self_attn.out_proj.": "attn.proj."}
SIGLIP_PATCH = "embeddings.patch_embedding.weight"


def hf_siglip_root(files: dict, where: str) -> str:
    """The name prefix of a Hugging Face SigLIP vision tower: "vision_model." (transformers 4.x, the
    released files, a full SiglipModel) or "" (transformers 5.x SiglipVisionModel)."""
    roots = sorted(n[:-len(SIGLIP_PATCH)] for n in files if n.endswith(SIGLIP_PATCH))
    if len(roots) != 1 or roots[0] not in ("", "vision_model."):
        raise CheckpointError(f"{where}: expected one SigLIP vision tower ({SIGLIP_PATCH} or "
                              f"vision_model.{SIGLIP_PATCH}), found {roots or 'none'}")
    return roots[0]


def hf_siglip_plan(files: dict, P: str, D: int, attn_pool: bool, root: str = "vision_model.") -> tuple[dict, set]:
    """Hugging Face SigLIP names (vision tower under `root`) -> timm-layout native pieces under P.

    q/k/v_proj fill rows [0, D), [D, 2D), [2D, 3D) of the fused qkv; the position embedding [P, D]
    is viewed as [1, P, D]; the pooling head (head.probe, head.attention.in_proj_*, ...) maps to
    timm's attn_pool (in_proj rows [0, D) -> q, [D, 3D) -> kv) or is ignored when the tower has none.
    The text tower and logit_scale / logit_bias of a full SiglipModel are ignored; any other name is
    left unplanned, so check_plan reports it."""
    plan, ignored = {}, set()
    for n, (_, shape) in files.items():
        if n.startswith("text_model.") or n in ("logit_scale", "logit_bias") or n.endswith("position_ids"):
            ignored.add(n)
            continue
        if not n.startswith(root):
            continue
        r = n[len(root):]
        if r.startswith("head.") and not attn_pool:
            ignored.add(n)
        elif r == "embeddings.position_embedding.weight":
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
                a = next((a for a in _SIGLIP_BLOCK if rest.startswith(a)), None)
                if a is not None:
                    plan[n] = [Piece(P + f"blocks.{i}." + _SIGLIP_BLOCK[a] + rest[len(a):])]
        else:
            a = next((a for a in _SIGLIP_SIMPLE if r.startswith(a)), None)
            if a is not None:
                plan[n] = [Piece(P + _SIGLIP_SIMPLE[a] + r[len(a):])]
    return plan, ignored


# ---- config.json fields --------------------------------------------------------------------------

REQUIRED = object()
_KINDS = {"posint": "a positive integer", "posnum": "a positive number", "bool": "true or false",
          "str": "a string", "triple": "a list of 3 numbers"}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def typed(v, kind: str, name: str):
    """v checked against kind (see _KINDS) and converted; otherwise CheckpointError naming `name`."""
    ok = {"posint": lambda: isinstance(v, int) and not isinstance(v, bool) and v > 0,
          "posnum": lambda: _is_num(v) and v > 0, "bool": lambda: isinstance(v, bool),
          "str": lambda: isinstance(v, str),
          "triple": lambda: isinstance(v, list) and len(v) == 3 and all(_is_num(x) for x in v)}[kind]()
    if not ok:
        raise CheckpointError(f"{name} must be {_KINDS[kind]}, got {v!r}")
    return float(v) if kind == "posnum" else tuple(float(x) for x in v) if kind == "triple" else v


class Fields:
    """Typed reads of one JSON object. `where` names the file, `label` the object's path inside it
    ("" or "text_config."). An absent (or null) field takes `default` (REQUIRED: an error); when
    `notes` is a list, each such fallback is recorded there as "<label><key> absent: <source> value v"."""

    def __init__(self, obj, where: str, label: str = "", notes: Optional[list] = None, source: str = ""):
        if not isinstance(obj, dict):
            raise CheckpointError(f"{where}: {label.rstrip('.') or 'config'} must be a JSON object, "
                                  f"got {type(obj).__name__}")
        self.obj, self.where, self.label, self.notes, self.source = obj, where, label, notes, source

    def name(self, key: str) -> str:
        return f"{self.where}: {self.label}{key}"

    def error(self, key: str, text: str) -> CheckpointError:
        return CheckpointError(f"{self.name(key)} {text}")

    def get(self, key: str, kind: str, default=REQUIRED, note: bool = True):
        v = self.obj.get(key)
        if v is not None:
            return typed(v, kind, self.name(key))
        if default is REQUIRED:
            raise CheckpointError(f'{self.where}: missing field "{self.label}{key}"')
        if note and self.notes is not None:
            self.notes.append(f"{self.label}{key} absent: {self.source} value {default!r}")
        return default


# transformers' Qwen2Config defaults (the same in 4.x and 5.x) for the fields a file may leave out
QWEN2_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                  "tie_word_embeddings": False, "max_window_layers": 28}
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_KEYS_OK = ("rope_type", "type", "rope_theta")        # what a plain (unscaled) RoPE may carry


def _rope_theta(F: Fields, default) -> float:
    """RoPE's base from `rope_theta` (4.x), `rope_parameters.rope_theta` (5.x) or
    `rope_parameters.full_attention.rope_theta` (5.x per layer type). Only the default (unscaled)
    RoPE is implemented: another rope_type, a scaling key or partial rotation is refused by name."""
    thetas = {}
    if F.obj.get("rope_theta") is not None:
        thetas["rope_theta"] = typed(F.obj["rope_theta"], "posnum", F.name("rope_theta"))
    for key in ("rope_scaling", "rope_parameters"):
        r = F.obj.get(key)
        if r is None:
            continue
        if not isinstance(r, dict):
            raise F.error(key, f"must be an object, got {r!r}")
        if r and all(k in LAYER_TYPES for k in r):           # per layer type; every layer is full
            if not isinstance(r.get("full_attention"), dict):
                raise F.error(key, "has no \"full_attention\" entry")
            r, key = r["full_attention"], key + ".full_attention"
        kind = r.get("rope_type", r.get("type", "default"))
        if kind != "default":
            raise F.error(key + ".rope_type", f"{kind!r} is not supported (only 'default': this decoder "
                                              f"has no RoPE scaling)")
        for k, v in r.items():
            if k not in ROPE_KEYS_OK and v is not None and not (k == "partial_rotary_factor" and v == 1.0):
                raise F.error(f"{key}.{k}", f"{v!r} is not supported (plain RoPE over the whole head)")
        if r.get("rope_theta") is not None:
            thetas[key + ".rope_theta"] = typed(r["rope_theta"], "posnum", F.name(key + ".rope_theta"))
    if len(set(thetas.values())) > 1:
        raise CheckpointError(f"{F.where}: " + " and ".join(f"{F.label}{k} {v}" for k, v in thetas.items())
                              + " disagree")
    if thetas:
        return next(iter(thetas.values()))
    return F.get("rope_theta", "posnum", default)


def _check_attention_kind(F: Fields, layers: int):
    """Every layer must be plain full attention with q/k/v biases (what Qwen2 and this decoder do)."""
    types = F.obj.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers:
            raise F.error("layer_types", f"must list one type per layer ({layers}), got {types!r}")
        bad = [i for i, t in enumerate(types) if t != "full_attention"]
        if bad:
            raise F.error(f"layer_types[{bad[0]}]", f"is {types[bad[0]]!r}: only full attention is supported")
    if F.get("use_sliding_window", "bool", False, note=False):
        window = F.obj.get("sliding_window")
        first = F.get("max_window_layers", "posint", QWEN2_DEFAULTS["max_window_layers"], note=False)
        if window is not None and first < layers:
            raise F.error("use_sliding_window", f"is true: layers {first}..{layers - 1} would attend over a "
                                                f"window of {window} tokens, which is not supported")
    if not F.get("attention_bias", "bool", True, note=False):
        raise F.error("attention_bias", "is false, but Qwen2 attention has q/k/v biases")


def lm_config_from_hf(d: dict, where: str = "Qwen2 config", label: str = "",
                      fallback: Optional[LMConfig] = None, notes: Optional[list] = None,
                      source: str = "fallback") -> LMConfig:
    """A Hugging Face Qwen2 config (config.json of Qwen2ForCausalLM, or a released URSA text_config
    with label "text_config.") -> LMConfig.

    Read: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads (null: = heads), rms_norm_eps, the RoPE base (_rope_theta: 4.x and 5.x
    spellings), tie_word_embeddings, max_position_embeddings. Refused by name: another model_type or
    hidden_act, RoPE scaling, sliding-window layers, layer_types other than full attention,
    attention_bias false, a head_dim other than hidden / heads, sizes that do not divide, a value of
    the wrong type. attention_dropout and the token ids do not change the computation and are not read.
    Absent fields: `fallback`'s values (noted in `notes`) when given, else transformers' defaults
    (QWEN2_DEFAULTS) for the optional fields and an error for the sizes."""
    F = Fields(d, where, label, notes if fallback is not None else None, source)

    def dflt(ours: str, hf=REQUIRED):
        return getattr(fallback, ours) if fallback is not None else hf

    mt = F.get("model_type", "str", "qwen2", note=False)
    if mt != "qwen2":
        raise F.error("model_type", f"{mt!r} is not 'qwen2'")
    act = F.get("hidden_act", "str", "silu", note=False)
    if act != "silu":
        raise F.error("hidden_act", f"{act!r} is not supported (Qwen2 uses 'silu')")
    hidden = F.get("hidden_size", "posint", dflt("hidden_size"))
    heads = F.get("num_attention_heads", "posint", dflt("num_heads"))
    kv = F.get("num_key_value_heads", "posint", dflt("num_kv_heads", heads))
    layers = F.get("num_hidden_layers", "posint", dflt("num_layers"))
    if hidden % heads:
        raise F.error("hidden_size", f"{hidden} is not a multiple of {F.label}num_attention_heads {heads}")
    if heads % kv:
        raise F.error("num_attention_heads", f"{heads} is not a multiple of {F.label}num_key_value_heads {kv}")
    head_dim = F.get("head_dim", "posint", hidden // heads, note=False)
    if head_dim != hidden // heads or head_dim % 2:
        raise F.error("head_dim", f"{head_dim}: must be hidden_size / num_attention_heads = "
                                  f"{hidden // heads} and even (RoPE pairs channels)")
    _check_attention_kind(F, layers)
    Q = QWEN2_DEFAULTS
    return LMConfig(vocab_size=F.get("vocab_size", "posint", dflt("vocab_size")), hidden_size=hidden,
                    intermediate_size=F.get("intermediate_size", "posint", dflt("intermediate_size")),
                    num_layers=layers, num_heads=heads, num_kv_heads=kv,
                    rms_norm_eps=F.get("rms_norm_eps", "posnum", dflt("rms_norm_eps", Q["rms_norm_eps"])),
                    rope_theta=_rope_theta(F, dflt("rope_theta", Q["rope_theta"])),
                    max_position_embeddings=F.get("max_position_embeddings", "posint",
                                                  dflt("max_position_embeddings", Q["max_position_embeddings"])),
                    tie_word_embeddings=F.get("tie_word_embeddings", "bool",
                                              dflt("tie_word_embeddings", Q["tie_word_embeddings"])))


# transformers' SiglipVisionConfig defaults (4.37 to 5.x): a SiglipModel's nested vision_config is
# saved as its difference from them, so an absent field means this value
SIGLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "num_channels": 3,
                   "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
HF_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "erf"}


def vit_config_from_hf(d: dict, where: str = "SigLIP config") -> ViTConfig:
    """A Hugging Face SiglipVisionConfig dict (or a SiglipConfig holding "vision_config") -> ViTConfig.

    Read: sizes, image_size, patch_size, layer_norm_eps, hidden_act (its GELU form); absent fields
    take SIGLIP_DEFAULTS. Refused by name: another model_type or activation, num_channels other than
    3, an image_size that is not a multiple of patch_size, a hidden_size that the heads do not divide.
    The HF pooling head (vision_use_head) does not change the patch features: attn_pool is False and
    hf_siglip_plan ignores its tensors. image_mean / image_std live in the preprocessor config: the
    SigLIP defaults (0.5) are kept."""
    F = Fields(d, where)
    if "vision_config" in d:
        F = Fields(d["vision_config"], where, "vision_config.")
    mt = F.get("model_type", "str", "siglip_vision_model", note=False)
    if mt != "siglip_vision_model":
        raise F.error("model_type", f"{mt!r} is not 'siglip_vision_model'")
    get = {k: F.get(k, "str" if k == "hidden_act" else "posnum" if k == "layer_norm_eps" else "posint", v)
           for k, v in SIGLIP_DEFAULTS.items()}
    if get["hidden_act"] not in HF_GELU:
        raise F.error("hidden_act", f"{get['hidden_act']!r} is not supported (one of {', '.join(HF_GELU)})")
    if get["num_channels"] != 3:
        raise F.error("num_channels", f"{get['num_channels']} is not 3 (RGB)")
    if get["image_size"] % get["patch_size"]:
        raise F.error("image_size", f"{get['image_size']} is not a multiple of {F.label}patch_size {get['patch_size']}")
    if get["hidden_size"] % get["num_attention_heads"]:
        raise F.error("hidden_size", f"{get['hidden_size']} is not a multiple of {F.label}num_attention_heads "
                                     f"{get['num_attention_heads']}")
    return ViTConfig(image_size=get["image_size"], patch_size=get["patch_size"], hidden_size=get["hidden_size"],
                     intermediate_size=get["intermediate_size"], num_layers=get["num_hidden_layers"],
                     num_heads=get["num_attention_heads"], layer_norm_eps=get["layer_norm_eps"],
                     gelu=HF_GELU[get["hidden_act"]], attn_pool=False)


# ---- this project's model directories ------------------------------------------------------------

def save_state_dict(sd: dict, folder, max_shard_bytes: int = SHARD_BYTES, metadata: Optional[dict] = None):
    """Write sd into folder as model.safetensors, or shards + index above max_shard_bytes (each file
    written atomically, ursa.io)."""
    folder = Path(folder)
    sd = {n: t.detach().contiguous().cpu() for n, t in sd.items()}
    shards, cur, size = [], {}, 0
    for n, t in sd.items():
        b = t.numel() * t.element_size()
        if cur and size + b > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[n] = t
        size += b
    shards.append(cur)
    meta = {"format": "pt", **(metadata or {})}
    names = [SINGLE_NAME] if len(shards) == 1 else \
        [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    for name, sh in zip(names, shards):
        with io.atomic_file(folder / name) as tmp:
            save_file(sh, str(tmp), metadata=meta)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in sd.values())
        io.write_json(folder / INDEX_NAME, {"metadata": {"total_size": total},
                                            "weight_map": {n: f for f, sh in zip(names, shards) for n in sh}})


def save_model(model, out_dir, extra: Optional[dict] = None, max_shard_bytes: int = SHARD_BYTES,
               state_dict: Optional[dict] = None):
    """Write config.json + safetensors as one folder swap (ursa.io.atomic_dir)."""
    cfg: ModelConfig = model.cfg
    with io.atomic_dir(out_dir) as tmp:
        io.write_json(tmp / "config.json", {"ursa_config": cfg.to_dict(), **(extra or {})})
        save_state_dict(state_dict if state_dict is not None else model.state_dict(), tmp, max_shard_bytes)


def _check_types(obj, where: str):
    """Every field of a (nested) config dataclass has its default's type (bool, int, float, str,
    tuple of numbers); ints given for floats become floats. Raises naming the field."""
    for f in dataclasses.fields(obj):
        v, name = getattr(obj, f.name), f"{where}.{f.name}"
        if dataclasses.is_dataclass(v):
            _check_types(v, name)
            continue
        d = f.default if f.default is not dataclasses.MISSING else \
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if d is None:
            continue
        if isinstance(d, bool):
            ok, kind = isinstance(v, bool), "true or false"
        elif isinstance(d, int):
            ok, kind = isinstance(v, int) and not isinstance(v, bool), "an integer"
        elif isinstance(d, float):
            ok, kind = _is_num(v), "a number"
            if ok:
                setattr(obj, f.name, float(v))
        elif isinstance(d, str):
            ok, kind = isinstance(v, str), "a string"
        else:
            ok = isinstance(v, tuple) and all(_is_num(x) for x in v)
            kind = "a list of numbers"
        if not ok:
            raise CheckpointError(f"{name} must be {kind}, got {v!r}")


def read_config(model_dir, recover: bool = True) -> ModelConfig:
    """config.json of a model directory -> a validated ModelConfig. An unknown field, a value of the
    wrong type or sizes that do not fit are one error naming the file and the field. recover: first
    finish or undo an interrupted folder swap (ursa.io.recover_dir)."""
    d = Path(model_dir)
    if recover:
        io.recover_dir(d)
    p = d / "config.json"
    if not p.exists():
        raise CheckpointError(f"{d}: no config.json")
    try:
        raw = io.read_json(p, "config.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(raw, dict) or "ursa_config" not in raw:
        raise CheckpointError(f"{p}: no \"ursa_config\" (not a model directory written by this project; "
                              f"released Hugging Face directories load through ursa.release.load_released)")
    where = f"{p}: ursa_config"
    try:
        cfg = ModelConfig.from_dict(raw["ursa_config"], where=where)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    _check_types(cfg, where)
    try:
        return cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"{where}.{e}") from None


def load_model(model_dir, dtype: torch.dtype = torch.float32, device="cpu", value_head: Optional[bool] = None,
               head_seed: int = 0) -> URSAModel:
    """Build the model from config.json and strictly load its weights (streamed: built on the meta
    device, allocated in `dtype` on `device`, filled tensor by tensor).

    value_head=True on a directory without one adds a fresh head (ursa.model.init_value_head with
    head_seed: the same head on every load); value_head=False on a directory with one is an error."""
    d = Path(model_dir)
    io.recover_dir(d)
    cfg = read_config(d, recover=False)
    has_head = cfg.value_head
    want = has_head if value_head is None else bool(value_head)
    if has_head and not want:
        raise CheckpointError(f"{d}: has a value head; load it with value_head=True")
    cfg.value_head = want
    files = weight_files(d)
    with torch.device("meta"):
        model = URSAModel(cfg)
    model = model.to(dtype).to_empty(device=device)
    fresh = want and not has_head
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()
                if not (fresh and n.startswith("score."))}
    plan = identity_plan(files)
    check_plan(expected, files, plan, set(), str(d))
    stream_plan(model, files, plan)
    if fresh:
        init_value_head(model, head_seed)
    return model
