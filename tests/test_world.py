"""Tests of the toy visual-math world (ursa/world.py) and `synth.py world`.

The checks are independent of the generator's own code paths: facts are recounted from the scene,
read back from the image's pixels, and every equation in a solution is re-evaluated."""
import io
import json
import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ursa import world  # noqa: E402
from ursa.world import (FAMILIES, LETTERS, NUM_ATTR_SLOTS, NUM_ATTR_VALUES, check, corrupt,  # noqa: E402
                        make_problem, make_problems)

N = 150     # problems per split in the sweeps (cycling the families)


@pytest.fixture(scope="module")
def problems():
    return {s: make_problems(N, s) for s in ("train", "test", "hard")}


def _all(problems):
    return [p for ps in problems.values() for p in ps]


def _png(img) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


# ---- independent readers ---------------------------------------------------------------------

PERCEPTION = [
    re.compile(r"^There (?:is|are) (\d+) (?:(red|green|blue) )?(circle|square|triangle)s?\.$"),
    re.compile(r"^The (red|green|blue|orange) bar is (\d+)\.$"),
    re.compile(r"^The (rectangle|shape|cut-out) is (\d+) units? (wide|tall)\.$"),
]


def body(step: str, k: int) -> str:
    prefix = f"Step {k + 1}: "
    assert step.startswith(prefix), step
    return step[len(prefix):]


def eval_chain(expr: str) -> int:
    """'3 * 5 + 2' with * before + and -, integers only (no eval)."""
    toks = expr.split()
    assert len(toks) % 2 == 1 and all(t.isdigit() for t in toks[::2]), expr
    terms, ops = [int(toks[0])], []
    for op, t in zip(toks[1::2], toks[2::2]):
        if op == "*":
            terms[-1] *= int(t)
        else:
            assert op in "+-", expr
            ops.append(op)
            terms.append(int(t))
    out = terms[0]
    for op, t in zip(ops, terms[1:]):
        out = out + t if op == "+" else out - t
    return out


def true_value(p) -> object:
    """The answer recomputed from the scene by a separate, slower formula."""
    f, sc, g = p.facts, p.facts["scene"], p.facts["given"]
    q = f["qtype"]
    if p.family == "shapes":
        cols = g["colours"] or ["red", "green", "blue"]
        return sum(g["values"][kind] for _c, kind, colour, *_ in sc["shapes"] if colour in cols)
    if p.family == "bars":
        h = {c: x for c, x in sc["bars"]}
        if q == "sum2":
            return h[g["pair"][0]] + h[g["pair"][1]]
        if q == "diff":
            return max(h.values()) - min(h.values())
        if q == "tallest":
            return max(h, key=h.get)
        return sum(h.values()) * g["scale"]
    u = g["unit"]
    if q == "perimeter":
        return (2 * sc["w"] + 2 * sc["h"]) * u
    cells = sc["w"] * sc["h"] - (sc["cut"]["w"] * sc["cut"]["h"] if sc["cut"] else 0)
    return cells * u * u


def read_image(p) -> dict:
    """Facts read back from the 48x48 image's pixels."""
    img = p.image
    px = img.load()
    white = (255, 255, 255)
    colour_of = {v: k for k, v in world.RGB.items()}
    if p.family == "shapes":      # every shape covers its cell's centre pixel
        out = {}
        for cell in range(16):
            c = px[(cell % 4) * 12 + 6, (cell // 4) * 12 + 6]
            if c != white:
                out[cell] = colour_of[c]
        return {"colours": out}
    if p.family == "bars":        # scan each bar's centre column upward from the axis
        bars = []
        for i in range(4):
            x = 6 + 10 * i + 4
            c = px[x, 43]
            if c not in colour_of or colour_of[c] in ("grey", "dark"):
                continue
            top = 43
            while px[x, top - 1] == c:
                top -= 1
            bars.append([colour_of[c], (44 - top) // 4])
        return {"bars": bars}
    filled = 0                    # unit cells whose centre is not white
    for i in range(8):
        for j in range(8):
            if px[4 + 5 * i + 3, 4 + 5 * j + 3] != white:
                filled += 1
    return {"cells": filled}


# ---- determinism and streams -----------------------------------------------------------------

def test_deterministic_per_split_and_seed():
    for split in ("train", "test", "hard"):
        for seed in range(12):
            a, b = make_problem(seed, split), make_problem(seed, split)
            assert a.to_dict() == b.to_dict()
            assert _png(a.image) == _png(b.image)
            json.dumps(a.to_dict())                  # serialisable
    # the family argument does not shift the stream: an auto-picked family gives the same problem
    for seed in range(12):
        auto = make_problem(seed, "train")
        assert make_problem(seed, "train", auto.family).to_dict() == auto.to_dict()


def test_splits_are_different_streams_without_id_collisions():
    ids = {s: {p.id for p in make_problems(500, s)} for s in ("train", "test", "hard")}
    assert all(len(v) == 500 for v in ids.values())
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["hard"]) and not (ids["test"] & ids["hard"])
    same = sum(make_problem(s, "train", "bars").facts == make_problem(s, "test", "bars").facts for s in range(100))
    assert same <= 2


def test_make_problems_cycles_families_evenly():
    ps = make_problems(30, "test", start=7)
    assert [p.seed for p in ps] == list(range(7, 37))
    assert all(sum(p.family == f for p in ps) == 10 for f in FAMILIES)


# ---- solutions -------------------------------------------------------------------------------

def test_solution_format_and_check(problems):
    for p in _all(problems):
        assert p.solution == "\n\n".join(p.steps) + "\n\n†Answer: " + p.answer
        assert "<image>" not in p.question and "<|image|>" not in p.question
        for k, s in enumerate(p.steps):
            body(s, k)
        assert check(p, p.solution)
        assert check(p, "Step 1: I think so.\n\n†Answer: " + p.answer)
        assert not check(p, "Step 1: I think so.")


def test_answer_matches_an_independent_formula(problems):
    for p in _all(problems):
        v = true_value(p)
        assert p.facts["value"] == v
        if p.choices is None:
            assert p.answer == str(v)
        else:
            assert p.answer in LETTERS and p.choices[LETTERS.index(p.answer)] == str(v)


def test_perception_steps_state_image_facts_and_arithmetic_is_true(problems):
    for p in _all(problems):
        sc = p.facts["scene"]
        n_per = len(p.perception_steps)
        assert p.perception_steps == list(range(n_per)) and n_per >= 1
        seen = {}
        for k, s in enumerate(p.steps):
            b = body(s, k)
            m = [r.match(b) for r in PERCEPTION]
            if k < n_per:                                   # states one fact of the scene
                if p.family == "shapes":
                    mm = m[0]
                    n, colour, kind = int(mm[1]), mm[2], mm[3]
                    want = sum(1 for _c, kd, col, *_ in sc["shapes"] if kd == kind and (colour is None or col == colour))
                    assert n == want > 0, (p.id, b)
                    assert (colour is None) == (p.facts["qtype"] == "total")
                elif p.family == "bars":
                    mm = m[1]
                    assert int(mm[2]) == dict(sc["bars"])[mm[1]], (p.id, b)
                    seen[mm[1]] = int(mm[2])
                else:
                    mm = m[2]
                    obj = sc["cut"] if mm[1] == "cut-out" else sc
                    assert int(mm[2]) == obj["w" if mm[3] == "wide" else "h"], (p.id, b)
                continue
            assert not any(m), (p.id, b)                   # arithmetic / reasoning steps only
            eq = re.fullmatch(r"(\d+(?: [-+*] \d+)+) = (-?\d+)\.", b)
            if eq:
                assert eval_chain(eq[1]) == int(eq[2]), (p.id, b)
                continue
            opt = re.fullmatch(r"(\w+) is option ([A-D])\.", b)
            tall = re.fullmatch(r"The tallest is (\d+) and the shortest is (\d+)\.", b)
            name = re.fullmatch(r"The tallest is the (\w+) bar\.", b)
            if opt:
                assert p.choices[LETTERS.index(opt[2])] == opt[1] and k == len(p.steps) - 1
            elif tall:
                assert (int(tall[1]), int(tall[2])) == (max(seen.values()), min(seen.values()))
            elif name:
                assert seen[name[1]] == max(seen.values())
            else:
                raise AssertionError(f"{p.id}: unrecognised step {b!r}")


def test_shapes_total_solution_by_hand():
    """One problem checked against a solution written out by hand from its picture."""
    p = make_problem(0, "train", "shapes")
    sc = p.facts["scene"]["shapes"]
    assert p.facts["qtype"] == "total"
    # the picture (see the image): a green and a red triangle, a blue square, a green circle and
    # two blue circles
    assert sorted((kind, colour) for _c, kind, colour, *_ in sc) == [
        ("circle", "blue"), ("circle", "blue"), ("circle", "green"), ("square", "blue"),
        ("triangle", "green"), ("triangle", "red")]
    assert p.question.startswith("Circles are worth 2, squares 3 and triangles 3.")
    assert p.choices == ["17", "18", "25", "15"]
    # 3 * 2 + 1 * 3 + 2 * 3 = 15 -> option D
    assert p.steps == ["Step 1: There are 3 circles.", "Step 2: There is 1 square.",
                       "Step 3: There are 2 triangles.", "Step 4: 3 * 2 = 6.", "Step 5: 1 * 3 = 3.",
                       "Step 6: 2 * 3 = 6.", "Step 7: 6 + 3 + 6 = 15.", "Step 8: 15 is option D."]
    assert p.answer == "D"


# ---- images and attributes -------------------------------------------------------------------

def test_image_shows_the_facts(problems):
    for p in _all(problems):
        assert p.image.size == (48, 48) and p.image.mode == "RGB"
        got = read_image(p)
        sc = p.facts["scene"]
        if p.family == "shapes":
            assert got["colours"] == {cell: colour for cell, _k, colour, *_ in sc["shapes"]}, p.id
        elif p.family == "bars":
            assert got["bars"] == sc["bars"], p.id
        else:
            want = sc["w"] * sc["h"] - (sc["cut"]["w"] * sc["cut"]["h"] if sc["cut"] else 0)
            assert got["cells"] == want, p.id


def test_image_matters():
    ps = make_problems(90, "train")
    imgs = {}
    for p in ps:
        key = json.dumps(p.facts["scene"], sort_keys=True)
        imgs.setdefault(key, set()).add(_png(p.image))
    assert len({b for v in imgs.values() for b in v}) == len(imgs)      # one image per scene
    # the answer cannot be read from the text alone: equal questions, different answers
    by_q = {}
    for p in make_problems(600, "train"):
        by_q.setdefault(p.question, set()).add(p.answer)
    assert any(len(v) > 1 for v in by_q.values())
    # a larger canvas is the same picture scaled
    big = make_problem(3, "train", "bars", image_size=96)
    assert big.image.size == (96, 96) and big.facts == make_problem(3, "train", "bars").facts


def test_attributes_fixed_length_and_range(problems):
    for p in _all(problems):
        a = p.attributes
        assert len(a) == NUM_ATTR_SLOTS and all(isinstance(x, int) and 0 <= x < NUM_ATTR_VALUES for x in a)
        assert a[0] == FAMILIES.index(p.family)
        sc = p.facts["scene"]
        if p.family == "shapes":
            assert sum(a[1:10]) == len(sc["shapes"])
        elif p.family == "bars":
            assert a[1:1 + len(sc["bars"])] == [h for _, h in sc["bars"]]
        else:
            assert a[1:3] == [sc["w"], sc["h"]]


def test_caption_and_text_question_state_the_facts(problems):
    for p in problems["train"]:
        assert p.text_question.endswith(p.question) and p.caption in p.text_question
        if p.family == "bars":
            for c, h in p.facts["scene"]["bars"]:
                assert f"the {c} bar is {h}" in p.caption


# ---- multiple choice -------------------------------------------------------------------------

def test_multiple_choice(problems):
    mc = [p for p in _all(problems) if p.choices is not None]
    assert 0.15 < len(mc) / len(_all(problems)) < 0.5
    for p in mc:
        assert len(p.choices) == 4 and len(set(p.choices)) == 4
        listed = re.findall(r"\(([A-D])\) (\S+)", p.question.split("\nChoices: ")[1])
        assert listed == list(zip(LETTERS, p.choices))
        assert p.choices[LETTERS.index(p.answer)] == str(true_value(p))
        if p.facts["qtype"] != "tallest":
            v = int(p.facts["value"])
            assert all(int(c) >= 0 and c != str(v) for c in p.choices if c != str(v))
            assert all(abs(int(c) - v) <= max(10, 2 * v) for c in p.choices)   # neighbours
        wrong = LETTERS[(LETTERS.index(p.answer) + 1) % 4]
        assert not check(p, "†Answer: " + wrong)


# ---- MIE ---------------------------------------------------------------------------------------

def test_corrupt_is_coherent_and_wrong(problems):
    rng = random.Random(0)
    for p in _all(problems):
        for _ in range(2):
            steps, ans, i = corrupt(p, rng)
            assert ans != p.answer
            assert i <= len(p.perception_steps)        # == : a phantom shape stated last
            assert steps[:i] == p.steps[:i] and steps[i] != p.steps[i]
            bad = "\n\n".join(steps) + "\n\n†Answer: " + ans
            assert not check(p, bad)
            # the misread step is still a perception statement; every equation is still true
            assert any(r.match(body(steps[i], i)) for r in PERCEPTION)
            for k, s in enumerate(steps):
                eq = re.fullmatch(r"(\d+(?: [-+*] \d+)+) = (-?\d+)\.", body(s, k))
                if eq:
                    assert eval_chain(eq[1]) == int(eq[2])
            if p.choices is not None:
                assert ans in LETTERS


def test_corrupt_by_hand():
    p = make_problem(0, "train", "shapes")      # 3 circles (2 each), 1 square (3), 2 triangles (3): 15 = D
    rng = random.Random(5)
    seen = set()
    for _ in range(40):
        steps, ans, i = corrupt(p, rng)
        seen.add((i, steps[i], ans))
    # multiple choice: only misreadings whose total is an option count: 4 circles -> 17 (A),
    # 2 squares -> 18 (B), 3 triangles -> 18 (B); 2 circles -> 13 is not an option
    assert seen == {(0, "Step 1: There are 4 circles.", "A"), (1, "Step 2: There are 2 squares.", "B"),
                    (2, "Step 3: There are 3 triangles.", "B")}
    steps, ans, i = next((s, a, i) for s, a, i in (corrupt(p, random.Random(k)) for k in range(40)) if a == "A")
    assert steps == ["Step 1: There are 4 circles.", "Step 2: There is 1 square.", "Step 3: There are 2 triangles.",
                     "Step 4: 4 * 2 = 8.", "Step 5: 1 * 3 = 3.", "Step 6: 2 * 3 = 6.", "Step 7: 8 + 3 + 6 = 17.",
                     "Step 8: 17 is option A."]


# ---- hard split --------------------------------------------------------------------------------

def test_hard_split_is_harder(problems):
    tr, hd = problems["train"], problems["hard"]

    def mean(xs):
        return sum(xs) / len(xs)
    n_shapes = lambda ps: mean([len(p.facts["scene"]["shapes"]) for p in ps if p.family == "shapes"])  # noqa: E731
    assert n_shapes(hd) > n_shapes(tr) + 3
    assert mean([len(p.steps) for p in hd]) > mean([len(p.steps) for p in tr]) + 1
    num = lambda ps: mean([p.facts["value"] for p in ps if isinstance(p.facts["value"], int)])  # noqa: E731
    assert num(hd) > 1.5 * num(tr)
    assert {"two_colours", "scaled_total", "l_area"} <= {p.facts["qtype"] for p in hd}
    assert not {"two_colours", "scaled_total", "l_area"} & {p.facts["qtype"] for p in tr}


# ---- synth.py world ----------------------------------------------------------------------------

def test_write_world_tiny(tmp_path, capsys):
    import synth
    out = synth.write_world(tmp_path / "toy", n_train=9, n_rl=4, n_test=5, n_hard=3, progress=False)

    def lines(name):
        return [json.loads(x) for x in (out / name).read_text(encoding="utf-8").splitlines()]
    counts = {"captions.jsonl": 9, "text.jsonl": 9, "cot_train.jsonl": 9, "rl.jsonl": 4,
              "test.jsonl": 5, "test_hard.jsonl": 3}
    for name, n in counts.items():
        recs = lines(name)
        assert len(recs) == n, name
        for r in recs:
            if "image" in r:
                assert (out / r["image"]).is_file()
    assert len(list((out / "images").glob("*.png"))) == 9 + 4 + 5 + 3
    cot, rl, test = lines("cot_train.jsonl"), lines("rl.jsonl"), lines("test.jsonl")
    assert not {r["id"] for r in cot} & {r["id"] for r in rl}
    c = cot[0]
    assert c["conversations"][0]["value"].startswith("<image>\n")
    assert c["conversations"][1]["value"].endswith("†Answer: " + c["answer"])
    assert {"answer", "choices", "perception_steps", "facts"} <= set(c)
    cap = lines("captions.jsonl")[0]
    assert cap["conversations"][0]["value"] == "<image>\nDescribe the image." and len(cap["attributes"]) == NUM_ATTR_SLOTS
    assert set(lines("text.jsonl")[0]) == {"id", "text_question", "solution"}
    for r in rl + test:
        assert {"id", "image", "question", "answer", "steps", "perception_steps", "family"} <= set(r)
        assert ("choices" in r) == ("\nChoices: " in r["question"])
        p = world.problem_from_id(r["id"])
        assert p.question == r["question"] and p.answer == r["answer"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["args"]["n_train"] == 9 and m["counts"]["rl"] == 4
    assert not list(tmp_path.glob(".toy*"))                     # no temporary folder left

    capsys.readouterr()
    stamp = (out / "rl.jsonl").stat().st_mtime_ns
    synth.write_world(tmp_path / "toy", n_train=9, n_rl=4, n_test=5, n_hard=3, progress=False)
    assert "reusing" in capsys.readouterr().out
    assert (out / "rl.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="n_rl 4 -> 2"):
        synth.write_world(tmp_path / "toy", n_train=9, n_rl=2, n_test=5, n_hard=3, progress=False)
    synth.write_world(tmp_path / "toy", n_train=9, n_rl=2, n_test=5, n_hard=3, progress=False, force=True)
    assert len(lines("rl.jsonl")) == 2 and len(list((out / "images").glob("*.png"))) == 9 + 2 + 5 + 3
