"""Hugging Face layouts of the parity fixtures: Qwen2 config.json and SigLIP tensor names as
transformers 4.x and 5.x write them. Shared by tests/test_parity.py and
tests/fixtures/make_parity_fixtures.py (which regenerates the fixtures with transformers)."""
from __future__ import annotations


def qwen2_config_as(cfg: dict, version: int) -> dict:
    """A Qwen2 config.json dict in the transformers 4.x spelling (top-level rope_theta, rope_scaling)
    or the 5.x one (rope_parameters {"rope_theta", "rope_type": "default"}), from either."""
    c = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_parameters", "rope_scaling")}
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta"))
    if version == 4:
        c.update(rope_theta=theta, rope_scaling=None)
        c.pop("layer_types", None)
    else:
        c["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    return c


def siglip_names_as(sd: dict, version: int) -> dict:
    """SiglipVisionModel tensor names with the `vision_model.` prefix (4.x, released files) or
    without it (5.x)."""
    bare = {n.removeprefix("vision_model."): t for n, t in sd.items()}
    return bare if version == 5 else {"vision_model." + n: t for n, t in bare.items()}
