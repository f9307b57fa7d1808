"""Writing the toy world's datasets: `write_world(out_dir, ...)` (run by `python synth.py world`).

Files, in the project's record formats (JSONL, UTF-8; "image" is relative to the file's folder;
images are PNG under images/):

    captions.jsonl    {"id", "image", "conversations": [human "<image>\\nDescribe the image.",
                       gpt caption], "attributes", "patch_attributes"}   (alignment; vision pretraining)
    text.jsonl        {"id", "text_question", "solution"}         (text-only LM pretraining)
    cot_train.jsonl   {"id", "image", "conversations": [human "<image>\\n" + question, gpt solution],
                       "answer", "choices", "steps", "perception_steps", "facts"}      (SFT)
    rl.jsonl, test.jsonl, test_hard.jsonl
                      {"id", "image", "question", "answer", "choices" (multiple choice only),
                       "steps", "perception_steps", "family"}
    manifest.json     the arguments, the world's knobs, the counts and a few statistics

captions/text/cot_train share the train problems (and images) with seeds [base, base + n_train);
rl.jsonl uses the next n_rl train seeds, so RL prompts never repeat an SFT problem; test and hard
use seeds [base, base + n) of their own splits' random streams; base = seed * SEED_STRIDE.
The folder is built as `<out>.tmp` and swapped in at the end (ursa.io.atomic_dir): a killed run
leaves no half dataset and no stray folder after the next run; rerunning with the same arguments
reuses the folder.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tqdm import tqdm

from ursa import io, world
from ursa.data import conversation_turns, read_jsonl
from ursa.pretraining import attributes, patch_attributes
from ursa.tokenizer import Tokenizer, train_toy_tokenizer

SEED_STRIDE = 10_000_000        # problem seeds of --seed s start at s * SEED_STRIDE


FORMAT = 5      # bumped whenever the records or images change (2: patch_attributes; 3: bars aligned to patches;
                #   4: option steps write the letter as the question does, "15 is option (D).";
                #   5: option steps check the options in order, "(A) 17 is not 15. (B) 15 is 15.")


def _world_signature(image_size: int) -> dict:
    """What the generated data depends on besides the counts: the record format, knobs, image size."""
    return {"format": FORMAT, "image_size": image_size, "families": list(world.FAMILIES),
            "knobs": {s: dataclasses.asdict(k) for s, k in world.KNOBS.items()}}


def _jsonable(x):
    """Tuples (from the knobs dataclass) become lists, as they come back from JSON."""
    return json.loads(json.dumps(x))


def _caption_record(p: world.Problem, image: str) -> dict:
    return {"id": p.id, "image": image,
            "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                              {"from": "gpt", "value": p.caption}],
            "attributes": attributes(p.facts), "patch_attributes": patch_attributes(p.facts)}


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
    io.recover_dir(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.exists() and not force:
        if not manifest_path.exists():
            raise ValueError(f"{out} exists but has no manifest.json; pass --force to overwrite it")
        old = io.read_json(manifest_path, "dataset manifest")
        if old.get("args") == args and old.get("world") == sig:
            if progress:
                print(f"reusing {out}")
            return out
        diff = [f"{k} {old.get('args', {}).get(k)!r} -> {v!r}" for k, v in args.items()
                if old.get("args", {}).get(k) != v]
        if old.get("world") != sig:
            diff.append("the world's knobs or the record format changed (ursa/world.py, ursa/toydata.py)")
        raise ValueError(f"{out} was written with other arguments ({'; '.join(diff)}); "
                         f"pass --force to overwrite it")

    base = seed * SEED_STRIDE
    with io.atomic_dir(out) as tmp:
        _write_into(tmp, base, n_train, n_rl, n_test, n_hard, image_size, args, sig, progress)
    return out


def _write_into(tmp: Path, base: int, n_train: int, n_rl: int, n_test: int, n_hard: int, image_size: int,
                args: dict, sig: dict, progress: bool):
    (tmp / "images").mkdir()
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
    io.write_jsonl(tmp / "captions.jsonl", [_caption_record(p, img(p)) for p in cot])
    io.write_jsonl(tmp / "text.jsonl", [{"id": p.id, "text_question": p.text_question,
                                       "solution": p.solution} for p in cot])
    io.write_jsonl(tmp / "cot_train.jsonl", [_cot_record(p, img(p)) for p in cot])
    for name, ps in (("rl", rl), ("test", test), ("test_hard", hard)):
        io.write_jsonl(tmp / f"{name}.jsonl", [_problem_record(p, img(p)) for p in ps])
    counts = {"captions": len(cot), "text": len(cot), "cot_train": len(cot), "rl": len(rl),
              "test": len(test), "test_hard": len(hard), "images": len(cot) + len(rl) + len(test) + len(hard)}
    manifest = {"args": args, "world": sig, "counts": counts,
                "stats": {"train": _stats(cot), "test": _stats(test), "hard": _stats(hard)}}
    io.write_json(tmp / "manifest.json", manifest, indent=2)


def world_tokenizer(path: Path, data_dir: Path, vocab_size: int) -> Tokenizer:
    """The run's toy BPE at `path`, trained once on every text of the world's datasets (the chat
    template included, so its phrases merge like the data's own), then read back from the file."""
    path = Path(path)
    if path.exists():
        return Tokenizer.from_file(path)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok
