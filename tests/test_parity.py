"""Parity with Hugging Face transformers: our Qwen2 decoder and SigLIP ViT, loaded from HF-layout
files through ursa/weights.py's config and name maps, reproduce the outputs that transformers
computed for the same weights (tests/fixtures/parity/, written by make_parity_fixtures.py; this test
does not need transformers).

The fixtures' weights are large random values (attention far from uniform) and the Qwen2 fixture uses
rope_theta 1000, not our default, so a wrong name, swapped q/k/v, RoPE layout, GELU variant or a
config field dropped by the map moves the outputs far beyond the tolerance (test_fixtures_are_sensitive
shows it for two of them). Row 1 of the Qwen2 batch is left-padded: it is compared at its real
positions, with our own position rule and with the position ids HF's generate() makes. (RoPE is
relative, so a constant position offset would not show here; tests/test_lm.py checks padding.)
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ursa.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig, ViTConfig
from ursa.model import URSAModel
from ursa.weights import (CheckpointError, hf_qwen2_name, lm_config_from_hf, load_hf_siglip,
                          load_model_weights, vit_config_from_hf)

FIX = Path(__file__).parent / "fixtures" / "parity"
TOL = dict(atol=1e-5, rtol=1e-5)
IMAGE_TOKEN = 96          # the fixture's input ids are all below 90


def _json(p: Path) -> dict:
    return json.loads(p.read_text())


def _small_vision() -> VisionConfig:
    return VisionConfig(siglip=ViTConfig(image_size=16, patch_size=8, hidden_size=16,
                                         intermediate_size=32, num_layers=1, num_heads=2))


def _small_lm(vocab=97) -> LMConfig:
    return LMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=4, num_kv_heads=2)


def _qwen2_model(lm_cfg: LMConfig) -> URSAModel:
    """A URSAModel whose language_model comes from the HF Qwen2 fixture (the vision part is unused)."""
    cfg = ModelConfig(vision=_small_vision(), projector=ProjectorConfig(out_dim=lm_cfg.hidden_size),
                      lm=lm_cfg, image_token_id=IMAGE_TOKEN)
    model = URSAModel(cfg).eval()
    load_model_weights(model, FIX / "qwen2", name_fn=hf_qwen2_name, prefix_filter="language_model.")
    return model


def _siglip_model(vit_cfg: ViTConfig) -> URSAModel:
    cfg = ModelConfig(vision=VisionConfig(siglip=vit_cfg), projector=ProjectorConfig(out_dim=32),
                      lm=_small_lm(), image_token_id=IMAGE_TOKEN)
    model = URSAModel(cfg).eval()
    load_hf_siglip(model, FIX / "siglip")
    return model


# ---- Qwen2 -----------------------------------------------------------------------------------------

def test_qwen2_logits_and_hidden_match_hf():
    model = _qwen2_model(lm_config_from_hf(_json(FIX / "qwen2" / "config.json")))
    inp, ref = load_file(str(FIX / "qwen2" / "inputs.safetensors")), load_file(str(FIX / "qwen2" / "outputs.safetensors"))
    ids, mask = inp["input_ids"], inp["attention_mask"]
    real = mask.bool()                                                         # [B, T]
    assert int((~real).sum()) == int((~real[1]).sum()) == 4                   # row 1: 4 left pads
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)                                 # our own position rule
        hf_pos = model(ids, attention_mask=mask, position_ids=inp["position_ids"])
    for out in (ours, hf_pos):
        torch.testing.assert_close(out.hidden[real], ref["hidden"][real], **TOL)
        torch.testing.assert_close(out.logits[real], ref["logits"][real], **TOL)
    assert ref["logits"][real].abs().max() > 1.0                               # not a near-zero output


def test_qwen2_missing_or_extra_tensor_is_named(tmp_path):
    sd = load_file(str(FIX / "qwen2" / "model.safetensors"))
    cfg = lm_config_from_hf(_json(FIX / "qwen2" / "config.json"))
    gone = "model.layers.1.mlp.up_proj.weight"
    save_file({n: t for n, t in sd.items() if n != gone}, str(tmp_path / "model.safetensors"))
    model = URSAModel(ModelConfig(vision=_small_vision(), projector=ProjectorConfig(out_dim=32),
                                  lm=cfg, image_token_id=IMAGE_TOKEN))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\): language_model\." + gone.replace(".", r"\.")):
        load_model_weights(model, tmp_path, name_fn=hf_qwen2_name, prefix_filter="language_model.")
    save_file({**sd, "model.layers.2.mlp.up_proj.weight": sd[gone].clone()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): language_model\.model\.layers\.2\.mlp"):
        load_model_weights(model, tmp_path, name_fn=hf_qwen2_name, prefix_filter="language_model.")


# ---- SigLIP ----------------------------------------------------------------------------------------

def test_siglip_last_hidden_state_matches_hf():
    model = _siglip_model(vit_config_from_hf(_json(FIX / "siglip" / "config.json")))
    px = load_file(str(FIX / "siglip" / "inputs.safetensors"))["pixel_values"]
    ref = load_file(str(FIX / "siglip" / "outputs.safetensors"))["last_hidden_state"]
    with torch.no_grad():
        ours = model.vision_model.vision_tower(px)                             # normalised input
        # through the whole tower: [0, 1] pixels, normalised with SigLIP's mean = std = 0.5
        (tower,) = model.vision_model(px * 0.5 + 0.5)
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(tower, ref, **TOL)


def test_siglip_transformers5_layout_without_prefix_loads_the_same(tmp_path):
    """transformers 5.x saves SiglipVisionModel as `embeddings.*` (no `vision_model.`)."""
    sd = load_file(str(FIX / "siglip" / "model.safetensors"))
    save_file({n.removeprefix("vision_model."): t for n, t in sd.items()}, str(tmp_path / "model.safetensors"))
    a = _siglip_model(vit_config_from_hf(_json(FIX / "siglip" / "config.json")))
    b = URSAModel(a.cfg).eval()
    load_hf_siglip(b, tmp_path)
    for n, t in a.vision_model.state_dict().items():
        torch.testing.assert_close(b.vision_model.state_dict()[n], t, atol=0, rtol=0)


def test_siglip_missing_or_extra_tensor_is_named_and_hf_head_is_dropped(tmp_path):
    sd = load_file(str(FIX / "siglip" / "model.safetensors"))
    vit = vit_config_from_hf(_json(FIX / "siglip" / "config.json"))
    model = URSAModel(ModelConfig(vision=VisionConfig(siglip=vit), projector=ProjectorConfig(out_dim=32),
                                  lm=_small_lm(), image_token_id=IMAGE_TOKEN))
    gone = "vision_model.encoder.layers.1.self_attn.k_proj.bias"
    save_file({n: t for n, t in sd.items() if n != gone}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=gone.replace(".", r"\.")):
        load_hf_siglip(model, tmp_path)
    extra = "vision_model.encoder.layers.0.extra.weight"
    save_file({**sd, extra: torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=extra.replace(".", r"\.")):
        load_hf_siglip(model, tmp_path)
    # HF's pooling head (vision_use_head) is not used by URSA: its tensors are accepted and dropped
    save_file({**sd, "vision_model.head.probe": torch.zeros(1, 1, 32)}, str(tmp_path / "model.safetensors"))
    load_hf_siglip(model, tmp_path)


# ---- the tests can fail -----------------------------------------------------------------------------

def test_fixtures_are_sensitive():
    """A config map that dropped rope_theta, or used the erf GELU, would fail the parity tests."""
    lm = lm_config_from_hf(_json(FIX / "qwen2" / "config.json"))
    lm.rope_theta = 10000.0                                                    # LMConfig's default
    inp, ref = load_file(str(FIX / "qwen2" / "inputs.safetensors")), load_file(str(FIX / "qwen2" / "outputs.safetensors"))
    with torch.no_grad():
        out = _qwen2_model(lm)(inp["input_ids"], attention_mask=inp["attention_mask"])
    real = inp["attention_mask"].bool()
    assert (out.logits[real] - ref["logits"][real]).abs().max() > 1e-3
    vit = vit_config_from_hf(_json(FIX / "siglip" / "config.json"))
    vit.gelu = "erf"
    px = load_file(str(FIX / "siglip" / "inputs.safetensors"))["pixel_values"]
    with torch.no_grad():
        y = _siglip_model(vit).vision_model.vision_tower(px)
    assert (y - load_file(str(FIX / "siglip" / "outputs.safetensors"))["last_hidden_state"]).abs().max() > 1e-4


# ---- the config maps on hand-written dicts -----------------------------------------------------------

def test_lm_config_from_hf_reads_both_rope_spellings_and_rejects_what_it_cannot_run():
    qwen25_7b = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
                 "max_position_embeddings": 4096, "tie_word_embeddings": False,
                 "use_sliding_window": False, "sliding_window": 4096}
    c = lm_config_from_hf(qwen25_7b)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.rope_theta, c.max_position_embeddings, c.tie_word_embeddings, c.head_dim) == \
        (152064, 3584, 18944, 28, 28, 4, 10000.0, 4096, False, 128)
    v5 = {k: v for k, v in qwen25_7b.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    assert lm_config_from_hf(v5).rope_theta == 1e6
    no_kv = {k: v for k, v in qwen25_7b.items() if k != "num_key_value_heads"}
    assert lm_config_from_hf(no_kv).num_kv_heads == 28                         # HF default: = heads
    with pytest.raises(CheckpointError, match='missing field "intermediate_size"'):
        lm_config_from_hf({k: v for k, v in qwen25_7b.items() if k != "intermediate_size"})
    with pytest.raises(CheckpointError, match="rope_scaling.rope_type 'yarn'"):
        lm_config_from_hf({**qwen25_7b, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        lm_config_from_hf({**qwen25_7b, "use_sliding_window": True})
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        lm_config_from_hf({**qwen25_7b, "model_type": "llama"})


def test_vit_config_from_hf_maps_gelu_and_nested_vision_config():
    so400m = {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14, "hidden_size": 1152,
              "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
              "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
    c = vit_config_from_hf({"model_type": "siglip", "vision_config": so400m})
    assert (c.image_size, c.patch_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
            c.gelu, c.attn_pool) == (384, 14, 1152, 4304, 27, 16, "tanh", False)
    assert vit_config_from_hf({**so400m, "hidden_act": "gelu"}).gelu == "erf"
    with pytest.raises(CheckpointError, match="hidden_act 'relu'"):
        vit_config_from_hf({**so400m, "hidden_act": "relu"})
    with pytest.raises(CheckpointError, match='vision_config: missing field "patch_size"'):
        vit_config_from_hf({"vision_config": {k: v for k, v in so400m.items() if k != "patch_size"}})


# ---- ursa.bench's FLOP arithmetic (speed itself is never asserted) ------------------------------------

def test_bench_flop_arithmetic_on_hand_numbers():
    from ursa.bench import matmul_flops, mfu, train_flops_per_token
    assert train_flops_per_token(1000) == 6000                                 # 6 N
    assert train_flops_per_token(1000, n_layers=2, d_model=4, seq_len=10) == 6000 + 12 * 2 * 4 * 10
    # 6960 FLOPs/token at 100 tokens/s on a 1 MFLOP/s machine uses 69.6% of it
    assert abs(mfu(6960, 100, 1e6) - 0.696) < 1e-12
    assert matmul_flops(3) == 54                                               # 9 outputs x 3 mul-adds x 2
