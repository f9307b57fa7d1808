"""The Python half of scripts/gpu_check.sh: CUDA checks of the model code, and the 8B architecture.

    python scripts/gpu_check.py tiny   [--dry-run]   # CUDA vs CPU: logits, bf16, greedy tokens, a step
    python scripts/gpu_check.py ursa8b [--dry-run] [--seq 4096] [--layers N]

tiny    the tiny preset on CUDA against the same weights on the CPU: fp32 logits (max |diff|, fails
        above 1e-3: TF32 is off, kernels differ), bf16 autocast logits (within 0.1), greedy
        generation (the same tokens at batch 4, left-padded, batched == one by one on CUDA), and one
        training step's tokens/s.
ursa8b  ursa.config.get_config("ursa-8b") with random weights in bf16, built on the meta device and
        materialised on the GPU: forward + backward at one sequence of --seq tokens (text only,
        micro-batch 1, every decoder layer activation-checkpointed, no optimizer: an 8B bf16 model
        with AdamW does not fit one GPU), its tokens/s and MFU (model FLOPs, ursa.flops.lm_forward_flops
        x 3, against the bf16 peak of an 8192^3 matmul measured here); then KV-cache greedy
        generation tokens/s at batch 1 and 32. torch.cuda.max_memory_allocated for each.
--dry-run (automatic without CUDA) walks the same steps, builds the 8B model on the meta device
(no memory), prints what each step would compute and skips the CUDA work with the reason.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ursa.bench import NEVER, random_batch, tiny_model   # noqa: E402
from ursa.flops import lm_forward_flops, matmul_flops   # noqa: E402
from ursa.config import get_config                                                       # noqa: E402
from ursa.data import next_token_loss                                                    # noqa: E402
from ursa.generate import generate                                                       # noqa: E402
from ursa.model import URSAModel                                                         # noqa: E402

GiB = 2 ** 30
FP32_LOGIT_TOL = 1e-3
BF16_LOGIT_TOL = 0.1


class CheckFailed(ValueError):
    pass


def skip(what: str, reason: str) -> None:
    print(f"  SKIP {what}: {reason}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps calls after one warm-up (synchronised)."""
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def bf16_peak(n: int = 8192, reps: int = 10) -> float:
    """FLOP/s of an n^3 bf16 matmul on the GPU."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return matmul_flops(n) / timed(lambda: a @ b, reps)


# ---- tiny: CUDA against the CPU ------------------------------------------------------------------

def check_tiny(dry: bool, reason: str) -> None:
    print("tiny preset: CUDA against the CPU")
    cpu = tiny_model(0).eval()
    g = torch.Generator().manual_seed(0)
    ids, px, lmask = random_batch(cpu.cfg, 8, 60, g)
    prompts = [ids[i, : 30 + 4 * i].tolist() for i in range(4)]           # ragged: left padding
    print(f"  {cpu.num_params():,} parameters; batch 8 x 60, prompts of {[len(p) for p in prompts]} tokens")
    if dry:
        skip("fp32 / bf16 logits, greedy tokens, training step", reason)
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu = tiny_model(0).cuda().eval()
    with torch.no_grad():
        want = cpu(ids, px).logits
        got = gpu(ids.cuda(), px.cuda()).logits.cpu()
        d32 = (got - want).abs().max().item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            d16 = (gpu(ids.cuda(), px.cuda()).logits.float().cpu() - want).abs().max().item()
    print(f"  fp32 logits max |cuda - cpu| {d32:.2e} (limit {FP32_LOGIT_TOL}); bf16 autocast {d16:.2e} "
          f"(limit {BF16_LOGIT_TOL})")
    a = generate(cpu, prompts, px[:4], max_new_tokens=24, stop_ids=[NEVER])
    b = generate(gpu, prompts, px[:4].cuda(), max_new_tokens=24, stop_ids=[NEVER])
    alone = [generate(gpu, [p], px[i:i + 1].cuda(), max_new_tokens=24, stop_ids=[NEVER]).row(0)
             for i, p in enumerate(prompts)]
    same = sum(a.row(i) == b.row(i) for i in range(4))
    batched_ok = all(b.row(i) == alone[i] for i in range(4))
    print(f"  greedy 4 x 24: {same}/4 rows equal the CPU's; batched == one by one on CUDA: {batched_ok}")
    gpu.train()
    opt = torch.optim.AdamW(gpu.parameters(), lr=1e-4)
    ids64, px64, lm64 = (t.cuda() for t in random_batch(gpu.cfg, 64, 140, g))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(ids64, px64)
        next_token_loss(out.logits, ids64, lm64)[0].backward()
        opt.step()
    print(f"  training step 64 x 140 (bf16 autocast): {ids64.numel() / timed(step, 5):,.0f} tokens/s")
    if not (d32 <= FP32_LOGIT_TOL and d16 <= BF16_LOGIT_TOL and batched_ok):
        raise CheckFailed("tiny: CUDA disagrees with the CPU (see the lines above)")


# ---- the 8B architecture ------------------------------------------------------------------------------

def build_8b(device: str, layers: int | None) -> URSAModel:
    """ursa-8b in bf16, built on the meta device; on `device` with Normal(0, 0.02) weights (norms 1,
    biases 0) unless device is "meta"."""
    cfg = get_config("ursa-8b")
    if layers is not None:
        cfg.lm.num_layers = layers
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = URSAModel(cfg)
    finally:
        torch.set_default_dtype(old)
    if device == "meta":
        return model
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "hd_alpha" in name:
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model


def check_8b(dry: bool, reason: str, seq: int, layers: int | None, new_tokens: int = 128,
             prompt: int = 512) -> None:
    from ursa.dist import checkpoint_block
    meta = build_8b("meta", layers)
    cfg = meta.cfg
    n = meta.num_params()
    n_lm = sum(p.numel() for p in meta.language_model.parameters())
    flops = 3 * lm_forward_flops(cfg.lm, seq)
    print(f"ursa-8b: {n / 1e9:.2f} B parameters ({n_lm / 1e9:.2f} B in the LM), {cfg.lm.num_layers} decoder "
          f"layers{' (truncated)' if layers else ''}, bf16 weights {n * 2 / GiB:.1f} GiB")
    print(f"  train: 1 x {seq} tokens, text only, activation checkpointing per decoder layer, no optimizer; "
          f"model FLOPs {flops / 1e12:.1f} TFLOP per step (LM, causal attention, x3)")
    print(f"  generate: prompt {prompt} tokens, {new_tokens} new tokens, greedy, batch 1 and 32")
    if dry:
        skip("8B forward + backward, MFU, generation, peak memory", reason)
        return
    torch.cuda.reset_peak_memory_stats()
    peak = bf16_peak()
    print(f"  bf16 matmul peak (8192^3): {peak / 1e12:.0f} TFLOP/s")
    model = build_8b("cuda", layers)
    for layer in model.language_model.model.layers:
        checkpoint_block(layer)
    model.train()
    g = torch.Generator(device="cuda").manual_seed(0)
    img = cfg.image_token_id
    ids = torch.randint(0, img, (1, seq), device="cuda", generator=g)          # no <|image|> id
    lmask = torch.ones_like(ids)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids)
        next_token_loss(out.logits, ids, lmask)[0].backward()
    torch.cuda.reset_peak_memory_stats()
    t = timed(step, 3)
    mem = torch.cuda.max_memory_allocated() / GiB
    print(f"  train fwd+bwd: {t:.3f} s/step, {seq / t:,.0f} tokens/s, MFU {100 * flops / t / peak:.1f}% "
          f"of the measured peak; peak memory {mem:.1f} GiB")
    model.zero_grad(set_to_none=True)
    model.eval()
    for B in (1, 32):
        p_ids = torch.randint(0, img, (B, prompt), generator=torch.Generator().manual_seed(B)).tolist()
        torch.cuda.reset_peak_memory_stats()
        t = timed(lambda: generate(model, p_ids, None, max_new_tokens=new_tokens, stop_ids=[NEVER]), 2)
        print(f"  generate batch {B}: {B * new_tokens / t:,.0f} new tokens/s ({t:.2f} s incl. the prefill); "
              f"peak memory {torch.cuda.max_memory_allocated() / GiB:.1f} GiB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="CUDA checks (scripts/gpu_check.sh runs them)")
    p.add_argument("what", choices=("tiny", "ursa8b"))
    p.add_argument("--dry-run", action="store_true", help="walk the steps, skip the CUDA work")
    p.add_argument("--seq", type=int, default=4096, help="ursa8b: training sequence length")
    p.add_argument("--layers", type=int, default=None, help="ursa8b: truncate the decoder to N layers")
    args = p.parse_args(argv)
    dry, reason = args.dry_run, "dry run"
    if not torch.cuda.is_available():
        dry, reason = True, "no CUDA device (torch.cuda.is_available() is False)"
    try:
        if args.what == "tiny":
            check_tiny(dry, reason)
        else:
            check_8b(dry, reason, args.seq, args.layers)
    except CheckFailed as e:
        print(f"FAIL {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
