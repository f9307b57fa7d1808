"""DualMath labelling over a policy (URSA Stage II): sample solutions, BEL on the wrong ones, MIE
on the right ones, and "correct" records, written to a resumable JSONL.

    stats = label_dualmath(policy, tok, "data/toy/cot_train.jsonl", "runs/toy/label")

Per chunk of training problems:
  1. sample k solutions per problem with the policy (T = 1.0, top-p 0.95, as the paper);
  2. wrong ones -> Binary Error Locating (ursa.labeling.bel): N completions per probe at T = 0.3,
     every solution's binary search in lockstep, each round one batched sampler call;
  3. right ones -> about one third as many "correct" records (every step labelled 1);
  4. MIE -> the toy world's `ursa.mie.corrupt` on the problem's reference solution: one fact misread (or one
     arithmetic slip, one wrong option) and every later step RECOMPUTED from it (deterministic and
     always coherent; letting the policy continue would add sampling noise and cost); every step
     from the insertion on is labelled 0;
  5. the first `compare_mc` wrong solutions are also labelled by per-step Monte Carlo
     (Math-Shepherd) to compare cost and labels; they are written to compare.jsonl;
  6. `pairs` further problems (after the n_problems sampled ones, spread over the chunks) each give a
     PAIR: the reference solution as a "correct" record and an MIE corruption of that same solution.
     The two share the image, the question and every step before the corrupted one, so the only
     thing that tells their labels apart is whether that step agrees with the image and the
     question: the PRM must check it rather than learn where in a solution errors tend to sit (with
     unpaired records a late step is mostly labelled 0, whatever it says). No sampling: free.
The algorithms stay generic (ursa.labeling knows steps and a checker); the world enters only in
the MIE step and in the oracle measurements (label_quality).

Append-only and resumable: after each chunk its records are appended and fsync'ed, then
dualmath.progress.json (written atomically) records the chunk count and the file's byte length. A
rerun truncates the file to that length (dropping a half-written chunk or line) and goes on with
the next chunk; each chunk's randomness is seeded by its index, so a resumed run writes the same
records as an uninterrupted one. Image paths in the records are relative to the problems file's
folder, which dualmath.meta.json names (`image_root`, an absolute path), so the run folder can move
and be read from any working folder.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ursa import io, world
from ursa.answer import judge
from ursa.data import DataError, read_jsonl, record_pixels
from ursa.generate import sample_texts
from ursa.labeling import bel, correct_record, make_record, mie_record, per_step_mc, validate_record
from ursa.mie import corrupt
from ursa.oracle import oracle_steps_of
from ursa.prm import ANSWER_MARK, STEP_TAG, split_steps

SAMPLE_TEMPERATURE, SAMPLE_TOP_P = 1.0, 0.95   # the paper's incorrect-candidate sampling
PROBE_TEMPERATURE = 0.3                        # the paper's BEL completions per probe
SEED_STRIDE = 1_000_003                        # a prime: (seed, chunk) pairs never share a random stream
RECORDS, PROGRESS, META, COMPARE = "dualmath.jsonl", "dualmath.progress.json", "dualmath.meta.json", "compare.jsonl"


def prefix_text(steps) -> str:
    """The assistant text a probe continues from: the first steps, each followed by a blank line."""
    return "\n\n".join(steps) + "\n\n" if steps else ""


class PolicyCompleter:
    """The batched `complete(requests, n)` of ursa.labeling over the KV-cache sampler: for each
    (problem, prefix steps) request, n completions from the prefix, judged against the problem."""

    def __init__(self, model, tok, base: Path, temperature: float, top_p: float, max_new_tokens: int,
                 batch_size: int, generator: torch.Generator):
        self.model, self.tok, self.base = model, tok, Path(base)
        self.temperature, self.top_p, self.max_new = temperature, top_p, max_new_tokens
        self.batch_size, self.generator = batch_size, generator
        self.spent = 0                   # completions sampled (probes and first samples)
        self.new_tokens = 0
        self.decoded = 0                 # new tokens computed, stopped rows' included (Generation.decoded)
        self._px: dict = {}

    def pixels(self, item) -> torch.Tensor:
        if item["id"] not in self._px:
            self._px[item["id"]] = record_pixels(item, self.base, self.model.cfg.vision)
        return self._px[item["id"]]

    def sample(self, items, prefixes, n, temperature=None, top_p=None) -> list[list[str]]:
        prompts = [self.tok.encode_prompt(it["question"], True, self.model.cfg.vision.num_tokens,
                                          assistant_prefix=p) for it, p in zip(items, prefixes)]
        px = torch.stack([self.pixels(it) for it in items])
        texts, gens = sample_texts(self.model, self.tok, prompts, px, num_samples=n,
                                   batch_size=max(1, self.batch_size // n), max_new_tokens=self.max_new,
                                   temperature=self.temperature if temperature is None else temperature,
                                   top_p=self.top_p if top_p is None else top_p, generator=self.generator)
        self.new_tokens += sum(int(g.lengths.sum()) for g in gens)
        self.decoded += sum(g.decoded for g in gens)
        return texts

    def __call__(self, requests, n) -> list[list[bool]]:
        if not requests:
            return []
        items = [it for it, _ in requests]
        prefixes = [prefix_text(st) for _, st in requests]
        texts = self.sample(items, prefixes, n)
        self.spent += n * len(requests)
        return [[judge(p + t, it["answer"], it.get("choices"))[1] for t in ts]
                for it, p, ts in zip(items, prefixes, texts)]


def _new_stats() -> dict:
    return {"chunks": 0, "bytes": 0, "problems": 0, "samples": 0, "sampled_correct": 0,
            "unparsable": 0, "bel": 0, "bel_unsolved": 0, "mie": 0, "correct": 0, "pairs": 0,
            "bel_completions": 0, "per_step_mc_equivalent": 0, "first_error_hist": {},
            "compare": {"solutions": 0, "bel_completions": 0, "mc_completions": 0, "agree": 0}}


def _problems(path: Path, n: int) -> list[dict]:
    items = read_jsonl(path, required=("id", "image", "answer"))[:n]
    for it in items:
        if "question" not in it:          # conversation records carry the question in the human turn
            try:
                it["question"] = it["conversations"][0]["value"].replace("<image>\n", "")
            except (KeyError, IndexError, TypeError, AttributeError):
                raise DataError(f'{it["_where"]}: no "question" and no human turn to take it from') from None
    return items


def _mie_kind(kind: str, problem) -> str:
    """The corruption kind for a problem: "option" needs choices, so a free-form problem gets "perception"."""
    return kind if kind != "option" or problem.choices else "perception"


def _parse(text: str) -> Optional[tuple[list, str]]:
    """(steps, answer) of a sampled solution, or None when it has no steps, no answer line, or a
    step holding the tag or an answer mark (it could not be tagged one label per step)."""
    steps, ans = split_steps(text)
    if not steps or ans is None or any(STEP_TAG in x or ANSWER_MARK in x for x in steps):
        return None
    return steps, ans


def label_dualmath(model, tok, problems_path, out_dir, n_problems: int = 300, k_samples: int = 4,
                   n_probe: int = 8, chunk: int = 50, mie_per_problem: float = 0.5, mie_kind: str = "perception",
                   correct_ratio: float = 1 / 3, compare_mc: int = 60, pairs: int = 0, batch_size: int = 256,
                   max_new_tokens: int = 96, seed: int = 0, progress: bool = True) -> dict:
    """Write out_dir/dualmath.jsonl (step-labelled solutions) and return the label statistics.
    pairs: problems after the first n_problems that each add a (reference, MIE of it) pair (step 6
    of the module docstring; toy problems only)."""
    problems_path, out_dir = Path(problems_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = _problems(problems_path, n_problems + pairs)
    items, extra = items[:n_problems], items[n_problems:]
    out, prog_path = out_dir / RECORDS, out_dir / PROGRESS
    io.write_json(out_dir / META, {"image_root": str(problems_path.parent.resolve()),    # absolute: any cwd, any run depth
                                   "problems": str(problems_path.resolve())})
    stats = _new_stats()
    if prog_path.exists() and out.exists():
        stats = io.read_json(prog_path, "labelling progress")
        with open(out, "r+b") as f:                       # drop anything after the last full chunk
            f.truncate(stats["bytes"])
        if stats["compare"]["solutions"] and (out_dir / COMPARE).exists():
            rows = [json.loads(l) for l in (out_dir / COMPARE).read_text(encoding="utf-8").splitlines() if l.strip()]
            io.write_jsonl(out_dir / COMPARE, rows[:stats["compare"]["solutions"]])
    else:
        for f in (out, out_dir / COMPARE):
            if f.exists():
                f.unlink()
    n_chunks = (len(items) + chunk - 1) // chunk
    per_chunk = -(-len(extra) // max(1, n_chunks))      # pair problems per chunk (ceil)
    bar = tqdm(total=len(items), initial=min(len(items), stats["chunks"] * chunk), desc="label",
               disable=not progress, dynamic_ncols=True)
    t0, spent0, tokens0, decoded0 = time.time(), 0, 0, 0
    for c in range(stats["chunks"], n_chunks):
        rng = random.Random(seed * SEED_STRIDE + c)
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed * SEED_STRIDE + c)
        pol = PolicyCompleter(model, tok, problems_path.parent, PROBE_TEMPERATURE, 1.0, max_new_tokens, batch_size, gen)
        part = items[c * chunk:(c + 1) * chunk]
        texts = pol.sample(part, [""] * len(part), k_samples, temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P)
        wrong, right = [], []                             # (item, steps, answer)
        for it, ts in zip(part, texts):
            seen = set()
            for t in ts:
                ok = judge(t, it["answer"], it.get("choices"))[1]
                stats["samples"] += 1
                stats["sampled_correct"] += ok
                parsed = _parse(t)
                stats["unparsable"] += parsed is None
                if parsed is None or t in seen:
                    continue
                seen.add(t)
                (right if ok else wrong).append((it, *parsed))
        recs = []
        res, spent = bel(pol, [(it, st) for it, st, _ in wrong], n_probe)
        stats["bel_completions"] += spent
        for (it, st, ans), r in zip(wrong, res):
            stats["per_step_mc_equivalent"] += n_probe * len(st)
            if r.unsolved:
                stats["bel_unsolved"] += 1
                continue
            k = str(r.first_error)
            stats["first_error_hist"][k] = stats["first_error_hist"].get(k, 0) + 1
            recs.append(make_record(it, st, r.labels, ans, "bel", rid=f"{it['id']}-bel{len(recs)}"))
        todo = max(0, compare_mc - stats["compare"]["solutions"])
        if todo and wrong:
            sub = wrong[:todo]
            mc, mc_spent = per_step_mc(pol, [(it, st) for it, st, _ in sub], n_probe)
            cmp = stats["compare"]
            cmp["solutions"] += len(sub)
            cmp["mc_completions"] += mc_spent
            cmp["bel_completions"] += sum(n_probe * r.probes for r in res[:len(sub)])
            cmp["agree"] += sum(m.labels == r.labels for m, r in zip(mc, res[:len(sub)]))
            with open(out_dir / COMPARE, "a", encoding="utf-8") as f:
                for (it, st, ans), m, r in zip(sub, mc, res):
                    f.write(io.dumps({"problem_id": it["id"], "steps": st, "answer": ans, "mc_labels": m.labels,
                                      "bel_labels": None if r.unsolved else r.labels}, None) + "\n")
        for it, st, ans in right[:round(correct_ratio * len(wrong))]:
            recs.append(correct_record(it, st, ans, rid=f"{it['id']}-ok{len(recs)}"))
        solved = list({it["id"]: it for it, _, _ in right}.values()) or part
        for j in range(round(mie_per_problem * len(part))):
            it = solved[j % len(solved)]
            prob = world.problem_from_id(it["id"])
            recs.append(mie_record(it, prob.steps, lambda _: corrupt(prob, rng, kind=_mie_kind(mie_kind, prob)),
                                   rid=f"{it['id']}-mie{j}"))
        for it in extra[c * per_chunk:(c + 1) * per_chunk]:
            prob = world.problem_from_id(it["id"])
            recs.append(correct_record(it, prob.steps, prob.answer, rid=f"{it['id']}-ref"))
            recs.append(mie_record(it, prob.steps, lambda _: corrupt(prob, rng, kind=_mie_kind(mie_kind, prob)),
                                   rid=f"{it['id']}-pair"))
            stats["pairs"] += 1
        for r in recs:
            r["problem_id"] = r["id"].rsplit("-", 1)[0]
            validate_record(r, r["id"])
            stats[r["source"]] += 1
        with open(out, "a", encoding="utf-8") as f:
            for r in recs:
                f.write(io.dumps(r, None) + "\n")
            f.flush()
            os.fsync(f.fileno())
        stats["chunks"], stats["bytes"], stats["problems"] = c + 1, out.stat().st_size, stats["problems"] + len(part)
        io.write_json(prog_path, stats)
        spent0, tokens0 = spent0 + pol.spent + len(part) * k_samples, tokens0 + pol.new_tokens
        decoded0 += pol.decoded
        dt = max(time.time() - t0, 1e-9)
        stats["speed"] = {"completions_s": spent0 / dt, "new_tokens_s": tokens0 / dt, "decoded_tokens_s": decoded0 / dt}
        io.write_json(prog_path, stats)
        bar.update(len(part))
        bar.set_postfix(completions_s=f"{spent0 / dt:.0f}", new_tok_s=f"{tokens0 / dt:.0f}")
    bar.close()
    return stats


def dualmath_image_root(label_file: Path) -> Path:
    """The folder a DualMath file's image paths are relative to: dualmath.meta.json's image_root
    when it sits beside the file, else the file's own folder."""
    meta = Path(label_file).with_name(META)
    if meta.exists():
        return Path(io.read_json(meta, "DualMath meta file")["image_root"])
    return Path(label_file).parent


def format_label_stats(s: dict) -> str:
    hist = " ".join(f"{k}:{v}" for k, v in sorted(s["first_error_hist"].items(), key=lambda kv: int(kv[0])))
    cmp = s["compare"]
    return "\n".join([
        f"problems {s['problems']}, samples {s['samples']} ({100 * s['sampled_correct'] / max(1, s['samples']):.1f}% correct, "
        f"{s['unparsable']} unparsable)",
        f"records: bel {s['bel']} (+{s['bel_unsolved']} dropped: question unsolved), mie {s['mie']}, correct {s['correct']} "
        f"({s.get('pairs', 0)} of the mie and of the correct records are reference / MIE pairs)",
        f"first-error step histogram (BEL): {hist}",
        f"completions: BEL {s['bel_completions']} vs per-step MC on the same solutions {s['per_step_mc_equivalent']} "
        f"({s['per_step_mc_equivalent'] / max(1, s['bel_completions']):.2f}x)",
        f"measured side by side on {cmp['solutions']} solutions: BEL {cmp['bel_completions']} vs per-step MC "
        f"{cmp['mc_completions']} completions; identical labels on {cmp['agree']}/{cmp['solutions']}"])


# ---- label quality against the world's truth ---------------------------------------------------

def _first_zero(labels) -> Optional[int]:
    """1-based index of the first label 0, None when every label is 1."""
    return next((i + 1 for i, y in enumerate(labels) if y == 0), None)


def compare_first_errors(pairs) -> dict:
    """pairs: (labelled first error, true first error) with None meaning "no wrong step", or a
    true value of "unparsable". -> counts and rates: exact, too early (the label blames a step
    before the true first error, or a step of a solution whose steps are all right), too late
    (after it, or no step blamed although one is wrong), and unparsable by the oracle."""
    c = {"solutions": 0, "exact": 0, "too_early": 0, "too_late": 0, "unparsable": 0}
    for got, true in pairs:
        c["solutions"] += 1
        if true == "unparsable":
            c["unparsable"] += 1
        elif got == true:
            c["exact"] += 1
        elif true is None or (got is not None and got < true):
            c["too_early"] += 1
        else:
            c["too_late"] += 1
    judged = c["solutions"] - c["unparsable"]
    for k in ("exact", "too_early", "too_late"):
        c[f"{k}_rate"] = c[k] / judged if judged else float("nan")
    return c


def oracle_first_error(problem_id: str, steps, answer):
    """The oracle's first wrong step of a toy solution (1-based, None: all right), or "unparsable"."""
    v = oracle_steps_of(world.problem_from_id(problem_id), list(steps), answer)
    return "unparsable" if v is None else v.first_error


def label_quality(label_dir) -> dict:
    """DualMath labels against the oracle step labels of the toy world (ursa/oracle.py):
    BEL's first error on every BEL record, per-step MC's and BEL's on the compared solutions
    (compare.jsonl), and MIE records (their insertion must be the oracle's first error)."""
    label_dir = Path(label_dir)
    recs = read_jsonl(label_dir / RECORDS, allow_empty=True)
    out = {}
    for src in ("bel", "mie", "correct"):
        pairs = [(_first_zero(r["labels"]), oracle_first_error(r["problem_id"], r["steps"], r["answer"]))
                 for r in recs if r["source"] == src]
        out[src] = compare_first_errors(pairs)
    if (label_dir / COMPARE).exists():
        rows = read_jsonl(label_dir / COMPARE, allow_empty=True)
        truth = [oracle_first_error(r["problem_id"], r["steps"], r["answer"]) for r in rows]
        out["compare_mc"] = compare_first_errors([(_first_zero(r["mc_labels"]), t) for r, t in zip(rows, truth)])
        out["compare_bel"] = compare_first_errors([(_first_zero(r["bel_labels"]), t) for r, t in zip(rows, truth)
                                                   if r["bel_labels"] is not None])
    return out


def oracle_relabel(recs: list) -> list:
    """The same DualMath solutions with the toy world's true step labels (ursa/oracle.py) instead
    of BEL / MIE's: the oracle-label PRM ablation. Solutions the oracle cannot parse are dropped."""
    out = []
    for r in recs:
        v = oracle_steps_of(world.problem_from_id(r["problem_id"]), r["steps"], r["answer"])
        if v is not None:
            out.append({**r, "labels": v.labels, "source": f"oracle-{r['source']}"})
    return out
