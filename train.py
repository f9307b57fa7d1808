"""Every training loop of the URSA recipe, hand-written: pretrain (toy only), align, sft, prm, grpo.

    python train.py                          # the whole toy recipe on CPU: world, every stage, eval, table
    python train.py --quick                  # the same at smoke size (about a minute)
    python train.py sft --run runs/toy       # one stage (reads the previous stage's directory)
    python train.py sft --run runs/toy --stop-after 20   # stop early with a checkpoint; rerun resumes

Stages write runs/<name>/<stage>/: config.json + model.safetensors (the result), metrics.jsonl (one
line per logged step), state.json, and resume/ (optimizer, RNG, step) while the stage is running.
A finished stage is skipped when the recipe is rerun; an interrupted one resumes exactly.

Loss normalisation: every optimizer step counts its targets (assistant tokens, PRM tags) over the
whole batch BEFORE the micro-batch loop and divides every micro-batch's summed loss by that count,
so micro-batching never changes the gradient (DESIGN.md conventions).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
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
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=opt.bf16)


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
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optim = make_optimizer(params, opt)
    start = 0
    metrics_path = stage_dir / "metrics.jsonl"
    if (stage_dir / "resume").exists():
        start, rng = _load_resume(stage_dir, modules, optim)
        if restore_extra:
            restore_extra(rng)
        if metrics_path.exists():      # drop log lines written after the checkpoint
            keep = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] < start]
            metrics_path.write_text("".join(l + "\n" for l in keep))
        if not quiet:
            print(f"[{name}] resuming at step {start}/{opt.steps}")
    elif metrics_path.exists():
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
        gnorm = torch.nn.utils.clip_grad_norm_(params, opt.clip) if opt.clip > 0 else torch.tensor(0.0)
        optim.step()
        toks += m.get("tokens", 0)
        done_now += 1
        if step % opt.log_every == 0 or step == opt.steps - 1:
            dt = time.time() - t0
            rec = {"step": step, "lr": round(lr_at(step, opt), 8), "grad_norm": round(float(gnorm), 4),
                   "tok_s": round(toks / max(dt, 1e-9), 1),
                   **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()}}
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
            _save_resume(stage_dir, modules, optim, step + 1, extra_state() if extra_state else {})
        if stop_after and done_now >= stop_after and not last:
            bar.close()
            return False
    bar.close()
    return True


def write_result(stage_dir: Path, model: URSAModel, info: dict):
    """The stage's result: a model directory in stage_dir/model, then state.json {done: true}."""
    stage_dir = Path(stage_dir)
    save_model(model, stage_dir / "model", extra={"stage": info})
    (stage_dir / "state.json").write_text(json.dumps({"done": True, **info}, indent=1))
    if (stage_dir / "resume").exists():
        shutil.rmtree(stage_dir / "resume")


# =============================================================================================
# Data: tokenised examples with images held in memory as uint8
# =============================================================================================

class ExampleSet:
    """Encoded examples (ids, loss mask) and their images as uint8 [N, 3, S, S] (or none)."""

    def __init__(self, ids: list, masks: list, images_u8: Optional[torch.Tensor], extra: Optional[list] = None):
        self.ids, self.masks, self.images, self.extra = ids, masks, images_u8, extra

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
                         with_images: bool = True) -> ExampleSet:
    recs = read_jsonl(path, required=("id", "conversations"))[:limit]
    ids, masks = [], []
    for r in recs:
        user, answer, has_img = conversation_turns(r)
        if with_images and not has_img:
            raise ValueError(f"{r['_where']}: expected an <image> in the human turn")
        i, m = tok.encode_conversation(user, answer, image=with_images, num_image_tokens=cfg.vision.num_tokens)
        ids.append(i)
        masks.append(m)
    imgs = load_images_u8(recs, Path(path).parent, cfg.vision) if with_images else None
    return ExampleSet(ids, masks, imgs, recs)


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
        batch = data.batch(order(len(data), step, opt.batch_size, opt.seed), pad_id)
        n = batch.num_targets()
        total = 0.0
        for mb in batch.split(opt.micro_batch):
            with autocast(opt):
                out = model(mb.input_ids, mb.pixel_values, attention_mask=mb.attention_mask)
            loss, _ = next_token_loss(out.logits, mb.input_ids, mb.loss_mask, num_targets=n)
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
    pretrain: Opt = field(default_factory=lambda: Opt(steps=400, lr=2e-3, ckpt_every=100))
    align: Opt = field(default_factory=lambda: Opt(steps=150, lr=1e-3, ckpt_every=50))
    sft: Opt = field(default_factory=lambda: Opt(steps=300, lr=1e-3, ckpt_every=100))
    train_vision_in_sft: bool = True
    eval_samples: int = 8
    max_new_tokens: int = 96


def quick_recipe() -> Recipe:
    small = dict(batch_size=16, micro_batch=16, log_every=5, ckpt_every=1000)
    return Recipe(name="quick", data_dir="data/toy-quick", n_train=400, n_rl=64, n_test=48, n_hard=48,
                  vocab_size=400,
                  pretrain=Opt(steps=30, lr=2e-3, **small), align=Opt(steps=10, lr=1e-3, **small),
                  sft=Opt(steps=30, lr=1e-3, **small), eval_samples=4)


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
    model = load_model(run / prev / "model")
    data = encode_conversations(Path(recipe.data_dir) / data_file, tok, model.cfg)
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
# The recipe
# =============================================================================================

STAGES = ("pretrain", "align", "sft")


def run_stage(name: str, run: Path, recipe: Recipe, stop_after=None, quiet=False):
    data_dir = ensure_world(recipe)
    tok = ensure_tokenizer(run, data_dir, recipe.vocab_size)
    fn = {"pretrain": stage_pretrain, "align": stage_align, "sft": stage_sft}[name]
    t = time.time()
    fn(run, recipe, tok, stop_after=stop_after, quiet=quiet)
    return time.time() - t


def run_all(recipe: Recipe, quiet=False) -> dict:
    import eval as evaluate
    run = Path("runs") / recipe.name
    times = {}
    t0 = time.time()
    ensure_world(recipe)
    times["world"] = time.time() - t0
    for s in STAGES:
        times[s] = run_stage(s, run, recipe, quiet=quiet)
    results = evaluate.recipe_table(run, recipe, times, quiet=quiet)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("stage", nargs="?", default="all", choices=("all",) + STAGES,
                   help="the stage to run (default: the whole recipe)")
    p.add_argument("--quick", action="store_true", help="smoke-size recipe (about a minute)")
    p.add_argument("--run", default=None, help="run directory (default runs/toy or runs/quick)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many optimizer steps (with a checkpoint); rerun to resume")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = quick_recipe() if args.quick else Recipe()
    if args.run:
        recipe.name = Path(args.run).name
    if args.stage == "all":
        run_all(recipe)
    else:
        run = Path(args.run) if args.run else Path("runs") / recipe.name
        run_stage(args.stage, run, recipe, stop_after=args.stop_after)


if __name__ == "__main__":
    main()
