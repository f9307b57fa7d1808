"""Data for the toy recipe: the visual-math world's datasets (and, later, DualMath labelling).

    python synth.py world --out data/toy                       # CPU, a few seconds; 8000/1000/500/500
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


# ---- command line ----------------------------------------------------------------------------

def cmd_world(args):
    out = write_world(args.out, n_train=args.n_train, n_rl=args.n_rl, n_test=args.n_test,
                      n_hard=args.n_hard, image_size=args.image_size, seed=args.seed, force=args.force)
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    print(f"{out}: " + ", ".join(f"{k} {v}" for k, v in m["counts"].items()))


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

    # `label` (DualMath: BEL + MIE with a policy) is added here by train-side code.
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        raise SystemExit(f"synth.py {args.command}: {e}")


if __name__ == "__main__":
    main()
