"""Speed benchmarks on this machine: training step, the SFT loop, sampling, matmul peak, MFU, profiles.

    python -m ursa.bench --threads 2              # the table: train / loop / sample / stages (~2 min)
    python -m ursa.bench --threads 2 --parts train,loop
    python -m ursa.bench --threads 2 --profile    # where the time goes (docs/speed.md)
    python -m ursa.bench --threads 2 --plain      # the same on the plain path (SDPA, separate q/k/v)
    python -m ursa.bench --json                   # the numbers as one JSON object

What is measured (the "tiny" preset, the toy world's model, randomly initialised):
  train   forward + backward + AdamW step at batch 64 x 140 tokens (16 image tokens + 124 text
          tokens; next-token loss on the text), in fp32 and under bf16 autocast (weights stay fp32).
  loop    the SFT stage's data path: a generated toy world encoded as an ExampleSet, the step's 64
          rows batched, micro-batched (`split`, as the stage does today, or `buckets`: sorted by
          length, each padded to its own longest row), forward / loss / backward per micro-batch,
          gradient clipping, AdamW; real (non-pad) tokens/s, interleaved round by round with the
          isolated step (same precision) so "loop at X% of the isolated step" is one ratio.
  sample  ursa.generate.generate, 64 prompts of 44 tokens, 96 new tokens, greedy, with the KV cache
          and without (generate_no_cache: the whole sequence recomputed per token); new tokens/s.
  stages  the sampler at the stages' shapes (STAGE_SHAPES; no early stop, 96 new tokens a row),
          in completions/s and new tokens/s.
  peak    the best fp32 and bf16 GFLOP/s of square matmuls (1024 and 2048) on this machine.
  MFU     model FLOPs / s / peak (fp32 runs: the fp32 peak; bf16 autocast: the bf16 peak). "model"
          counts the vision tower on its patches per image, the projector on the image rows, the
          LM's matmuls and lm_head at every position, causal attention (the keys each query sees);
          training = 3 x forward. "6N" (PaLM, Chowdhery et al. 2022, appendix B: 6 x every
          parameter x every position) is kept beside it: it overcounts the tower, ignores attention.
Speed is never asserted in a test; the FLOP counts are ursa/flops.py's.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch

from ursa import lm as lm_mod
from ursa.config import ModelConfig, get_config
from ursa.data import next_token_loss
from ursa.flops import matmul_flops, mfu, model_train_flops, train_flops_per_token
from ursa.generate import generate, sample_next
from ursa.model import URSAModel, init_weights
from ursa.trainer import native_bf16


# ---- timing ---------------------------------------------------------------------------------------------

def interleave(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """Time each callable once per round, the order rotating every round (so a slow spell of the
    machine hits all of them alike). Returns name -> list of seconds."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t0)
    return out


def median_ratio(a: list, b: list) -> float:
    """Median over rounds of a[i] / b[i]."""
    return statistics.median(x / y for x, y in zip(a, b))


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


# ---- the isolated step ------------------------------------------------------------------------------

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


def tiny_model(seed: int = 0, cfg: Optional[ModelConfig] = None) -> URSAModel:
    return init_weights(URSAModel(cfg or get_config("tiny")), seed=seed)


def autocast_ctx(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def train_step_fn(model: URSAModel, ids, pixels, loss_mask, bf16: bool) -> Callable[[], float]:
    """One isolated step (zero_grad, forward, loss, backward, AdamW) as a callable -> loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(bf16):
            out = model(ids, pixels)
        loss, _ = next_token_loss(out.logits, ids, loss_mask)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def isolated_step_tokens_per_s(cfg: ModelConfig, bf16: bool, batch: int = 64, seq_len: int = 140,
                               steps: int = 3, seed: int = 0) -> float:
    """Tokens/s of the isolated training step (train_step_fn) of a fresh model of `cfg` on random
    data, median of `steps` steps after one warm-up: the reference a training loop's real
    tokens/s is compared with ("loop at X% of the isolated step")."""
    ids, px, lmask = random_batch(cfg, batch, seq_len, torch.Generator().manual_seed(seed))
    step = train_step_fn(tiny_model(seed, cfg), ids, px, lmask, bf16)
    return ids.numel() / statistics.median(interleave({"step": step}, steps)["step"])


# ---- the loop-shaped measurement (the SFT stage's data path) -------------------------------------

def toy_sft_data(folder: Path, n: int, seed: int = 0):
    """A toy world of n problems written to folder, its tokenizer, the tiny config and the SFT
    ExampleSet, built the way the SFT stage builds them."""
    from ursa.data import conversation_turns, encode_conversations, read_jsonl
    from ursa.tokenizer import Tokenizer, train_toy_tokenizer
    from ursa.toydata import write_world
    d = write_world(folder / "world", n_train=n, n_rl=0, n_test=0, n_hard=0, seed=seed, progress=False)
    texts = []
    for r in read_jsonl(d / "cot_train.jsonl"):
        u, a, _ = conversation_turns(r)
        texts.append(Tokenizer.chat_prompt(u) + a + "<|im_end|>")
    tok = train_toy_tokenizer(texts, vocab_size=512)
    cfg = get_config("tiny")
    cfg.lm.vocab_size = int(math.ceil(tok.vocab_size / 64) * 64)
    cfg.image_token_id = tok.image_id
    return encode_conversations(d / "cot_train.jsonl", tok, cfg.validate()), tok, cfg


def loop_step_fn(model: URSAModel, data, pad_id: int, batch_size: int, micro: Callable, bf16: bool):
    """One SFT-shaped step as a callable -> real tokens: rows (ursa.trainer.order), batch,
    micro(batch) -> micro-batches, loss normalised by the step's targets, clip, AdamW."""
    from ursa.trainer import Opt, make_optimizer, order
    model.train()
    opt = make_optimizer(model.parameters(), Opt(lr=1e-4))
    state = {"step": 0}

    def step():
        opt.zero_grad(set_to_none=True)
        batch = data.batch(order(len(data), state["step"], batch_size, 0), pad_id)
        state["step"] += 1
        n = batch.num_targets()
        for mb in micro(batch):
            with autocast_ctx(bf16):
                out = model(mb.input_ids, mb.pixel_values, attention_mask=mb.attention_mask)
            loss, _ = next_token_loss(out.logits, mb.input_ids, mb.loss_mask, num_targets=n)
            loss.backward()
            loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return batch.num_tokens()
    return step


def bench_loop(steps: int, bf16_modes=(False, True), n_problems: int = 512, batch: int = 64,
               seed: int = 0) -> dict:
    """Real tokens/s of the SFT-shaped loop (split vs buckets) beside the isolated step, interleaved."""
    with tempfile.TemporaryDirectory() as tmp:
        data, tok, cfg = toy_sft_data(Path(tmp), n_problems, seed)
    lens = [len(x) for x in data.ids]
    out = {"problems": len(data), "batch": batch, "mean_len": sum(lens) / len(lens), "max_len": max(lens)}
    g = torch.Generator().manual_seed(seed)
    ids, px, lmask = random_batch(cfg, batch, 140, g)
    variants = {"split(64) (the stage today)": lambda b: b.split(64), "split(16)": lambda b: b.split(16),
                "buckets(32)": lambda b: b.buckets(32), "buckets(16)": lambda b: b.buckets(16),
                "buckets(8)": lambda b: b.buckets(8), "buckets(64, 4096 tok)": lambda b: b.buckets(64, 4096)}
    for bf16 in bf16_modes:
        key = "bf16" if bf16 else "fp32"
        fns = {"isolated": train_step_fn(tiny_model(seed, cfg), ids, px, lmask, bf16)}
        real = {}
        for name, micro in variants.items():
            f = loop_step_fn(tiny_model(seed, cfg), data, tok.pad_id, batch, micro, bf16)
            fns[name] = (lambda f=f, name=name: real.setdefault(name, []).append(f()))
        t = interleave(fns, steps)
        iso = [ids.numel() / x for x in t["isolated"]]
        res = {"isolated_tokens_per_s": statistics.median(iso)}
        for name in variants:
            tps = [r / x for r, x in zip(real[name][-steps:], t[name])]
            res[name] = {"real_tokens_per_s": statistics.median(tps), "of_isolated": median_ratio(tps, iso)}
        out[key] = res
    return out


# ---- sampling ---------------------------------------------------------------------------------------

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


NEVER = -1          # a stop id no token has: every row decodes max_new_tokens


def bench_sampling(model: URSAModel, ids, pixels, new_tokens: int) -> dict:
    B = ids.shape[0]
    t0 = time.perf_counter()
    gen = generate(model, ids.tolist(), pixels, max_new_tokens=new_tokens, temperature=0.0, stop_ids=[NEVER])
    t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = generate_no_cache(model, ids, pixels, new_tokens)
    t_plain = time.perf_counter() - t0
    return {"cache_tokens_per_s": B * new_tokens / t_cache, "cache_s": t_cache,
            "no_cache_tokens_per_s": B * new_tokens / t_plain, "no_cache_s": t_plain,
            "speedup": t_plain / t_cache,
            "same_tokens": float((gen.tokens == plain).float().mean())}


STAGE_SHAPES = {               # name: (prompts, samples per prompt, prompts per generate call, temperature)
    "label": (64, 4, 64, 1.0),
    "grpo": (16, 8, 16, 1.0),
    "best-of-N": (64, 16, 4, 1.0),
    "greedy eval": (64, 1, 64, 0.0),
}


def sample_shape(model: URSAModel, prompts: list, pixels, shape: tuple, new_tokens: int, seed: int = 0,
                 stop_ids=(NEVER,), pad_id: int = 0) -> tuple[float, int, int]:
    """generate at one of STAGE_SHAPES (P prompts, G samples each, per_call prompts per call, T) on
    the first P prompts -> (seconds, new tokens up to each stop, Generation.decoded summed)."""
    P, G, per_call, T = shape
    gen = torch.Generator().manual_seed(seed)
    new = dec = 0
    t0 = time.perf_counter()
    for s in range(0, P, per_call):
        g = generate(model, prompts[s:s + per_call], pixels[s:s + per_call], num_samples=G, max_new_tokens=new_tokens,
                     temperature=T, stop_ids=stop_ids, pad_id=pad_id, generator=gen)
        new, dec = new + int(g.lengths.sum()), dec + g.decoded
    return time.perf_counter() - t0, new, dec


def bench_stages(model: URSAModel, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
    """Completions/s and new tokens/s of generate at the stages' shapes (STAGE_SHAPES)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (P, G, per_call, T) in STAGE_SHAPES.items():
        ids, px, _ = random_batch(model.cfg, P, prompt_len, g)
        dt, _, _ = sample_shape(model, ids.tolist(), px, (P, G, per_call, T), new_tokens, seed)
        out[name] = {"rows": P * G, "rows_per_call": per_call * G, "completions_per_s": P * G / dt,
                     "new_tokens_per_s": P * G * new_tokens / dt, "seconds": dt}
    return out


# ---- where the time goes -------------------------------------------------------------------------------

def _median_s(fn: Callable, reps: int) -> float:
    """Median seconds of fn() over reps calls after one warm-up call."""
    fn()
    return statistics.median(interleave({"f": fn}, reps, warmup=0)["f"])


def _fwd_bwd(f: Callable, bf16: bool) -> Callable:
    """A callable running f() (under autocast when bf16) and a backward through its output(s)."""
    def run():
        with autocast_ctx(bf16):
            y = f()
        ys = list(y) if isinstance(y, tuple) else [y]
        torch.autograd.backward(ys, [torch.ones_like(t) for t in ys])
    return run


def _leaf(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype).requires_grad_()


def breakdown_train(model: URSAModel, ids, pixels, loss_mask, bf16: bool, reps: int = 5) -> list:
    """Seconds per training step by component: each piece timed alone (forward + backward) at the
    step's shapes, times its count per step; "other" = the measured step minus their sum
    (residual adds, reshapes, autograd and Python overhead)."""
    cfg, lmc = model.cfg, model.cfg.lm
    L, (B, T), H = lmc.num_layers, ids.shape, lmc.hidden_size
    Hq, Hkv, hd = lmc.num_heads, lmc.num_kv_heads, lmc.head_dim
    lm = model.language_model
    layer = lm.model.layers[0]
    at = layer.self_attn
    dt = torch.bfloat16 if bf16 else torch.float32
    with autocast_ctx(bf16):
        pat = lm_mod.attention_pattern(None, T, 0, ids.device, dt, B)
    pos = torch.arange(T).expand(B, T)
    rot = lm.rotary(pos, T)
    x, h, feats = _leaf((B, T, H)), _leaf((B, T, H)), _leaf((B, cfg.vision.num_tokens, H))
    q, k, v = _leaf((B, Hq, T, hd), dt), _leaf((B, Hkv, T, hd), dt), _leaf((B, T, Hkv, hd), dt)
    qk = _leaf((B, Hq + Hkv, T, hd), dt)
    y_heads = _leaf((B, T, Hq * hd), dt)
    is_img = ids == cfg.image_token_id

    def kernel():
        qt, kt, vt = q, k, v.transpose(1, 2)                                  # v: a strided view, as in the layer
        if pat.kernel == "matmul":
            return lm_mod.matmul_attention(qt, kt, vt, pat.bias(qt.dtype))
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=pat.mask,
                                                                is_causal=pat.causal, enable_gqa=Hq != Hkv)

    def head_loss():
        return next_token_loss(lm.head(h), ids, loss_mask)[0]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    parts = [
        ("vision tower + projector", 1, _fwd_bwd(lambda: model.image_features(pixels), bf16)),
        ("embedding + image merge", 1, _fwd_bwd(lambda: lm.model.embed_tokens(ids).masked_scatter(
            is_img[..., None], feats.reshape(-1, H)), bf16)),
        ("RMSNorm", 2 * L + 1, _fwd_bwd(lambda: layer.input_layernorm(x), bf16)),
        (f"q/k/v projection ({'fused' if pat.fuse_qkv else 'separate'})", L,
         _fwd_bwd(lambda: at.qkv(x, lambda t: t, pat.fuse_qkv), bf16)),
        ("RoPE", L, _fwd_bwd(lambda: rot(qk), bf16)),
        (f"attention kernel ({pat.kernel})", L, _fwd_bwd(kernel, bf16)),
        ("o_proj", L, _fwd_bwd(lambda: at.o_proj(y_heads), bf16)),
        ("MLP", L, _fwd_bwd(lambda: layer.mlp(x), bf16)),
        ("lm_head + loss", 1, _fwd_bwd(head_loss, bf16)),
        ("mask + RoPE tables (per forward)", 1, lambda: (lm_mod.attention_pattern(None, T, 0, ids.device, dt, B),
                                                        lm.rotary(pos, T))),
        ("AdamW step", 1, opt.step),
    ]
    rows = [(name, n * _median_s(f, reps)) for name, n, f in parts]
    model.zero_grad(set_to_none=True)
    total = _median_s(train_step_fn(model, ids, pixels, loss_mask, bf16), reps)
    return rows + [("other (residuals, reshapes, autograd, Python)", total - sum(s for _, s in rows)),
                   ("= measured step", total)]


@torch.no_grad()
def breakdown_decode(model: URSAModel, rows: int, prompt_len: int, new_tokens: int, reps: int = 5) -> list:
    """Seconds per decoded token (all rows) by component, at the mean cache length of a greedy
    generate of new_tokens; "other" = the measured per-token time minus the pieces."""
    cfg, lmc = model.cfg, model.cfg.lm
    L, H = lmc.num_layers, lmc.hidden_size
    Hq, Hkv, hd = lmc.num_heads, lmc.num_kv_heads, lmc.head_dim
    model.eval()
    lm = model.language_model
    layer, Tk = lm.model.layers[0], prompt_len + new_tokens // 2
    at = layer.self_attn
    g = torch.Generator().manual_seed(0)
    ids, px, _ = random_batch(cfg, rows, prompt_len, g)
    pat = lm_mod.attention_pattern(None, 1, Tk - 1, ids.device, torch.float32, rows)
    pos = torch.full((rows, 1), Tk - 1)
    rot = lm.rotary(pos, Tk)
    x, logits = torch.randn(rows, 1, H), torch.randn(rows, lmc.vocab_size)
    qk = torch.randn(rows, Hq + Hkv, 1, hd)
    q, kc, vc = torch.randn(rows, Hq, 1, hd), torch.randn(rows, Hkv, Tk, hd), torch.randn(rows, Hkv, Tk, hd)
    k1 = torch.randn(rows, Hkv, 1, hd)
    cache = model.new_cache(rows, Tk + 1)
    cache.length = Tk - 1
    tok = torch.randint(0, lmc.vocab_size, (rows,))
    stop = torch.tensor([NEVER])

    def kernel():
        if pat.kernel == "matmul":
            return lm_mod.matmul_attention(q, kc, vc, pat.bias(q.dtype))
        return torch.nn.functional.scaled_dot_product_attention(q, kc, vc, enable_gqa=Hq != Hkv)

    def sampling():
        last = logits.clone()
        last[:, cfg.image_token_id] = float("-inf")
        t, _ = sample_next(last, 0.0, 1.0, None)
        return torch.isin(t, stop)

    parts = [
        ("token embedding", 1, lambda: lm.model.embed_tokens(tok[:, None])),
        ("RMSNorm", 2 * L + 1, lambda: layer.input_layernorm(x)),
        (f"q/k/v projection ({'fused' if pat.fuse_qkv else 'separate'})", L,
         lambda: at.qkv(x, lambda t: t, pat.fuse_qkv)),
        ("RoPE", L, lambda: rot(qk)),
        ("KV-cache write", L, lambda: cache.update(0, k1, k1)),
        (f"attention kernel ({pat.kernel}, {Tk} keys)", L, kernel),
        ("o_proj", L, lambda: at.o_proj(x)),
        ("MLP", L, lambda: layer.mlp(x)),
        ("lm_head", 1, lambda: lm.head(x[:, -1])),
        ("sampling + stop test", 1, sampling),
        ("mask + RoPE lookup (per step)", 1, lambda: (lm_mod.attention_pattern(None, 1, Tk - 1, ids.device,
                                                                               torch.float32, rows), lm.rotary(pos, Tk))),
    ]
    with lm_mod.constant_weights():                # as inside generate: the fused weights kept
        rows_out = [(name, n * _median_s(f, reps * 20)) for name, n, f in parts]
    P = ids.tolist()
    t_all = _median_s(lambda: generate(model, P, px, max_new_tokens=new_tokens, stop_ids=[NEVER]), reps)
    t_one = _median_s(lambda: generate(model, P, px, max_new_tokens=1, stop_ids=[NEVER]), reps)
    per_tok = (t_all - t_one) / (new_tokens - 1)
    return rows_out + [("other (residuals, reshapes, generate loop, Python)", per_tok - sum(s for _, s in rows_out)),
                       ("= measured per-token step", per_tok)]


def format_breakdown(title: str, rows: list, unit: float = 1e3, unit_name: str = "ms") -> str:
    total = rows[-1][1]
    lines = [title, f"  {'component':<52}{unit_name:>9}{'share':>8}"]
    for name, s in rows:
        lines.append(f"  {name:<52}{s * unit:>9.3f}{100 * s / total:>7.1f}%")
    return "\n".join(lines)


def profile(threads: Optional[int] = None, reps: int = 5, seed: int = 0) -> str:
    """The breakdowns of docs/speed.md: training step fp32 and bf16, decoding at 64 rows and 1."""
    if threads is not None:
        torch.set_num_threads(threads)
    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    ids, px, lmask = random_batch(model.cfg, 64, 140, g)
    out = [f"machine  {cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"]
    for bf16 in (False, True) if native_bf16(torch.device("cpu")) else (False,):
        rows = breakdown_train(model, ids, px, lmask, bf16, reps)
        out.append(format_breakdown(f"training step, batch 64 x 140, {'bf16 autocast' if bf16 else 'fp32'}", rows))
    for n in (64, 1):
        rows = breakdown_decode(model, n, 44, 96, reps)
        out.append(format_breakdown(f"greedy decoding, {n} row(s), prompt 44 + 96 new tokens, fp32, per token",
                                    rows, 1e6, "us"))
    return "\n\n".join(out)


# ---- the report ---------------------------------------------------------------------------------

def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or platform.machine())


PARTS = ("train", "loop", "sample", "stages")


def run(threads: Optional[int] = None, steps: int = 5, warmup: int = 2, batch: int = 64,
        seq_len: int = 140, prompt_len: int = 44, new_tokens: int = 96, seed: int = 0,
        parts=PARTS) -> dict:
    if threads is not None:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    model = tiny_model(seed)
    cfg = model.cfg
    n = model.num_params()
    res = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
           "model": {"preset": cfg.name, "params": n,
                     "params_by_part": {k: sum(p.numel() for p in m.parameters()) for k, m in model.named_children()}},
           "peak_gflops": {"fp32": matmul_peak(torch.float32) / 1e9, "bf16": matmul_peak(torch.bfloat16) / 1e9}}
    ids, pixels, loss_mask = random_batch(cfg, batch, seq_len, g)
    bf16_ok = native_bf16(torch.device("cpu"))      # else bf16 is emulated: its rows are skipped
    f_model = model_train_flops(cfg, [seq_len] * batch, batch) / ids.numel()
    res["flops_per_token"] = {"6N": train_flops_per_token(n), "model": f_model}
    if "train" in parts:
        res["train"] = {"batch": batch, "seq_len": seq_len, "image_tokens": cfg.vision.num_tokens,
                        "steps": steps, "warmup": warmup}
        for key, bf16 in (("fp32", False), ("bf16", True)):
            if bf16 and not bf16_ok:
                res["train"][key] = None          # emulated bf16 (see native_bf16): the stages run fp32 here
                continue
            step = train_step_fn(tiny_model(seed), ids, pixels, loss_mask, bf16)
            t = statistics.median(interleave({"s": step}, steps, warmup)["s"])
            tps, peak = ids.numel() / t, res["peak_gflops"][key] * 1e9
            res["train"][key] = {"tokens_per_s": tps, "step_s": t, "mfu_model": mfu(f_model, tps, peak),
                                 "mfu_6N": mfu(train_flops_per_token(n), tps, peak)}
    if "loop" in parts:
        res["loop"] = bench_loop(steps, (False, True) if bf16_ok else (False,), seed=seed)
    if "sample" in parts:
        p_ids, p_px, _ = random_batch(cfg, batch, prompt_len, g)
        res["sample"] = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                         **bench_sampling(model, p_ids, p_px, new_tokens)}
    if "stages" in parts:
        res["stages"] = bench_stages(model, prompt_len, new_tokens, seed)
    return res


def format_table(r: dict) -> str:
    m, pk = r["machine"], r["peak_gflops"]
    parts = ", ".join(f"{k} {v:,}" for k, v in r["model"]["params_by_part"].items())
    lines = [f"machine  {m['cpu']}, {m['threads']} thread(s), torch {m['torch']}",
             f"model    {r['model']['preset']}: N = {r['model']['params']:,} parameters ({parts})",
             f"peak     matmul fp32 {pk['fp32']:.1f} GFLOP/s, bf16 {pk['bf16']:.1f} GFLOP/s (square 1024/2048)"]
    if "train" in r:
        t = r["train"]
        lines += ["", f"train step (fwd+bwd+AdamW), batch {t['batch']} x {t['seq_len']} tokens "
                      f"({t['image_tokens']} image), median of {t['steps']} steps after {t['warmup']} warm-up",
                  f"  {'precision':<14}{'tokens/s':>10}{'s/step':>9}{'MFU model':>11}{'MFU 6N':>9}"]
        for key, label in (("fp32", "fp32"), ("bf16", "bf16 autocast")):
            x = t[key]
            if x is None:
                lines.append(f"  {label:<14}skipped: this CPU has no native bf16 (AVX512-BF16 or AMX), so the "
                             f"stages compute in fp32")
                continue
            lines.append(f"  {label:<14}{x['tokens_per_s']:>10,.0f}{x['step_s']:>9.3f}"
                         f"{100 * x['mfu_model']:>10.1f}%{100 * x['mfu_6N']:>8.1f}%")
        f = r["flops_per_token"]
        lines.append(f"  model FLOPs/token {f['model']:,.0f} (vision on patches, LM, causal attention; "
                     f"x3 for training); 6N = {f['6N']:,.0f}")
    if "loop" in r:
        lp = r["loop"]
        lines += ["", f"SFT-shaped loop: {lp['problems']} toy problems (mean {lp['mean_len']:.0f}, max "
                      f"{lp['max_len']} tokens), {lp['batch']} rows per step; real (non-pad) tokens/s, "
                      f"interleaved with the isolated step"]
        for key in ("fp32", "bf16"):
            if key in lp:
                x = lp[key]
                lines.append(f"  {key}: isolated step {x['isolated_tokens_per_s']:,.0f} tokens/s")
                for name, v in x.items():
                    if isinstance(v, dict):
                        lines.append(f"    {name:<28}{v['real_tokens_per_s']:>9,.0f} real tokens/s "
                                     f"({100 * v['of_isolated']:.0f}% of the isolated step)")
    if "sample" in r:
        s = r["sample"]
        lines += ["", f"sampling, batch {s['batch']}, prompt {s['prompt_len']} tokens, {s['new_tokens']} new "
                      f"tokens, greedy, fp32"] + [
            f"  {label:<14}{s[k + '_tokens_per_s']:>10,.0f} new tokens/s {s[k + '_s']:>7.2f} s"
            for label, k in (("KV cache", "cache"), ("no cache", "no_cache"))] + [
            f"  speed-up of the cache x{s['speedup']:.1f}; same greedy tokens: {100 * s['same_tokens']:.1f}%"]
    if "stages" in r:
        lines += ["", "sampler at the stages' shapes (96 new tokens per row, fp32)",
                  f"  {'stage':<14}{'rows':>6}{'rows/call':>10}{'completions/s':>15}{'new tok/s':>11}"]
        for name, x in r["stages"].items():
            lines.append(f"  {name:<14}{x['rows']:>6}{x['rows_per_call']:>10}{x['completions_per_s']:>15.1f}"
                         f"{x['new_tokens_per_s']:>11,.0f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure training and sampling speed of the tiny preset on this machine.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--steps", type=int, default=5, help="timed steps / rounds per measurement")
    p.add_argument("--new-tokens", type=int, default=96, help="new tokens per sampled row")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--profile", action="store_true", help="print where the time goes instead of the table")
    p.add_argument("--plain", action="store_true", help="force the plain path (SDPA, separate q/k/v projections)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = p.parse_args(argv)
    parts = tuple(x for x in args.parts.split(",") if x)
    if args.steps < 1 or args.new_tokens < 2 or (args.threads is not None and args.threads < 1):
        p.error("--steps and --threads must be at least 1, --new-tokens at least 2")
    if any(x not in PARTS for x in parts):
        p.error(f"--parts: choose from {','.join(PARTS)}")
    with lm_mod.forced_path(lm_mod.PLAIN) if args.plain else nullcontext():
        if args.profile:
            print(profile(args.threads, args.steps))
            return
        res = run(threads=args.threads, steps=args.steps, new_tokens=args.new_tokens, parts=parts)
    print(json.dumps(res, indent=1) if args.json else format_table(res))


if __name__ == "__main__":
    main()
