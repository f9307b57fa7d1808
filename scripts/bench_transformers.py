"""Side by side with Hugging Face transformers at the tiny preset's exact dimensions.

    python scripts/bench_transformers.py --threads 2 [--rounds 5]

Runs only where transformers is installed (it is imported lazily; without it one line is printed and
the script exits 0). It is no test and no part of CI: transformers is never a dependency.

What it does:
  1. builds transformers' LlavaForConditionalGeneration (SiglipVisionModel + MLP projector +
     Qwen2ForCausalLM) at the "tiny" dimensions, copies this project's weights into it through the
     Hugging Face name plans of ursa/weights.py (hf_qwen2_plan, hf_siglip_plan, inverted here), and
     checks that both give the same logits on a batch (max |difference| printed; exit 1 above 1e-4).
     LLaVA feeds the projector the last encoder layer's output, this model the tower's final
     LayerNorm of it (as URSA's SigLIP does); the HF tower's post_layernorm is therefore moved onto
     its last encoder layer (the same one LayerNorm, computed once, so the timing is unchanged).
  2. times both in one process, interleaved round by round (median of per-round time ratios):
     the training step (forward, next-token loss on the text, backward, AdamW) in fp32 and under bf16
     autocast, against transformers with its default attention ("sdpa") and with "eager";
     batched greedy generation (64 prompts x 96 new tokens, no early stop) and batch-1 generation
     (transformers' generate with eos_token_id None; ours with a stop id that never occurs).
Ratios are "transformers time / our time" (above 1: this project is faster).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ursa.bench import NEVER, autocast_ctx, interleave, random_batch, tiny_model, train_step_fn   # noqa: E402
from ursa.data import next_token_loss                                                # noqa: E402
from ursa.generate import generate                                                   # noqa: E402
from ursa.weights import hf_qwen2_plan, hf_siglip_plan                               # noqa: E402

LOGIT_TOL = 1e-4


def hf_config(tf, cfg, attn: str):
    """LlavaConfig of the tiny preset (SigLIP without its pooling head, Qwen2 with q/k/v bias)."""
    v, lm = cfg.vision.siglip, cfg.lm
    vision = tf.SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                   num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                                   image_size=v.image_size, patch_size=v.patch_size, num_channels=3,
                                   layer_norm_eps=v.layer_norm_eps, vision_use_head=False,
                                   hidden_act={"tanh": "gelu_pytorch_tanh", "erf": "gelu"}[v.gelu])
    text = tf.Qwen2Config(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size,
                          intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
                          num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
                          rms_norm_eps=lm.rms_norm_eps, rope_theta=lm.rope_theta,
                          max_position_embeddings=lm.max_position_embeddings,
                          tie_word_embeddings=lm.tie_word_embeddings, hidden_act="silu")
    c = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=cfg.image_token_id,
                       image_seq_length=cfg.vision.num_tokens, projector_hidden_act="gelu",
                       vision_feature_layer=-1, vision_feature_select_strategy="full",
                       multimodal_projector_bias=True, tie_word_embeddings=lm.tie_word_embeddings)
    c._attn_implementation = attn
    for sub in (c.text_config, c.vision_config):
        sub._attn_implementation = attn
    return c


def move_post_layernorm(hf) -> None:
    """Apply the SigLIP tower's post_layernorm at the end of its last encoder layer (whose output
    LLaVA reads) and make post_layernorm the identity: the tower then hands the projector the
    normed features, as this project's tower does, with the same one LayerNorm computed."""
    tower = hf.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    last, norm = tower.encoder.layers[-1], tower.post_layernorm
    inner = last.forward

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        return (norm(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else norm(out)

    last.forward = forward
    tower.post_layernorm = torch.nn.Identity()


def native_pieces(hf_name: str, shape, cfg) -> list:
    """The Piece list (ursa.weights) that loads the Hugging Face LLaVA tensor hf_name, found by the
    project's own HF plans (transformers 5.x `model.*` names and 4.x names both)."""
    from ursa.weights import Piece
    n = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    if n.startswith("language_model."):
        rest = n[len("language_model."):]
        rest = rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
        return hf_qwen2_plan({rest: (None, shape)})[0][rest]
    if n == "lm_head.weight":
        return hf_qwen2_plan({n: (None, shape)})[0][n]
    if n.startswith("vision_tower."):
        rest = n[len("vision_tower."):]
        root = "vision_model." if rest.startswith("vision_model.") else ""      # 4.x / 5.x names
        plan, _ = hf_siglip_plan({rest: (None, shape)}, "vision_model.vision_tower.",
                                 cfg.vision.siglip.hidden_size, False, root)
        return plan[rest]
    if n.startswith("multi_modal_projector."):
        layer, leaf = n[len("multi_modal_projector."):].split(".", 1)
        return [Piece(f"aligner.layers.{ {'linear_1': 0, 'linear_2': 2}[layer] }.{leaf}")]
    raise KeyError(f"no native tensor for the transformers tensor {hf_name}")


def copy_weights(hf, ours) -> None:
    """Fill every HF tensor from the native state dict: the load plans read backwards (a piece with
    `rows` takes those rows of the native tensor; `view` is undone by the reshape)."""
    sd = ours.state_dict()
    with torch.no_grad():
        for name, t in hf.state_dict().items():
            if name.endswith("position_ids"):
                continue
            parts = []
            for p in native_pieces(name, tuple(t.shape), ours.cfg):
                x = sd[p.dst]
                parts.append((x[p.rows[0]:p.rows[1]] if p.rows is not None else x).reshape(-1))
            t.copy_(torch.cat(parts).view(t.shape))


def build_hf(tf, ours, attn: str):
    hf = tf.LlavaForConditionalGeneration(hf_config(tf, ours.cfg, attn))
    copy_weights(hf, ours)
    move_post_layernorm(hf)
    hf.generation_config.eos_token_id = None           # never stop early
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def hf_pixels(px: torch.Tensor) -> torch.Tensor:
    """The project's [0, 1] pixels normalised as its SigLIP tower does ((x - 0.5) / 0.5)."""
    return (px - 0.5) / 0.5


def hf_step_fn(hf, ids, px, loss_mask, bf16: bool):
    """The training step of bench.train_step_fn on the transformers model (same loss code)."""
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    hpx = hf_pixels(px)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(bf16):
            logits = hf(input_ids=ids, pixel_values=hpx).logits
        loss, _ = next_token_loss(logits, ids, loss_mask)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def ratios(times: dict, ours: str) -> dict:
    """name -> median over rounds of time(name) / time(ours)."""
    return {k: statistics.median(a / b for a, b in zip(v, times[ours])) for k, v in times.items() if k != ours}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="This project vs transformers at the tiny preset (not a test).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement")
    p.add_argument("--new-tokens", type=int, default=96)
    args = p.parse_args(argv)
    try:
        tf = importlib.import_module("transformers")
    except ImportError:
        print("transformers is not installed: nothing to compare (pip install transformers in another venv)")
        return 0
    torch.set_num_threads(args.threads)
    ours = tiny_model(0).eval()
    cfg = ours.cfg
    hf = {a: build_hf(tf, ours, a) for a in ("sdpa", "eager")}
    print(f"transformers {tf.__version__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    g = torch.Generator().manual_seed(0)
    ids, px, lmask = random_batch(cfg, 8, 60, g)
    with torch.no_grad():
        want = ours(ids, px).logits
        worst = max((h(input_ids=ids, pixel_values=hf_pixels(px)).logits - want).abs().max().item()
                    for h in hf.values())
    print(f"logits, batch 8 x 60 (16 image tokens), fp32: max |ours - transformers| = {worst:.2e}")
    if not worst <= LOGIT_TOL:
        print(f"FAIL: above {LOGIT_TOL}")
        return 1

    ids, px, lmask = random_batch(cfg, 64, 140, g)
    for bf16 in (False, True):
        fns = {"ours": train_step_fn(copy.deepcopy(ours), ids, px, lmask, bf16)}
        for a, h in hf.items():
            fns[f"transformers {a}"] = hf_step_fn(copy.deepcopy(h), ids, px, lmask, bf16)
        t = interleave(fns, args.rounds)
        r = ratios(t, "ours")
        tps = ids.numel() / statistics.median(t["ours"])
        print(f"train step 64 x 140, {'bf16 autocast' if bf16 else 'fp32'}: ours {tps:,.0f} tokens/s; "
              + "; ".join(f"{k} x{v:.2f}" for k, v in r.items()))

    P = args.new_tokens
    for B in (64, 1):
        p_ids, p_px, _ = random_batch(cfg, B, 44, g)
        prompts = p_ids.tolist()

        def run_ours():
            return generate(ours, prompts, p_px, max_new_tokens=P, stop_ids=[NEVER]).tokens

        def run_hf(h):
            with torch.no_grad():
                out = h.generate(input_ids=p_ids, attention_mask=torch.ones_like(p_ids),
                                 pixel_values=hf_pixels(p_px), max_new_tokens=P, min_new_tokens=P,
                                 do_sample=False)
            return out[:, p_ids.shape[1]:]
        same = torch.equal(run_ours(), run_hf(hf["sdpa"]))
        fns = {"ours": run_ours, **{f"transformers {a}": (lambda h=h: run_hf(h)) for a, h in hf.items()}}
        t = interleave(fns, args.rounds)
        r = ratios(t, "ours")
        print(f"greedy generation {B} x {P} new tokens: ours {B * P / statistics.median(t['ours']):,.0f} new "
              f"tokens/s (same tokens as transformers: {same}); " + "; ".join(f"{k} x{v:.2f}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
