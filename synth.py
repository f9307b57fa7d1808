"""Data for the toy recipe: the visual-math world's datasets, and DualMath labelling (Stage II).

    python synth.py world --out data/toy                       # CPU, a few seconds; 8000/1000/500/500
    python synth.py label --run runs/toy --data data/toy       # DualMath from the SFT policy (BEL + MIE)
    python synth.py world --out data/toy --n-train 200 --n-rl 50 --n-test 50 --n-hard 50
    python synth.py world --out data/toy --n-train 16000 --force   # overwrite with other arguments

`world` writes, in DESIGN.md's record formats (JSONL, UTF-8; "image" is relative to the file's
folder; images are PNG under images/):

    captions.jsonl    {"id", "image", "conversations": [human "<image>\\nDescribe the image.",
                       gpt caption], "attributes"}                  (alignment; ViT pretraining)
    text.jsonl        {"id", "text_question", "solution"}         (text-only LM pretraining)
    cot_train.jsonl   {"id", "image", "conversations": [human "<image>\\n" + question, gpt solution],
                       "answer", "choices", "steps", "perception_steps", "facts"}      (SFT)
    rl.jsonl, test.jsonl, test_hard.jsonl
                      {"id", "image", "question", "answer", "choices" (multiple choice only),
                       "steps", "perception_steps", "family"}
    manifest.json     the arguments, the world's knobs, the counts and a few statistics

captions/text/cot_train share the train problems (and images) with seeds [base, base + n_train);
rl.jsonl uses the next n_rl train seeds, so RL prompts never repeat an SFT problem; test and hard
use seeds [base, base + n) of their own splits' random streams; base = seed * 10_000_000.
A run writes into a temporary folder renamed at the end (a killed run leaves no half dataset);
rerunning with the same arguments reuses the folder. Reading the files back is ursa/data.py's job
(`read_jsonl`, `load_image`: `file:line: why` errors).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from ursa import world

SEED_STRIDE = 10_000_000        # problem seeds of --seed s start at s * SEED_STRIDE


def _world_signature(image_size: int) -> dict:
    """What the generated data depends on besides the counts: knobs and image size."""
    return {"image_size": image_size, "families": list(world.FAMILIES),
            "knobs": {s: dataclasses.asdict(k) for s, k in world.KNOBS.items()}}


def _jsonable(x):
    """Tuples (from the knobs dataclass) become lists, as they come back from JSON."""
    return json.loads(json.dumps(x))


def _caption_record(p: world.Problem, image: str) -> dict:
    return {"id": p.id, "image": image,
            "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                              {"from": "gpt", "value": p.caption}],
            "attributes": p.attributes}


def _cot_record(p: world.Problem, image: str) -> dict:
    return {"id": p.id, "image": image,
            "conversations": [{"from": "human", "value": "<image>\n" + p.question},
                              {"from": "gpt", "value": p.solution}],
            "answer": p.answer, "choices": p.choices, "steps": p.steps,
            "perception_steps": p.perception_steps, "facts": p.facts}


def _problem_record(p: world.Problem, image: str) -> dict:
    r = {"id": p.id, "image": image, "question": p.question, "answer": p.answer}
    if p.choices is not None:
        r["choices"] = p.choices
    r.update(steps=p.steps, perception_steps=p.perception_steps, family=p.family)
    return r


def _stats(problems: list) -> dict:
    """Average solution length (characters) per family and the fraction of multiple choice."""
    out = {"solution_chars": {}, "mc_fraction": round(sum(p.choices is not None for p in problems)
                                                      / max(1, len(problems)), 4)}
    for fam in world.FAMILIES:
        ps = [p for p in problems if p.family == fam]
        if ps:
            out["solution_chars"][fam] = round(sum(len(p.solution) for p in ps) / len(ps), 1)
    return out


def _write_jsonl(path: Path, records: list):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_world(out_dir, n_train: int = 8000, n_rl: int = 1000, n_test: int = 500, n_hard: int = 500,
                image_size: int = world.IMAGE_SIZE, seed: int = 0, force: bool = False,
                progress: bool = True) -> Path:
    """Write the toy world's datasets to out_dir (see the module docstring) and return its path.

    Same arguments as an existing manifest -> reuse (prints "reusing OUT"); different arguments or a
    folder without a manifest -> ValueError unless force=True (then the folder is replaced)."""
    out = Path(out_dir)
    for name, n in (("n_train", n_train), ("n_rl", n_rl), ("n_test", n_test), ("n_hard", n_hard)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if image_size < 12:
        raise ValueError(f"image_size must be >= 12, got {image_size}")
    args = {"n_train": n_train, "n_rl": n_rl, "n_test": n_test, "n_hard": n_hard,
            "image_size": image_size, "seed": seed}
    sig = _jsonable(_world_signature(image_size))
    manifest_path = out / "manifest.json"
    if out.exists() and not force:
        if not manifest_path.exists():
            raise ValueError(f"{out} exists but has no manifest.json; pass --force to overwrite it")
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if old.get("args") == args and old.get("world") == sig:
            print(f"reusing {out}")
            return out
        diff = [f"{k} {old.get('args', {}).get(k)!r} -> {v!r}" for k, v in args.items()
                if old.get("args", {}).get(k) != v]
        if old.get("world") != sig:
            diff.append("the world's knobs changed (ursa/world.py)")
        raise ValueError(f"{out} was written with other arguments ({'; '.join(diff)}); "
                         f"pass --force to overwrite it")

    base = seed * SEED_STRIDE
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    plan = [("train", base, n_train), ("train", base + n_train, n_rl), ("test", base, n_test),
            ("hard", base, n_hard)]
    groups = []
    with tqdm(total=n_train + n_rl + n_test + n_hard, desc="world", disable=not progress) as bar:
        for split, start, n in plan:
            ps = []
            for s in range(start, start + n):
                p = world.make_problem(s, split, world.FAMILIES[s % len(world.FAMILIES)], image_size)
                p.image.save(tmp / "images" / f"{p.id}.png", format="PNG")
                ps.append(p)
                bar.update(1)
            groups.append(ps)
    cot, rl, test, hard = groups
    img = lambda p: f"images/{p.id}.png"    # noqa: E731
    _write_jsonl(tmp / "captions.jsonl", [_caption_record(p, img(p)) for p in cot])
    _write_jsonl(tmp / "text.jsonl", [{"id": p.id, "text_question": p.text_question,
                                       "solution": p.solution} for p in cot])
    _write_jsonl(tmp / "cot_train.jsonl", [_cot_record(p, img(p)) for p in cot])
    for name, ps in (("rl", rl), ("test", test), ("test_hard", hard)):
        _write_jsonl(tmp / f"{name}.jsonl", [_problem_record(p, img(p)) for p in ps])
    counts = {"captions": len(cot), "text": len(cot), "cot_train": len(cot), "rl": len(rl),
              "test": len(test), "test_hard": len(hard), "images": len(cot) + len(rl) + len(test) + len(hard)}
    manifest = {"args": args, "world": sig, "counts": counts,
                "stats": {"train": _stats(cot), "test": _stats(test), "hard": _stats(hard)}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    if out.exists():                        # force: replace the old folder
        trash = out.parent / f".{out.name}.old{os.getpid()}"
        out.rename(trash)
        shutil.rmtree(trash)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


# ---- DualMath labelling (Stage II) ---------------------------------------------------------------
#
# From an SFT run: sample K solutions per training problem (T = 1.0, top-p 0.95, as the paper);
# wrong ones -> Binary Error Locating (ursa.labeling.bel) with N completions per probe at T = 0.3;
# correct ones -> about one third as many records with every step correct; MIE -> the toy world's
# `corrupt` on the problem's reference solution: one perception fact replaced by a neighbouring
# value and every later step RECOMPUTED from it (deterministic and always coherent; letting the
# policy continue would also work but adds sampling noise and cost); every step from the insertion
# on is labelled incorrect. MIE runs on mie_per_problem x the chunk's problems (default 0.5, which
# with the default sampling gives roughly the paper's 302K : 773K MIE : BEL proportion).
#
# Append-only and resumable: problems are processed in chunks; after each chunk its records are
# appended and fsync'ed, then dualmath.progress.json records the chunk count and the file's byte
# length. A rerun truncates the file to that length (dropping a half-written chunk or line) and goes
# on with the next chunk; each chunk's randomness is seeded by its index, so a resumed run writes the
# same records as an uninterrupted one.

def _prefix_text(steps) -> str:
    return "\n\n".join(steps) + "\n\n" if steps else ""


class PolicyCompleter:
    """The batched `complete(requests, n)` of ursa.labeling over the KV-cache sampler."""

    def __init__(self, model, tok, base: Path, temperature: float, top_p: float, max_new_tokens: int,
                 batch_size: int, generator):
        self.model, self.tok, self.base = model, tok, Path(base)
        self.temperature, self.top_p, self.max_new = temperature, top_p, max_new_tokens
        self.batch_size, self.generator = batch_size, generator
        self.spent = 0
        self._px = {}

    def pixels(self, item):
        if item["id"] not in self._px:
            from ursa.data import image_path, load_image
            from ursa.vision import preprocess
            self._px[item["id"]] = preprocess(load_image(image_path(item, self.base), item.get("_where", item["id"])),
                                              self.model.cfg.vision)
        return self._px[item["id"]]

    def sample(self, items, prefixes, n, temperature=None, top_p=None):
        import torch
        from ursa.generate import sample_texts
        prompts = [self.tok.encode_prompt(it["question"], True, self.model.cfg.vision.num_tokens,
                                          assistant_prefix=p) for it, p in zip(items, prefixes)]
        px = torch.stack([self.pixels(it) for it in items])
        texts, _ = sample_texts(self.model, self.tok, prompts, px, num_samples=n,
                                batch_size=max(1, self.batch_size // n), max_new_tokens=self.max_new,
                                temperature=self.temperature if temperature is None else temperature,
                                top_p=self.top_p if top_p is None else top_p, generator=self.generator)
        return texts

    def __call__(self, requests, n):
        from ursa.answer import extract_answer, is_equiv
        if not requests:
            return []
        items = [it for it, _ in requests]
        prefixes = [_prefix_text(st) for _, st in requests]
        texts = self.sample(items, prefixes, n)
        self.spent += n * len(requests)
        return [[is_equiv(extract_answer(p + t), str(it["answer"]), it.get("choices")) for t in ts]
                for it, p, ts in zip(items, prefixes, texts)]


def label_dualmath(model, tok, problems_path, out_dir, n_problems: int = 300, k_samples: int = 4,
                   n_probe: int = 8, chunk: int = 50, mie_per_problem: float = 0.5, correct_ratio: float = 1 / 3,
                   compare_mc: int = 60, batch_size: int = 256, max_new_tokens: int = 96, seed: int = 0,
                   progress: bool = True) -> dict:
    """Write out_dir/dualmath.jsonl (step-labelled solutions) and return the label statistics."""
    import random
    import torch
    from ursa.answer import extract_answer, is_equiv
    from ursa.data import read_jsonl
    from ursa.labeling import bel, correct_record, make_record, mie_record, per_step_mc, validate_record
    from ursa.prm import ANSWER_MARK, STEP_TAG, split_steps

    problems_path, out_dir = Path(problems_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = read_jsonl(problems_path, required=("id", "image", "answer", "steps"))[:n_problems]
    rel = os.path.relpath(problems_path.parent, out_dir)
    for it in items:
        if "question" not in it:      # conversation records carry the question in the human turn
            it["question"] = it["conversations"][0]["value"].replace("<image>\n", "")
    out, prog_path = out_dir / "dualmath.jsonl", out_dir / "dualmath.progress.json"
    stats = {"chunks": 0, "bytes": 0, "problems": 0, "samples": 0, "sampled_correct": 0,
             "unparsable": 0, "bel": 0, "bel_unsolved": 0, "mie": 0, "correct": 0,
             "bel_completions": 0, "per_step_mc_equivalent": 0, "first_error_hist": {},
             "compare": {"solutions": 0, "bel_completions": 0, "mc_completions": 0, "agree": 0}}
    if prog_path.exists():
        stats = json.loads(prog_path.read_text())
        with open(out, "r+b") as f:                       # drop anything after the last full chunk
            f.truncate(stats["bytes"])
    elif out.exists():
        out.unlink()
    n_chunks = (len(items) + chunk - 1) // chunk
    bar = tqdm(total=len(items), initial=min(len(items), stats["chunks"] * chunk), desc="label",
               disable=not progress, dynamic_ncols=True)
    t0, spent0 = time.time(), 0
    for c in range(stats["chunks"], n_chunks):
        rng = random.Random(seed * 1_000_003 + c)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + c)
        pol = PolicyCompleter(model, tok, problems_path.parent, 0.3, 1.0, max_new_tokens, batch_size, gen)
        part = items[c * chunk:(c + 1) * chunk]
        texts = pol.sample(part, [""] * len(part), k_samples, temperature=1.0, top_p=0.95)
        wrong, right = [], []                             # (item, steps, answer)
        for it, ts in zip(part, texts):
            seen = set()
            for t in ts:
                steps, ans = split_steps(t)
                if any(STEP_TAG in x or ANSWER_MARK in x for x in steps):
                    steps = []                            # a stray tag / answer mark inside a step
                ok = is_equiv(extract_answer(t), str(it["answer"]), it.get("choices"))
                stats["samples"] += 1
                stats["sampled_correct"] += ok
                if not steps or ans is None or t in seen:
                    stats["unparsable"] += not steps or ans is None
                    continue
                seen.add(t)
                (right if ok else wrong).append((it, steps, ans))
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
        # per-step MC on the first wrong solutions, to compare cost and labels with BEL
        todo = max(0, compare_mc - stats["compare"]["solutions"])
        if todo and wrong:
            sub = wrong[:todo]
            mc, mc_spent = per_step_mc(pol, [(it, st) for it, st, _ in sub], n_probe)
            cmp = stats["compare"]
            cmp["solutions"] += len(sub)
            cmp["mc_completions"] += mc_spent
            cmp["bel_completions"] += sum(n_probe * r.probes for r in res[:len(sub)])
            cmp["agree"] += sum(m.labels == r.labels for m, r in zip(mc, res[:len(sub)]))
        n_correct = round(correct_ratio * len(wrong))
        for it, st, ans in right[:n_correct]:
            recs.append(correct_record(it, st, ans, rid=f"{it['id']}-ok{len(recs)}"))
        solved = list({it["id"]: it for it, _, _ in right}.values()) or part
        for j in range(round(mie_per_problem * len(part))):
            it = solved[j % len(solved)]
            prob = world.problem_from_id(it["id"])
            recs.append(mie_record(it, prob.steps, lambda _: world.corrupt(prob, rng), rid=f"{it['id']}-mie{j}"))
        for r in recs:
            r["image"] = os.path.join(rel, r["image"])
            r["problem_id"] = r["id"].rsplit("-", 1)[0]
            validate_record(r, r["id"])
            stats[r["source"]] += 1
        with open(out, "a", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        stats["chunks"], stats["bytes"], stats["problems"] = c + 1, out.stat().st_size, stats["problems"] + len(part)
        tmp = prog_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=1))
        tmp.replace(prog_path)
        spent0 += pol.spent + len(part) * k_samples
        bar.update(len(part))
        bar.set_postfix(completions_s=f"{spent0 / max(time.time() - t0, 1e-9):.0f}")
    bar.close()
    return stats


def format_label_stats(s: dict) -> str:
    hist = " ".join(f"{k}:{v}" for k, v in sorted(s["first_error_hist"].items(), key=lambda kv: int(kv[0])))
    cmp = s["compare"]
    lines = [
        f"problems {s['problems']}, samples {s['samples']} ({100 * s['sampled_correct'] / max(1, s['samples']):.1f}% correct, "
        f"{s['unparsable']} unparsable)",
        f"records: bel {s['bel']} (+{s['bel_unsolved']} dropped: question unsolved), mie {s['mie']}, correct {s['correct']}",
        f"first-error step histogram (BEL): {hist}",
        f"completions: BEL {s['bel_completions']} vs per-step MC on the same solutions {s['per_step_mc_equivalent']} "
        f"({s['per_step_mc_equivalent'] / max(1, s['bel_completions']):.2f}x)",
        f"measured side by side on {cmp['solutions']} solutions: BEL {cmp['bel_completions']} vs per-step MC "
        f"{cmp['mc_completions']} completions; identical labels on {cmp['agree']}/{cmp['solutions']}"]
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------

def cmd_world(args):
    out = write_world(args.out, n_train=args.n_train, n_rl=args.n_rl, n_test=args.n_test,
                      n_hard=args.n_hard, image_size=args.image_size, seed=args.seed, force=args.force)
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    print(f"{out}: " + ", ".join(f"{k} {v}" for k, v in m["counts"].items()))


def cmd_label(args):
    from ursa.tokenizer import Tokenizer
    from ursa.weights import load_model
    run = Path(args.run)
    model = load_model(run / "sft" / "model").eval()
    tok = Tokenizer.from_file(run / "tokenizer.json")
    stats = label_dualmath(model, tok, Path(args.data) / "cot_train.jsonl", run / "label",
                           n_problems=args.n_problems, k_samples=args.k_samples, n_probe=args.n_probe,
                           compare_mc=args.compare_mc, seed=args.seed)
    print(format_label_stats(stats))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Toy-world datasets and DualMath labelling.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("world", help="write the toy visual-math world's datasets")
    w.add_argument("--out", default="data/toy", help="output folder (default data/toy)")
    w.add_argument("--n-train", type=int, default=8000, help="SFT problems (also captions and text)")
    w.add_argument("--n-rl", type=int, default=1000, help="RL prompts (train stream, after the SFT seeds)")
    w.add_argument("--n-test", type=int, default=500, help="test problems (in distribution)")
    w.add_argument("--n-hard", type=int, default=500, help="hard-split test problems")
    w.add_argument("--image-size", type=int, default=world.IMAGE_SIZE, help="image side in pixels")
    w.add_argument("--seed", type=int, default=0, help=f"world seed: problem seeds start at seed * {SEED_STRIDE}")
    w.add_argument("--force", action="store_true", help="overwrite an existing folder made with other arguments")
    w.set_defaults(func=cmd_world)

    lb = sub.add_parser("label", help="DualMath: sample with the SFT policy, BEL on wrong solutions, MIE, correct")
    lb.add_argument("--run", default="runs/toy", help="run folder with sft/model and tokenizer.json")
    lb.add_argument("--data", default="data/toy", help="world folder (reads cot_train.jsonl)")
    lb.add_argument("--n-problems", type=int, default=300, help="training problems to sample")
    lb.add_argument("--k-samples", type=int, default=4, help="solutions sampled per problem (T=1.0, top-p 0.95)")
    lb.add_argument("--n-probe", type=int, default=8, help="completions per BEL probe (T=0.3)")
    lb.add_argument("--compare-mc", type=int, default=60, help="wrong solutions also labelled by per-step MC")
    lb.add_argument("--seed", type=int, default=0)
    lb.set_defaults(func=cmd_label)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        raise SystemExit(f"synth.py {args.command}: {e}")


if __name__ == "__main__":
    main()
