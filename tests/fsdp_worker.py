"""Worker of tests/test_fsdp.py: FSDP2 training jobs under torchrun on CPU (gloo).

    torchrun --standalone --nproc_per_node=2 tests/fsdp_worker.py --out DIR --phase main
    torchrun --standalone --nproc_per_node=2 tests/fsdp_worker.py --out DIR --phase resume

phase main:   a strict-load error (a directory of another architecture) raised on both ranks;
              sft (fp32, 5 steps, sharded checkpoint after step 3, export, logits checks),
              prm (fp32, 3 steps, from DIR/prm_base without a value head), sft in bf16 mixed
              precision (3 steps), tiny-hybrid (1 step).
phase resume: a fresh process group loads DIR/ckpt and runs steps 3 and 4 of the sft job.
Rank 0 writes DIR/<phase>.json. The same data and the single-process reference loop live here
(`make_batch`, `JOBS`, `reference_run`) so the test computes the reference with the same inputs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ursa.config import get_config                    # noqa: E402
from ursa.data import Batch, next_token_loss          # noqa: E402
from ursa.prm import prm_loss                         # noqa: E402

TAG = 5            # the step-tag token id in these synthetic PRM batches
ROWS, MICRO = 8, 2  # global batch rows; micro-batch rows (2 ranks x 2 micro-batches of 2)
LR, CLIP, WD = 1e-2, 0.5, 0.1
DATA_SEED = 1234

JOBS = {
    "sft":    dict(preset="micro", task="sft", mp=False, steps=5, save_at=3),
    "prm":    dict(preset="micro", task="prm", mp=False, steps=3),
    "bf16":   dict(preset="micro", task="sft", mp=True, steps=3),
    "hybrid": dict(preset="tiny-hybrid", task="sft", mp=False, steps=1),
}


def job_config(job: dict):
    cfg = get_config(job["preset"])
    if job["task"] == "prm":
        cfg.value_head, cfg.value_head_dropout = True, 0.0   # dropout off: ranks see other rows
    return cfg


def make_batch(cfg, task: str, rows: int = ROWS) -> tuple[Batch, torch.Tensor]:
    """A right-padded batch drawn from the GLOBAL torch RNG (so a resume must restore it):
    [bos] + <|image|> x N + text; the second half is the response (loss mask); for "prm" every
    4th response token is a step tag with a random 0/1 label. Returns (batch, labels [B, T])."""
    n_img, V = cfg.vision.num_tokens, cfg.lm.vocab_size
    lens = torch.randint(10, 17, (rows,))
    T = 1 + n_img + int(lens.max())
    ids = torch.zeros(rows, T, dtype=torch.long)
    am = torch.zeros(rows, T, dtype=torch.long)
    lm = torch.zeros(rows, T, dtype=torch.long)
    labels = torch.zeros(rows, T)
    for r in range(rows):
        L = 1 + n_img + int(lens[r])
        text = torch.randint(TAG + 1, V, (L,))
        text[text == cfg.image_token_id] = TAG + 1
        text[0] = 1
        text[1:1 + n_img] = cfg.image_token_id
        ids[r, :L], am[r, :L] = text, 1
        start = 1 + n_img + int(lens[r]) // 2
        lm[r, start:L] = 1
        if task == "prm":
            pos = torch.arange(start + 1, L, 4)
            ids[r, pos] = TAG
            labels[r, pos] = torch.randint(0, 2, (len(pos),)).float()
    S = cfg.vision.image_size
    px = torch.rand(rows, 3, S, S)
    return Batch(ids, am, lm, px), labels


def rows_of(batch: Batch, labels: torch.Tensor, idx) -> tuple[Batch, torch.Tensor]:
    idx = torch.as_tensor(list(idx))
    return Batch(batch.input_ids[idx], batch.attention_mask[idx], batch.loss_mask[idx],
                 batch.pixel_values[idx]), labels[idx]


def count(batch: Batch, task: str) -> int:
    return int((batch.input_ids == TAG).sum()) if task == "prm" else batch.num_targets()


def micro_loss(model, mb: Batch, labels: torch.Tensor, task: str, n: int) -> torch.Tensor:
    if task == "prm":
        out = model(mb.input_ids, mb.pixel_values, attention_mask=mb.attention_mask,
                    logits=False, values=True)
        return prm_loss(out.values.float(), labels, mb.input_ids == TAG, num_tags=n)[0]
    out = model(mb.input_ids, mb.pixel_values, attention_mask=mb.attention_mask)
    return next_token_loss(out.logits, mb.input_ids, mb.loss_mask, num_targets=n)[0]


def split(batch: Batch, labels: torch.Tensor, micro: int):
    return [(mb, labels[i * micro:(i + 1) * micro]) for i, mb in enumerate(batch.split(micro))]


def freeze_for(model, task: str):
    """PRM training updates the LLM part (and the head) only (URSA Stage II)."""
    if task == "prm":
        for n, p in model.named_parameters():
            p.requires_grad = n.split(".")[0] in ("language_model", "score")


def make_opt(params):
    from ursa.trainer import Opt, make_optimizer
    return make_optimizer(params, Opt(lr=LR, weight_decay=WD, clip=CLIP))


def reference_run(name: str, base_dir: Path | None = None) -> tuple[list, list, torch.nn.Module]:
    """The single-process loop on the whole global batch: (losses, grad norms, final model).
    Runs on one thread (a tiny model: more threads only fight over the 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_run(name, base_dir)
    finally:
        torch.set_num_threads(threads)


def _reference_run(name: str, base_dir: Path | None) -> tuple[list, list, torch.nn.Module]:
    from ursa.model import URSAModel, init_weights
    from ursa.weights import load_model
    job = JOBS[name]
    cfg = job_config(job)
    if job["task"] == "prm":
        model = load_model(base_dir, value_head=True)
        model.cfg.value_head_dropout = 0.0
        model.score_dropout.p = 0.0
    else:
        model = init_weights(URSAModel(cfg), std=0.2, seed=0)
    freeze_for(model, job["task"])
    optim = make_opt(model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(DATA_SEED)
    losses, norms = [], []
    for step in range(job["steps"]):
        batch, labels = make_batch(cfg, job["task"])
        n = count(batch, job["task"])
        total = 0.0
        for mb, lb in split(batch, labels, MICRO):
            loss = micro_loss(model, mb, lb, job["task"], n)
            loss.backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, norms, model


# ---- the FSDP side ----------------------------------------------------------------------------

def fsdp_run(name: str, info, out: Path, resume: bool = False) -> dict:
    from ursa import dist
    job = JOBS[name]
    cfg = job_config(job)
    if job["task"] == "prm":
        model = dist.build_fsdp_model(cfg, out / "prm_base", mixed_precision=job["mp"])
    else:
        model = dist.build_fsdp_model(cfg, mixed_precision=job["mp"], seed=0, init_std=0.2)
    freeze_for(model, job["task"])
    optim = make_opt(model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(DATA_SEED)
    start = 0
    if resume:
        start = dist.load_sharded(out / "ckpt", model, optim)["step"]
    rec = {"losses": {}, "norms": {}}
    for step in range(start, job["steps"]):
        batch, labels = make_batch(cfg, job["task"])
        mine, lab = rows_of(batch, labels, dist.rank_indices(range(ROWS), info.rank, info.world_size))
        n = dist.global_count(count(mine, job["task"]))
        total = 0.0
        for mb, lb in dist.accumulate(model, split(mine, lab, MICRO)):
            loss = micro_loss(model, mb, lb, job["task"], n)
            loss.backward()
            total += loss.item()
        norm = dist.clip_grad_norm_(params, CLIP)
        optim.step()
        optim.zero_grad(set_to_none=True)
        rec["losses"][step] = dist.global_sum([total])[0]
        rec["norms"][step] = float(norm)
        if job.get("save_at") == step + 1 and not resume:
            dist.save_sharded(out / "ckpt", model, optim, {"step": step + 1})
    if name == "sft" and not resume:
        rec.update(check_exports(model, cfg, info, out))
    return rec


def check_exports(model, cfg, info, out: Path) -> dict:
    """Export -> load in one process -> same logits; replicate() -> same logits; native names."""
    from ursa import dist
    from ursa.model import URSAModel
    from ursa.weights import load_model
    dist.export_model_dir(model, out / "export", extra={"stage": "test"})
    torch.manual_seed(7)
    batch, _ = make_batch(cfg, "sft", rows=3)
    with torch.no_grad():
        sharded = model(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask).logits
        rep = dist.replicate(model, dtype=torch.float32)
        rep_logits = rep(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask).logits
    names = list(dist.full_state_dict(model).keys())
    res = {"replica_max_diff": float((rep_logits - sharded).abs().max())}
    if info.is_main:
        single = load_model(out / "export")
        with torch.no_grad():
            ref = single(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask).logits
        res["export_max_diff"] = float((ref - sharded).abs().max())
        res["logit_scale"] = float(ref.abs().max())
        res["names_native"] = names == list(URSAModel(cfg).state_dict().keys())
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--phase", choices=("main", "resume"), required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    from ursa import dist
    info = dist.setup()
    out = Path(args.out)
    results = {"world_size": info.world_size}
    if args.phase == "main":
        try:            # a strict-load error on rank 0 must reach every rank (no hang)
            dist.build_fsdp_model(get_config("tiny-hybrid"), out / "prm_base")
            results["strict_error"] = ""
        except RuntimeError as e:
            results["strict_error"] = str(e)[:400]
        results["strict_error_ranks"] = dist.global_sum([1.0 if results["strict_error"] else 0.0])[0]
        for name in JOBS:
            results[name] = fsdp_run(name, info, out)
    else:
        results["sft"] = fsdp_run("sft", info, out, resume=True)
    if info.is_main:
        (out / f"{args.phase}.json").write_text(json.dumps(results, indent=1))
        print("WORKER DONE", flush=True)


if __name__ == "__main__":
    from ursa import dist as _dist
    _dist.run_and_exit(main)
