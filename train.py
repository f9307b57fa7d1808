"""Every training loop of the URSA recipe, hand-written: pretrain (toy only), align, sft, prm, grpo.

    python train.py                          # the whole toy recipe on CPU: world, every stage, eval, table
    python train.py --quick                  # the same at smoke size (about a minute)
    python train.py sft --run runs/toy       # one stage (reads the previous stage's directory)
    python train.py sft --run runs/toy --stop-after 20   # stop early with a checkpoint; rerun resumes
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py sft --quick --fsdp --threads 1
                                             # FSDP2 over 2 CPU processes (docs/scale_out.md: GPUs)

Stages write runs/<name>/<stage>/: config.json + model.safetensors (the result), metrics.jsonl (one
line per logged step), state.json, and resume/ (optimizer, RNG, step) while the stage is running.
A finished stage is skipped when the recipe is rerun; an interrupted one resumes exactly.

Loss normalisation: every optimizer step counts its targets (assistant tokens, PRM tags) over the
whole batch BEFORE the micro-batch loop and divides every micro-batch's summed loss by that count,
so micro-batching never changes the gradient (DESIGN.md conventions).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ursa.config import ModelConfig, get_config
from ursa.data import Batch, Example, collate, conversation_turns, image_path, load_image, next_token_loss, read_jsonl
from ursa.model import URSAModel, init_weights
from ursa.tokenizer import Tokenizer, train_toy_tokenizer
from ursa.weights import load_model, save_model


# =============================================================================================
# Options
# =============================================================================================

@dataclass
class Opt:
    """One stage's optimisation settings."""
    steps: int = 100
    batch_size: int = 64
    micro_batch: int = 64
    lr: float = 1e-3
    warmup_ratio: float = 0.02
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    bf16: bool = True            # bf16 autocast (CPU or GPU); weights stay fp32
    log_every: int = 10
    ckpt_every: int = 50
    seed: int = 0
    epochs: Optional[float] = None   # if set, steps = ceil(epochs * rows / rows per step) once data is known


def with_epochs(opt: Opt, rows: int, rows_per_step: int) -> Opt:
    """Resolve opt.epochs into a step count for a dataset of `rows`."""
    if opt.epochs is None:
        return opt
    return replace(opt, steps=max(1, math.ceil(opt.epochs * rows / rows_per_step)))


def lr_at(step: int, opt: Opt) -> float:
    """Linear warmup over warmup_ratio * steps, then cosine decay to min_lr_ratio * lr."""
    warm = max(1, int(round(opt.warmup_ratio * opt.steps)))
    if step < warm:
        return opt.lr * (step + 1) / warm
    p = (step - warm) / max(1, opt.steps - warm)
    return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(params, opt: Opt):
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=opt.lr, betas=(0.9, 0.95), eps=1e-8)


def autocast(opt: Opt, device="cpu"):
    if DIST is not None:            # FSDP's MixedPrecisionPolicy already computes in bf16 (opt.bf16)
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=opt.bf16)


# =============================================================================================
# Scale-out (--fsdp): ursa/dist.py under torchrun; every helper is a no-op in one process
# =============================================================================================

DIST = None                    # ursa.dist.DistInfo under --fsdp (set by main), else None
FSDP = {"activation_checkpointing": True, "no_sync": True}


def is_main() -> bool:
    return DIST is None or DIST.is_main


def to_dev(*tensors):
    """Move batch tensors to this rank's device (CPU in one process)."""
    dev = DIST.device if DIST is not None else torch.device("cpu")
    return [None if t is None else t.to(dev) for t in tensors]


def stage_model(model_dir, value_head=None, bf16: bool = True):
    """A stage's starting model: load_model in one process; sharded with FSDP2 under --fsdp
    (bf16 mixed precision when the stage's opt.bf16)."""
    if DIST is None:
        return load_model(model_dir, value_head=value_head)
    from ursa import dist
    from ursa.weights import read_config
    cfg = read_config(model_dir)
    if value_head is not None:
        cfg.value_head = value_head
    return dist.build_fsdp_model(cfg, model_dir, mixed_precision=bf16,
                                 activation_checkpointing=FSDP["activation_checkpointing"])


def my_rows(idx: list) -> list:
    """This rank's contiguous share of the optimizer step's global rows (all of them in one process)."""
    if DIST is None:
        return idx
    from ursa import dist
    return dist.rank_indices(idx, DIST.rank, DIST.world_size)


def global_count(n: int) -> int:
    """Targets / tags of the whole optimizer step: summed over ranks under --fsdp."""
    if DIST is None:
        return int(n)
    from ursa import dist
    return dist.global_count(n)


def micro_batches(model, items):
    """The micro-batch loop; under --fsdp gradients are reduce-scattered after the last one only."""
    if DIST is None:
        return iter(items)
    from ursa import dist
    return dist.accumulate(model, items, no_sync=FSDP["no_sync"])


def rank0_first(fn, *args, **kwargs):
    """fn on rank 0, then on the others (after a barrier): for steps that write shared files."""
    from ursa import dist
    if DIST is not None and not is_main():
        dist.barrier()
    out = fn(*args, **kwargs)
    if DIST is not None and is_main():
        dist.barrier()
    return out


# =============================================================================================
# The loop: resume, accumulation, clipping, logging, checkpoints
# =============================================================================================

def stage_done(stage_dir: Path) -> bool:
    f = Path(stage_dir) / "state.json"
    return f.exists() and json.loads(f.read_text()).get("done", False)


def _save_resume(stage_dir: Path, modules: dict, optim, step: int, extra_tensors: dict):
    tmp = stage_dir / "resume.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sd = {f"{k}.{n}": t.detach().cpu().contiguous() for k, m in modules.items() for n, t in m.state_dict().items()}
    save_file(sd, str(tmp / "modules.safetensors"))
    torch.save(optim.state_dict(), tmp / "optimizer.pt")
    rng = {"torch_rng": torch.get_rng_state(), **{k: v.cpu() for k, v in extra_tensors.items()}}
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "python_rng": repr(random.getstate())}))
    final = stage_dir / "resume"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _load_resume(stage_dir: Path, modules: dict, optim) -> tuple[int, dict]:
    d = stage_dir / "resume"
    sd = load_file(str(d / "modules.safetensors"))
    for k, m in modules.items():
        part = {n[len(k) + 1:]: t for n, t in sd.items() if n.startswith(k + ".")}
        m.load_state_dict(part, strict=True)
    optim.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
    rng = load_file(str(d / "rng.safetensors"))
    torch.set_rng_state(rng.pop("torch_rng"))
    st = json.loads((d / "state.json").read_text())
    return st["step"], rng


def train_loop(stage_dir, name: str, modules: dict, opt: Opt, step_fn: Callable[[int], dict],
               extra_state: Optional[Callable[[], dict]] = None,
               restore_extra: Optional[Callable[[dict], None]] = None,
               stop_after: Optional[int] = None, quiet: bool = False) -> bool:
    """Run optimizer steps 0 .. opt.steps-1, resuming from stage_dir/resume if present.

    modules: every module whose state must survive a resume (the model, auxiliary heads).
    step_fn(step) runs forward+backward for the whole optimizer step (it splits micro-batches
    itself) and returns metrics (must include "loss"). Returns True when the stage finished."""
    from ursa import dist
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if DIST is not None and list(modules) != ["model"]:
        raise ValueError(f"--fsdp trains one sharded model per stage, got modules {list(modules)}")
    quiet = quiet or not is_main()
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optim = make_optimizer(params, opt)
    start = 0
    metrics_path = stage_dir / "metrics.jsonl"
    if (stage_dir / "resume").exists():
        if DIST is not None:
            st = dist.load_sharded(stage_dir / "resume", modules["model"], optim)
            start, rng = st.pop("step"), {k: v for k, v in st.items() if torch.is_tensor(v)}
        else:
            start, rng = _load_resume(stage_dir, modules, optim)
        if restore_extra:
            restore_extra(rng)
        if metrics_path.exists() and is_main():      # drop log lines written after the checkpoint
            keep = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] < start]
            metrics_path.write_text("".join(l + "\n" for l in keep))
        if not quiet:
            print(f"[{name}] resuming at step {start}/{opt.steps}")
    elif metrics_path.exists() and is_main():
        metrics_path.unlink()
    for m in modules.values():
        m.train()
    bar = tqdm(range(start, opt.steps), desc=name, disable=quiet, dynamic_ncols=True, leave=False)
    t0, toks, done_now = time.time(), 0, 0
    for step in bar:
        for g in optim.param_groups:
            g["lr"] = lr_at(step, opt)
        optim.zero_grad(set_to_none=True)
        m = step_fn(step)
        if DIST is not None:           # loss: each rank holds its share of the global sum
            m["loss"], m["tokens"] = dist.global_sum([m["loss"], m.get("tokens", 0)])
            m["tokens"] = int(m["tokens"])
        clip = dist.clip_grad_norm_ if DIST is not None else torch.nn.utils.clip_grad_norm_
        gnorm = clip(params, opt.clip) if opt.clip > 0 else torch.tensor(0.0)
        optim.step()
        toks += m.get("tokens", 0)
        done_now += 1
        if step % opt.log_every == 0 or step == opt.steps - 1:
            dt = time.time() - t0
            rec = {"step": step, "lr": round(lr_at(step, opt), 8), "grad_norm": round(float(gnorm), 4),
                   "tok_s": round(toks / max(dt, 1e-9), 1),
                   **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()}}
            if is_main():
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if not quiet:
                tqdm.write(f"[{name}] step {step:5d} | loss {m['loss']:.4f} | lr {rec['lr']:.2e} | "
                           f"{rec['tok_s']:.0f} tok/s" + "".join(
                               f" | {k} {v:.3f}" for k, v in m.items()
                               if k not in ("loss", "tokens") and isinstance(v, float)))
            t0, toks = time.time(), 0
        last = step == opt.steps - 1
        if not last and ((step + 1) % opt.ckpt_every == 0 or (stop_after and done_now >= stop_after)):
            extra = extra_state() if extra_state else {}
            if DIST is not None:
                dist.save_sharded(stage_dir / "resume", modules["model"], optim, {"step": step + 1, **extra})
            else:
                _save_resume(stage_dir, modules, optim, step + 1, extra)
        if stop_after and done_now >= stop_after and not last:
            bar.close()
            return False
    bar.close()
    return True


def write_result(stage_dir: Path, model: URSAModel, info: dict):
    """The stage's result: a model directory in stage_dir/model, then state.json {done: true}."""
    stage_dir = Path(stage_dir)
    if DIST is not None:
        from ursa import dist
        dist.export_model_dir(model, stage_dir / "model", extra={"stage": info})   # rank 0 writes
    else:
        save_model(model, stage_dir / "model", extra={"stage": info})
    if is_main():
        (stage_dir / "state.json").write_text(json.dumps({"done": True, **info}, indent=1))
        if (stage_dir / "resume").exists():
            shutil.rmtree(stage_dir / "resume")
    if DIST is not None:
        from ursa import dist
        dist.barrier()


# =============================================================================================
# Data: tokenised examples with images held in memory as uint8
# =============================================================================================

class ExampleSet:
    """Encoded examples (ids, loss mask) and their images as uint8 [N, 3, S, S] (or none)."""

    def __init__(self, ids: list, masks: list, images_u8: Optional[torch.Tensor]):
        self.ids, self.masks, self.images = ids, masks, images_u8

    def __len__(self):
        return len(self.ids)

    def batch(self, idx, pad_id: int) -> Batch:
        ex = [Example(self.ids[i], self.masks[i],
                      None if self.images is None else self.images[i].float() / 255.0) for i in idx]
        return collate(ex, pad_id)


def load_images_u8(records, base: Path, vcfg) -> torch.Tensor:
    from ursa.vision import preprocess
    out = torch.empty((len(records), 3, vcfg.image_size, vcfg.image_size), dtype=torch.uint8)
    for i, r in enumerate(tqdm(records, desc="images", leave=False, disable=len(records) < 2000)):
        out[i] = (preprocess(load_image(image_path(r, base), r.get("_where", r.get("id"))), vcfg) * 255).round().to(torch.uint8)
    return out


def encode_conversations(path: Path, tok: Tokenizer, cfg: ModelConfig, limit: Optional[int] = None,
                         with_images: bool = True, max_len: Optional[int] = None) -> ExampleSet:
    recs = read_jsonl(path, required=("id", "conversations"))[:limit]
    ids, masks = [], []
    for r in recs:
        user, answer, has_img = conversation_turns(r)
        if with_images and not has_img:
            raise ValueError(f"{r['_where']}: expected an <image> in the human turn")
        i, m = tok.encode_conversation(user, answer, image=with_images, num_image_tokens=cfg.vision.num_tokens)
        if max_len is not None and len(i) > max_len:
            if with_images and sum(t == cfg.image_token_id for t in i[:max_len]) < cfg.vision.num_tokens:
                raise ValueError(f"{r['_where']}: --max-len {max_len} would cut the image's positions")
            i, m = i[:max_len], m[:max_len]
        ids.append(i)
        masks.append(m)
    imgs = load_images_u8(recs, Path(path).parent, cfg.vision) if with_images else None
    return ExampleSet(ids, masks, imgs)


def order(n: int, step: int, batch: int, seed: int) -> list:
    """Indices of optimizer step `step`: epoch permutations (seeded per epoch) laid end to end."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, off = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.extend(perm[off:off + batch - len(out)].tolist())
    return out


def lm_step_fn(model: URSAModel, data: ExampleSet, opt: Opt, pad_id: int) -> Callable[[int], dict]:
    """Eq. 1 (next-token cross-entropy on the response), normalised by the step's target count."""
    def step_fn(step):
        batch = data.batch(my_rows(order(len(data), step, opt.batch_size, opt.seed)), pad_id)
        n = global_count(batch.num_targets())
        total = 0.0
        for mb in micro_batches(model, batch.split(opt.micro_batch)):
            ids, px, am, lm = to_dev(mb.input_ids, mb.pixel_values, mb.attention_mask, mb.loss_mask)
            with autocast(opt):
                out = model(ids, px, attention_mask=am)
            loss, _ = next_token_loss(out.logits, ids, lm, num_targets=n)
            loss.backward()
            total += loss.item()
        return {"loss": total, "tokens": int(batch.attention_mask.sum())}
    return step_fn


def set_trainable(model: URSAModel, parts: tuple):
    """Freeze everything except the named top-level parts ("vision_model", "aligner", ...)."""
    for n, p in model.named_parameters():
        p.requires_grad = n.split(".")[0] in parts


# =============================================================================================
# Recipe sizes
# =============================================================================================

@dataclass
class Recipe:
    name: str = "toy"
    preset: str = "tiny"
    data_dir: str = "data/toy"
    n_train: int = 8000
    n_rl: int = 1000
    n_test: int = 500
    n_hard: int = 500
    vocab_size: int = 512
    pretrain: Opt = field(default_factory=lambda: Opt(steps=250, lr=2e-3, ckpt_every=50))
    align: Opt = field(default_factory=lambda: Opt(steps=80, lr=1e-3, ckpt_every=40))
    sft: Opt = field(default_factory=lambda: Opt(steps=500, lr=1e-3, ckpt_every=50))
    train_vision_in_sft: bool = True
    label: dict = field(default_factory=lambda: dict(n_problems=300, k_samples=4, n_probe=8, compare_mc=60))
    prm: Opt = field(default_factory=lambda: Opt(steps=150, lr=5e-4, weight_decay=0.02, ckpt_every=50))
    prm_heldout: float = 0.1
    bon_samples: int = 16
    grpo: Opt = field(default_factory=lambda: Opt(steps=40, lr=1e-4, weight_decay=0.0, micro_batch=64,
                                                  warmup_ratio=0.05, min_lr_ratio=1.0, log_every=1, ckpt_every=10))
    init: Optional[str] = None        # a stage's starting model directory (default: the previous stage's)
    stage_data: Optional[str] = None  # a stage's data file (default: the toy world's / the run's)
    prm_dir: Optional[str] = None     # grpo: the PRM model directory (default runs/<name>/prm/model)
    max_len: Optional[int] = None     # truncate training sequences to this many tokens
    max_prompt_len: Optional[int] = None  # grpo: drop RL prompts longer than this
    gen_batch: Optional[int] = None   # grpo: rollouts decoded at once (default: the whole step)
    grpo_reward: str = "ps"
    grpo_group: int = 8
    grpo_prompts: int = 16
    grpo_temperature: float = 1.0
    grpo_clip: float = 0.2
    grpo_beta: float = 0.003
    grpo_agg: str = "seq-mean"
    grpo_scale_std: bool = True
    grpo_filter_samples: int = 8
    grpo_filter: bool = True         # drop prompts the SFT policy always / never solves
    ps_gamma: float = 0.5
    ps_rho: float = 0.3
    max_new_tokens: int = 96


def quick_recipe() -> Recipe:
    small = dict(batch_size=16, micro_batch=16, log_every=5, ckpt_every=1000)
    return Recipe(name="quick", data_dir="data/toy-quick", n_train=400, n_rl=64, n_test=48, n_hard=48,
                  vocab_size=400,
                  pretrain=Opt(steps=30, lr=2e-3, **small), align=Opt(steps=10, lr=1e-3, **small),
                  sft=Opt(steps=30, lr=1e-3, **small),
                  label=dict(n_problems=32, k_samples=4, n_probe=4, compare_mc=8),
                  prm=Opt(steps=10, lr=5e-4, **small), bon_samples=4,
                  grpo=Opt(steps=4, lr=5e-5, batch_size=1, micro_batch=16, log_every=1, ckpt_every=1000),
                  grpo_prompts=2, grpo_group=4, grpo_filter_samples=4)


# =============================================================================================
# Stages
# =============================================================================================

def ensure_world(recipe: Recipe) -> Path:
    from synth import write_world
    return Path(write_world(recipe.data_dir, n_train=recipe.n_train, n_rl=recipe.n_rl,
                            n_test=recipe.n_test, n_hard=recipe.n_hard))


def ensure_tokenizer(run: Path, data_dir: Path, vocab_size: int) -> Tokenizer:
    path = run / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(path)
    # every example carries the chat template, so its phrases are merged like the data's own
    texts = []
    for r in read_jsonl(data_dir / "cot_train.jsonl"):
        u, a, _ = conversation_turns(r)
        texts.append(Tokenizer.chat_prompt(u) + a + "<|im_end|>")
    for r in read_jsonl(data_dir / "text.jsonl"):
        texts.append(Tokenizer.chat_prompt(r["text_question"], image=False) + r["solution"])
    for r in read_jsonl(data_dir / "captions.jsonl"):
        u, a, _ = conversation_turns(r)
        texts.append(Tokenizer.chat_prompt(u) + a)
    tok = train_toy_tokenizer(texts, vocab_size=vocab_size)
    run.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


def model_config(recipe: Recipe, tok: Tokenizer) -> ModelConfig:
    cfg = get_config(recipe.preset)
    cfg.lm.vocab_size = int(math.ceil(tok.vocab_size / 64) * 64)
    cfg.image_token_id = tok.image_id
    return cfg.validate()


class AttributeHead(nn.Module):
    """Vision pretraining head: all patch features -> one classifier per scene attribute slot."""

    def __init__(self, num_patches: int, width: int, slots: int, values: int):
        super().__init__()
        self.slots, self.values = slots, values
        self.proj = nn.Linear(num_patches * width, slots * values)

    def forward(self, feats):                       # feats [B, P, D]
        return self.proj(feats.flatten(1)).view(feats.shape[0], self.slots, self.values)  # [B, slots, values]


def stage_pretrain(run: Path, recipe: Recipe, tok: Tokenizer, stop_after=None, quiet=False):
    """Toy stand-in for downloading Qwen2.5 and SigLIP: the LM on text-only problems (and caption
    text), the vision tower on predicting scene attributes. Both trained in one loop."""
    from ursa import world
    sd = run / "pretrain"
    if stage_done(sd):
        return
    data_dir = Path(recipe.data_dir)
    cfg = model_config(recipe, tok)
    torch.manual_seed(recipe.pretrain.seed)
    model = init_weights(URSAModel(cfg), seed=recipe.pretrain.seed)
    # text: problems with facts in words, plus caption sentences (so alignment has words to reach)
    ids, masks = [], []
    for r in read_jsonl(data_dir / "text.jsonl", required=("text_question", "solution")):
        i, m = tok.encode_conversation(r["text_question"], r["solution"], image=False)
        ids.append(i), masks.append(m)
    caps = read_jsonl(data_dir / "captions.jsonl", required=("conversations", "attributes"))
    for r in caps:
        u, a, _ = conversation_turns(r)
        i, m = tok.encode_conversation(u, a, image=False)
        ids.append(i), masks.append(m)
    text = ExampleSet(ids, masks, None)
    imgs = load_images_u8(caps, data_dir, cfg.vision)
    attrs = torch.tensor([r["attributes"] for r in caps], dtype=torch.long)      # [N, slots]
    head = AttributeHead(cfg.vision.num_tokens, cfg.vision.out_dims[0], world.NUM_ATTR_SLOTS, world.NUM_ATTR_VALUES)
    set_trainable(model, ("vision_model", "language_model"))
    opt = recipe.pretrain
    lm_fn = lm_step_fn(model, text, opt, tok.pad_id)

    def step_fn(step):
        m = lm_fn(step)
        idx = order(len(caps), step, opt.batch_size, opt.seed + 1)
        with autocast(opt):
            logits = head(model.vision_model(imgs[idx].float() / 255.0)[0])       # [B, slots, values]
        vloss = nn.functional.cross_entropy(logits.float().flatten(0, 1), attrs[idx].flatten())
        vloss.backward()
        acc = (logits.argmax(-1) == attrs[idx]).all(-1).float().mean().item()
        return {"loss": m["loss"] + vloss.item(), "lm_loss": m["loss"], "vit_loss": vloss.item(),
                "vit_scene_acc": acc, "tokens": m["tokens"]}

    if train_loop(sd, "pretrain", {"model": model, "head": head}, opt, step_fn, stop_after=stop_after, quiet=quiet):
        write_result(sd, model, {"stage": "pretrain"})


def _stage_lm(run: Path, stage: str, prev: str, recipe: Recipe, tok: Tokenizer, data_file: str,
              parts: tuple, opt: Opt, stop_after=None, quiet=False):
    sd = run / stage
    if stage_done(sd):
        return
    model = stage_model(Path(recipe.init) if recipe.init else run / prev / "model", bf16=opt.bf16)
    data = encode_conversations(Path(recipe.stage_data) if recipe.stage_data else Path(recipe.data_dir) / data_file,
                                tok, model.cfg, max_len=recipe.max_len)
    opt = with_epochs(opt, len(data), opt.batch_size)
    set_trainable(model, parts)
    torch.manual_seed(opt.seed)
    if train_loop(sd, stage, {"model": model}, opt, lm_step_fn(model, data, opt, tok.pad_id),
                  stop_after=stop_after, quiet=quiet):
        write_result(sd, model, {"stage": stage, "trained": list(parts)})


def stage_align(run, recipe, tok, stop_after=None, quiet=False):
    """Stage I alignment: ONLY the projector trains, on image-caption pairs."""
    _stage_lm(run, "align", "pretrain", recipe, tok, "captions.jsonl", ("aligner",), recipe.align,
              stop_after, quiet)


def stage_sft(run, recipe, tok, stop_after=None, quiet=False):
    """Stage I math SFT on chain-of-thought conversations (Eq. 1): projector + LM (+ vision)."""
    parts = ("aligner", "language_model") + (("vision_model",) if recipe.train_vision_in_sft else ())
    _stage_lm(run, "sft", "align", recipe, tok, "cot_train.jsonl", parts, recipe.sft, stop_after, quiet)


# =============================================================================================
# Stage II: DualMath labelling and the PRM
# =============================================================================================

def stage_label(run: Path, recipe: Recipe, tok: Tokenizer, stop_after=None, quiet=False):
    """synth.py label with the SFT policy (BEL on wrong samples, MIE, correct), resumable."""
    from synth import format_label_stats, label_dualmath
    sd = run / "label"
    if stage_done(sd):
        return
    model = load_model(run / "sft" / "model").eval()
    L = recipe.label
    stats = label_dualmath(model, tok, Path(recipe.data_dir) / "cot_train.jsonl", sd,
                           n_problems=L["n_problems"], k_samples=L["k_samples"], n_probe=L["n_probe"],
                           compare_mc=L["compare_mc"], max_new_tokens=recipe.max_new_tokens,
                           progress=not quiet)
    report = format_label_stats(stats)
    if not quiet:
        print(report)
    (sd / "stats.txt").write_text(report + "\n")
    (sd / "state.json").write_text(json.dumps({"done": True, **stats}, indent=1))


class PRMData:
    """DualMath records encoded for the PRM: user turn = <|image|> + instruction + question + the
    solution with a tag after every step; labels at the tags (Eq. 4)."""

    def __init__(self, records, tok: Tokenizer, cfg: ModelConfig, base: Path, max_len: Optional[int] = None):
        from ursa.prm import prm_input, tag_steps
        self.labels, self.ids, self.pos = [r["labels"] for r in records], [], []
        for r in records:
            ids, pos = prm_input(tok, r["question"], tag_steps(r["steps"], r["answer"]), cfg.vision.num_tokens)
            self.ids.append(ids[:max_len] if max_len else ids)     # truncation drops the late tags' labels
            self.pos.append(pos)
        self.images = load_images_u8(records, base, cfg.vision)

    def __len__(self):
        return len(self.ids)

    def batch(self, idx, pad_id: int):
        from ursa.prm import labels_at
        b = collate([Example(self.ids[i], [0] * len(self.ids[i]), self.images[i].float() / 255.0) for i in idx], pad_id)
        lab, mask = labels_at([self.pos[i] for i in idx], [self.labels[i] for i in idx], b.input_ids.shape[1])
        return b, lab, mask


def split_by_problem(records, heldout_frac: float, seed: int = 0):
    """Held-out split by problem id (a problem's records never straddle the split)."""
    import hashlib
    def h(pid):
        return int(hashlib.sha1(f"{seed}:{pid}".encode()).hexdigest()[:8], 16) / 2**32
    pid = lambda r: r.get("problem_id", r["id"])
    return ([r for r in records if h(pid(r)) >= heldout_frac], [r for r in records if h(pid(r)) < heldout_frac])


@torch.no_grad()
def prm_heldout_metrics(model, data: PRMData, pad_id: int, batch_size: int = 64) -> dict:
    """Step accuracy at 0.5, ROC AUC, and first-error accuracy (by the first step below 0.5 and
    by the lowest-scoring step) on records that have a wrong step."""
    from ursa.prm import auc, first_error_hit, step_scores
    model.eval()
    scores = []
    for s in range(0, len(data), batch_size):
        b, lab, mask = data.batch(list(range(s, min(len(data), s + batch_size))), pad_id)
        v = model(b.input_ids, b.pixel_values, attention_mask=b.attention_mask, logits=False, values=True).values
        scores.extend(step_scores(v.float(), mask))
    flat_s = [x for sc in scores for x in sc]
    flat_l = [y for sc, lab in zip(scores, data.labels) for y in lab[:len(sc)]]
    hits_t = hits_m = n_err = 0
    for sc, lab in zip(scores, data.labels):
        if 0 in lab[:len(sc)]:
            t, m = first_error_hit(sc, lab[:len(sc)])
            hits_t += t
            hits_m += bool(m)
            n_err += 1
    model.train()
    return {"step_acc": sum((x >= 0.5) == bool(y) for x, y in zip(flat_s, flat_l)) / max(1, len(flat_s)),
            "auc": auc(flat_s, flat_l), "first_error_acc": hits_t / max(1, n_err),
            "first_error_acc_min": hits_m / max(1, n_err), "steps": len(flat_s), "solutions": len(scores)}


def stage_prm(run: Path, recipe: Recipe, tok: Tokenizer, stop_after=None, quiet=False):
    """Stage II PRM: SFT weights + a value head (dropout 0.1 -> Linear(H, 1)); BCE at the step tags
    (Eq. 4); the LLM and the head train, the vision tower and projector are frozen (paper)."""
    from ursa.prm import prm_loss
    sd = run / "prm"
    if stage_done(sd):
        return
    path = Path(recipe.stage_data) if recipe.stage_data else run / "label" / "dualmath.jsonl"
    recs = read_jsonl(path, required=("question", "steps", "labels", "answer", "image"))
    train_recs, held = split_by_problem(recs, recipe.prm_heldout)
    if not train_recs:
        raise ValueError(f"{path}: no training records for the PRM")
    model = stage_model(Path(recipe.init) if recipe.init else run / "sft" / "model", value_head=True,
                        bf16=recipe.prm.bf16)
    train_data = PRMData(train_recs, tok, model.cfg, path.parent, recipe.max_len)
    held_data = PRMData(held, tok, model.cfg, path.parent, recipe.max_len)
    set_trainable(model, ("language_model", "score"))
    opt = with_epochs(recipe.prm, len(train_data), recipe.prm.batch_size)
    torch.manual_seed(opt.seed)

    def step_fn(step):
        b, lab, mask = train_data.batch(my_rows(order(len(train_data), step, opt.batch_size, opt.seed)), tok.pad_id)
        n_tags = global_count(int(mask.sum()))        # the whole step's tags, before micro-batching
        tot, acc = 0.0, 0.0
        slices = [slice(s, s + opt.micro_batch) for s in range(0, b.input_ids.shape[0], opt.micro_batch)]
        for sl in micro_batches(model, slices):
            ids, px, am, lb, mk = to_dev(b.input_ids[sl], b.pixel_values[sl], b.attention_mask[sl], lab[sl], mask[sl])
            with autocast(opt):
                v = model(ids, px, attention_mask=am, logits=False, values=True).values
            loss, m = prm_loss(v.float(), lb, mk, num_tags=n_tags)
            loss.backward()
            tot += loss.item()
            acc += m["step_acc"] * int(mask[sl].sum())
        return {"loss": tot, "step_acc": acc / max(1, int(mask.sum())), "tokens": int(b.attention_mask.sum())}

    if train_loop(sd, "prm", {"model": model}, opt, step_fn, stop_after=stop_after, quiet=quiet):
        met = prm_heldout_metrics(model, held_data, tok.pad_id)
        if not quiet and held and is_main():
            print(f"[prm] held-out: step acc {met['step_acc']:.3f} | AUC {met['auc']:.3f} | first-error acc "
                  f"{met['first_error_acc']:.3f} (lowest step {met['first_error_acc_min']:.3f}) | "
                  f"{met['steps']} steps in {met['solutions']} solutions")
        write_result(sd, model, {"stage": "prm", "heldout": met, "train_records": len(train_recs)})


# =============================================================================================
# Stage III: GRPO with the process-supervised reward (PS-GRPO)
# =============================================================================================

def rl_prompts(run: Path, recipe: Recipe, tok: Tokenizer, quiet=False) -> list:
    """RL prompts the SFT policy neither always solves nor always fails (8 samples each, as the
    paper's 20K -> 15.3K filter). Cached in runs/<name>/rl_prompts.json (shared by every variant)."""
    import eval as ev
    path = run / "rl_prompts.json"
    rl_file = Path(recipe.stage_data) if recipe.stage_data else Path(recipe.data_dir) / "rl.jsonl"
    recs = ev.load_problems(rl_file)
    if not recipe.grpo_filter:
        return recs
    if path.exists():
        keep = set(json.loads(path.read_text())["keep"])
        return [r for r in recs if r["id"] in keep]
    policy = load_model(Path(recipe.init) if recipe.init else run / "sft" / "model").eval()
    res = ev.evaluate(policy, tok, recs, rl_file.parent, n=recipe.grpo_filter_samples, temperature=1.0,
                      max_new_tokens=recipe.max_new_tokens, seed=1234, quiet=quiet)
    keep = [r["id"] for r, c in zip(recs, res["correct"]) if 0 < sum(c) < len(c)]
    info = {"candidates": len(recs), "keep": keep,
            "all_correct": sum(all(c) for c in res["correct"]), "all_wrong": sum(not any(c) for c in res["correct"])}
    path.write_text(json.dumps(info))
    if not quiet:
        print(f"[grpo] RL prompts: {len(keep)} of {len(recs)} kept ({info['all_correct']} always right, "
              f"{info['all_wrong']} always wrong dropped)")
    return [r for r in recs if r["id"] in set(keep)]


def token_step_index(tok: Tokenizer, tokens: list, n_scores: int) -> list:
    """For Variant 2: the step (0-based) each response token belongs to, -1 for tokens after the
    last scored step (the answer line) and for the stop token."""
    from ursa.prm import split_steps
    text, starts = "", []
    for t in tokens:
        starts.append(len(text))
        text += tok.decode([t])
    steps, _ = split_steps(text)
    spans, pos = [], 0
    for st in steps:
        b = text.find(st, pos)
        spans.append((b, b + len(st)))
        pos = b + len(st)
    out = []
    for c in starts:
        k = next((i for i, (b, e) in enumerate(spans) if c < e), len(spans))
        out.append(k if k < n_scores else -1)
    return out


def stage_grpo(run: Path, recipe: Recipe, tok: Tokenizer, stop_after=None, quiet=False,
               reward: Optional[str] = None, out_name: Optional[str] = None):
    """PS-GRPO (Eq. 5-8): G rollouts per prompt from the current policy, split into steps, scored by
    the PRM; reward outcome | ps | v1 | v2; group-relative advantages; clipped surrogate + beta * k3 KL
    to the SFT reference. Rollouts of step k are sampled with a generator seeded by k, so a resumed
    run samples exactly what the uninterrupted one would."""
    import eval as ev
    from ursa.generate import Generation, generate
    from ursa.grpo import (drop_moment, group_advantages, outcome_reward,
                           policy_loss, ps_reward, token_logprobs, variant1_reward, variant2_advantages)
    from ursa.prm import split_steps
    reward = reward or recipe.grpo_reward
    sd = run / (out_name or grpo_dir_name(reward))
    if stage_done(sd):
        return
    G, B, opt = recipe.grpo_group, recipe.grpo_prompts, recipe.grpo
    prompts_recs = rank0_first(rl_prompts, run, recipe, tok, quiet or not is_main())
    rl_file = Path(recipe.stage_data) if recipe.stage_data else Path(recipe.data_dir) / "rl.jsonl"
    if not prompts_recs:
        raise ValueError("no RL prompt left after filtering (the SFT policy solves all or none)")
    base = rl_file.parent
    init = Path(recipe.init) if recipe.init else run / "sft" / "model"
    policy = stage_model(init, bf16=opt.bf16)
    ref = stage_model(init, bf16=opt.bf16).eval()
    prm = stage_model(Path(recipe.prm_dir) if recipe.prm_dir else run / "prm" / "model", bf16=opt.bf16).eval()
    scorer = ev.PRMScorer(prm, tok, base)
    for p in list(ref.parameters()) + list(prm.parameters()):
        p.requires_grad = False
    set_trainable(policy, ("aligner", "language_model"))
    px_all = ev.problem_pixels(prompts_recs, base, policy.cfg.vision)
    prompt_ids = ev.prompts_for(prompts_recs, tok, policy.cfg)
    if recipe.max_prompt_len:
        keep = [i for i, p in enumerate(prompt_ids) if len(p) <= recipe.max_prompt_len]
        if not quiet and len(keep) < len(prompt_ids):
            print(f"[grpo] {len(prompt_ids) - len(keep)} prompts longer than {recipe.max_prompt_len} tokens dropped")
        prompts_recs, prompt_ids, px_all = [prompts_recs[i] for i in keep], [prompt_ids[i] for i in keep], px_all[keep]
    opt = with_epochs(opt, len(prompts_recs), B)
    T = recipe.grpo_temperature

    def step_fn(step):
        t0 = time.time()
        idx = my_rows(order(len(prompts_recs), step, B, opt.seed))
        recs = [prompts_recs[i] for i in idx]
        px = px_all[idx]
        # sampling: through an unsharded copy under --fsdp (a decode step through the sharded model
        # would all-gather every block for one token, and ranks may stop after different lengths)
        sampler, px_gen = policy, px
        if DIST is not None:
            from ursa import dist
            sampler = dist.replicate(policy, dtype=torch.bfloat16 if opt.bf16 else torch.float32)
            px_gen = to_dev(px)[0].to(next(sampler.parameters()).dtype)
        rank = DIST.rank if DIST is not None else 0
        gen = torch.Generator().manual_seed(opt.seed * 1_000_003 + step + 7919 * rank)
        chunk = max(1, recipe.gen_batch // G) if recipe.gen_batch else len(idx)
        parts = [generate(sampler, [prompt_ids[i] for i in idx[c:c + chunk]], px_gen[c:c + chunk], num_samples=G,
                          max_new_tokens=recipe.max_new_tokens, temperature=T, top_p=1.0,
                          stop_ids=(tok.im_end_id, tok.eos_id), pad_id=tok.pad_id, generator=gen)
                 for c in range(0, len(idx), chunk)]
        g = parts[0] if len(parts) == 1 else Generation(
            torch.cat([q.tokens for q in parts]), torch.cat([q.logprobs for q in parts]),
            torch.cat([q.lengths for q in parts]), [r for q in parts for r in q.stop_reason],
            torch.cat([q.prompt_index + c for q, c in zip(parts, range(0, len(idx), chunk))]))
        del sampler
        B_loc = len(idx)
        R = B_loc * G                                                      # this rank's rollouts
        texts = [tok.decode(g.row(i)) for i in range(R)]
        correct = torch.tensor([ev.judge(recs[i // G], texts[i])[1] for i in range(R)])
        resp = [[texts[b * G + j] for j in range(G)] for b in range(B_loc)]
        scores = [s for grp in scorer.score_responses(recs, resp, px) for s in grp]   # R lists
        t_sample = time.time() - t0
        # rewards and advantages (Eq. 6-7, Appendix B.1)
        adv_tok = None
        if reward == "outcome":
            rw = outcome_reward(correct)
        elif reward == "ps":
            rw = ps_reward(correct, scores, gamma=recipe.ps_gamma, rho=recipe.ps_rho)
        elif reward == "v1":
            rw = variant1_reward(correct, scores)
        elif reward == "v2":
            rw = outcome_reward(correct)
        else:
            raise ValueError(f"unknown reward {reward!r}: outcome | ps | v1 | v2")
        adv = group_advantages(rw.view(B_loc, G), scale_std=recipe.grpo_scale_std).view(R)   # [R]
        # training sequences: prompt + response (right padded); targets are the response tokens
        seqs = [prompt_ids[idx[i // G]] + g.row(i) for i in range(R)]
        Tm = max(map(len, seqs))
        ids = torch.full((R, Tm), tok.pad_id, dtype=torch.long)
        am = torch.zeros((R, Tm), dtype=torch.long)
        tmask = torch.zeros((R, Tm), dtype=torch.bool)                    # target positions (response)
        for i, sq in enumerate(seqs):
            P = len(prompt_ids[idx[i // G]])
            ids[i, :len(sq)] = torch.tensor(sq)
            am[i, :len(sq)] = 1
            tmask[i, P:len(sq)] = True                                     # up to and incl. the stop token
        if reward == "v2":
            steps_idx = torch.full((R, Tm), -1, dtype=torch.long)
            for i in range(R):
                P = len(prompt_ids[idx[i // G]])
                ti = token_step_index(tok, g.row(i), len(scores[i]))
                steps_idx[i, P:P + len(ti)] = torch.tensor(ti, dtype=torch.long)
            adv_tok = torch.cat([variant2_advantages(correct[b * G:(b + 1) * G], scores[b * G:(b + 1) * G],
                                                     steps_idx[b * G:(b + 1) * G, 1:], scale_std=recipe.grpo_scale_std)
                                 for b in range(B_loc)])                   # [R, Tm-1]
        mask = tmask[:, 1:]                                                # aligned with targets ids[:, 1:]
        n_tok = global_count(int(mask.sum()))                              # whole step, all ranks
        R_all = global_count(R)
        stats = {"pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
        total = 0.0
        slices = [slice(s, s + opt.micro_batch) for s in range(0, R, opt.micro_batch)]
        for sl in micro_batches(policy, slices):
            ids_, am_, px_, mask_ = to_dev(ids[sl], am[sl], px[torch.arange(R)[sl] // G], mask[sl])
            with torch.no_grad(), autocast(opt):
                ref_logits = ref(ids_, px_, attention_mask=am_).logits
            ref_lp = token_logprobs(ref_logits[:, :-1].float(), ids_[:, 1:], T)
            with autocast(opt):
                logits = policy(ids_, px_, attention_mask=am_).logits
            lp = token_logprobs(logits[:, :-1].float(), ids_[:, 1:], T)
            a = to_dev(adv_tok[sl] if adv_tok is not None else adv[sl])[0]
            loss, m = policy_loss(lp, lp.detach(), a, mask_, ref_logp=ref_lp, clip_eps=recipe.grpo_clip,
                                  beta=recipe.grpo_beta, agg=recipe.grpo_agg, num_tokens=n_tok, num_seqs=R_all,
                                  constant=R_all * recipe.max_new_tokens)
            loss.backward()
            total += loss.item()
            w = int(mask[sl].sum()) / max(1, n_tok)
            for k in stats:
                stats[k] += m.get(k, 0.0) * w
        deltas = [drop_moment(sc) for sc, c in zip(scores, correct.tolist()) if c]
        n_steps = [len(split_steps(t)[0]) for t in texts]
        return {"loss": total, "reward": rw.mean().item(), "acc": correct.float().mean().item(),
                "resp_len": float(g.lengths.float().mean()), "n_steps": sum(n_steps) / R,
                "drop_rate": sum(d >= recipe.ps_rho for d in deltas) / max(1, len(deltas)),
                "kl": stats["kl"], "clip_frac": stats["clip_frac"], "sample_s": t_sample,
                "tokens": int(am.sum())}

    if train_loop(sd, f"grpo-{reward}", {"model": policy}, opt, step_fn, stop_after=stop_after, quiet=quiet):
        write_result(sd, policy, {"stage": "grpo", "reward": reward})


# =============================================================================================
# The recipe
# =============================================================================================

STAGES = ("pretrain", "align", "sft", "label", "prm", "grpo")


FSDP_STAGES = ("align", "sft", "prm", "grpo")     # the stages that train one model from a model dir


def run_stage(name: str, run: Path, recipe: Recipe, stop_after=None, quiet=False):
    if DIST is not None and name not in FSDP_STAGES:
        raise ValueError(f"--fsdp runs the stages {', '.join(FSDP_STAGES)}; run {name!r} without it")
    data_dir = rank0_first(ensure_world, recipe)
    tok = rank0_first(ensure_tokenizer, run, data_dir, recipe.vocab_size)
    fn = {"pretrain": stage_pretrain, "align": stage_align, "sft": stage_sft, "label": stage_label,
          "prm": stage_prm, "grpo": stage_grpo}[name]
    t = time.time()
    fn(run, recipe, tok, stop_after=stop_after, quiet=quiet)
    return time.time() - t


def run_all(recipe: Recipe, quiet=False) -> dict:
    """Synthesise the world if needed, run every stage (skipping finished ones), evaluate, print
    the results table (also written to runs/<name>/results.md and results.json)."""
    import eval as evaluate
    run = Path("runs") / recipe.name
    times = {}
    t0 = time.time()
    ensure_world(recipe)
    times["world"] = time.time() - t0
    for s in STAGES:
        times[s] = run_stage(s, run, recipe, quiet=quiet)
    return evaluate.recipe_table(run, recipe, times, quiet=quiet)


REWARDS = ("outcome", "ps", "v1", "v2")


def grpo_dir_name(reward: str) -> str:
    """runs/<name>/grpo holds PS-GRPO (the recipe's main run); other rewards grpo-<reward>."""
    return "grpo" if reward == "ps" else f"grpo-{reward}"


def run_ablation(recipe: Recipe, rewards=REWARDS, quiet=False) -> dict:
    """SFT vs GRPO (outcome) vs PS-GRPO vs Variant 1 vs Variant 2, same seeds, prompts and budget:
    each variant trains into runs/<name>/grpo-<reward>/ from the same SFT and PRM."""
    import eval as evaluate
    run = Path("runs") / recipe.name
    for s in STAGES[:-1]:
        run_stage(s, run, recipe, quiet=quiet)
    tok = Tokenizer.from_file(run / "tokenizer.json")
    times = {}
    for r in rewards:
        t = time.time()
        # PS-GRPO is the recipe's main run (runs/<name>/grpo): same seeds and budget, reused
        stage_grpo(run, recipe, tok, quiet=quiet, reward=r)
        times[r] = time.time() - t
    return evaluate.ablation_table(run, recipe, {r: grpo_dir_name(r) for r in rewards}, times, quiet=quiet)


def apply_overrides(recipe: Recipe, args):
    """Command-line settings of one stage onto the recipe (a no-op for flags left unset)."""
    for flag, attr in (("init", "init"), ("data", "stage_data"), ("prm", "prm_dir"), ("max_len", "max_len"),
                       ("prompts_per_step", "grpo_prompts"), ("group", "grpo_group"),
                       ("temperature", "grpo_temperature"), ("max_prompt_len", "max_prompt_len"),
                       ("max_new_tokens", "max_new_tokens"), ("kl_coef", "grpo_beta"), ("clip_eps", "grpo_clip"),
                       ("ps_gamma", "ps_gamma"), ("ps_rho", "ps_rho"), ("gen_batch", "gen_batch")):
        if getattr(args, flag, None) is not None:
            setattr(recipe, attr, getattr(args, flag))
    stage = args.stage if args.stage in ("pretrain", "align", "sft", "prm", "grpo") else None
    opt_flags = {"lr": "lr", "steps": "steps", "epochs": "epochs", "batch_size": "batch_size",
                 "micro_batch": "micro_batch", "warmup_ratio": "warmup_ratio", "weight_decay": "weight_decay"}
    given = {a: getattr(args, f) for f, a in opt_flags.items() if getattr(args, f, None) is not None}
    if args.fp32:
        given["bf16"] = False
    if (given or args.init or args.data) and stage is None:
        raise SystemExit("train.py: --init/--data/--lr/... set one stage's settings: name the stage")
    if given:
        setattr(recipe, stage, replace(getattr(recipe, stage), **given))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("stage", nargs="?", default="all", choices=("all", "ablation") + STAGES,
                   help="the stage to run (default: the whole recipe; ablation: every GRPO reward)")
    p.add_argument("--reward", choices=REWARDS, default=None,
                   help="grpo reward: outcome (GRPO), ps (PS-GRPO, default), v1, v2 (Appendix B.1)")
    p.add_argument("--grpo-steps", type=int, default=None, help="override the GRPO step budget")
    o = p.add_argument_group("one stage's settings (override the recipe; for real data and the 8B model)")
    o.add_argument("--init", help="the stage's starting model directory (default: the previous stage's)")
    o.add_argument("--data", help="the stage's data file (align/sft: conversations; prm: DualMath; grpo: problems)")
    o.add_argument("--prm", help="grpo: the PRM model directory (default <run>/prm/model)")
    o.add_argument("--lr", type=float, help="peak learning rate")
    o.add_argument("--steps", type=int, help="optimizer steps")
    o.add_argument("--epochs", type=float, help="epochs over the stage's data (sets the step count)")
    o.add_argument("--batch-size", type=int, help="rows per optimizer step (all ranks together)")
    o.add_argument("--micro-batch", type=int, help="rows per forward/backward on one rank")
    o.add_argument("--warmup-ratio", type=float, help="linear warmup fraction of the steps")
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    o.add_argument("--fp32", action="store_true", help="no bf16 (autocast, or FSDP mixed precision)")
    o.add_argument("--max-len", type=int, help="truncate training sequences to this many tokens")
    o.add_argument("--prompts-per-step", type=int, help="grpo: prompts per optimizer step")
    o.add_argument("--group", type=int, help="grpo: rollouts per prompt (G)")
    o.add_argument("--temperature", type=float, help="grpo: sampling temperature")
    o.add_argument("--max-prompt-len", type=int, help="grpo: drop prompts longer than this")
    o.add_argument("--max-new-tokens", type=int, help="longest response sampled")
    o.add_argument("--kl-coef", type=float, help="grpo: beta of the k3 KL term (paper 0.003)")
    o.add_argument("--clip-eps", type=float, help="grpo: clip epsilon of the surrogate")
    o.add_argument("--ps-gamma", type=float, help="grpo: PS reward penalty gamma (Eq. 6)")
    o.add_argument("--ps-rho", type=float, help="grpo: drop-moment threshold rho (Eq. 5)")
    o.add_argument("--gen-batch", type=int, help="grpo: rollouts decoded at once")
    p.add_argument("--quick", action="store_true", help="smoke-size recipe (about a minute)")
    p.add_argument("--run", "--run-dir", dest="run", default=None,
                   help="run directory (default runs/toy or runs/quick); under torchrun write --run-dir "
                        "(torchrun reads --run as an abbreviation of its own --run-path)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many optimizer steps (with a checkpoint); rerun to resume")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2 over the torchrun processes (stages align, sft, prm, grpo; docs/scale_out.md)")
    p.add_argument("--no-activation-checkpointing", action="store_true",
                   help="--fsdp: keep every block's activations (faster, more memory)")
    p.add_argument("--sync-every-micro-batch", action="store_true",
                   help="--fsdp: reduce-scatter after every micro-batch (less memory than no_sync accumulation)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fsdp:
        global DIST
        from ursa import dist
        if args.stage in ("all", "ablation"):
            p.error(f"--fsdp runs one stage at a time ({', '.join(FSDP_STAGES)}), not {args.stage!r}")
        DIST = dist.setup()
        FSDP.update(activation_checkpointing=not args.no_activation_checkpointing,
                    no_sync=not args.sync_every_micro_batch)
        dist.run_and_exit(_main, args)          # destroy_process_group, then os._exit
    _main(args)


def _main(args):
    recipe = quick_recipe() if args.quick else Recipe()
    if args.run:
        recipe.name = Path(args.run).name
    if args.grpo_steps:
        recipe.grpo.steps = args.grpo_steps
    apply_overrides(recipe, args)
    if args.reward:
        recipe.grpo_reward = args.reward
    try:
        if args.stage == "all":
            run_all(recipe)
        elif args.stage == "ablation":
            run_ablation(recipe)
        else:
            run = Path(args.run) if args.run else Path("runs") / recipe.name
            run_stage(args.stage, run, recipe, stop_after=args.stop_after)
    except (ValueError, FileNotFoundError) as e:   # bad input: one line naming the file / record
        if DIST is not None:
            raise
        raise SystemExit(f"train.py {args.stage}: {e}")


if __name__ == "__main__":
    main()
