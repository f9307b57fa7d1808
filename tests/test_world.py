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
from ursa import answer  # noqa: E402
from ursa.oracle import OracleVerdict, misquoted_options, oracle_steps, oracle_steps_of  # noqa: E402
from ursa.mie import corrupt, corruption_kinds, slipped_values  # noqa: E402
from ursa.pretraining import NUM_ATTR_SLOTS, NUM_ATTR_VALUES, attributes  # noqa: E402
from ursa.world import FAMILIES, check, make_problem, make_problems  # noqa: E402
from ursa.world import OPTION_LETTERS as LETTERS  # noqa: E402

N = 150     # problems per split in the sweeps (cycling the families)

# The problems worked out by hand below (train-shapes-0, train-bars-4, ...) were drawn with these knobs,
# wider than the default world's; the rules under test do not depend on the knobs. The sweeps'
# `problems` fixture (module scope, made before this one applies) uses the default knobs.
HAND_WORKED = world.WorldKnobs(shapes_count=(1, 6), shape_value=(1, 5), bars_count=(3, 4), bar_height=(1, 8),
                               grid_side=(2, 6))


@pytest.fixture(autouse=True)
def hand_worked_knobs(monkeypatch):
    monkeypatch.setitem(world.KNOBS, "train", HAND_WORKED)
    monkeypatch.setitem(world.KNOBS, "test", HAND_WORKED)


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
            x = 2 + 12 * i + 4                          # bar i spans x 2 + 12i .. 10 + 12i
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
            opt = re.findall(r"\(([A-D])\) (\w+) is (not )?(\w+)\.", b)
            tall = re.fullmatch(r"The tallest is (\d+) and the shortest is (\d+)\.", b)
            name = re.fullmatch(r"The tallest is the (\w+) bar\.", b)
            if opt:         # the options checked in order, each copied right, up to the one holding the answer
                assert " ".join(f"({x}) {h} is {n}{v}." for x, h, n, v in opt) == b and k == len(p.steps) - 1
                assert "".join(x for x, *_ in opt) == LETTERS[:len(opt)] and opt[-1][0] == p.answer
                value = p.choices[LETTERS.index(p.answer)]
                assert all(h == p.choices[i] and v == value and bool(n) == (h != value)
                           for i, (x, h, n, v) in enumerate(opt)), (p.id, b)
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
                       "Step 6: 2 * 3 = 6.", "Step 7: 6 + 3 + 6 = 15.",
                       "Step 8: (A) 17 is not 15. (B) 18 is not 15. (C) 25 is not 15. (D) 15 is 15."]
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
        a = attributes(p.facts)
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
                     "Step 8: (A) 17 is 17."]


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
    synth.write_world(tmp_path / "toy", n_train=9, n_rl=4, n_test=5, n_hard=3, progress=True)
    assert "reusing" in capsys.readouterr().out
    assert (out / "rl.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="n_rl 4 -> 2"):
        synth.write_world(tmp_path / "toy", n_train=9, n_rl=2, n_test=5, n_hard=3, progress=False)
    synth.write_world(tmp_path / "toy", n_train=9, n_rl=2, n_test=5, n_hard=3, progress=False, force=True)
    assert len(lines("rl.jsonl")) == 2 and len(list((out / "images").glob("*.png"))) == 9 + 2 + 5 + 3


def test_generation_and_perception_mie_are_frozen():
    """Datasets on disk stay identical: problems and default (perception) MIE output are pinned by
    a digest (retaken when option steps began writing the letter in brackets, as the question does,
    and again when they began checking the options in order: only the option steps changed)."""
    import hashlib
    h = hashlib.sha256()
    for split in ("train", "test", "hard"):
        for p in make_problems(60, split):
            h.update(json.dumps({**p.to_dict(), "attributes": attributes(p.facts)}, sort_keys=True).encode())
            h.update(json.dumps(corrupt(p, random.Random(p.seed))).encode())
    assert h.hexdigest() == "f8bbbdd3aa717b55fa866f665050b72c1fb4b75e54fe6d1f08ae0835cc250686"


def test_letters_and_check_use_the_answer_module():
    assert LETTERS == answer.LETTERS[:4] == "ABCD"
    p = make_problem(0, "train", "shapes")              # answer D (15)
    for resp in ("†Answer: D", "†Answer: (D)", "†Answer: 15", "†Answer: A", "Step 1: 15.", "\\boxed{D}"):
        assert check(p, resp) == answer.judge(resp, "D", p.choices)[1]
    assert check(p, "†Answer: 15") and not check(p, "†Answer: 17")


# ---- MIE: arithmetic slips and wrong options -------------------------------------------------

def test_slipped_values_by_hand():
    assert slipped_values(21) == [11, 12, 19, 20, 22, 23, 31]       # +-1, +-2, +-10, 21 -> 12
    assert slipped_values(10) == [0, 8, 9, 11, 12, 20]              # no "01"
    assert slipped_values(36) == [26, 34, 35, 37, 38, 46, 63]
    assert slipped_values(1) == [0, 2, 3, 11] and slipped_values(0) == [1, 2, 10]


def test_arithmetic_corruption_by_hand():
    p = make_problem(3, "train", "grid")        # perimeter: 4 + 2 = 6, 2 * 6 = 12, 12 * 3 = 36
    assert p.steps[2:] == ["Step 3: 4 + 2 = 6.", "Step 4: 2 * 6 = 12.", "Step 5: 12 * 3 = 36."]
    got = {}
    for s in range(400):
        steps, ans, i = corrupt(p, random.Random(s), "arithmetic")
        got[(i, ans)] = steps
    # slip 4 + 2 -> y in {4, 5, 7, 8, 16}: answer 6y; 2 * 6 -> y in {2, 10, 11, 13, 14, 21, 22}: 3y;
    # 12 * 3 -> {26, 34, 35, 37, 38, 46, 63}
    want = {(2, str(6 * y)) for y in (4, 5, 7, 8, 16)} | {(3, str(3 * y)) for y in (2, 10, 11, 13, 14, 21, 22)} \
        | {(4, str(y)) for y in (26, 34, 35, 37, 38, 46, 63)}
    assert set(got) == want
    assert got[(2, "42")] == p.steps[:2] + ["Step 3: 4 + 2 = 7.", "Step 4: 2 * 7 = 14.", "Step 5: 14 * 3 = 42."]

    mc = make_problem(0, "train", "shapes")     # 3 * 2, 1 * 3, 2 * 3, 6 + 3 + 6 = 15 -> D; A 17, B 18, C 25
    got = {}
    for s in range(300):
        steps, ans, i = corrupt(mc, random.Random(s), "arithmetic")
        got.setdefault((i, ans), steps)
    # only slips whose total is an option: 17 (A) or 25 (C) from any equation; 18 (B) is out of reach
    assert set(got) == {(i, a) for i in (3, 4, 5, 6) for a in "AC"}
    assert got[(4, "A")] == mc.steps[:4] + ["Step 5: 1 * 3 = 5.", "Step 6: 2 * 3 = 6.", "Step 7: 6 + 5 + 6 = 17.",
                                            "Step 8: (A) 17 is 17."]


def test_option_corruption_by_hand():
    p = make_problem(0, "train", "shapes")      # (A) 17 (B) 18 (C) 25 (D) 15; A 17 is the nearest distractor
    # D read swapped with another option: the checks stop there, where the option holds 15 as misread
    want = {"A": "Step 8: (A) 15 is 15.", "B": "Step 8: (A) 17 is not 15. (B) 15 is 15.",
            "C": "Step 8: (A) 17 is not 15. (B) 18 is not 15. (C) 15 is 15."}
    seen = {}
    for s in range(300):
        steps, ans, i = corrupt(p, random.Random(s), "option")
        assert i == 7 and steps == p.steps[:7] + [want[ans]]
        seen[ans] = seen.get(ans, 0) + 1
    assert set(seen) == {"A", "B", "C"} and seen["A"] > seen["B"] + seen["C"]     # nearest: 1/2 + 1/6
    t = make_problem(10, "train", "bars")       # tallest: red, option C; colours have no "nearest"
    assert t.choices == ["green", "blue", "red", "orange"] and len(t.steps) == 6
    got = {a: st[-1] for st, a, _ in (corrupt(t, random.Random(s), "option") for s in range(60))}
    # an option after the true one: C is read as orange, so its check says "not" and D reads red
    assert got == {"A": "Step 6: (A) red is red.", "B": "Step 6: (A) green is not red. (B) red is red.",
                   "D": "Step 6: (A) green is not red. (B) blue is not red. (C) orange is not red. (D) red is red."}


def test_corruption_kinds_and_errors():
    free, mc = make_problem(0, "train", "grid"), make_problem(0, "train", "shapes")
    tallest = make_problem(10, "train", "bars")
    assert corruption_kinds(free) == ["perception", "arithmetic"]
    assert corruption_kinds(mc) == ["perception", "arithmetic", "option"]
    assert corruption_kinds(tallest) == ["perception", "option"]
    with pytest.raises(ValueError, match="train-grid-0.*'option'"):
        corrupt(free, random.Random(0), "option")
    with pytest.raises(ValueError, match="train-bars-10.*'arithmetic'"):
        corrupt(tallest, random.Random(0), "arithmetic")
    with pytest.raises(ValueError, match="train-grid-0.*'typo'"):
        corrupt(free, random.Random(0), "typo")
    for p in (free, mc):                        # the default is perception, draw for draw
        assert all(corrupt(p, random.Random(s)) == corrupt(p, random.Random(s), "perception") for s in range(20))


def _kind_of(p, steps, i) -> str:
    if any(r.match(body(steps[i], i)) for r in PERCEPTION):
        return "perception"
    return "option" if body(steps[i], i).startswith("(A) ") else "arithmetic"


def test_any_weights_perception_twice():
    for p, kinds in ((make_problem(0, "train", "shapes"), 3), (make_problem(0, "train", "grid"), 2)):
        n = {"perception": 0, "arithmetic": 0, "option": 0}
        for s in range(600):
            steps, ans, i = corrupt(p, random.Random(s), "any")
            n[_kind_of(p, steps, i)] += 1
        share = n["perception"] / 600
        if kinds == 3:                          # 2 : 1 : 1
            assert 0.42 < share < 0.58 and 0.17 < n["option"] / 600 < 0.33
        else:                                   # 2 : 1, never an option
            assert 0.58 < share < 0.75 and n["option"] == 0


# ---- the oracle --------------------------------------------------------------------------------

def _resp(*bodies, ans=None) -> str:
    text = "\n\n".join(f"Step {k + 1}: {b}" for k, b in enumerate(bodies))
    return text + ("" if ans is None else f"\n\n†Answer: {ans}")


def _labels_ok(v: OracleVerdict) -> bool:
    n, fe = len(v.steps), v.first_error
    return v.labels == ([1] * n if fe is None else [1] * (fe - 1) + [0] * (n - fe + 1)) and (v.reason == "") == (fe is None)


def test_oracle_accepts_every_rendered_solution(problems):
    for p in _all(problems):
        for v in (oracle_steps(p, p.solution), oracle_steps_of(p, p.steps, p.answer)):
            assert v is not None and v.first_error is None and v.labels == [1] * len(p.steps), p.id
            assert v.answer_correct and v.complete and v.reason == "" and v.steps == p.steps


def test_oracle_agrees_with_every_corruption(problems):
    rng = random.Random(1)
    n = {"perception": 0, "arithmetic": 0, "option": 0}
    for p in _all(problems):
        kinds = corruption_kinds(p)
        for kind in ("perception", "arithmetic", "option", "any"):
            if kind != "any" and kind not in kinds:
                with pytest.raises(ValueError):
                    corrupt(p, rng, kind)
                continue
            for _ in range(2):
                steps, ans, i = corrupt(p, rng, kind)
                assert ans != p.answer and steps[:i] == p.steps[:i] and steps[i] != p.steps[i]
                falsities = [k for k, s in enumerate(steps)
                             if (eq := re.fullmatch(r"(\d+(?: [-+*] \d+)+) = (-?\d+)\.", body(s, k)))
                             and eval_chain(eq[1]) != int(eq[2])]
                got = _kind_of(p, steps, i)
                n[got] += 1
                assert falsities == ([i] if got == "arithmetic" else []), (p.id, steps)
                text = "\n\n".join(steps) + "\n\n†Answer: " + ans
                for v in (oracle_steps(p, text), oracle_steps_of(p, steps, ans)):
                    assert v is not None and v.first_error == i + 1, (p.id, kind, steps, v)
                    assert not v.answer_correct and not v.complete and _labels_ok(v)
    assert min(n.values()) > 50


def test_misquoted_options_by_hand_and_on_every_solution_and_option_corruption(problems):
    """Option checks whose option text is not the question's, anywhere in the response (after the
    first error too); none in a rendered solution, at least one in every option corruption."""
    ch = ["8", "9", "7", "11"]
    wrong_first = ("Step 1: There is 1 red circle.\n\nStep 2: 1 * 3 = 3.\n\nStep 3: (A) 8 is not 3. (B) 9 is not 3. "
                   "(C) 7 is not 3. (D) 3 is 3.\n\n†Answer: D")          # the error is elsewhere; (D) is 11
    assert misquoted_options(ch, wrong_first) == ["(D) 3"]
    assert misquoted_options(ch, "Step 4: (A) 8 is not 9. (B) 9 is 9.") == []
    assert misquoted_options(ch, "Step 4: (a) 8 IS NOT 9. (c) 9 is 9. (E) 3 is not 9.") == ["(C) 9", "(E) 3"]
    assert misquoted_options(["red", "green"], "(A) red is not green. (B) Green is green.") == []
    assert misquoted_options(None, "(A) 8 is 8.") == [] and misquoted_options(ch, None) == []
    rng, n = random.Random(2), 0
    for p in _all(problems):
        assert misquoted_options(p.choices, p.solution) == [], p.id
        if p.choices is not None:
            steps, ans, _ = corrupt(p, rng, "option")
            assert misquoted_options(p.choices, "\n\n".join(steps)), (p.id, steps)
            n += 1
    assert n > 20


SHAPES = ["There are 3 circles.", "There is 1 square.", "There are 2 triangles."]     # train-shapes-0
SHAPES_AR = ["3 * 2 = 6.", "1 * 3 = 3.", "2 * 3 = 6.", "6 + 3 + 6 = 15.", "15 is option (D)."]
BARS = ["The orange bar is 7.", "The blue bar is 8."]                                   # train-bars-0
DIFF = ["The blue bar is 2.", "The green bar is 6.", "The red bar is 4.", "The orange bar is 3."]   # train-bars-4
TALL = ["The red bar is 6.", "The green bar is 3.", "The orange bar is 4.", "The blue bar is 1."]   # train-bars-10
SCALED = ["The red bar is 4.", "The blue bar is 6.", "The orange bar is 8.", "The green bar is 3."]  # hard-bars-7
GRID = ["The rectangle is 3 units wide.", "The rectangle is 5 units tall."]             # train-grid-0, unit 4
L_AREA = ["The shape is 7 units wide.", "The shape is 4 units tall.", "The cut-out is 2 units wide.",
          "The cut-out is 3 units tall."]                                               # hard-grid-3, unit 5

# (problem id, step bodies, answer line, first_error, answer_correct, reason), all worked out by hand
S, SA = SHAPES, SHAPES_AR
WRONG = [
    # shapes, multiple choice: 3 circles (2 each), 1 square (3), 2 triangles (3) = 15 -> D (A 17, B 18, C 25)
    ("train-shapes-0", ["There are 4 circles.", *S[1:], "4 * 2 = 8.", *SA[1:3], "8 + 3 + 6 = 17.", "17 is option (A)."],
     "A", 1, False, "step 1 reads 4 circles; the image has 3"),
    ("train-shapes-0", [*S, "3 * 2 = 7.", *SA[1:3], "7 + 3 + 6 = 16.", "16 is closest to option (A)."],
     "A", 4, False, "step 4 states 3 * 2 = 7, which is false (it is 6)"),
    ("train-shapes-0", [*S, *SA[:3], "6 + 3 + 6 = 16.", "16 is closest to option (A)."],
     "A", 7, False, "step 7 states 6 + 3 + 6 = 16, which is false (it is 15)"),
    ("train-shapes-0", [*S, "3 * 3 = 9.", *SA[1:3], "9 + 3 + 6 = 18.", "18 is option (B)."],      # a square's value
     "B", 4, False, "step 4 computes 3 * 3 = 9; next the solution needs 3 * 2 = 6 or 1 * 3 = 3 or 2 * 3 = 6"),
    ("train-shapes-0", [S[0], S[2], "3 * 2 = 6.", "2 * 3 = 6.", "6 + 6 = 12.", "12 is closest to option (D)."],
     "D", 3, True, "step 3 computes 3 * 2 = 6 before reading the squares"),
    ("train-shapes-0", [*S[:2], SA[0], S[2]], "D", 3, True, "step 3 computes 3 * 2 = 6 before reading the triangles"),
    ("train-shapes-0", [*S, SA[0], *SA[2:]], "D", 6, True, "step 6 computes 6 + 3 + 6 = 15 before 1 * 3 = 3, which it uses"),
    ("train-shapes-0", [*S, *SA[:2], *SA[1:]], "D", 6, True, "step 6 computes 1 * 3 = 3, a repeat of an earlier step"),
    ("train-shapes-0", [*S, S[0], *SA], "D", 4, True, "step 4 reads 3 circles, a repeat of an earlier step"),
    ("train-shapes-0", [*S, *SA, S[1]], "D", 9, True, "step 9 reads 1 square, a repeat of an earlier step"),
    ("train-shapes-0", [*S, *SA[:4], "15 is option (A)."], "A", 8, False,
     "step 8 names option A (which is 17); 15 is option D"),
    ("train-shapes-0", [*S, *SA[:4], "15 is option (E)."],
     "E", 8, False, "step 8 names option E (there is no such option); 15 is option D"),
    ("train-shapes-0", [*S, *SA[:4], "16 is option (D)."], "D", 8, True, "step 8 maps 16 to an option; the value is 15"),
    ("train-shapes-0", [*S, *SA[:4], "15 is closest to option (D)."],
     "D", 8, True, "step 8 says 15 is closest to option D; 15 is option D"),
    ("train-shapes-0", [*S, *SA[:3], "15 is option (D)."], "D", 7, True,
     "step 7 names an option before 6 + 3 + 6 = 15, which it uses"),
    ("train-shapes-0", [*S, *SA[:3], "6 + 3 = 9.", "9 + 6 = 15.", "15 is option (D)."],           # partial sums
     "D", 7, True, "step 7 computes 6 + 3 = 9; next the solution needs 6 + 3 + 6 = 15"),
    # the option step as checks in order ((A) 17 (B) 18 (C) 25 (D) 15; the answer is D)
    ("train-shapes-0", [*S, *SA[:4], "(A) 17 is not 15. (C) 25 is not 15. (D) 15 is 15."], "D", 8, True,
     "step 8 checks (C) 25 is not 15; the next option to check is (B)"),                        # skips B
    ("train-shapes-0", [*S, *SA[:4], "(A) 17 is not 15. (B) 15 is 15."], "B", 8, False,
     "step 8 checks (B) 15 is 15; (B) is 18"),                                                  # miscopies B
    ("train-shapes-0", [*S, *SA[:4], "(A) 15 is not 15."], "D", 8, True,
     "step 8 checks (A) 15 is not 15; (A) is 17"),                                              # miscopies A
    ("train-shapes-0", [*S, *SA[:4], "(A) 17 is 15."], "A", 8, False, "step 8 checks (A) 17 is 15, which is false"),
    ("train-shapes-0", [*S, *SA[:4], "(A) 17 is not 17. (B) 18 is not 17."], "D", 8, True,
     "step 8 checks (A) 17 is not 17; the value is 15"),                                        # another value
    ("train-shapes-0", [*S, *SA[:3], "(A) 17 is not 15."], "D", 7, True,
     "step 7 checks an option before 6 + 3 + 6 = 15, which it uses"),
    ("train-shapes-0", [*S, *SA[:4], "(A) 17 is not 15. (B) 18 is not 15. (C) 25 is not 15. (D) 15 is 15.",
                        "(A) 17 is not 15."], "D", 9, True, "step 9 checks (A) 17 is not 15 after the option is found"),
    ("train-grid-0", [*GRID, "3 * 5 = 15.", "4 * 4 = 16.", "15 * 16 = 240.", "(A) 240 is 240."], "240", 6, True,
     "step 6 checks (A) 240 is 240, but the question has no options"),
    ("train-shapes-0", [*S, "3 * 2 + 1 * 3 + 2 * 3 = 15."],                                     # one mixed equation
     "D", 4, True,
     "step 4 computes 3 * 2 + 1 * 3 + 2 * 3 = 15; next the solution needs 3 * 2 = 6 or 1 * 3 = 3 or 2 * 3 = 6"),
    ("train-shapes-0", [*S, "3 * 2 = 6. 1 * 3 = 4.", "2 * 3 = 6."],                             # merged steps
     "D", 4, True, "step 4 states 1 * 3 = 4, which is false (it is 3)"),
    ("train-shapes-0", ["The red bar is 3."], "D", 1, True, "step 1 reads the red bar as 3; the image has no red bar"),
    # shapes, free form: 3 circles (2), 2 triangles (3), no square = 12; green shapes: 1 circle (3), 1 square (5)
    ("train-shapes-1", [S[0], "There are 0 squares."], "12", 2, True,
     "step 2 reads 0 squares, a fact the solution does not state"),
    ("train-shapes-1", [S[0], S[1]], "15", 2, False, "step 2 reads 1 square; the image has none"),
    ("train-shapes-3", ["There is 1 red circle."], "D", 1, True,
     "step 1 reads 1 red circle, a fact the solution does not state"),
    ("train-shapes-3", ["There are 2 circles."], "D", 1, True, "step 1 reads 2 circles, a fact the solution does not state"),
    # bars, sum of two: orange 7 + blue 8 = 15 (red 2 not asked)
    ("train-bars-0", [BARS[0], "The blue bar is 9.", "7 + 9 = 16."], "16", 2, False,
     "step 2 reads the blue bar as 9; the image shows 8"),
    ("train-bars-0", [*BARS, "7 + 8 = 16."], "16", 3, False, "step 3 states 7 + 8 = 16, which is false (it is 15)"),
    ("train-bars-0", [*BARS, "7 + 2 = 9."], "9", 3, False, "step 3 computes 7 + 2 = 9; next the solution needs 7 + 8 = 15"),
    ("train-bars-0", [BARS[0], "7 + 8 = 15."], "15", 2, True, "step 2 computes 7 + 8 = 15 before reading the blue bar"),
    ("train-bars-0", [BARS[0], "The red bar is 2.", BARS[1], "7 + 8 = 15."], "15", 2, True,
     "step 2 reads the red bar as 2, a fact the solution does not state"),
    ("train-bars-0", [BARS[0], BARS[0], BARS[1], "7 + 8 = 15."], "15", 2, True,
     "step 2 reads the orange bar as 7, a repeat of an earlier step"),
    ("train-bars-0", [*BARS, "7 + 8 = 15.", "15 is option (A)."], "A", 4, False,
     "step 4 names option A, but the question has no options"),
    # bars, difference: tallest 6 (green), shortest 2 (blue) -> 4
    ("train-bars-4", [*DIFF, "6 - 2 = 4."], "4", 5, True,
     "step 5 computes 6 - 2 = 4 before the tallest is 6 and the shortest is 2, which it uses"),
    ("train-bars-4", [*DIFF, "The tallest is 6 and the shortest is 3.", "6 - 3 = 3."], "3", 5, False,
     "step 5 states the tallest is 6 and the shortest is 3; next the solution needs the tallest is 6 and the shortest is 2"),
    ("train-bars-4", [*DIFF, "The tallest is 6 and the shortest is 2.", "2 - 6 = -4."], "-4", 6, False,
     "step 6 computes 2 - 6 = -4; next the solution needs 6 - 2 = 4"),
    # bars, tallest: red, option C of (green, blue, red, orange)
    ("train-bars-10", [*TALL, "The tallest is the orange bar.", "orange is option (D)."], "D", 5, False,
     "step 5 states the tallest is the orange bar; next the solution needs the tallest is the red bar"),
    ("train-bars-10", [*TALL, "The tallest is the red bar.", "red is option (A)."], "A", 6, False,
     "step 6 names option A (which is green); red is option C"),
    # bars, scaled total: 4 + 6 + 8 + 3 = 21, 21 * 2 = 42
    ("hard-bars-7", [*SCALED, "4 + 6 + 8 + 3 = 21.", "21 * 2 = 44."], "44", 6, False,
     "step 6 states 21 * 2 = 44, which is false (it is 42)"),
    ("hard-bars-7", [*SCALED, "21 * 2 = 42."], "42", 5, True,
     "step 5 computes 21 * 2 = 42 before 4 + 6 + 8 + 3 = 21, which it uses"),
    # grid, area: 3 * 5 = 15, 4 * 4 = 16, 15 * 16 = 240
    ("train-grid-0", ["The rectangle is 4 units wide.", GRID[1], "4 * 5 = 20.", "4 * 4 = 16.", "20 * 16 = 320."], "320", 1,
     False, "step 1 reads the width as 4 units; the image shows 3"),
    ("train-grid-0", [*GRID, "3 * 5 = 16.", "4 * 4 = 16.", "16 * 16 = 256."], "256", 3, False,
     "step 3 states 3 * 5 = 16, which is false (it is 15)"),
    ("train-grid-0", [*GRID, "3 * 3 = 9."], "144", 3, False,
     "step 3 computes 3 * 3 = 9; next the solution needs 3 * 5 = 15 or 4 * 4 = 16"),
    ("train-grid-0", [GRID[0], "3 * 5 = 15."], "240", 2, True, "step 2 computes 3 * 5 = 15 before reading the height"),
    ("train-grid-0", [*GRID, "3 * 5 = 15.", "15 * 16 = 240."], "240", 4, True,
     "step 4 computes 15 * 16 = 240 before 4 * 4 = 16, which it uses"),
    ("train-grid-0", [*GRID, "3 * 5 = 15.", "3 * 5 = 15."], "240", 4, True,
     "step 4 computes 3 * 5 = 15, a repeat of an earlier step"),
    ("train-grid-0", [*GRID, "The cut-out is 1 unit wide."], "240", 3, True,
     "step 3 reads the cut width as 1 unit; the image has no cut-out"),
    ("train-grid-0", [*GRID, "3 * 5 = 15.", "4 * 4 = 16.", "15 * 16 = 240.", "15 * 16 = 240."], "240", 6, True,
     "step 6 computes 15 * 16 = 240, a repeat of an earlier step"),
    # grid, perimeter: 4 + 2 = 6, 2 * 6 = 12, 12 * 3 = 36; L-shape: 7 * 4 = 28, 2 * 3 = 6, 28 - 6 = 22, 5 * 5, 22 * 25
    ("train-grid-3", ["The rectangle is 4 units wide.", "The rectangle is 2 units tall.", "4 + 2 = 7.", "2 * 7 = 14.",
                      "14 * 3 = 42."], "42", 3, False, "step 3 states 4 + 2 = 7, which is false (it is 6)"),
    ("hard-grid-3", [*L_AREA[:2], "The cut-out is 3 units wide.", L_AREA[3]], "475", 3, False,
     "step 3 reads the cut width as 3 units; the image shows 2"),
    ("hard-grid-3", [*L_AREA, "7 * 4 = 28.", "2 * 3 = 6.", "28 - 6 = 21."], "525", 7, False,
     "step 7 states 28 - 6 = 21, which is false (it is 22)"),
    # grid, multiple choice: 6 * 2 = 12, 4 * 4 = 16, 12 * 16 = 192 -> D (A 96)
    ("train-grid-1", ["The rectangle is 6 units wide.", "The rectangle is 2 units tall.", "6 * 2 = 12.", "4 * 4 = 16.",
                      "12 * 16 = 192.", "192 is option (A)."], "A", 6, False,
     "step 6 names option A (which is 96); 192 is option D"),
]


@pytest.mark.parametrize("pid,bodies,ans,first_error,answer_correct,reason", WRONG)
def test_oracle_on_hand_written_wrong_responses(pid, bodies, ans, first_error, answer_correct, reason):
    p = world.problem_from_id(pid)
    v = oracle_steps(p, _resp(*bodies, ans=ans))
    assert v is not None and (v.first_error, v.reason, v.answer_correct) == (first_error, reason, answer_correct)
    assert not v.complete and _labels_ok(v) and len(v.labels) == len(bodies)
    assert oracle_steps_of(p, v.steps, ans).labels == v.labels


def test_oracle_right_steps_wrong_answer_line_and_incomplete():
    p = make_problem(0, "train", "shapes")
    v = oracle_steps(p, _resp(*SHAPES, *SHAPES_AR, ans="A"))
    assert v.first_error is None and v.labels == [1] * 8 and not v.answer_correct and v.complete
    v = oracle_steps(p, _resp(*SHAPES, *SHAPES_AR))                      # no answer line
    assert v.first_error is None and not v.answer_correct and v.complete
    v = oracle_steps(p, _resp(*SHAPES, *SHAPES_AR[:4], ans="D"))         # stops before the option step
    assert v.first_error is None and v.labels == [1] * 7 and v.answer_correct and not v.complete
    assert oracle_steps_of(p, p.steps, None).answer_correct is False
    assert oracle_steps_of(p, p.steps, "(D)").answer_correct is True


ACCEPTED = [    # harmless variants: every step right
    ("train-shapes-0", _resp(SHAPES[2], SHAPES[0], SHAPES[1], "2 * 3 = 6.", "3 * 2 = 6.", "1 * 3 = 3.", "6 + 6 + 3 = 15.",
                             "15 is option (D).", ans="D"), 8),                   # another reading order
    ("train-shapes-0", "Step 1:   there is 3 circles\n\nStep 2: There are 1 squares .\n\nStep 3: There are 2 triangle\n\n"
                       "Step 4: 3*2=6\n\nStep 5: 3 × 1 = 3.\n\nStep 6: 2 *3 = 6.\n\nStep 7: 6+3+6 = 15.\n\n"
                       "Step 8: 15 is option D\n\n†Answer: D", 8),         # spaces, grammar, case, ×, periods, no brackets
    ("train-shapes-0", _resp(" ".join(SHAPES), "3 * 2 = 6. 1 * 3 = 3.\n2 * 3 = 6.",
                             "6 + 3 + 6 = 15. Step 9: 15 is option (D).", ans="D"), 3),      # merged steps
    ("train-shapes-0", "\n\n".join(f"Step 1: {b}" for b in SHAPES + SHAPES_AR) + "\n\n†Answer: D", 8),  # numbering
    ("train-grid-0", _resp("The shape is 5 units tall.", "The shape is 3 units wide.", "4 * 4 = 16.", "5 * 3 = 15.",
                           "16 * 15 = 240.", ans="240"), 5),                  # independent computations swapped
    ("train-bars-0", _resp(BARS[1], BARS[0], "8 + 7 = 15.", ans="15"), 3),
    ("hard-grid-3", _resp(*L_AREA[::-1], "3 * 2 = 6.", "4 * 7 = 28.", "28 - 6 = 22.", "5 * 5 = 25.", "25 * 22 = 550",
                          ans="550"), 9),
]


@pytest.mark.parametrize("pid,text,n", ACCEPTED)
def test_oracle_accepts_harmless_variants(pid, text, n):
    v = oracle_steps(world.problem_from_id(pid), text)
    assert v is not None and v.first_error is None and v.labels == [1] * n and v.complete and v.answer_correct, v


def test_oracle_unparsable_is_none():
    p = make_problem(0, "train", "shapes")
    for text in ("", "   \n", "†Answer: D", _resp(*SHAPES, "I count them carefully.", ans="D"),
                 "There are 3 circles.\n\n†Answer: D",                       # no step header
                 _resp("There are three circles.", ans="D"), _resp(*SHAPES, "3 * 2 = 6 points.", ans="D"),
                 _resp(*SHAPES, "3 * 2 =", ans="D"), _resp(*SHAPES, "2.5 * 2 = 5.", ans="D"),
                 _resp(*SHAPES, "The tallest bar is 8.", ans="D"), "Let me look.\n\n" + p.solution,
                 p.solution.replace("Step 4: ", "Step 4:\n\nStep 5: ", 1)):
        assert oracle_steps(p, text) is None, text
    assert oracle_steps(p, None) is None and oracle_steps_of(p, [], "D") is None
    assert oracle_steps_of(p, ["There are 3 circles."], "D") is None and oracle_steps_of(p, [""], None) is None


def test_oracle_never_raises_fuzz():
    rng = random.Random(7)
    ps = make_problems(12, "train") + make_problems(12, "hard")
    toks = ["Step ", "Step 1:", "1", "7", "15", "0", " ", "\n", "\n\n", ".", ". ", "*", "+", "-", "=", "×", "There are ",
            "There is ", "circles", "red ", "The ", "bar is ", "rectangle", "cut-out", " is ", "units", "wide", "tall",
            "option ", "A", "E", "(", "closest to ", "The tallest is ", " and the shortest is ", "The total is ",
            "†Answer:", "и", "\\boxed{", "}", "9" * 12, "\t"]
    for it in range(3000):
        p = ps[it % len(ps)]
        if it % 3 == 0:
            s = "".join(rng.choice(toks) for _ in range(rng.randrange(1, 40)))
        elif it % 3 == 1:
            s = list(p.solution)
            for _ in range(rng.randrange(1, 4)):
                s.insert(rng.randrange(len(s)), rng.choice(toks))
            s = "".join(s)
        else:
            s = "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(0, 60)))
        v = oracle_steps(p, s)
        assert v is None or (_labels_ok(v) and v.steps)
    for p in ps:                                # every truncation: only the cut step can be wrong
        text = p.solution
        for j in range(len(text) + 1):
            v = oracle_steps(p, text[:j])
            assert v is None or (_labels_ok(v) and v.first_error in (None, len(v.steps))), (p.id, text[:j])
            if text[:j].endswith(".") and text[j:].startswith("\n\n"):        # a whole step ends here
                assert v is not None and v.first_error is None and v.answer_correct == ("†" in text[:j])


def test_patch_attributes_by_hand():
    from ursa.pretraining import PATCH_SLOTS, patch_attributes
    shapes = {"family": "shapes", "scene": {"shapes": [[0, "circle", "red", 9, 0, 0], [5, "circle", "red", 9, 0, 0],
                                                       [6, "square", "blue", 9, 0, 0]]}}
    pa = patch_attributes(shapes)
    assert len(pa) == 16 and all(len(x) == PATCH_SLOTS for x in pa)
    # cell 0 and 5: red circle (class 1 + 3 * 0 + 0), 2 red circles, 2 circles, 3 shapes; cell 6: blue square
    assert pa[0] == pa[5] == [0, 1, 2, 2, 3]
    assert pa[6] == [0, 1 + 3 * 2 + 1, 1, 1, 3]
    assert pa[1] == [0, 0, 0, 0, 3]
    bars = {"family": "bars", "scene": {"bars": [["green", 3], ["red", 7], ["blue", 3]]}}
    pb = patch_attributes(bars)
    # columns 0..2 hold bars 0..2 (bar i spans x 6 + 10i .. 14 + 10i), column 3 none; every row alike
    assert pb[0] == pb[12] == [1, 2, 3, 2, 3] and pb[1] == [1, 1, 7, 1, 3] and pb[2] == [1, 3, 3, 2, 3]
    assert pb[3] == pb[15] == [1, 0, 0, 0, 3]
    grid = {"family": "grid", "scene": {"w": 5, "h": 3, "cut": {"w": 2, "h": 1, "corner": 0}}}
    assert set(map(tuple, patch_attributes(grid))) == {(2, 5, 3, 2, 1)}


PAIR_IDS = ("train-shapes-0", "train-bars-1", "train-grid-1")


def _pair_records():
    """Three toy records for the clean-pair tests, and a judge's view of them: the index of the first
    step of `steps` that differs from the question's reference solution (None: none differs)."""
    recs = [{"id": pid, "question": world.problem_from_id(pid).question} for pid in PAIR_IDS]
    refs = {r["question"]: world.problem_from_id(r["id"]).steps for r in recs}

    def first_off(q, steps):
        return next((k for k, s in enumerate(steps) if k >= len(refs[q]) or s != refs[q][k]), None)

    return recs, first_off


def test_mie_pair_test_reads_the_corrupted_step(monkeypatch):
    """A judge that marks only the first step differing from the reference finds every corruption at
    its step (reading any other position, e.g. the last, would miss some); a blind one finds none."""
    import torch
    from ursa import prm as prm_mod
    from ursa.results import mie_pair_test
    recs, first_off = _pair_records()

    def knowing(model, tok, questions, tagged, pixels=None, batch_size=64):
        out = []
        for q, t in zip(questions, tagged):
            steps = [s.strip() for s in t.split("†Answer:")[0].split(prm_mod.STEP_TAG)[:-1]]
            first = first_off(q, steps)
            out.append([0.0 if k == first else 1.0 for k in range(len(steps))])
        return out

    px = torch.zeros(len(recs), 3, 4, 4)
    monkeypatch.setattr(prm_mod, "score_steps", knowing)
    res = mie_pair_test(None, None, recs, px)
    kinds = {k for r in recs for k in corruption_kinds(world.problem_from_id(r["id"]))}
    assert set(res) == kinds and sum(e["n"] for e in res.values()) == sum(
        len(corruption_kinds(world.problem_from_id(r["id"]))) for r in recs)
    assert all(e["step_lower"] == 1.0 and e["solution_lower"] == 1.0 for e in res.values())

    def blind(model, tok, questions, tagged, pixels=None, batch_size=64):
        return [[0.5] * t.count(prm_mod.STEP_TAG) for t in tagged]

    monkeypatch.setattr(prm_mod, "score_steps", blind)
    assert all(e["step_lower"] == 0.0 for e in mie_pair_test(None, None, recs, px).values())


def test_policy_pair_test_reads_the_corrupted_step(monkeypatch):
    """The policy-likelihood pair test compares the corrupted step with the reference's SAME step:
    a judge that finds only the first step differing from the reference unlikely gets 1.0 on every
    kind, one that finds every step equally likely 0.0."""
    import torch
    from ursa import evaluate
    from ursa.results import policy_pair_test
    recs, first_off = _pair_records()

    def knowing(policy, tok, questions, steps, pixels, batch_size=32):
        return [[-9.0 if k == first_off(q, st) else -1.0 for k in range(len(st))] for q, st in zip(questions, steps)]

    px = torch.zeros(len(recs), 3, 4, 4)
    monkeypatch.setattr(evaluate, "step_logprobs", knowing)
    res = policy_pair_test(None, None, recs, px)
    assert set(res) == {k for r in recs for k in corruption_kinds(world.problem_from_id(r["id"]))}
    assert all(e["step_lower"] == 1.0 and e["n"] > 0 for e in res.values())
    monkeypatch.setattr(evaluate, "step_logprobs", lambda policy, tok, q, steps, px, batch_size=32:
                        [[-1.0] * len(s) for s in steps])
    assert all(e["step_lower"] == 0.0 for e in policy_pair_test(None, None, recs, px).values())


def test_option_step_by_hand():
    """Checks in order up to the option holding the value; a value that is no option fails every
    check and ends at the nearest option, never the one `avoid` names."""
    from ursa.world import option_step
    assert option_step(["4", "9", "5", "7"], "5") == ("(A) 4 is not 5. (B) 9 is not 5. (C) 5 is 5.", "C")
    assert option_step(["5", "9", "5", "7"], "5") == ("(A) 5 is 5.", "A")            # the first match ends it
    assert option_step(["red", "blue"], "blue") == ("(A) red is not blue. (B) blue is blue.", "B")
    fail = "(A) 4 is not 23. (B) 9 is not 23. (C) 25 is not 23. (D) 21 is not 23."
    assert option_step(["4", "9", "25", "21"], "23") == (fail + " 23 is closest to option (C).", "C")   # 25 and 21 tie: first
    assert option_step(["4", "9", "25", "21"], "23", avoid="C") == (fail + " 23 is closest to option (D).", "D")
