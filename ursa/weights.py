"""Checkpoint I/O: model directories (config.json + safetensors), strict loads, name maps.

A model directory holds
    config.json                      ursa.config.ModelConfig as JSON (key "ursa_config") + metadata
    model.safetensors                or model-0000k-of-0000n.safetensors + model.safetensors.index.json
Native names are the released URSA names (see ursa/config.py), so a released URSA-8B / URSA-RM-8B
file loads with the identity map. Hugging Face layouts of the parts map onto them:
    Qwen2ForCausalLM    model.* -> language_model.model.*, lm_head.* -> language_model.lm_head.*
    SiglipVisionModel   vision_model.embeddings / encoder.layers.N / post_layernorm
                        -> timm names (patch_embed.proj, pos_embed, blocks.N.attn.qkv, ..., norm),
                        q/k/v concatenated into qkv.
lm_config_from_hf / vit_config_from_hf map those parts' config.json dicts onto LMConfig / ViTConfig
(tests/test_parity.py checks all four maps against outputs of the transformers models).

Loading is strict: every expected tensor found, every file tensor used, every shape equal; anything
else raises one error that names the tensors. Writes go to a temporary name and are renamed, so a
crash never leaves half a checkpoint. Only safetensors and JSON are read: nothing is unpickled.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ursa.config import LMConfig, ModelConfig, ViTConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    pass


# ---- strict state-dict checks ------------------------------------------------------------------

def check_state_dict(expected: dict, got_shapes: dict, source: str):
    """expected: name -> shape; got_shapes: name -> shape. Raise naming every problem."""
    missing = sorted(set(expected) - set(got_shapes))
    unexpected = sorted(set(got_shapes) - set(expected))
    bad = sorted(n for n in set(expected) & set(got_shapes)
                 if tuple(expected[n]) != tuple(got_shapes[n]))
    problems = []
    if missing:
        problems.append(f"lacks {len(missing)} tensor(s): {_names(missing)}")
    if unexpected:
        problems.append(f"has {len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
    if bad:
        problems.append("shape mismatch: " + ", ".join(
            f"{n} {list(got_shapes[n])} (expected {list(expected[n])})" for n in bad[:10])
            + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def _names(names, k=10):
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def load_state_dict_strict(model: torch.nn.Module, sd: dict, source: str = "state dict"):
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    check_state_dict(expected, {n: tuple(t.shape) for n, t in sd.items()}, source)
    model.load_state_dict(sd, strict=True)


# ---- safetensors files (single or sharded) -------------------------------------------------------

def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a directory: the index's shards, or model.safetensors."""
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / INDEX_NAME
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(wm.values()))
        absent = [f for f in files if not (path / f).exists()]
        if absent:
            raise CheckpointError(f"{index}: names shard(s) that are missing: {', '.join(absent)}")
        # every tensor the index names must be in its shard
        for f in files:
            with safe_open(str(path / f), "pt") as fh:
                keys = set(fh.keys())
            lost = [n for n, s in wm.items() if s == f and n not in keys]
            if lost:
                raise CheckpointError(f"{index}: names tensor(s) not in {f}: {_names(lost)}")
        return [path / f for f in files]
    single = path / SINGLE_NAME
    if single.exists():
        return [single]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if found:
        raise CheckpointError(f"{path}: has {found} but no {INDEX_NAME}")
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}")


def file_shapes(files: Iterable[Path]) -> dict:
    shapes = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for n in fh.keys():
                if n in shapes:
                    raise CheckpointError(f"{f}: tensor {n} appears in more than one shard")
                shapes[n] = tuple(fh.get_slice(n).get_shape())
    return shapes


def stream_tensors(files: Iterable[Path]):
    """Yield (name, tensor) shard by shard (peak memory: one tensor, not the whole file)."""
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for n in fh.keys():
                yield n, fh.get_tensor(n)


# ---- name maps -----------------------------------------------------------------------------------

def identity_map(shapes: dict) -> dict:
    """name in file -> list of (native name, transform) ; here 1:1."""
    return {n: n for n in shapes}


def hf_qwen2_name(name: str) -> str:
    """Hugging Face Qwen2ForCausalLM name -> native name."""
    if name.startswith("model.") or name.startswith("lm_head."):
        return "language_model." + name
    raise CheckpointError(f"not a Qwen2ForCausalLM tensor name: {name}")


def _hf_field(d: dict, key: str, where: str):
    if key not in d or d[key] is None:
        raise CheckpointError(f"{where}: missing field \"{key}\"")
    return d[key]


def lm_config_from_hf(d: dict, where: str = "Qwen2 config") -> LMConfig:
    """A Hugging Face Qwen2 config.json dict (Qwen2ForCausalLM) -> LMConfig.

    Reads RoPE's theta from `rope_theta` (transformers 4.x files, the released Qwen2.5 ones) or
    `rope_parameters.rope_theta` (transformers 5.x). What this decoder does not implement (another
    activation, RoPE scaling, sliding-window attention, a head_dim other than hidden / heads) is an
    error naming the field, never silently ignored."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(d).__name__}")
    mt = d.get("model_type", "qwen2")
    if mt != "qwen2":
        raise CheckpointError(f"{where}: model_type {mt!r} is not 'qwen2'")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (Qwen2 uses 'silu')")
    if d.get("use_sliding_window"):
        raise CheckpointError(f"{where}: use_sliding_window true is not supported")
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for k, r in (("rope_parameters", rope), ("rope_scaling", scaling)):
        kind = r.get("rope_type", r.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"{where}: {k}.rope_type {kind!r} is not supported (only 'default')")
    theta = d.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"{where}: missing field \"rope_theta\" (or rope_parameters.rope_theta)")
    hidden, heads = int(_hf_field(d, "hidden_size", where)), int(_hf_field(d, "num_attention_heads", where))
    kv = d.get("num_key_value_heads") or heads
    if d.get("head_dim") is not None and int(d["head_dim"]) * heads != hidden:
        raise CheckpointError(f"{where}: head_dim {d['head_dim']} != hidden_size {hidden} / "
                              f"num_attention_heads {heads} (not supported)")
    return LMConfig(vocab_size=int(_hf_field(d, "vocab_size", where)), hidden_size=hidden,
                    intermediate_size=int(_hf_field(d, "intermediate_size", where)),
                    num_layers=int(_hf_field(d, "num_hidden_layers", where)), num_heads=heads,
                    num_kv_heads=int(kv), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                    rope_theta=float(theta),
                    max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
                    tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))


_HF_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "erf"}


def vit_config_from_hf(d: dict, where: str = "SigLIP config") -> ViTConfig:
    """A Hugging Face SiglipVisionConfig dict (or a SiglipConfig holding "vision_config") -> ViTConfig.

    The HF pooling head (`head.*`, vision_use_head) has another layout than timm's attn_pool; it is
    dropped on load (hf_siglip_to_timm), so attn_pool is False. image_mean / image_std live in the
    preprocessor config, not here: the defaults (0.5, SigLIP's) are kept."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if "vision_config" in d:
        d, where = d["vision_config"], where + ".vision_config"
    mt = d.get("model_type", "siglip_vision_model")
    if mt != "siglip_vision_model":
        raise CheckpointError(f"{where}: model_type {mt!r} is not 'siglip_vision_model'")
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _HF_GELU:
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported "
                              f"(one of {', '.join(_HF_GELU)})")
    if int(d.get("num_channels", 3)) != 3:
        raise CheckpointError(f"{where}: num_channels {d['num_channels']} is not 3")
    return ViTConfig(image_size=int(_hf_field(d, "image_size", where)),
                     patch_size=int(_hf_field(d, "patch_size", where)),
                     hidden_size=int(_hf_field(d, "hidden_size", where)),
                     intermediate_size=int(_hf_field(d, "intermediate_size", where)),
                     num_layers=int(_hf_field(d, "num_hidden_layers", where)),
                     num_heads=int(_hf_field(d, "num_attention_heads", where)),
                     layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
                     gelu=_HF_GELU[act], attn_pool=False)


def load_model_weights(model: torch.nn.Module, path, name_fn: Callable[[str], str] = lambda n: n,
                       prefix_filter: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """Strictly load safetensors file(s) at `path` into `model`, streaming shard by shard.

    name_fn maps a file name to a native name. prefix_filter: only native tensors starting with it
    are expected (to load one part, e.g. "language_model.")."""
    files = safetensors_files(Path(path))
    fshapes = {name_fn(n): s for n, s in file_shapes(files).items()}
    own = model.state_dict()
    expected = {n: tuple(t.shape) for n, t in own.items()
                if prefix_filter is None or n.startswith(prefix_filter)}
    check_state_dict(expected, fshapes, str(path))
    with torch.no_grad():
        for n, t in stream_tensors(files):
            dst = own[name_fn(n)]
            dst.copy_(t.to(dtype or dst.dtype))
    return model


def load_hf_siglip(model, path):
    """Load a Hugging Face SiglipVisionModel file into the siglip tower (kind "siglip")."""
    files = safetensors_files(Path(path))
    sd = hf_siglip_prefixed(dict(stream_tensors(files)))
    native = hf_siglip_to_timm(sd, prefix="vision_model.vision_tower.")
    own = model.state_dict()
    expected = {n: tuple(t.shape) for n, t in own.items() if n.startswith("vision_model.vision_tower.")}
    check_state_dict(expected, {n: tuple(t.shape) for n, t in native.items()}, str(path))
    with torch.no_grad():
        for n, t in native.items():
            own[n].copy_(t)
    return model


def hf_siglip_prefixed(sd: dict) -> dict:
    """Released SigLIP files (and transformers 4.x) name SiglipVisionModel tensors `vision_model.*`;
    transformers 5.x saves the same model without that prefix (`embeddings.*`, `encoder.layers.N.*`,
    `post_layernorm.*`). Add the prefix to an unprefixed file so both layouts map the same way."""
    if any(n.startswith("vision_model.") for n in sd):
        return sd
    return {"vision_model." + n: t for n, t in sd.items()}


def hf_siglip_to_timm(sd: dict, prefix: str = "") -> dict:
    """HF SiglipVisionModel state dict -> timm-layout names (q/k/v -> qkv, pos emb -> [1, P, D])."""
    out, used = {}, set()

    def take(n):
        if n not in sd:
            raise CheckpointError(f"SigLIP checkpoint lacks {n}")
        used.add(n)
        return sd[n]

    p = "vision_model."
    out[prefix + "patch_embed.proj.weight"] = take(p + "embeddings.patch_embedding.weight")
    out[prefix + "patch_embed.proj.bias"] = take(p + "embeddings.patch_embedding.bias")
    out[prefix + "pos_embed"] = take(p + "embeddings.position_embedding.weight")[None]   # [1, P, D]
    n_layers = len({k.split(".")[3] for k in sd if k.startswith(p + "encoder.layers.")})
    for i in range(n_layers):
        s, d = f"{p}encoder.layers.{i}.", f"{prefix}blocks.{i}."
        for a, b in [("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                     ("mlp.fc2", "mlp.fc2"), ("self_attn.out_proj", "attn.proj")]:
            for w in ("weight", "bias"):
                out[d + f"{b}.{w}"] = take(s + f"{a}.{w}")
        for w in ("weight", "bias"):
            out[d + f"attn.qkv.{w}"] = torch.cat(
                [take(s + f"self_attn.{x}_proj.{w}") for x in "qkv"], 0)        # [3D, ...]
    for w in ("weight", "bias"):
        out[prefix + f"norm.{w}"] = take(p + f"post_layernorm.{w}")
    rest = sorted(set(sd) - used)
    head = [n for n in rest if n.startswith(p + "head.")]
    if set(rest) - set(head):
        raise CheckpointError(f"SigLIP checkpoint has unexpected tensor(s): {_names(sorted(set(rest) - set(head)))}")
    return out


# ---- model directories ---------------------------------------------------------------------------

def _atomic_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _commit_dir(tmp: Path, out_dir: Path):
    out_dir = Path(out_dir)
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def save_state_dict(sd: dict, folder: Path, max_shard_bytes: int = 5 * 2**30,
                    metadata: Optional[dict] = None):
    """Write sd into folder as model.safetensors, or shards + index if it exceeds max_shard_bytes."""
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
    if len(shards) == 1:
        save_file(shards[0], str(Path(folder) / SINGLE_NAME), metadata=meta)
        return
    wm = {}
    for k, sh in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(Path(folder) / fname), metadata=meta)
        wm.update({n: fname for n in sh})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (Path(folder) / INDEX_NAME).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": wm}, indent=1))


def save_model(model, out_dir, extra: Optional[dict] = None, max_shard_bytes: int = 5 * 2**30,
               state_dict: Optional[dict] = None):
    """Write config.json + safetensors into out_dir atomically (temp dir, then rename)."""
    tmp = _atomic_dir(Path(out_dir))
    cfg: ModelConfig = model.cfg
    (tmp / "config.json").write_text(json.dumps({"ursa_config": cfg.to_dict(), **(extra or {})}, indent=1))
    save_state_dict(state_dict if state_dict is not None else model.state_dict(), tmp, max_shard_bytes)
    _commit_dir(tmp, Path(out_dir))


def read_config(model_dir) -> ModelConfig:
    p = Path(model_dir) / "config.json"
    if not p.exists():
        raise CheckpointError(f"{model_dir}: no config.json")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if "ursa_config" not in d:
        raise CheckpointError(f"{p}: no \"ursa_config\" (not a model directory written by this project; "
                              f"released Hugging Face directories load through ursa.release)")
    return ModelConfig.from_dict(d["ursa_config"], where=str(p)).validate()


def load_model(model_dir, dtype: torch.dtype = torch.float32, device="cpu", value_head: Optional[bool] = None):
    """Build the model from config.json and strictly load its weights.

    value_head=True on a directory without one adds a freshly initialised head (PRM from SFT)."""
    from ursa.model import URSAModel, init_weights
    cfg = read_config(model_dir)
    want_head = cfg.value_head if value_head is None else value_head
    has_head = cfg.value_head
    cfg.value_head = want_head
    model = URSAModel(cfg)
    init_weights(model, seed=0)
    if want_head and not has_head:
        with torch.no_grad():
            model.score.weight.normal_(0, 0.02)
            model.score.bias.zero_()
        skip = {"score.weight", "score.bias"}
        files = safetensors_files(Path(model_dir))
        own = model.state_dict()
        expected = {n: tuple(t.shape) for n, t in own.items() if n not in skip}
        check_state_dict(expected, file_shapes(files), str(model_dir))
        with torch.no_grad():
            for n, t in stream_tensors(files):
                own[n].copy_(t)
    else:
        if has_head and not want_head:
            raise CheckpointError(f"{model_dir}: has a value head; load it with value_head=True")
        load_model_weights(model, model_dir)
    return model.to(dtype=dtype, device=device)
