"""Speed benchmarks on this machine: training step, sampling with and without the KV cache, matmul peak, MFU.

    python -m ursa.bench                          # all of torch's threads; prints a table (~1-2 min)
    python -m ursa.bench --threads 2 --steps 5    # pin the thread count, time 5 training steps
    python -m ursa.bench --json                   # the same numbers as one JSON object

What is measured (the "tiny" preset, the toy world's model, randomly initialised; random data):
  train   forward + backward + AdamW step at batch 64 x 140 tokens (16 image tokens + 124 text
          tokens; next-token loss on the text), in fp32 and under bf16 autocast (weights stay fp32);
          2 warm-up steps, then --steps timed steps. tokens/s counts every position of the batch.
  sample  ursa.generate.generate (prefill once, then one token at a time through the KV cache),
          64 prompts of 44 tokens (16 image + 28 text), 96 new tokens each, greedy; and the same
          without a cache (generate_no_cache below: the whole sequence, image included, recomputed
          for every new token), in new tokens/s. Both are greedy, so they should pick the same
          tokens; the agreement is printed as a check.
  peak    the best fp32 and bf16 GFLOP/s of square matmuls (1024 and 2048) on this machine.
  MFU     model-FLOPs utilisation (PaLM, Chowdhery et al. 2022, appendix B):
              MFU = 6 * N * tokens_per_s / peak
          N counts every parameter (vision tower + projector + LM, embedding and head included) and,
          as in the formula, charges it to every token; 6 = 2 (forward) + 4 (backward) FLOPs per
          parameter per token. This overcounts the vision tower (it runs on 16 patches per image,
          not on 140 tokens) and ignores attention; the second MFU column adds PaLM's attention
          term for the LM, 12 * L * d * T FLOPs per token (L layers, width d, sequence T).
          fp32 steps are divided by the fp32 peak, bf16-autocast steps by the bf16 peak.
Speed is never asserted in a test (tests/test_parity.py checks only the FLOP arithmetic).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from typing import Optional

import torch

from ursa.config import get_config, ModelConfig
from ursa.data import next_token_loss
from ursa.generate import generate
from ursa.model import URSAModel, init_weights


# ---- FLOP arithmetic ------------------------------------------------------------------------------

def train_flops_per_token(n_params: int, n_layers: int = 0, d_model: int = 0, seq_len: int = 0) -> float:
    """Training FLOPs per token (forward + backward): 6 N, plus PaLM's attention term 12 L d T
    (QK^T and AV, forward and backward, non-causal count) when n_layers, d_model, seq_len are given."""
    return 6.0 * n_params + 12.0 * n_layers * d_model * seq_len


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_s: float) -> float:
    """Model-FLOPs utilisation: flops_per_token * tokens_per_s / peak (a fraction, not a percent)."""
    return flops_per_token * tokens_per_s / peak_flops_per_s


def matmul_flops(n: int) -> float:
    """FLOPs of one [n, n] x [n, n] matmul: n^2 outputs, n multiply-adds each."""
    return 2.0 * n ** 3


# ---- measurements -------------------------------------------------------------------------------

def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048), min_time: float = 0.3) -> float:
    """Best FLOP/s over square matmuls of the given sizes; each is repeated for >= min_time seconds."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b                                                                  # warm-up
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = max(best, reps * matmul_flops(n) / dt)
    return best


def random_batch(cfg: ModelConfig, batch: int, seq_len: int, g: torch.Generator, prefix: int = 2):
    """Random ids [B, T] with the image's N <|image|> positions right after `prefix` text tokens,
    random pixels [B, 3, S, S] in [0, 1], and a loss mask [B, T] over the text positions."""
    n_img, V, img_id = cfg.vision.num_tokens, cfg.lm.vocab_size, cfg.image_token_id
    if seq_len < prefix + n_img + 2:
        raise ValueError(f"seq_len {seq_len} leaves no text beside {n_img} image tokens")
    ids = torch.randint(0, V - 1, (batch, seq_len), generator=g)
    ids = ids + (ids >= img_id).long()                                         # skip the image id
    ids[:, prefix:prefix + n_img] = img_id
    S = cfg.vision.image_size
    pixels = torch.rand(batch, 3, S, S, generator=g)
    loss_mask = (ids != img_id).long()
    return ids, pixels, loss_mask


def tiny_model(seed: int = 0) -> URSAModel:
    return init_weights(URSAModel(get_config("tiny")), seed=seed)


def bench_train(model: URSAModel, ids, pixels, loss_mask, steps: int, warmup: int, bf16: bool) -> dict:
    """Time forward + backward + AdamW over `steps` steps after `warmup` untimed ones."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx():
            out = model(ids, pixels)
        loss, _ = next_token_loss(out.logits, ids, loss_mask)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    return {"tokens_per_s": ids.numel() * steps / dt, "step_s": dt / steps, "final_loss": losses[-1]}


@torch.no_grad()
def generate_no_cache(model: URSAModel, ids: torch.Tensor, pixels: torch.Tensor, new_tokens: int):
    """Greedy decoding that recomputes the whole sequence (vision tower included) for every new
    token: the baseline the KV cache removes. ids [B, Tp] (no padding) -> new tokens [B, new_tokens]."""
    model.eval()
    ban = model.cfg.image_token_id
    seq = ids
    for _ in range(new_tokens):
        logits = model(seq, pixels).logits[:, -1].float()                      # [B, V]
        logits[:, ban] = float("-inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)         # [B, T + 1]
    return seq[:, ids.shape[1]:]


def bench_sampling(model: URSAModel, ids, pixels, new_tokens: int) -> dict:
    B = ids.shape[0]
    t0 = time.perf_counter()
    gen = generate(model, ids.tolist(), pixels, max_new_tokens=new_tokens, temperature=0.0)
    t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = generate_no_cache(model, ids, pixels, new_tokens)
    t_plain = time.perf_counter() - t0
    return {"cache_tokens_per_s": B * new_tokens / t_cache, "cache_s": t_cache,
            "no_cache_tokens_per_s": B * new_tokens / t_plain, "no_cache_s": t_plain,
            "speedup": t_plain / t_cache,
            "same_tokens": float((gen.tokens == plain).float().mean())}


# ---- the report ---------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(threads: Optional[int] = None, steps: int = 5, warmup: int = 2, batch: int = 64,
        seq_len: int = 140, prompt_len: int = 44, new_tokens: int = 96, seed: int = 0) -> dict:
    if threads is not None:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    model = tiny_model(seed)
    cfg = model.cfg
    parts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    n = model.num_params()
    res = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
           "model": {"preset": cfg.name, "params": n, "params_by_part": parts},
           "train": {"batch": batch, "seq_len": seq_len, "image_tokens": cfg.vision.num_tokens,
                     "steps": steps, "warmup": warmup},
           "sample": {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}}

    res["peak_gflops"] = {"fp32": matmul_peak(torch.float32) / 1e9, "bf16": matmul_peak(torch.bfloat16) / 1e9}

    ids, pixels, loss_mask = random_batch(cfg, batch, seq_len, g)
    f6n = train_flops_per_token(n)
    f_attn = train_flops_per_token(n, cfg.lm.num_layers, cfg.lm.hidden_size, seq_len)
    res["flops_per_token"] = {"6N": f6n, "6N+attn": f_attn}
    for key, bf16 in (("fp32", False), ("bf16", True)):
        m = tiny_model(seed)                                   # fresh weights and optimizer per run
        r = bench_train(m, ids, pixels, loss_mask, steps, warmup, bf16)
        peak = res["peak_gflops"][key] * 1e9
        r["mfu_6N"] = mfu(f6n, r["tokens_per_s"], peak)
        r["mfu_6N_attn"] = mfu(f_attn, r["tokens_per_s"], peak)
        res["train"][key] = r

    p_ids, p_px, _ = random_batch(cfg, batch, prompt_len, g)
    res["sample"].update(bench_sampling(model, p_ids, p_px, new_tokens))
    return res


def format_table(r: dict) -> str:
    m, t, s, pk = r["machine"], r["train"], r["sample"], r["peak_gflops"]
    parts = ", ".join(f"{k} {v:,}" for k, v in r["model"]["params_by_part"].items())
    lines = [
        f"machine  {m['cpu']}, {m['threads']} thread(s), torch {m['torch']}",
        f"model    {r['model']['preset']}: N = {r['model']['params']:,} parameters ({parts})",
        f"peak     matmul fp32 {pk['fp32']:.1f} GFLOP/s, bf16 {pk['bf16']:.1f} GFLOP/s (square 1024/2048)",
        "",
        f"train step (fwd+bwd+AdamW), batch {t['batch']} x {t['seq_len']} tokens "
        f"({t['image_tokens']} image), {t['warmup']} warm-up + {t['steps']} timed steps",
        f"  {'precision':<14}{'tokens/s':>10}{'s/step':>9}{'MFU 6N':>9}{'MFU +attn':>11}",
    ]
    for key, label in (("fp32", "fp32"), ("bf16", "bf16 autocast")):
        x = t[key]
        lines.append(f"  {label:<14}{x['tokens_per_s']:>10,.0f}{x['step_s']:>9.2f}"
                     f"{100 * x['mfu_6N']:>8.1f}%{100 * x['mfu_6N_attn']:>10.1f}%")
    lines += [
        f"  MFU = 6 * N * tokens/s / peak (fp32 peak for fp32, bf16 peak for autocast); "
        f"+attn adds 12 * L * d * T = {r['flops_per_token']['6N+attn'] - r['flops_per_token']['6N']:,.0f} "
        f"FLOPs/token to 6N = {r['flops_per_token']['6N']:,.0f}",
        "",
        f"sampling, batch {s['batch']}, prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens, greedy, fp32",
        f"  {'':<14}{'new tok/s':>10}{'seconds':>9}",
        f"  {'KV cache':<14}{s['cache_tokens_per_s']:>10,.0f}{s['cache_s']:>9.2f}",
        f"  {'no cache':<14}{s['no_cache_tokens_per_s']:>10,.0f}{s['no_cache_s']:>9.2f}",
        f"  speed-up of the cache x{s['speedup']:.1f}; same greedy tokens: {100 * s['same_tokens']:.1f}%",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure training and sampling speed of the tiny preset on this machine.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per precision (after 2 warm-up steps)")
    p.add_argument("--new-tokens", type=int, default=96, help="new tokens per sampled row")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = p.parse_args(argv)
    if args.steps < 1 or args.new_tokens < 1 or (args.threads is not None and args.threads < 1):
        p.error("--steps, --new-tokens and --threads must be at least 1")
    res = run(threads=args.threads, steps=args.steps, new_tokens=args.new_tokens)
    print(json.dumps(res, indent=1) if args.json else format_table(res))


if __name__ == "__main__":
    main()
