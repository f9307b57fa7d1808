"""Parameter counts per part and the FSDP2 memory plan of a preset (estimates, not measurements).

    python -m ursa.memory ursa-8b                       # build on the meta device, print parameters per part
    python -m ursa.memory tiny --json                   # the config as JSON
    python -m ursa.memory ursa-8b --gpus 8 --micro-batch 1 --seq-len 4096    # + the per-GPU memory plan

The plan's formulas follow how ursa/dist.py shards and computes (see memory_plan's docstring); check
them against torch.cuda.max_memory_allocated() on the first steps of a real run.
"""
from __future__ import annotations

import argparse
import json

import torch

from ursa.config import PRESETS, ModelConfig, get_config
from ursa.model import URSAModel

GIB = 2**30


def _param_groups(cfg: ModelConfig) -> dict:
    """Parameter counts: total, per part, the largest LM / vision block, the root group."""
    with torch.device("meta"):
        m = URSAModel(cfg)
    n = lambda mod: sum(p.numel() for p in mod.parameters())          # noqa: E731
    lm_blocks = [n(b) for b in m.language_model.model.layers]
    vis_blocks = [n(b) for b in m.vision_model.blocks()]
    total = n(m)
    return {"total": total, "vision": n(m.vision_model), "aligner": n(m.aligner),
            "language_model": n(m.language_model), "score": n(m.score) if cfg.value_head else 0,
            "lm_block": max(lm_blocks), "vision_block": max(vis_blocks) if vis_blocks else 0,
            "root": total - sum(lm_blocks) - sum(vis_blocks),
            "root_trainable_llm": n(m.language_model) - sum(lm_blocks) + (n(m.score) if cfg.value_head else 0)}


TRAINABLE = ("all", "llm", "projector")


def memory_plan(cfg: ModelConfig, gpus: int, micro_batch: int, seq_len: int, trainable: str = "all",
                mixed_precision: bool = True, activation_checkpointing: bool = True,
                grad_accum: int = 1, no_sync: bool = True, frozen_copies: int = 0,
                images_per_row: int = 1, logits: bool = True, gen_rows: int = 0,
                gpu_gib: float = 79.6, overhead_gib: float = 1.5) -> dict:
    """Per-GPU memory (bytes) of FSDP2 training with build_fsdp_model, by term. N = gpus, P = all
    parameters, Pt = trainable ones, B = micro_batch, T = seq_len, H / I / L / V = LM hidden /
    intermediate / layers / vocab, Hkv x hd = the KV width; activations in bf16 (2 bytes) under
    mixed precision (4 in fp32).

    peak = static + max(training step, rollout phase)

    Static, sharded (FSDP2 with MixedPrecisionPolicy keeps NO separate bf16 copy: the fp32 shards
    ARE the master weights):
        params 4 P / N  +  grads 4 Pt / N  +  AdamW m and v 8 Pt / N        (= 16 P / N when Pt = P)
        + 4 P / N per extra frozen copy (GRPO: reference policy, PRM), as build_fsdp_model keeps them
        + overhead_gib for the CUDA context, NCCL buffers and the allocator's own use.
    Training step, unsharded and transient:
        root group (embeddings, lm_head, final norm, vision stems/necks, projector, value head),
            gathered for the whole forward + backward:                       2 P_root
        the running block + the prefetched next one:                          2 x 2 P_block
        gradients: no_sync accumulation over grad_accum > 1 micro-batches keeps EVERY parameter's
            unsharded gradient in fp32 (FSDP2 upcasts to reduce_dtype) until the last one: 4 Pt;
            otherwise the root's and one block's bf16 grad + fp32 reduce copy: 6 (P_root + P_block)
        activations with checkpointing (only block inputs are kept; one block at a time is recomputed
        in backward):
          LM:     L x 2 B T H  (layer-boundary hidden states)
                + B T (26 H + 8 I)   (one layer's full activations: two RMSNorms 6H each (fp32 x and
                  bf16 out), q/k/v/o inputs 4H, SDPA q, expanded k, v and out 8H, MLP gate, up, act,
                  product 8I; attention by a memory-efficient kernel, O(T))
                + 3 B T^2 (the boolean [T, T] padding mask and its bf16 bias)
          without checkpointing: L x B T (26 H + 8 I) + the mask.
          loss:   14 B T V (bf16 logits 2 + fp32 log-softmax kept 4 + fp32/bf16 gradients 8 in backward)
          vision (only when it trains, trainable = "all"), per image (B x images_per_row):
                SAM: L_sam x 2 G^2 D + one global block G^2 (26 D + 8 I) + 8 h G^4 (the dense rel-pos
                bias: fp32, its bf16 copy and its gradient); SigLIP: L_sig x 2 P D + P (26 D + 8 I).
    Rollout phase (GRPO, gen_rows > 0 sequences decoded at once up to T tokens; see replicate()):
        unsharded bf16 replica 2 P  +  KV cache gen_rows x T x L x 2 (k, v) x Hkv x hd x 2 bytes
        + logits of one decode step 4 gen_rows V.
    The verdict: "fits" when the peak is under 90% of gpu_gib (fragmentation headroom), "tight" under
    100%, else "does not fit". Estimates, not measurements: check torch.cuda.max_memory_allocated()
    on the first steps."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    if gpus < 1 or micro_batch < 1 or seq_len < 1 or grad_accum < 1:
        raise ValueError(f"gpus {gpus}, micro_batch {micro_batch}, seq_len {seq_len}, grad_accum "
                         f"{grad_accum} must be >= 1")
    g = _param_groups(cfg)
    N, B, T = gpus, micro_batch, seq_len
    lm = cfg.lm
    H, I, L, V = lm.hidden_size, lm.intermediate_size, lm.num_layers, lm.vocab_size
    P = g["total"]
    Pt = {"all": P, "llm": g["language_model"] + g["score"], "projector": g["aligner"]}[trainable]
    pb = 2 if mixed_precision else 4                     # bytes of an unsharded parameter / activation
    blk = max(g["lm_block"], g["vision_block"])
    st, tr, ro = {}, {}, {}
    st["sharded params (fp32)"] = 4 * P / N
    st["sharded grads (fp32)"] = 4 * Pt / N
    st["AdamW m, v (fp32)"] = 8 * Pt / N
    if frozen_copies:
        st[f"{frozen_copies} frozen copies (fp32 shards)"] = frozen_copies * 4 * P / N
    st["CUDA context, NCCL, allocator"] = overhead_gib * GIB
    tr["root group, unsharded"] = pb * g["root"]
    tr["2 blocks in flight, unsharded"] = 2 * pb * blk
    if no_sync and grad_accum > 1:
        tr["no_sync unsharded grads (fp32)"] = 4 * Pt
    else:
        tr["grads in flight (root + block)"] = (pb + 4) * (g["root"] + blk)
    block_full = pb / 2 * B * T * (26 * H + 8 * I)
    if activation_checkpointing:
        tr["LM activations"] = L * pb * B * T * H + block_full + 3 * B * T * T
    else:
        tr["LM activations"] = L * block_full + 3 * B * T * T
    if logits:
        tr["logits + loss"] = 14 * B * T * V
    if trainable == "all":
        v, vis = cfg.vision, 0.0
        s = v.siglip
        Ps, Ds = s.num_patches, s.hidden_size
        sig_full = pb / 2 * Ps * (26 * Ds + 8 * s.intermediate_size)
        vis += (s.num_layers * pb * Ps * Ds + sig_full) if activation_checkpointing else s.num_layers * sig_full
        if v.kind == "hybrid":
            sm = v.sam
            G2, D = sm.grid ** 2, sm.hidden_size
            sam_full = pb / 2 * G2 * (26 * D + 8 * sm.intermediate_size) + 8 * sm.num_heads * G2 * G2
            vis += (sm.num_layers * pb * G2 * D + sam_full) if activation_checkpointing \
                else sm.num_layers * sam_full
        tr["vision activations"] = B * images_per_row * vis
    if gen_rows:
        ro["bf16 replica for generation"] = 2 * P
        ro["KV cache"] = gen_rows * T * L * 2 * lm.num_kv_heads * lm.head_dim * 2
        ro["decode-step logits"] = 4 * gen_rows * V
    static, train, roll = sum(st.values()), sum(tr.values()), sum(ro.values())
    total = static + max(train, roll)
    verdict = "fits" if total <= 0.9 * gpu_gib * GIB else ("tight" if total <= gpu_gib * GIB else "does not fit")
    return {"preset": cfg.name, "gpus": N, "micro_batch": B, "seq_len": T, "trainable": trainable,
            "mixed_precision": mixed_precision, "activation_checkpointing": activation_checkpointing,
            "grad_accum": grad_accum, "no_sync": no_sync, "gen_rows": gen_rows, "params": P,
            "trainable_params": Pt, "lm_block_params": g["lm_block"],
            "vision_block_params": g["vision_block"], "root_params": g["root"],
            "static": st, "train": tr, "rollout": ro, "static_total": static, "train_total": train,
            "rollout_total": roll, "total": total, "gpu_gib": gpu_gib, "verdict": verdict}


def format_memory_plan(plan: dict) -> str:
    """The plan as a table in GiB, with the peak and the verdict."""
    lines = [f"FSDP2 memory plan per GPU: {plan['preset']} on {plan['gpus']} GPU(s), micro-batch "
             f"{plan['micro_batch']} x {plan['seq_len']} tokens, trainable {plan['trainable']} "
             f"({plan['trainable_params']:,} of {plan['params']:,} parameters),",
             f"  {'bf16 mixed precision' if plan['mixed_precision'] else 'fp32'}, activation "
             f"checkpointing {'on' if plan['activation_checkpointing'] else 'off'}, "
             f"{plan['grad_accum']} micro-batch(es) per step per GPU "
             f"({'no_sync accumulation' if plan['no_sync'] else 'reduce-scatter every micro-batch'})",
             f"  largest LM block {plan['lm_block_params']:,}, vision block "
             f"{plan['vision_block_params']:,}, root group {plan['root_params']:,} parameters"]
    sections = [("static", plan["static"], plan["static_total"]),
                ("training step", plan["train"], plan["train_total"])]
    if plan["rollout"]:
        sections.append((f"rollout phase ({plan['gen_rows']} rows)", plan["rollout"], plan["rollout_total"]))
    for title, terms, tot in sections:
        lines.append(f"  {title}:")
        for k, v in terms.items():
            lines.append(f"    {k:<34} {v / GIB:8.2f} GiB")
        lines.append(f"    {'subtotal':<34} {tot / GIB:8.2f} GiB")
    lines.append(f"  peak = static + max(training{', rollout' if plan['rollout'] else ''})"
                 f" = {plan['total'] / GIB:.2f} GiB of {plan['gpu_gib']:.1f} GiB: {plan['verdict']}"
                 + (" (under 10% headroom)" if plan["verdict"] == "tight" else ""))
    return "\n".join(lines)


def part_counts(cfg: ModelConfig) -> dict:
    """{top-level part: parameters} of the model built on the meta device (state-dict tensors)."""
    with torch.device("meta"):
        model = URSAModel(cfg)
    parts: dict = {}
    for n, t in model.state_dict().items():
        parts[n.split(".")[0]] = parts.get(n.split(".")[0], 0) + t.numel()
    return parts


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m ursa.memory",
        description="Print a preset's config and parameter counts; with --gpus, the FSDP2 memory plan "
                    "per GPU (memory_plan states the formula).")
    p.add_argument("preset", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", help="print the config as JSON and exit")
    m = p.add_argument_group("FSDP2 memory plan (printed when --gpus is given)")
    m.add_argument("--gpus", type=int, default=None, help="number of GPUs the model is sharded over")
    m.add_argument("--micro-batch", type=int, default=1, help="rows per GPU per forward/backward")
    m.add_argument("--seq-len", type=int, default=4096, help="tokens per row (image tokens included)")
    m.add_argument("--batch-size", type=int, default=128,
                   help="global rows per optimizer step (paper: 128 for SFT and PRM); sets the "
                        "accumulation count batch / (gpus x micro-batch)")
    m.add_argument("--trainable", default="all", choices=("all", "llm", "projector"),
                   help="all (SFT, GRPO), llm (PRM: LLM + head), projector (alignment)")
    m.add_argument("--fp32", action="store_true", help="no mixed precision (fp32 compute)")
    m.add_argument("--no-activation-checkpointing", action="store_true", help="keep every activation")
    m.add_argument("--sync-every-micro-batch", action="store_true",
                   help="reduce-scatter after every micro-batch instead of no_sync accumulation")
    m.add_argument("--no-logits", action="store_true", help="the loss reads the value head only (PRM)")
    m.add_argument("--frozen-copies", type=int, default=0,
                   help="extra frozen sharded models (GRPO: 2, the reference policy and the PRM)")
    m.add_argument("--gen-rows", type=int, default=0,
                   help="GRPO rollout: sequences decoded at once per GPU with an unsharded bf16 replica")
    m.add_argument("--gpu-gib", type=float, default=79.6, help="memory of one GPU (H100 80GB: 79.6 GiB)")
    args = p.parse_args(argv)
    cfg = get_config(args.preset)
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2))
        return
    parts = part_counts(cfg)
    total = sum(parts.values())
    print(f"preset {cfg.name}: {total:,} parameters (built on the meta device)")
    for k, v in parts.items():
        print(f"  {k:<16} {v:>15,}")
    if args.gpus is not None:
        per_step = args.gpus * args.micro_batch
        if args.batch_size % per_step:
            p.error(f"--batch-size {args.batch_size} is not a multiple of gpus x micro-batch = {per_step}")
        plan = memory_plan(cfg, args.gpus, args.micro_batch, args.seq_len, trainable=args.trainable,
                           mixed_precision=not args.fp32,
                           activation_checkpointing=not args.no_activation_checkpointing,
                           grad_accum=args.batch_size // per_step, no_sync=not args.sync_every_micro_batch,
                           frozen_copies=args.frozen_copies, logits=not args.no_logits,
                           gen_rows=args.gen_rows, gpu_gib=args.gpu_gib)
        print()
        print(format_memory_plan(plan))


if __name__ == "__main__":
    main()
