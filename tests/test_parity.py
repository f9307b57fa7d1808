"""Parity with Hugging Face transformers, and the Stage I part loaders. Our Qwen2 decoder and SigLIP
ViT, loaded from HF-layout files through the production loaders (ursa.release.load_qwen2_lm_into /
load_siglip_into: the streaming plans and config maps of ursa/weights.py), reproduce the outputs that
transformers computed for the same weights (tests/fixtures/parity/, written by
make_parity_fixtures.py; this test does not need transformers). The end of the file loads the parts
into the released (tiny-hybrid) architecture from every layout.

Both transformers layouts are checked. The fixtures' Qwen2 config.json spells the RoPE base the 5.x
way (`rope_parameters`), SigLIP's names carry the 4.x / released `vision_model.` prefix; the
`<name>_transformers4` / `_transformers5` folders the fixture script writes are used when present,
and otherwise built here by rewriting exactly what transformers changes between 4.x and 5.x (the
config key, the name prefix).

The fixtures' weights are large random values (attention far from uniform) and the Qwen2 fixture uses
rope_theta 1000, not our default, so a wrong name, swapped q/k/v, RoPE layout, GELU variant or a
config field dropped by the map moves the outputs far beyond the tolerance (test_fixtures_are_sensitive
shows it for two of them). Row 1 of the Qwen2 batch is left-padded: it is compared at its real
positions, with our own position rule and with the position ids HF's generate() makes.
"""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ursa.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig, ViTConfig, get_config
from ursa.model import URSAModel, init_weights
from ursa.release import load_qwen2_lm_into, load_siglip_into
from ursa.weights import CheckpointError, lm_config_from_hf, save_state_dict, vit_config_from_hf

from hf_layouts import qwen2_config_as, siglip_names_as

FIX = Path(__file__).parent / "fixtures" / "parity"
TOL = dict(atol=1e-5, rtol=1e-5)
IMAGE_TOKEN = 96          # the fixture's input ids are all below 90


def _json(p: Path) -> dict:
    return json.loads(p.read_text())


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the two transformers layouts ---------------------------------------------------------------





def _dir(tmp: Path, config: dict, sd: dict) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config))
    save_file(sd, str(tmp / "model.safetensors"))
    return tmp


def layout_dir(kind: str, version: int, tmp: Path) -> Path:
    """parity/<kind>_transformers<version>/ when make_parity_fixtures.py wrote it, else that layout
    built from parity/<kind>/ (kind: qwen2 | siglip)."""
    d = FIX / f"{kind}_transformers{version}"
    if d.is_dir():
        return d
    config, sd = _json(FIX / kind / "config.json"), load_file(str(FIX / kind / "model.safetensors"))
    if kind == "qwen2":
        config = qwen2_config_as(config, version)
    else:
        sd = siglip_names_as(sd, version)
    return _dir(tmp / f"{kind}{version}", config, sd)


def _small_vision() -> VisionConfig:
    return VisionConfig(siglip=ViTConfig(image_size=16, patch_size=8, hidden_size=16,
                                         intermediate_size=32, num_layers=1, num_heads=2))


def _small_lm(vocab=97) -> LMConfig:
    return LMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=4, num_kv_heads=2)


def _qwen2_model(lm_cfg: LMConfig, qwen_dir: Path = FIX / "qwen2") -> URSAModel:
    """A URSAModel whose language_model comes from a HF Qwen2 directory (the vision part is unused)."""
    cfg = ModelConfig(vision=_small_vision(), projector=ProjectorConfig(out_dim=lm_cfg.hidden_size),
                      lm=lm_cfg, image_token_id=IMAGE_TOKEN)
    return load_qwen2_lm_into(URSAModel(cfg).eval(), qwen_dir)


def _siglip_model(vit_cfg: ViTConfig, siglip_dir: Path = FIX / "siglip") -> URSAModel:
    cfg = ModelConfig(vision=VisionConfig(siglip=vit_cfg), projector=ProjectorConfig(out_dim=32),
                      lm=_small_lm(), image_token_id=IMAGE_TOKEN)
    return load_siglip_into(URSAModel(cfg).eval(), siglip_dir)


def _qwen2_outputs(model):
    inp, ref = load_file(str(FIX / "qwen2" / "inputs.safetensors")), load_file(str(FIX / "qwen2" / "outputs.safetensors"))
    with torch.no_grad():
        ours = model(inp["input_ids"], attention_mask=inp["attention_mask"])
        hf_pos = model(inp["input_ids"], attention_mask=inp["attention_mask"], position_ids=inp["position_ids"])
    return inp, ref, ours, hf_pos


# ---- Qwen2 -----------------------------------------------------------------------------------------

def test_fixture_config_is_the_transformers5_spelling():
    c = _json(FIX / "qwen2" / "config.json")
    assert "rope_theta" not in c and c["rope_parameters"] == {"rope_theta": 1000.0, "rope_type": "default"}


@pytest.mark.parametrize("version", [4, 5])
def test_qwen2_logits_and_hidden_match_hf_in_both_config_layouts(tmp_path, version):
    d = layout_dir("qwen2", version, tmp_path)
    config = _json(d / "config.json")
    assert ("rope_theta" in config) == (version == 4) and ("rope_parameters" in config) == (version == 5)
    lm = lm_config_from_hf(config, str(d / "config.json"))
    assert lm.rope_theta == 1000.0                                             # not the default 10000
    inp, ref, ours, hf_pos = _qwen2_outputs(_qwen2_model(lm, d))
    real = inp["attention_mask"].bool()                                        # [B, T]
    assert int((~real).sum()) == int((~real[1]).sum()) == 4                   # row 1: 4 left pads
    for out in (ours, hf_pos):
        torch.testing.assert_close(out.hidden[real], ref["hidden"][real], **TOL)
        torch.testing.assert_close(out.logits[real], ref["logits"][real], **TOL)
    assert ref["logits"][real].abs().max() > 1.0                               # not a near-zero output


def test_qwen2_missing_or_extra_tensor_is_named(tmp_path):
    sd = load_file(str(FIX / "qwen2" / "model.safetensors"))
    cfg = lm_config_from_hf(_json(FIX / "qwen2" / "config.json"))
    gone = "model.layers.1.mlp.up_proj.weight"
    d = _dir(tmp_path / "a", _json(FIX / "qwen2" / "config.json"), {n: t for n, t in sd.items() if n != gone})
    model = URSAModel(ModelConfig(vision=_small_vision(), projector=ProjectorConfig(out_dim=32),
                                  lm=cfg, image_token_id=IMAGE_TOKEN))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\): language_model\." + gone.replace(".", r"\.")):
        load_qwen2_lm_into(model, d)
    d = _dir(tmp_path / "b", _json(FIX / "qwen2" / "config.json"),
             {**sd, "model.layers.2.mlp.up_proj.weight": sd[gone].clone()})
    with pytest.raises(CheckpointError, match=r"does not use: model\.layers\.2\.mlp\.up_proj\.weight"):
        load_qwen2_lm_into(model, d)


def test_qwen2_config_that_disagrees_with_the_model_is_refused(tmp_path):
    """The RoPE base and the head counts do not show in the tensor shapes: config.json must agree."""
    sd = load_file(str(FIX / "qwen2" / "model.safetensors"))
    base = _json(FIX / "qwen2" / "config.json")
    lm = lm_config_from_hf(base)
    model = URSAModel(ModelConfig(vision=_small_vision(), projector=ProjectorConfig(out_dim=32),
                                  lm=lm, image_token_id=IMAGE_TOKEN))
    for version in (4, 5):
        c = qwen2_config_as(base, version)
        if version == 4:
            c["rope_theta"] = 10000.0
        else:
            c["rope_parameters"]["rope_theta"] = 10000.0
        d = _dir(tmp_path / f"theta{version}", c, sd)
        with pytest.raises(CheckpointError, match=r"config.json: rope_theta 10000.0 differs from the model's "
                                                  r"lm.rope_theta 1000.0"):
            load_qwen2_lm_into(model, d)
    # 8 heads of 4 channels and 4 kv heads: the same q/k/v shapes as 4 heads of 8 and 2 kv heads
    d = _dir(tmp_path / "heads", {**base, "num_attention_heads": 8, "num_key_value_heads": 4}, sd)
    with pytest.raises(CheckpointError, match="num_attention_heads 8 differs from the model's lm.num_heads 4"):
        load_qwen2_lm_into(model, d)


# ---- SigLIP ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
def test_siglip_last_hidden_state_matches_hf_in_both_name_layouts(tmp_path, version):
    d = layout_dir("siglip", version, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    assert all(n.startswith("vision_model.") == (version == 4) for n in sd) and len(sd) == 37
    model = _siglip_model(vit_config_from_hf(_json(d / "config.json")), d)
    px = load_file(str(FIX / "siglip" / "inputs.safetensors"))["pixel_values"]
    ref = load_file(str(FIX / "siglip" / "outputs.safetensors"))["last_hidden_state"]
    with torch.no_grad():
        ours = model.vision_model.vision_tower(px)                             # normalised input
        # through the whole tower: [0, 1] pixels, normalised with SigLIP's mean = std = 0.5
        (tower,) = model.vision_model(px * 0.5 + 0.5)
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(tower, ref, **TOL)


def test_siglip_missing_or_extra_tensor_is_named_and_hf_head_is_dropped(tmp_path):
    sd = load_file(str(FIX / "siglip" / "model.safetensors"))
    config = _json(FIX / "siglip" / "config.json")
    vit = vit_config_from_hf(config)
    model = URSAModel(ModelConfig(vision=VisionConfig(siglip=vit), projector=ProjectorConfig(out_dim=32),
                                  lm=_small_lm(), image_token_id=IMAGE_TOKEN))
    gone = "encoder.layers.1.self_attn.k_proj.bias"
    for version in (4, 5):
        named = siglip_names_as({n: t for n, t in sd.items() if not n.endswith(gone)}, version)
        with pytest.raises(CheckpointError, match=r"vision_model\.vision_tower\.blocks\.1\.attn\.qkv\.bias is "
                                                  r"covered by rows \[\(0, 32\), \(64, 96\)\], not exactly once"):
            load_siglip_into(model, _dir(tmp_path / f"gone{version}", config, named))
    extra = "vision_model.encoder.layers.0.extra.weight"
    with pytest.raises(CheckpointError, match=extra.replace(".", r"\.")):
        load_siglip_into(model, _dir(tmp_path / "extra", config, {**sd, extra: torch.zeros(2)}))
    # HF's pooling head (vision_use_head) is not used by URSA: its tensors are accepted and dropped
    before = {n: t.clone() for n, t in model.state_dict().items()}
    load_siglip_into(model, _dir(tmp_path / "head", config, {**sd, "vision_model.head.probe": torch.zeros(1, 1, 32)}))
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and all(n.startswith("vision_model.vision_tower.") for n in changed)


def test_siglip_config_that_disagrees_with_the_tower_is_refused(tmp_path):
    sd = load_file(str(FIX / "siglip" / "model.safetensors"))
    config = _json(FIX / "siglip" / "config.json")
    vit = vit_config_from_hf(config)
    model = URSAModel(ModelConfig(vision=VisionConfig(siglip=vit), projector=ProjectorConfig(out_dim=32),
                                  lm=_small_lm(), image_token_id=IMAGE_TOKEN))
    with pytest.raises(CheckpointError, match="layer_norm_eps 1e-05 differs from the tower's layer_norm_eps 1e-06"):
        load_siglip_into(model, _dir(tmp_path / "eps", {**config, "layer_norm_eps": 1e-5}, sd))
    d = _dir(tmp_path / "gelu", {**config, "hidden_act": "gelu"}, sd)            # the erf form
    with pytest.raises(CheckpointError, match="hidden_act computes the erf GELU but the tower the tanh one"):
        load_siglip_into(model, d)
    load_siglip_into(model, d, allow_gelu_mismatch=True)                        # explicit: loads


# ---- the tests can fail -----------------------------------------------------------------------------

def test_fixtures_are_sensitive():
    """A config map that dropped the RoPE base, or used the erf GELU, would fail the parity tests."""
    lm = lm_config_from_hf(_json(FIX / "qwen2" / "config.json"))
    right = _qwen2_model(lm)
    lm.rope_theta = 10000.0                                                    # LMConfig's default
    wrong = URSAModel(ModelConfig(vision=_small_vision(), projector=ProjectorConfig(out_dim=32), lm=lm,
                                  image_token_id=IMAGE_TOKEN)).eval()
    wrong.load_state_dict(right.state_dict())
    inp, ref, out, _ = _qwen2_outputs(wrong)
    real = inp["attention_mask"].bool()
    assert (out.logits[real] - ref["logits"][real]).abs().max() > 1e-3
    vit = vit_config_from_hf(_json(FIX / "siglip" / "config.json"))
    right = _siglip_model(vit)
    vit.gelu = "erf"
    wrong = URSAModel(ModelConfig(vision=VisionConfig(siglip=vit), projector=ProjectorConfig(out_dim=32),
                                  lm=_small_lm(), image_token_id=IMAGE_TOKEN)).eval()
    wrong.load_state_dict(right.state_dict())
    px = load_file(str(FIX / "siglip" / "inputs.safetensors"))["pixel_values"]
    with torch.no_grad():
        y = wrong.vision_model.vision_tower(px)
    assert (y - load_file(str(FIX / "siglip" / "outputs.safetensors"))["last_hidden_state"]).abs().max() > 1e-4


# ---- the Qwen2 config map: every field that changes the computation, read or refused ------------------

QWEN25_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
             "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
             "max_position_embeddings": 4096, "tie_word_embeddings": False, "attention_dropout": 0.0,
             "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}


def _refused(d: dict, pattern: str):
    with pytest.raises(CheckpointError) as e:
        lm_config_from_hf(d, "Q/config.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("Q/config.json: "), msg
    assert re.search(pattern, msg), msg


def test_qwen2_sizes_are_read_and_checked():
    c = lm_config_from_hf(QWEN25_7B)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.rope_theta, c.max_position_embeddings, c.tie_word_embeddings, c.head_dim) == \
        (152064, 3584, 18944, 28, 28, 4, 10000.0, 4096, False, 128)
    assert lm_config_from_hf({**QWEN25_7B, "num_key_value_heads": None}).num_kv_heads == 28   # HF: = heads
    _refused({k: v for k, v in QWEN25_7B.items() if k != "intermediate_size"}, 'missing field "intermediate_size"')
    _refused({**QWEN25_7B, "hidden_size": "3584"}, "hidden_size must be a positive integer, got '3584'")
    _refused({**QWEN25_7B, "num_hidden_layers": 28.0}, "num_hidden_layers must be a positive integer")
    _refused({**QWEN25_7B, "hidden_size": 3585}, "hidden_size 3585 is not a multiple of num_attention_heads 28")
    _refused({**QWEN25_7B, "num_key_value_heads": 3}, "num_attention_heads 28 is not a multiple of num_key_value_heads 3")
    _refused({**QWEN25_7B, "model_type": "llama"}, "model_type 'llama' is not 'qwen2'")


def test_qwen2_rope_base_in_every_spelling():
    v4 = lm_config_from_hf({**QWEN25_7B, "rope_theta": 1e6})
    v5 = {k: v for k, v in QWEN25_7B.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    per_layer = {**v5, "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
    legacy_type = {**QWEN25_7B, "rope_theta": 1e6, "rope_scaling": {"type": "default"}}
    assert [lm_config_from_hf(d).rope_theta for d in (v5, per_layer, legacy_type)] == [1e6] * 3 == [v4.rope_theta] * 3
    # absent everywhere: transformers' default base
    assert lm_config_from_hf({k: v for k, v in v5.items() if k != "rope_parameters"}).rope_theta == 10000.0
    _refused({**v5, "rope_theta": 5e5}, r"rope_theta 500000.0 and rope_parameters.rope_theta 1000000.0 disagree")
    _refused({**v5, "rope_parameters": {"rope_theta": "big"}}, "rope_parameters.rope_theta must be a positive number")


def test_qwen2_rope_scaling_is_refused_in_both_spellings():
    _refused({**QWEN25_7B, "rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type 'yarn' is not supported")
    _refused({**QWEN25_7B, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type 'linear'")
    _refused({**QWEN25_7B, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
             "rope_parameters.rope_type 'dynamic'")
    _refused({**QWEN25_7B, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
             "rope_parameters.partial_rotary_factor 0.5 is not supported")
    assert lm_config_from_hf({**QWEN25_7B, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                               "partial_rotary_factor": 1.0}}).rope_theta == 1e4


def test_qwen2_tie_word_embeddings_and_rms_norm_eps_are_read():
    c = lm_config_from_hf({**QWEN25_7B, "tie_word_embeddings": True, "rms_norm_eps": 1e-5})
    assert c.tie_word_embeddings is True and c.rms_norm_eps == 1e-5
    assert lm_config_from_hf({k: v for k, v in QWEN25_7B.items() if k != "rms_norm_eps"}).rms_norm_eps == 1e-6
    _refused({**QWEN25_7B, "tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false")
    _refused({**QWEN25_7B, "rms_norm_eps": 0}, "rms_norm_eps must be a positive number")


def test_qwen2_sliding_window_is_refused_only_when_a_layer_would_slide():
    # sliding_window set but use_sliding_window false (Qwen2.5's own files): no layer slides
    assert lm_config_from_hf(QWEN25_7B).num_layers == 28
    # use_sliding_window true but max_window_layers covers every layer: still none slides
    assert lm_config_from_hf({**QWEN25_7B, "use_sliding_window": True, "max_window_layers": 28}).num_layers == 28
    _refused({**QWEN25_7B, "use_sliding_window": True, "max_window_layers": 20},
             r"use_sliding_window is true: layers 20\.\.27 would attend over a window of 4096 tokens")
    types = ["full_attention"] * 28
    assert lm_config_from_hf({**QWEN25_7B, "layer_types": types}).num_layers == 28
    _refused({**QWEN25_7B, "layer_types": types[:27] + ["sliding_attention"]},
             r"layer_types\[27\] is 'sliding_attention': only full attention is supported")
    _refused({**QWEN25_7B, "layer_types": types[:5]}, "layer_types must list one type per layer")


def test_qwen2_attention_bias_activation_and_head_dim():
    assert lm_config_from_hf({**QWEN25_7B, "attention_bias": True}).num_heads == 28
    _refused({**QWEN25_7B, "attention_bias": False}, "attention_bias is false, but Qwen2 attention has q/k/v biases")
    _refused({**QWEN25_7B, "hidden_act": "gelu"}, "hidden_act 'gelu' is not supported")
    assert lm_config_from_hf({**QWEN25_7B, "head_dim": 128}).head_dim == 128
    _refused({**QWEN25_7B, "head_dim": 64}, "head_dim 64: must be hidden_size / num_attention_heads = 128")
    # attention_dropout only acts in training mode of transformers' eager attention: not read
    assert lm_config_from_hf({**QWEN25_7B, "attention_dropout": 0.1}) == lm_config_from_hf(QWEN25_7B)


# ---- the SigLIP config map -------------------------------------------------------------------------

L16 = {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 16, "hidden_size": 1024,
       "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
       "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "num_channels": 3}


def test_vit_config_from_hf_reads_every_field_and_nested_vision_config():
    c = vit_config_from_hf({"model_type": "siglip", "vision_config": L16})
    assert (c.image_size, c.patch_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
            c.gelu, c.layer_norm_eps, c.attn_pool) == (384, 16, 1024, 4096, 24, 16, "tanh", 1e-6, False)
    assert vit_config_from_hf({**L16, "hidden_act": "gelu"}).gelu == "erf"
    assert vit_config_from_hf({**L16, "hidden_act": "gelu_new"}).gelu == "tanh"
    assert vit_config_from_hf({**L16, "layer_norm_eps": 1e-5}).layer_norm_eps == 1e-5
    # a SiglipModel's vision_config is saved as its difference from the defaults (google/siglip-large-patch16-384)
    large = vit_config_from_hf({"model_type": "siglip", "vision_config": {
        "hidden_size": 1024, "image_size": 384, "intermediate_size": 4096, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 16}})
    assert (large.gelu, large.layer_norm_eps, large.image_size, large.patch_size) == ("tanh", 1e-6, 384, 16)
    assert vit_config_from_hf({"model_type": "siglip_vision_model"}).image_size == 224


@pytest.mark.parametrize("change,pattern", [
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
    ({"num_channels": 1}, "num_channels 1 is not 3"),
    # so400m's 384 / 14: transformers' conv drops the last 6 pixels; this tower needs a multiple
    ({"patch_size": 14}, "image_size 384 is not a multiple of vision_config.patch_size 14"),
    ({"patch_size": 0}, "patch_size must be a positive integer, got 0"),
    ({"layer_norm_eps": "1e-6"}, "layer_norm_eps must be a positive number"),
    ({"hidden_size": 1025}, "hidden_size 1025 is not a multiple of vision_config.num_attention_heads 16"),
    ({"model_type": "clip_vision_model"}, "model_type 'clip_vision_model' is not 'siglip_vision_model'"),
])
def test_vit_config_from_hf_refuses_by_name(change, pattern):
    with pytest.raises(CheckpointError, match="S/config.json: vision_config." + pattern.replace("(", r"\(")):
        vit_config_from_hf({"model_type": "siglip", "vision_config": {**L16, **change}}, "S/config.json")


# ---- Stage I into the released architecture (tiny-hybrid): Qwen2.5 and SigLIP, every layout ---------

def random_model(cfg, seed: int) -> URSAModel:
    """A tiny-hybrid model with large random values (biases and the HD path included)."""
    m = init_weights(URSAModel(cfg), std=0.2, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.vision_model.vision_tower_high.vision_tower.hd_alpha_downsamples.fill_(0.7)
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


@pytest.fixture(scope="module")
def hybrid():
    return random_model(get_config("tiny-hybrid"), 0)


def qwen2_config(lm, version: int) -> dict:
    """A Qwen2ForCausalLM config.json for LMConfig `lm`, spelled as transformers 4.x or 5.x writes it."""
    c = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": lm.vocab_size,
         "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size,
         "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_heads,
         "num_key_value_heads": lm.num_kv_heads, "hidden_act": "silu", "rms_norm_eps": lm.rms_norm_eps,
         "max_position_embeddings": lm.max_position_embeddings, "tie_word_embeddings": False,
         "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "attention_dropout": 0.0}
    if version == 4:
        return {**c, "rope_theta": lm.rope_theta, "rope_scaling": None}
    return {**c, "rope_parameters": {"rope_theta": lm.rope_theta, "rope_type": "default"},
            "layer_types": ["full_attention"] * lm.num_layers}


def test_load_qwen2_lm_into_is_strict_for_the_lm(hybrid, tmp_path):
    src = hybrid
    hf = {n[len("language_model."):]: t.clone() for n, t in src.state_dict().items() if n.startswith("language_model.")}
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)     # stale buffer: skipped
    d = tmp_path / "qwen"
    d.mkdir()
    save_state_dict(hf, d, max_shard_bytes=40_000)
    for version in (4, 5):
        (d / "config.json").write_text(json.dumps(qwen2_config(src.cfg.lm, version)))
        dst = random_model(src.cfg, 5)
        vision_before = {n: t.clone() for n, t in dst.state_dict().items() if not n.startswith("language_model.")}
        load_qwen2_lm_into(dst, d)
        for n, t in dst.state_dict().items():
            want = src.state_dict()[n] if n.startswith("language_model.") else vision_before[n]
            assert torch.equal(t, want), (version, n)
    c5 = qwen2_config(src.cfg.lm, 5)
    c5["rope_parameters"]["rope_theta"] = 1000000.0                 # the 5.x spelling is read, not skipped
    (d / "config.json").write_text(json.dumps(c5))
    with pytest.raises(CheckpointError, match=r"config.json: rope_theta 1000000.0 differs from the model's lm.rope_theta"):
        load_qwen2_lm_into(dst, d)
    (d / "config.json").write_text(json.dumps({**qwen2_config(src.cfg.lm, 4), "rms_norm_eps": 1e-5}))
    with pytest.raises(CheckpointError, match=r"config.json: rms_norm_eps 1e-05 differs"):
        load_qwen2_lm_into(dst, d)
    (d / "config.json").write_text(json.dumps({**qwen2_config(src.cfg.lm, 4), "rope_scaling": {"type": "yarn"}}))
    with pytest.raises(CheckpointError, match=r"config.json: rope_scaling.rope_type 'yarn' is not supported"):
        load_qwen2_lm_into(dst, d)


def _hf_siglip(tower) -> dict:
    """A Hugging Face SiglipModel state dict built by hand from a timm-layout tower."""
    sd, D, v = tower.state_dict(), tower.cfg.hidden_size, "vision_model."
    hf = {v + "embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"],
          v + "embeddings.patch_embedding.bias": sd["patch_embed.proj.bias"],
          v + "embeddings.position_embedding.weight": sd["pos_embed"][0],
          v + "post_layernorm.weight": sd["norm.weight"], v + "post_layernorm.bias": sd["norm.bias"],
          v + "head.probe": sd["attn_pool.latent"],
          v + "head.attention.in_proj_weight": torch.cat([sd["attn_pool.q.weight"], sd["attn_pool.kv.weight"]]),
          v + "head.attention.in_proj_bias": torch.cat([sd["attn_pool.q.bias"], sd["attn_pool.kv.bias"]]),
          "text_model.embeddings.token_embedding.weight": torch.zeros(5, D), "logit_scale": torch.zeros(1),
          "logit_bias": torch.zeros(1)}
    for a, b in (("head.attention.out_proj", "attn_pool.proj"), ("head.layernorm", "attn_pool.norm"),
                 ("head.mlp.fc1", "attn_pool.mlp.fc1"), ("head.mlp.fc2", "attn_pool.mlp.fc2")):
        for w in ("weight", "bias"):
            hf[f"{v}{a}.{w}"] = sd[f"{b}.{w}"]
    for i in range(tower.cfg.num_layers):
        s, b = f"{v}encoder.layers.{i}.", f"blocks.{i}."
        for w in ("weight", "bias"):
            q, k, vv = sd[b + f"attn.qkv.{w}"].chunk(3, dim=0)
            hf[s + f"self_attn.q_proj.{w}"], hf[s + f"self_attn.k_proj.{w}"], hf[s + f"self_attn.v_proj.{w}"] = q, k, vv
            for x, y in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                         ("mlp.fc2", "mlp.fc2"), ("self_attn.out_proj", "attn.proj")):
                hf[s + f"{x}.{w}"] = sd[b + f"{y}.{w}"]
    return {n: t.clone().contiguous() for n, t in hf.items()}


def test_load_siglip_into_from_hf_and_timm_layouts(hybrid, tmp_path):
    src = hybrid
    tower = src.vision_model.vision_tower_low.vision_tower
    P = "vision_model.vision_tower_low.vision_tower."
    x = torch.rand(1, 3, 16, 16)
    for layout in ("hf4", "hf5", "timm"):
        d = tmp_path / layout
        d.mkdir()
        if layout == "hf4":                       # SiglipModel: `vision_model.*` plus the text tower
            sd = _hf_siglip(tower)
        elif layout == "hf5":                     # transformers 5.x SiglipVisionModel: no prefix
            sd = {n.removeprefix("vision_model."): t for n, t in _hf_siglip(tower).items()
                  if n.startswith("vision_model.")}
            assert not any(n.startswith("vision_model.") for n in sd)
        else:
            sd = {"visual.trunk." + n: t.clone() for n, t in tower.state_dict().items()}
            sd["text.token_embedding.weight"], sd["logit_scale"] = torch.zeros(5, 4), torch.zeros(1)
        save_state_dict(sd, d, max_shard_bytes=30_000)
        dst = random_model(src.cfg, 7)
        lm_before = dst.language_model.model.embed_tokens.weight.clone()
        load_siglip_into(dst, d)
        for n, t in dst.state_dict().items():
            if n.startswith(P):
                assert torch.equal(t, src.state_dict()[n]), (layout, n)
        assert torch.equal(dst.language_model.model.embed_tokens.weight, lm_before)
        with torch.no_grad():
            torch.testing.assert_close(dst.vision_model.vision_tower_low.vision_tower(x), tower(x), rtol=0, atol=0)
    # strict: a vision tensor the tower lacks (and nothing else) is named
    d = tmp_path / "bad"
    d.mkdir()
    sd = _hf_siglip(tower)
    del sd["vision_model.head.probe"]
    save_state_dict(sd, d)
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\): " + P + "attn_pool.latent"):
        load_siglip_into(random_model(src.cfg, 8), d)


def test_load_siglip_into_checks_the_hf_config(hybrid, tmp_path):
    src = hybrid
    vit = src.cfg.vision.siglip                  # the released tower's form: erf GELU
    d = tmp_path / "hf"
    d.mkdir()
    save_state_dict(_hf_siglip(src.vision_model.vision_tower_low.vision_tower), d)
    vc = {"model_type": "siglip_vision_model", "hidden_size": vit.hidden_size, "intermediate_size":
          vit.intermediate_size, "num_hidden_layers": vit.num_layers, "num_attention_heads": vit.num_heads,
          "image_size": vit.image_size, "patch_size": vit.patch_size, "hidden_act": "gelu"}
    (d / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": vc}))
    load_siglip_into(random_model(src.cfg, 9), d)                              # erf == erf: loads
    (d / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": {
        **vc, "hidden_act": "gelu_pytorch_tanh"}}))
    with pytest.raises(CheckpointError, match="hidden_act computes the tanh GELU but the tower the erf one"):
        load_siglip_into(random_model(src.cfg, 9), d)
    load_siglip_into(random_model(src.cfg, 9), d, allow_gelu_mismatch=True)
    (d / "config.json").write_text(json.dumps({**vc, "num_channels": 4}))
    with pytest.raises(CheckpointError, match=r"config.json: num_channels 4 is not 3"):
        load_siglip_into(random_model(src.cfg, 9), d)


# ---- ursa.flops's FLOP arithmetic (speed itself is never asserted) ------------------------------------

def test_bench_flop_arithmetic_on_hand_numbers():
    from ursa.flops import matmul_flops, mfu, train_flops_per_token
    assert train_flops_per_token(1000) == 6000                                 # 6 N
    assert train_flops_per_token(1000, n_layers=2, d_model=4, seq_len=10) == 6000 + 12 * 2 * 4 * 10
    # 6960 FLOPs/token at 100 tokens/s on a 1 MFLOP/s machine uses 69.6% of it
    assert abs(mfu(6960, 100, 1e6) - 0.696) < 1e-12
    assert matmul_flops(3) == 54                                               # 9 outputs x 3 mul-adds x 2
