"""The training stages of the URSA recipe as loops: pretrain (toy only), align, sft, label, prm, grpo.

    python train.py                          # the whole toy recipe on CPU: world, every stage, evaluation
    python train.py --quick                  # the same at smoke size (about a minute)
    python train.py ablation                 # GRPO with each reward (outcome, ps, v1, v2) from the same SFT + PRM
    python train.py sft --run runs/toy       # one stage (reads the previous stage's folder)
    python train.py sft --stop-after 20      # stop early with a checkpoint; rerunning resumes exactly
    python train.py sft --quick --device cuda                       # one GPU, no FSDP
    torchrun --standalone --nproc_per_node=8 train.py sft --fsdp ...   # FSDP2 (docs/scale_out.md)
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py sft --quick --fsdp --threads 1

Every stage writes runs/<name>/<stage>/: model/ (config.json + model.safetensors), metrics.jsonl (one
line per logged step), state.json, and resume/ while it runs. A finished stage is skipped when the
recipe is rerun; an interrupted one resumes exactly (ursa/trainer.py).

Loss normalisation: every optimizer step counts its targets (response tokens, PRM tags, GRPO tokens
or sequences) over the whole step, all ranks, BEFORE the micro-batch loop, and divides every
micro-batch's summed loss by that count, so micro-batching never changes the gradient.

The grpo stage's simplifications, stated up front:
- the reference policy is the SFT policy, frozen; the PRM is frozen;
- with --ppo-epochs 1 (the default) training is on policy: the ratio pi/pi_old is 1 and the clip
  never acts; --ppo-epochs E > 1 takes E optimizer steps on each rollout batch, where the clip does
  act (pi_old = the policy that sampled the batch; checkpoints fall on batch boundaries);
- rollouts of batch b are sampled with a generator seeded by b, so a resumed run draws exactly
  what the uninterrupted run drew;
- under --fsdp the rollouts are decoded by an unsharded bf16 copy of the policy (ursa.dist.replicate).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from itertools import accumulate
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from ursa import dist
from ursa.answer import judge
from ursa.config import ModelConfig, get_config
from ursa.data import (DataError, ExampleSet, PRMExamples, conversation_turns, encode_conversations,
                       next_token_loss, read_jsonl)
from ursa.dualmath import dualmath_image_root, format_label_stats, label_dualmath, oracle_relabel
from ursa.evaluate import gold, load_problems, prm_scores, problem_pixels, prompts_for, sample
from ursa.generate import generate
from ursa.grpo import (REWARDS, drop_moment, mixed_groups, policy_loss, rollout_advantages, rollout_batch,
                       rollout_rewards, token_logprobs, token_step_index, token_step_tensor)
from ursa.io import read_json, write_json, write_text
from ursa.model import URSAModel, init_weights
from ursa.pretraining import PATCH_GRID, AttributeHeads
from ursa.prm import balance_weight, prm_loss, split_steps
from ursa.results import (evaluate_ablation, evaluate_prm_ablation, evaluate_recipe, prm_label_metrics,
                          split_by_problem)
from ursa.tokenizer import Tokenizer
from ursa.recipe import GRPOSettings, LabelSettings, Recipe, apply_overrides, quick_recipe  # noqa: F401 (the CLI's recipes)
from ursa.toydata import world_tokenizer, write_world
from ursa.trainer import (Opt, Runtime, TrainingError, isolated_tokens_per_s, order, set_trainable, stage_done,
                          train_loop, with_epochs, write_result)

SEED_STRIDE = 1_000_003        # a prime: per-batch generators of different seeds never coincide
RANK_STRIDE = 7_919            # ... nor those of different ranks
RL_FILTER_SEED = 1_234         # the RL-prompt filter's samples (fixed: every GRPO variant keeps the same prompts)


# =============================================================================================
# Shared set-up
# =============================================================================================

def ensure_world(recipe: Recipe, quiet: bool = False, force: bool = False) -> Path:
    """The toy world's folder, written when missing. One written with other counts, knobs or record
    format is an error, or with force rewritten (only then: under torchrun the ranks after the first
    find it up to date and reuse it)."""
    kw = dict(n_train=recipe.n_train, n_rl=recipe.n_rl, n_test=recipe.n_test, n_hard=recipe.n_hard,
              progress=not quiet)
    try:
        return write_world(recipe.data_dir, **kw)
    except ValueError:
        if not force:
            raise
        return write_world(recipe.data_dir, force=True, **kw)


def model_config(recipe: Recipe, tok: Tokenizer) -> ModelConfig:
    cfg = get_config(recipe.preset)
    cfg.lm.vocab_size = int(math.ceil(tok.vocab_size / 64) * 64)     # a multiple of 64: faster matmuls
    cfg.image_token_id = tok.image_id
    return cfg.validate()


def lm_step_fn(model: URSAModel, data: ExampleSet, opt: Opt, pad_id: int, rt: Runtime):
    """Eq. 1 (next-token cross-entropy on the response), normalised by the step's target count;
    micro-batches of similar length (Batch.buckets: less padding, the same gradient).
    step_fn.run(batch) is the forward + backward alone (the isolated-step reference)."""
    def run(batch) -> float:
        n = dist.global_count(batch.num_targets())
        total = 0.0
        for mb in dist.accumulate(model, batch.buckets(opt.micro_batch), rt.no_sync):
            ids, px, am, lm = rt.to(mb.input_ids, mb.pixel_values, mb.attention_mask, mb.loss_mask)
            with rt.autocast(opt.bf16):
                out = model(ids, px, attention_mask=am)
            loss, _ = next_token_loss(out.logits, ids, lm, num_targets=n)
            loss.backward()
            total += loss.item()
        return total

    def step_fn(step):
        batch = step_fn.batch(step)
        return {"loss": run(batch), "tokens": batch.num_tokens()}

    step_fn.batch = lambda step: data.batch(rt.rows(order(len(data), step, opt.batch_size, opt.seed)), pad_id)
    step_fn.run = run
    return step_fn


def isolated(model, step_fn, rt: Runtime) -> Optional[float]:
    """The isolated-step reference of an LM-style stage (None under FSDP: its steps are collectives)."""
    if rt.dist is not None:
        return None
    b = step_fn.batch(0)
    return isolated_tokens_per_s(lambda: step_fn.run(b), b.num_tokens(),
                                 [p for p in model.parameters() if p.requires_grad])


# =============================================================================================
# Stage I: pretraining stand-in, alignment, SFT
# =============================================================================================

def stage_pretrain(run: Path, recipe: Recipe, tok: Tokenizer, rt: Runtime, stop_after=None, quiet=False, force=False):
    """Toy stand-in for downloading a pretrained Qwen2.5 and SigLIP, in one loop of three losses:
    the LM on text-only problems (the facts in words), the whole model on image captions (the
    vision tower learns to see what the captions say, as SigLIP learned from image-text pairs), and
    the vision tower on the scene's and each patch's facts (ursa/pretraining.py)."""
    sd, opt, data_dir = run / "pretrain", recipe.pretrain, Path(recipe.data_dir)
    if stage_done(sd):
        return
    torch.manual_seed(opt.seed)
    model = init_weights(URSAModel(model_config(recipe, tok)), seed=opt.seed).to(rt.device)
    ids, masks = [], []
    for r in read_jsonl(data_dir / "text.jsonl", required=("text_question", "solution")):
        i, m = tok.encode_conversation(r["text_question"], r["solution"], image=False)
        ids.append(i), masks.append(m)
    caps = read_jsonl(data_dir / "captions.jsonl", required=("conversations", "attributes", "patch_attributes"))
    if not recipe.caption_pretraining:
        for r in caps:
            u, a, _ = conversation_turns(r)
            i, m = tok.encode_conversation(u, a, image=False)
            ids.append(i), masks.append(m)
    text = ExampleSet(ids, masks, None)
    captions = encode_conversations(data_dir / "captions.jsonl", tok, model.cfg)            # with their images
    scene_y = torch.tensor([r["attributes"] for r in caps], dtype=torch.long)          # [N, slots]
    patch_y = torch.tensor([r["patch_attributes"] for r in caps], dtype=torch.long)    # [N, P, slots]
    if patch_y.shape[1] != PATCH_GRID ** 2:
        raise DataError(f"{data_dir / 'captions.jsonl'}: {patch_y.shape[1]} patch attributes per image, expected "
                        f"{PATCH_GRID ** 2}")
    head = AttributeHeads(model.cfg.vision.num_tokens, model.cfg.vision.out_dims[0]).to(rt.device)
    set_trainable(model, ("vision_model", "aligner", "language_model"))
    text_fn = lm_step_fn(model, text, opt, tok.pad_id, rt)
    caption_fn = lm_step_fn(model, captions, replace(opt, seed=opt.seed + 1), tok.pad_id, rt)

    def step_fn(step):
        t = text_fn(step)
        c = caption_fn(step) if recipe.caption_pretraining else {"loss": 0.0, "tokens": 0}
        idx = order(len(caps), step, opt.batch_size, opt.seed + 2)
        px, ys, yp = rt.to(captions.images[idx].float() / 255.0, scene_y[idx], patch_y[idx])
        with rt.autocast(opt.bf16):
            vloss, scene_acc, patch_acc = head.loss(model.vision_model(px)[0], ys, yp)
        vloss.backward()
        return {"loss": t["loss"] + c["loss"] + vloss.item(), "lm_loss": t["loss"], "caption_loss": c["loss"],
                "vit_loss": vloss.item(), "vit_scene_acc": scene_acc, "vit_patch_acc": patch_acc,
                "tokens": t["tokens"] + c["tokens"]}

    iso = None
    if rt.dist is None:
        bt, bc = text_fn.batch(0), caption_fn.batch(0)
        cap = recipe.caption_pretraining
        iso = isolated_tokens_per_s(lambda: (text_fn.run(bt), cap and caption_fn.run(bc)),
                                    bt.num_tokens() + (bc.num_tokens() if cap else 0),
                                    [p for p in model.parameters() if p.requires_grad])
    if train_loop(sd, "pretrain", {"model": model, "head": head}, opt, step_fn, rt, stop_after=stop_after,
                  quiet=quiet, force=force, isolated_tok_s=iso):
        write_result(sd, model, {"stage": "pretrain"}, rt)


def _stage_lm(run: Path, stage: str, prev: str, recipe: Recipe, tok: Tokenizer, data_file: str, parts: tuple,
              opt: Opt, rt: Runtime, stop_after=None, quiet=False, force=False):
    sd = run / stage
    if stage_done(sd):
        return
    torch.manual_seed(opt.seed)
    model = rt.load(Path(recipe.init) if recipe.init else run / prev / "model", bf16=opt.bf16)
    data = encode_conversations(Path(recipe.stage_data) if recipe.stage_data else Path(recipe.data_dir) / data_file,
                                tok, model.cfg, max_len=recipe.max_len)
    opt = with_epochs(opt, len(data), opt.batch_size)
    set_trainable(model, parts)
    step_fn = lm_step_fn(model, data, opt, tok.pad_id, rt)
    if train_loop(sd, stage, {"model": model}, opt, step_fn, rt, stop_after=stop_after, quiet=quiet, force=force,
                  isolated_tok_s=isolated(model, step_fn, rt)):
        write_result(sd, model, {"stage": stage, "trained": list(parts)}, rt)


def stage_align(run, recipe, tok, rt, stop_after=None, quiet=False, force=False):
    """Stage I alignment: ONLY the projector trains, on image-caption pairs."""
    _stage_lm(run, "align", "pretrain", recipe, tok, "captions.jsonl", ("aligner",), recipe.align, rt,
              stop_after, quiet, force)


def stage_sft(run, recipe, tok, rt, stop_after=None, quiet=False, force=False):
    """Stage I math SFT on chain-of-thought conversations (Eq. 1): projector + LM (+ vision)."""
    parts = ("aligner", "language_model") + (("vision_model",) if recipe.train_vision_in_sft else ())
    _stage_lm(run, "sft", "align", recipe, tok, "cot_train.jsonl", parts, recipe.sft, rt, stop_after, quiet, force)


# =============================================================================================
# Stage II: DualMath labelling and the PRM
# =============================================================================================

def stage_label(run: Path, recipe: Recipe, tok: Tokenizer, rt: Runtime, stop_after=None, quiet=False, force=False):
    """DualMath with the SFT policy (ursa/dualmath.py: BEL on wrong samples, MIE, correct), resumable."""
    sd = run / "label"
    if stage_done(sd):
        return
    torch.manual_seed(0)
    model = rt.load(Path(recipe.init) if recipe.init else run / "sft" / "model").eval()
    L = recipe.label
    stats = label_dualmath(model, tok, Path(recipe.stage_data or Path(recipe.data_dir) / "cot_train.jsonl"), sd,
                           n_problems=L.n_problems, k_samples=L.k_samples, n_probe=L.n_probe,
                           compare_mc=L.compare_mc, mie_kind=L.mie_kind, mie_per_problem=L.mie_per_problem,
                           correct_ratio=L.correct_ratio, pairs=L.pairs, max_new_tokens=recipe.max_new_tokens,
                           progress=not quiet)
    report = format_label_stats(stats)
    if not quiet:
        print(report)
    write_text(sd / "stats.txt", report + "\n")
    write_json(sd / "state.json", {"done": True, **stats})


def stage_prm(run: Path, recipe: Recipe, tok: Tokenizer, rt: Runtime, stop_after=None, quiet=False, force=False,
              oracle: bool = False):
    """Stage II PRM: SFT weights + a value head (dropout 0.1 -> Linear(H, 1)); BCE at the step tags
    (Eq. 4); the LLM and the head train, the vision tower and projector are frozen (paper; the
    recipe's train_vision_in_prm trains them too).
    oracle=True: the same solutions and training with the oracle's labels, into <run>/prm-oracle."""
    sd, opt = run / stage_dir_name("prm", recipe, oracle=oracle), recipe.prm
    if stage_done(sd):
        return
    torch.manual_seed(opt.seed)
    path = Path(recipe.stage_data) if recipe.stage_data else run / "label" / "dualmath.jsonl"
    recs = read_jsonl(path, required=("question", "steps", "labels", "answer", "image"))
    if oracle:
        recs = oracle_relabel(recs)
    train_recs, held = split_by_problem(recs, recipe.prm_heldout)
    if not train_recs:
        raise DataError(f"{path}: no training records for the PRM")
    model = rt.load(Path(recipe.init) if recipe.init else run / "sft" / "model", value_head=True, bf16=opt.bf16)
    base = dualmath_image_root(path)
    train_data = PRMExamples(train_recs, tok, model.cfg, base, recipe.max_len)
    held_data = PRMExamples(held, tok, model.cfg, base, recipe.max_len) if held else None
    vision = ("vision_model", "aligner") if recipe.train_vision_in_prm else ()
    set_trainable(model, ("language_model", "score") + vision)
    opt = with_epochs(opt, len(train_data), opt.batch_size)
    pos_weight = balance_weight(train_data.labels) if recipe.prm_balance else 1.0

    def run(parts) -> tuple[float, float]:
        n_local = sum(int(mk.sum()) for _, _, mk in parts)
        n_tags = dist.global_count(n_local)                # the whole step's tags, before micro-batching
        tot, acc = 0.0, 0.0
        for b, lb, mk in dist.accumulate(model, parts, rt.no_sync):
            ids, px, am, lb, mk = rt.to(b.input_ids, b.pixel_values, b.attention_mask, lb, mk)
            with rt.autocast(opt.bf16):
                v = model(ids, px, attention_mask=am, logits=False, values=True).values
            loss, m = prm_loss(v.float(), lb, mk, num_tags=n_tags, pos_weight=pos_weight)
            loss.backward()
            tot += loss.item()
            acc += m["step_acc"] * m["num_tags"] if m["num_tags"] else 0.0
        return tot, acc / max(1, n_local)

    def parts_of(step):
        return train_data.buckets(rt.rows(order(len(train_data), step, opt.batch_size, opt.seed)), tok.pad_id,
                                  opt.micro_batch)

    def step_fn(step):
        parts = parts_of(step)
        loss, acc = run(parts)
        return {"loss": loss, "step_acc": acc, "tokens": sum(b.num_tokens() for b, _, _ in parts)}

    p0 = parts_of(0)
    iso = None if rt.dist is not None else isolated_tokens_per_s(
        lambda: run(p0), sum(b.num_tokens() for b, _, _ in p0), [p for p in model.parameters() if p.requires_grad])
    if train_loop(sd, "prm", {"model": model}, opt, step_fn, rt, stop_after=stop_after, quiet=quiet, force=force,
                  isolated_tok_s=iso):
        met = prm_label_metrics(model, held_data, tok.pad_id) if held_data is not None else {}
        if not quiet and met and rt.is_main:
            print(f"[prm] held-out: step acc {met['step_acc']:.3f} | AUC {met['auc']:.3f} | first-error acc "
                  f"{met['first_error_acc']:.3f} | {met['steps']} steps in {met['solutions']} solutions")
        write_result(sd, model, {"stage": "prm", "labels": "oracle" if oracle else "dualmath", "heldout": met,
                                 "train_records": len(train_recs), "pos_weight": pos_weight}, rt)


# =============================================================================================
# Stage III: GRPO with the process-supervised reward (PS-GRPO)
# =============================================================================================

def rl_file(recipe: Recipe) -> Path:
    return Path(recipe.stage_data) if recipe.stage_data else Path(recipe.data_dir) / "rl.jsonl"


def rl_prompts(run: Path, recipe: Recipe, tok: Tokenizer, rt: Runtime, quiet=False) -> list:
    """RL prompts the SFT policy neither always solves nor always fails (filter_samples samples each
    at T = 1, as the paper's 20K -> 15.3K filter). Cached in runs/<name>/rl_prompts.json, shared by
    every GRPO variant, with each prompt's count of right samples."""
    recs, S = load_problems(rl_file(recipe)), recipe.rl
    if not S.filter:
        return recs
    path = run / "rl_prompts.json"
    if not path.exists():
        policy = rt.load(Path(recipe.init) if recipe.init else run / "sft" / "model").eval()
        s = sample(policy, tok, recs, rl_file(recipe).parent, n=S.filter_samples, temperature=1.0,
                   max_new_tokens=recipe.max_new_tokens, seed=RL_FILTER_SEED, quiet=quiet)
        keep = mixed_groups(torch.tensor(s.correct, dtype=torch.bool)).tolist()          # [B]
        write_json(path, {"candidates": len(recs), "samples": S.filter_samples, "speed": s.speed,
                          "right": {r["id"]: sum(c) for r, c in zip(recs, s.correct)},
                          "keep": [r["id"] for r, k in zip(recs, keep) if k]})
    info = read_json(path, "RL prompt cache")
    if not quiet:
        right = list(info["right"].values())
        speed = info.get("speed") or {}
        print(f"[grpo] RL prompts: {len(info['keep'])} of {len(recs)} kept ({right.count(info['samples'])} "
              f"always right, {right.count(0)} always wrong dropped; sampled at "
              f"{speed.get('completions_s', 0):.0f} completions/s, {speed.get('new_tokens_s', 0):.0f} new tokens/s of "
              f"{speed.get('decoded_tokens_s', 0):.0f} decoded)")
    keep = set(info["keep"])
    return [r for r in recs if r["id"] in keep]


def grpo_dir_name(reward: str) -> str:
    """runs/<name>/grpo holds PS-GRPO (the recipe's main run); other rewards grpo-<reward>."""
    return "grpo" if reward == "ps" else f"grpo-{reward}"


def stage_dir_name(name: str, recipe: Recipe, reward: Optional[str] = None, oracle: bool = False) -> str:
    """The run sub-folder a stage writes: its name, except prm --oracle-labels (prm-oracle) and GRPO
    with a reward other than PS (grpo-<reward>; the reward from the call or else the recipe)."""
    if name == "grpo":
        return grpo_dir_name(reward or recipe.rl.reward)
    return "prm-oracle" if name == "prm" and oracle else name


@torch.no_grad()
def _logprobs(model, ids, am, px, T: float, micro: int, rt: Runtime, bf16: bool) -> torch.Tensor:
    """[R, L-1] log-probs of every target token under `model` (no gradient), micro-batched."""
    out = []
    for s in range(0, ids.shape[0], micro):
        i, a, p = rt.to(ids[s:s + micro], am[s:s + micro], px[s:s + micro])
        with rt.autocast(bf16):
            logits = model(i, p, attention_mask=a).logits
        out.append(token_logprobs(logits[:, :-1].float(), i[:, 1:], T).cpu())
    return torch.cat(out)


def stage_grpo(run: Path, recipe: Recipe, tok: Tokenizer, rt: Runtime, stop_after=None, quiet=False, force=False,
               reward: Optional[str] = None):
    """PS-GRPO (Eq. 5-8) and its variants; see the module docstring for the simplifications."""
    S, opt = recipe.rl, recipe.grpo
    reward = reward or S.reward
    sd = run / stage_dir_name("grpo", recipe, reward)
    if stage_done(sd):
        return
    torch.manual_seed(opt.seed)
    recs = rt.main_first(rl_prompts, run, recipe, tok, rt, quiet or not rt.is_main)
    base, G, T, E = rl_file(recipe).parent, S.group, S.temperature, S.ppo_epochs
    init = Path(recipe.init) if recipe.init else run / "sft" / "model"
    policy = rt.load(init, bf16=opt.bf16)
    ref = rt.load(init, bf16=opt.bf16).eval()
    prm = rt.load(Path(recipe.prm_dir) if recipe.prm_dir else run / "prm" / "model", bf16=opt.bf16).eval()
    for p in list(ref.parameters()) + list(prm.parameters()):
        p.requires_grad = False
    set_trainable(policy, ("aligner", "language_model"))
    prompt_ids = prompts_for(recs, tok, policy.cfg)
    if S.max_prompt_len:
        keep = [i for i, p in enumerate(prompt_ids) if len(p) <= S.max_prompt_len]
        recs, prompt_ids = [recs[i] for i in keep], [prompt_ids[i] for i in keep]
    if not recs:
        raise TrainingError("grpo: no RL prompt left (the SFT policy solves all or none of them, or every "
                            "prompt is longer than --max-prompt-len); use more RL prompts or --no-rl-filter")
    px_all = problem_pixels(recs, base, policy.cfg.vision)
    cache = {}

    def rollouts(b: int) -> dict:
        """Batch b: sample -> judge -> score -> reward -> advantage -> the training tensors."""
        t0 = time.time()
        idx = rt.rows(order(len(recs), b, S.prompts, opt.seed))
        brecs, px = [recs[i] for i in idx], px_all[idx]
        sampler = policy if rt.dist is None else dist.replicate(policy, torch.bfloat16 if opt.bf16 else torch.float32)
        p0 = next(sampler.parameters())
        gen = torch.Generator(device=p0.device).manual_seed(opt.seed * SEED_STRIDE + b + RANK_STRIDE * rt.rank)
        chunk = max(1, S.gen_batch // G) if S.gen_batch else len(idx)
        rows, decoded = [], 0                                               # R token lists, rollout b*G+j
        for c in range(0, len(idx), chunk):
            g = generate(sampler, [prompt_ids[i] for i in idx[c:c + chunk]], px[c:c + chunk].to(p0.device, p0.dtype),
                         num_samples=G, max_new_tokens=recipe.max_new_tokens, temperature=T,
                         stop_ids=(tok.im_end_id, tok.eos_id), pad_id=tok.pad_id, generator=gen)
            rows += [g.row(i) for i in range(g.tokens.shape[0])]
            decoded += g.decoded
        del sampler
        t_gen = time.time() - t0                                            # the sampling alone
        R = len(rows)
        texts = [tok.decode(r) for r in rows]
        correct = torch.tensor([judge(texts[i], *gold(brecs[i // G]))[1] for i in range(R)])         # [R]
        scores = [s for grp in prm_scores(prm, tok, brecs, [texts[b_ * G:(b_ + 1) * G] for b_ in range(len(idx))], px)
                  for s in grp]                                                                      # R lists
        rw = rollout_rewards(reward, correct, scores, S.gamma, S.rho)                                # [R]
        ids, am, mask = rollout_batch([prompt_ids[idx[i // G]] for i in range(R)], rows, tok.pad_id)
        token_step = None
        if reward == "v2":
            # each token's first character in its text (exact for the toy's ASCII; see token_step_index)
            starts = [list(accumulate([0] + [len(tok.decode([t])) for t in r]))[:len(r)] for r in rows]
            token_step = token_step_tensor([len(prompt_ids[idx[i // G]]) for i in range(R)],
                                           [token_step_index(texts[i], starts[i], len(scores[i])) for i in range(R)],
                                           ids.shape[1])
        adv = rollout_advantages(reward, rw.view(-1, G), correct.view(-1, G), scores, token_step, S.scale_std)
        t_score = time.time() - t0 - t_gen                                  # judging, PRM scores, rewards, batch
        px_rows = px.repeat_interleave(G, dim=0)                                                     # [R, 3, S, S]
        ref_lp = _logprobs(ref, ids, am, px_rows, T, opt.micro_batch, rt, opt.bf16)
        old_lp = _logprobs(policy, ids, am, px_rows, T, opt.micro_batch, rt, opt.bf16) if E > 1 else None
        t_all = time.time() - t0
        deltas = [drop_moment(sc) for sc, c in zip(scores, correct.tolist()) if c]
        stats = {"reward": rw.mean().item(), "acc": correct.float().mean().item(),
                 "resp_len": sum(map(len, rows)) / R, "n_steps": sum(len(split_steps(t)[0]) for t in texts) / R,
                 "drop_rate": sum(d >= S.rho for d in deltas) / max(1, len(deltas)),
                 "mixed": float(mixed_groups(correct.view(-1, G)).float().mean()), "rollout_s": t_all,
                 "sample_s": t_gen, "score_s": t_score, "logprob_s": t_all - t_gen - t_score,
                 "rollout_tok_s": sum(map(len, rows)) / max(t_gen, 1e-9), "completions_s": R / max(t_gen, 1e-9),
                 "decoded_tok_s": decoded / max(t_gen, 1e-9)}
        return {"b": b, "ids": ids, "am": am, "mask": mask, "px": px_rows, "adv": adv, "ref_lp": ref_lp,
                "old_lp": old_lp, "stats": stats}

    def step_fn(step):
        if cache.get("b") != step // E:
            cache.clear()
            cache.update(rollouts(step // E))
        ro = cache
        R = ro["ids"].shape[0]
        n_tok, R_all = dist.global_count(int(ro["mask"].sum())), dist.global_count(R)    # whole step, all ranks
        total, kl, clip = 0.0, 0.0, 0.0
        slices = [slice(s, s + opt.micro_batch) for s in range(0, R, opt.micro_batch)]
        for sl in dist.accumulate(policy, slices, rt.no_sync):
            ids, am, px, mask, adv, ref_lp = rt.to(ro["ids"][sl], ro["am"][sl], ro["px"][sl], ro["mask"][sl],
                                                   ro["adv"][sl], ro["ref_lp"][sl])
            with rt.autocast(opt.bf16):
                logits = policy(ids, px, attention_mask=am).logits
            lp = token_logprobs(logits[:, :-1].float(), ids[:, 1:], T)
            old = lp.detach() if ro["old_lp"] is None else rt.to(ro["old_lp"][sl])[0]
            loss, m = policy_loss(lp, old, adv, mask, ref_logp=ref_lp, clip_eps=S.clip_eps, beta=S.kl_coef,
                                  agg=S.loss_agg, num_tokens=n_tok, num_seqs=R_all, constant=R_all * recipe.max_new_tokens)
            loss.backward()
            total += loss.item()
            w = int(ro["mask"][sl].sum()) / max(1, n_tok)
            kl, clip = kl + m.get("kl", 0.0) * w, clip + m["clip_frac"] * w
        return {"loss": total, **ro["stats"], "kl": kl, "clip_frac": clip, "tokens": int(ro["am"].sum())}

    if train_loop(sd, f"grpo-{reward}", {"model": policy}, opt, step_fn, rt, stop_after=stop_after, quiet=quiet,
                  force=force, resumable_at=lambda s: s % E == 0):
        write_result(sd, policy, {"stage": "grpo", "reward": reward}, rt)


# =============================================================================================
# The recipe and the command line
# =============================================================================================

STAGES = ("pretrain", "align", "sft", "label", "prm", "grpo")
FSDP_STAGES = ("align", "sft", "prm", "grpo")     # the stages that train one model from a model dir
STAGE_FNS = {"pretrain": stage_pretrain, "align": stage_align, "sft": stage_sft, "label": stage_label,
             "prm": stage_prm, "grpo": stage_grpo}


def run_stage(name: str, run: Path, recipe: Recipe, rt: Runtime, stop_after=None, quiet=False, force=False,
              **kw) -> float:
    """One stage (after the world and the tokenizer it needs); returns its wall seconds, summed over the
    runs that resumed it (runs/<name>/stage_seconds.json), also when it was already done and is skipped."""
    if rt.dist is not None and name not in FSDP_STAGES:
        raise TrainingError(f"--fsdp runs the stages {', '.join(FSDP_STAGES)}; run {name!r} without it")
    if run.exists() and not run.is_dir():
        raise TrainingError(f"{run}: exists and is not a folder")
    data_dir = rt.main_first(ensure_world, recipe, quiet, force)
    tok = rt.main_first(world_tokenizer, run / "tokenizer.json", data_dir, recipe.vocab_size)
    key = stage_dir_name(name, recipe, **kw)
    times_file = run / "stage_seconds.json"
    times = read_json(times_file, "stage times") if times_file.exists() else {}
    if stage_done(run / key) and not force:         # skipped: report the seconds it took when it ran
        return float(times.get(key, 0.0))
    t = time.time()
    STAGE_FNS[name](run, recipe, tok, rt, stop_after=stop_after, quiet=quiet, force=force, **kw)
    if rt.is_main:                                  # summed over the runs that resumed it
        times[key] = round((0.0 if force else times.get(key, 0.0)) + time.time() - t, 1)
        write_json(times_file, times)
    return times.get(key, time.time() - t)


def run_all(recipe: Recipe, run: Path, rt: Runtime, quiet=False, force_world=False) -> dict:
    """The world (rewritten when outdated and force_world), every stage (finished ones are skipped),
    then the evaluation and results files."""
    t0 = time.time()
    ensure_world(recipe, quiet, force_world)
    times = {"world": time.time() - t0}
    for s in STAGES:
        times[s] = run_stage(s, run, recipe, rt, quiet=quiet)
    return evaluate_recipe(run, recipe, times, rt, quiet=quiet)


def run_ablation(recipe: Recipe, run: Path, rt: Runtime, quiet=False) -> dict:
    """The two ablations. The PRM's labels: the same solutions and training with the oracle's true
    step labels (runs/<name>/prm-oracle) against BEL + MIE's, both judged on the same SFT samples.
    The GRPO reward: SFT vs GRPO (outcome) vs PS-GRPO vs Variant 1 vs Variant 2, with the same SFT,
    PRM, prompts, seeds and budget; PS-GRPO is the recipe's main run (runs/<name>/grpo), reused."""
    for s in STAGES[:-1]:
        run_stage(s, run, recipe, rt, quiet=quiet)
    times = {"prm-oracle": run_stage("prm", run, recipe, rt, quiet=quiet, oracle=True)}
    times.update({r: run_stage("grpo", run, recipe, rt, quiet=quiet, reward=r) for r in REWARDS})
    evaluate_prm_ablation(run, recipe, {"dualmath": "prm", "oracle": "prm-oracle"}, rt, quiet=quiet)
    return evaluate_ablation(run, recipe, {r: grpo_dir_name(r) for r in REWARDS}, times, rt, quiet=quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("stage", nargs="?", default="all", choices=("all", "ablation") + STAGES,
                   help="the stage to run (default: the whole recipe; ablation: every GRPO reward)")
    p.add_argument("--quick", action="store_true", help="smoke-size recipe (about a minute)")
    p.add_argument("--run", "--run-dir", dest="run", default=None,
                   help="run folder (default runs/toy or runs/quick); under torchrun write --run-dir "
                        "(torchrun reads --run as an abbreviation of its own --run-path)")
    p.add_argument("--stop-after", type=int, help="stop after this many optimizer steps (with a checkpoint)")
    p.add_argument("--force", action="store_true", help="resume even though the stage's settings changed; rewrite "
                   "the toy world's folder when its counts, knobs or record format changed")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (one process; --fsdp picks its own)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 over the torchrun processes (align, sft, prm, grpo)")
    p.add_argument("--no-activation-checkpointing", action="store_true", help="--fsdp: keep every block's activations")
    p.add_argument("--sync-every-micro-batch", action="store_true",
                   help="--fsdp: reduce-scatter after every micro-batch (less memory than no_sync accumulation)")
    o = p.add_argument_group("one stage's settings (override the recipe; for real data and the 8B model)")
    o.add_argument("--init", help="the stage's starting model directory (default: the previous stage's)")
    o.add_argument("--data", help="the stage's data file (align/sft: conversations; prm: DualMath; grpo: problems)")
    o.add_argument("--prm", help="grpo: the PRM model directory (default <run>/prm/model)")
    o.add_argument("--lr", type=float, help="peak learning rate")
    o.add_argument("--steps", type=int, help="optimizer steps")
    o.add_argument("--epochs", type=float, help="epochs over the stage's data (sets the step count; not with --steps)")
    o.add_argument("--batch-size", type=int, help="rows per optimizer step (all ranks together)")
    o.add_argument("--micro-batch", type=int, help="rows per forward/backward on one rank")
    o.add_argument("--warmup-ratio", type=float, help="linear warmup fraction of the steps")
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    o.add_argument("--fp32", action="store_true", help="no bf16 (autocast, or FSDP mixed precision)")
    o.add_argument("--max-len", type=int, help="truncate training sequences to this many tokens")
    o.add_argument("--oracle-labels", action="store_true",
                   help="prm: train on the toy world's true step labels instead of DualMath's (into <run>/prm-oracle)")
    o.add_argument("--label-problems", type=int, help="label: training problems sampled for DualMath (toy default 600)")
    o.add_argument("--prm-train-vision", action="store_true",
                   help="prm: train the vision tower and projector too (the paper freezes them)")
    g = p.add_argument_group("grpo")
    g.add_argument("--reward", choices=REWARDS, help="outcome (GRPO), ps (PS-GRPO, default), v1, v2 (Appendix B.1)")
    g.add_argument("--grpo-steps", type=int, help="GRPO optimizer steps")
    g.add_argument("--prompts-per-step", type=int, help="prompts per rollout batch")
    g.add_argument("--group", type=int, help="rollouts per prompt (G)")
    g.add_argument("--temperature", type=float, help="sampling temperature")
    g.add_argument("--ppo-epochs", type=int, help="optimizer steps per rollout batch (>1: the clip acts)")
    g.add_argument("--kl-coef", type=float, help="beta of the k3 KL term (paper 0.003)")
    g.add_argument("--clip-eps", type=float, help="clip epsilon of the surrogate (acts with --ppo-epochs > 1)")
    g.add_argument("--ps-gamma", type=float, help="PS reward penalty gamma (Eq. 6)")
    g.add_argument("--ps-rho", type=float, help="drop-moment threshold rho (Eq. 5)")
    g.add_argument("--gen-batch", type=int, help="rollouts decoded at once")
    g.add_argument("--max-prompt-len", type=int, help="drop prompts longer than this")
    g.add_argument("--no-rl-filter", action="store_true", help="keep every RL prompt")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fsdp:
        if args.stage in ("all", "ablation"):
            raise SystemExit(f"train.py: --fsdp runs one stage at a time ({', '.join(FSDP_STAGES)}), not {args.stage!r}")
        info = dist.setup()
        rt = Runtime.from_dist(info, not args.no_activation_checkpointing, not args.sync_every_micro_batch)
        dist.run_and_exit(_main, args, rt)          # destroy_process_group, then os._exit
    _main(args, Runtime(device=torch.device(args.device)))


def _main(args, rt: Runtime):
    recipe = quick_recipe() if args.quick else Recipe()
    run = Path(args.run) if args.run else Path("runs") / recipe.name
    recipe.name = run.name
    try:
        apply_overrides(recipe, args)
        if args.stop_after is not None and args.stage in ("all", "ablation", "label"):
            raise TrainingError("--stop-after stops one training stage: name it (pretrain, align, sft, prm or grpo)")
        if args.stage == "all":
            run_all(recipe, run, rt, force_world=args.force)
        elif args.stage == "ablation":
            run_ablation(recipe, run, rt)
        else:
            kw = {"oracle": True} if args.oracle_labels else {}
            if kw and args.stage != "prm":
                raise TrainingError("--oracle-labels goes with the prm stage")
            run_stage(args.stage, run, recipe, rt, stop_after=args.stop_after, force=args.force, **kw)
    except (ValueError, FileNotFoundError, PermissionError) as e:   # bad input: one line naming the file / record
        if rt.dist is not None:
            raise
        print(f"train.py {args.stage}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
