"""The toy visual-math world: small RGB images whose content is needed to answer, with step-by-step
solutions in URSA's style (URSA, Stage I, "Response style") and MIE corruptions (URSA, Stage II, MIE).

Three families, each drawn with PIL on a 48x48 canvas (4x4 cells of 12 px = one ViT patch each):

    shapes  1-9 circles / squares / triangles in 3 colours on the 4x4 cells; the text gives a value
            per kind; "total value of the shapes" or "of the red shapes" (hard: of two colours)
    bars    3-4 coloured bars on a unit grid (heights 1-9); sum of two bars, tallest - shortest,
            "which bar is the tallest" (multiple choice), total of all bars (hard: times a scale)
    grid    a rectangle on an 8x8 unit grid, the text gives the unit length; area or perimeter
            (hard: the area of an L-shape = bounding rectangle minus a cut-out corner)

A solution is a pure function of the facts AS READ from the image (`render`): perception steps
state one reading each ("Step 1: There are 3 red circles."), arithmetic steps compute from the
readings ("Step 4: 3 * 5 = 15."), and the response ends with "\\n\\n†Answer: X". The
Misinterpretation Insertion Engine (MIE, URSA, Stage II) is then just a re-render with one
reading replaced by a plausible neighbouring wrong value (`corrupt`): everything after the
misread step is recomputed consistently and ends at a wrong answer; `corrupt(..., kind=...)` can
instead slip one equation's result (recomputing after it) or name a wrong option. Shapes solutions
state only the kinds they see (no "There are 0 squares."), so a misread "phantom" shape adds a step
and a count is never misread as 0 (its step would silently vanish); see `misreadings` for the tiers.

    Step 1: There are 3 circles.            <- perception steps (one reading each)
    Step 2: There is 1 triangle.
    Step 3: 3 * 7 = 21.                     <- arithmetic steps
    Step 4: 1 * 8 = 8.
    Step 5: 21 + 8 = 29.
    †Answer: 29                             (steps and the answer line separated by blank lines)

Multiple choice: 4 options (A)-(D) listed in the question as "Choices: (A) 12 (B) 15 ..."; the
distractors are the answers that plausible mistakes produce (a one-off misreading, an arithmetic
slip of +-1, +-2, +-10), and the last step checks the options in order until one holds the value
("Step 7: (A) 20 is not 22. (B) 22 is 22."; see `option_step`).

    from ursa.world import make_problem, make_problems, check
    from ursa.mie import corrupt
    p = make_problem(7, "train")          # deterministic per (split, seed)
    p.image.save("x.png"); print(p.question); print(p.solution)
    steps, answer, first_wrong = corrupt(p, random.Random(0), kind="any")

Difficulty knobs live in `KNOBS` (one `WorldKnobs` per split; "test" shares "train"'s, so the test
set is in distribution): tune them there. The module imports only `ursa.answer` from the package;
the step-level oracle that labels any response to a problem lives in `ursa.oracle`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, asdict
from typing import Optional

from PIL import Image, ImageDraw

from ursa.answer import LETTERS, judge

# ---- constants -------------------------------------------------------------------------------

IMAGE_SIZE = 48                     # default canvas side in px; geometry below is in 48-px units
FAMILIES = ("shapes", "bars", "grid")
SPLITS = ("train", "test", "hard")
KINDS = ("circle", "square", "triangle")
SHAPE_COLOURS = ("red", "green", "blue")
BAR_COLOURS = ("red", "green", "blue", "orange")
OPTION_LETTERS = LETTERS[:4]          # (A)-(D): every multiple-choice problem has 4 options
RGB = {"red": (220, 40, 40), "green": (30, 160, 50), "blue": (40, 80, 220), "orange": (240, 150, 20),
       "grey": (200, 200, 200), "dark": (40, 40, 40)}
GRID_FILLS = ((150, 190, 240), (240, 190, 140), (170, 220, 160))   # light fill of the figure
GRID_UNITS, GRID_PX, GRID_MARGIN = 8, 5, 4    # 8x8 unit grid of 5 px, 4 px margin (48-px coords)
BAR_MAX, BAR_PX, BAR_BASE = 10, 4, 44         # gridlines up to 10 units of 4 px above y = 44
BAR_X0, BAR_PITCH, BAR_W = 2, 12, 8           # bar i spans x in [2 + 12i, 10 + 12i): one bar per 12-px
                                              # patch column, so no patch mixes two bars' colours
MAX_SHAPES = 16                               # one shape per cell of the 4x4 grid



@dataclass(frozen=True)
class WorldKnobs:
    """Difficulty of one split. Ranges are inclusive (lo, hi); a question type listed twice is
    drawn twice as often."""
    shapes_count: tuple = (1, 4)        # shapes on the 4x4 cells (at most MAX_SHAPES)
    shape_value: tuple = (1, 4)         # value of each kind, stated in the text
    shapes_qtypes: tuple = ("total", "colour")
    bars_count: tuple = (3, 3)
    bar_height: tuple = (1, 6)          # at most BAR_MAX
    bar_scale: tuple = (2, 9)           # only for "scaled_total"
    bars_qtypes: tuple = ("sum2", "diff", "tallest", "total")
    grid_side: tuple = (2, 5)           # rectangle / L-shape sides in units (at most GRID_UNITS)
    grid_unit: tuple = (2, 4)           # length of one grid unit in cm, stated in the text
    grid_qtypes: tuple = ("area", "perimeter")
    mc_prob: float = 0.25               # numeric questions asked as multiple choice
    shape_jitter: int = 1               # +- px of a shape's centre inside its cell


_TRAIN = WorldKnobs()
KNOBS = {
    "train": _TRAIN,
    "test": _TRAIN,
    "hard": WorldKnobs(shapes_count=(6, 14), shape_value=(6, 15),
                       shapes_qtypes=("total", "colour", "two_colours", "two_colours"),
                       bars_count=(4, 4), bar_height=(2, 10),
                       bars_qtypes=("sum2", "diff", "tallest", "total", "scaled_total", "scaled_total"),
                       grid_side=(3, 8), grid_unit=(3, 9),
                       grid_qtypes=("area", "perimeter", "l_area", "l_area")),
}


@dataclass
class Problem:
    id: str
    family: str
    split: str
    seed: int
    question: str                       # without any image token; MC options included
    choices: Optional[list]             # option texts for (A)-(D), or None
    answer: str                         # a number as a string, or a letter for multiple choice
    steps: list                         # each with its "Step k: " prefix
    perception_steps: list              # 0-based indices into steps
    facts: dict                         # JSON-serialisable: qtype, scene, given, readings, value
    caption: str
    text_question: str                  # the question with the image facts stated in words
    image: Optional[Image.Image] = field(default=None, repr=False, compare=False)

    @property
    def solution(self) -> str:
        return "\n\n".join(self.steps) + "\n\n†Answer: " + self.answer

    def to_dict(self) -> dict:
        """Every field but the image."""
        d = asdict(self)
        d.pop("image")
        return d


# ---- small text helpers ----------------------------------------------------------------------

def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _there(n: int, what: str) -> str:
    """_there(1, 'red circle') -> 'There is 1 red circle.'"""
    return f"There {'is' if n == 1 else 'are'} {_plural(n, what)}."


def _join(items: list) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'"""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---- readings: the facts a solution reads from the image, in step order -----------------------

def shape_counts(scene: dict) -> dict:
    """{(colour, kind): count} over the placed shapes."""
    c = {(col, k): 0 for col in SHAPE_COLOURS for k in KINDS}
    for _cell, kind, colour, *_ in scene["shapes"]:
        c[(colour, kind)] += 1
    return c


def true_readings(facts: dict) -> list:
    """The correct readings [[key, value], ...] a solution states, in step order."""
    fam, q, scene, given = facts["family"], facts["qtype"], facts["scene"], facts["given"]
    if fam == "shapes":
        c = shape_counts(scene)
        if q == "total":
            return [[k, sum(c[(col, k)] for col in SHAPE_COLOURS)] for k in KINDS]
        return [[f"{col} {k}", c[(col, k)]] for col in given["colours"] for k in KINDS]
    if fam == "bars":
        h = dict((col, ht) for col, ht in scene["bars"])
        order = given["pair"] if q == "sum2" else [col for col, _ in scene["bars"]]
        return [[col, h[col]] for col in order]
    if fam == "grid":
        r = [["width", scene["w"]], ["height", scene["h"]]]
        if scene["cut"] is not None:
            r += [["cut width", scene["cut"]["w"]], ["cut height", scene["cut"]["h"]]]
        return r
    raise ValueError(f"unknown family {fam!r}")


def stated_readings(facts: dict, readings: list) -> list:
    """Indices of the readings that get a perception step, in step order: perception step k
    states readings[stated_readings(...)[k]] (shapes: zero counts are not stated)."""
    if facts["family"] == "shapes":
        return [i for i, (_, n) in enumerate(readings) if n > 0]
    return list(range(len(readings)))


def _valid_readings(facts: dict, readings: list) -> bool:
    """Whether a (possibly misread) set of readings still describes a drawable scene."""
    fam = facts["family"]
    v = dict((k, x) for k, x in readings)
    if fam == "shapes":
        return all(x >= 0 for x in v.values()) and sum(v.values()) <= MAX_SHAPES
    if fam == "bars":
        return all(1 <= x <= BAR_MAX for x in v.values())
    if not all(1 <= x <= GRID_UNITS for x in v.values()):
        return False
    return "cut width" not in v or (v["cut width"] < v["width"] and v["cut height"] < v["height"])


# ---- solutions as a function of the readings --------------------------------------------------

class _Calc:
    """Collects the non-perception steps of one solution. slip = (j, y): the j-th equation (0-based,
    in step order) states the result y instead of its true value, and every later step computes
    from y (an MIE arithmetic slip); slip None -> every result is true."""

    def __init__(self, slip: Optional[tuple] = None):
        self.steps, self.results, self.eq_steps, self.slip = [], [], [], slip

    def eq(self, terms: list, op: str = "+") -> int:
        """Write "a op b ... = r." (op "+" sums all terms, "*" and "-" take two) and return r."""
        r = sum(terms) if op == "+" else terms[0] * terms[1] if op == "*" else terms[0] - terms[1]
        if self.slip is not None and self.slip[0] == len(self.results):
            r = self.slip[1]
        self.results.append(r)
        self.eq_steps.append(len(self.steps))
        self.steps.append(f" {op} ".join(str(t) for t in terms) + f" = {r}.")
        return r

    def say(self, text: str) -> None:
        self.steps.append(text)


def _solve_shapes(q: str, given: dict, readings: list, calc: _Calc) -> tuple:
    """-> (perception step texts, value); the other steps go to calc."""
    per = [_there(n, key) for key, n in readings if n > 0]      # a reader states what it sees
    products = [calc.eq([n, given["values"][key.split()[-1]]], "*") for key, n in readings if n > 0]
    if not products:
        calc.say("The total is 0.")
        return per, 0
    return per, products[0] if len(products) == 1 else calc.eq(products)


def _solve_bars(q: str, given: dict, readings: list, calc: _Calc) -> tuple:
    per = [f"The {col} bar is {h}." for col, h in readings]
    hs = [h for _, h in readings]
    if q in ("sum2", "total", "scaled_total"):
        s = calc.eq(hs)
        return per, calc.eq([s, given["scale"]], "*") if q == "scaled_total" else s
    hi, lo = max(hs), min(hs)
    if q == "diff":
        calc.say(f"The tallest is {hi} and the shortest is {lo}.")
        return per, calc.eq([hi, lo], "-")
    if q == "tallest":                  # on a (misread) tie the leftmost tallest bar is named
        col = next(c for c, h in readings if h == hi)
        calc.say(f"The tallest is the {col} bar.")
        return per, col
    raise ValueError(f"unknown bars question type {q!r}")


def _solve_grid(q: str, given: dict, readings: list, calc: _Calc) -> tuple:
    v = dict((k, x) for k, x in readings)
    w, h, u = v["width"], v["height"], given["unit"]
    what = "rectangle" if q in ("area", "perimeter") else "shape"
    per = [f"The {what} is {_plural(w, 'unit')} wide.", f"The {what} is {_plural(h, 'unit')} tall."]
    if q == "perimeter":                # in units, then scaled by the unit length
        return per, calc.eq([calc.eq([2, calc.eq([w, h])], "*"), u], "*")
    a = calc.eq([w, h], "*")
    if q == "l_area":
        cw, ch = v["cut width"], v["cut height"]
        per += [f"The cut-out is {_plural(cw, 'unit')} wide.", f"The cut-out is {_plural(ch, 'unit')} tall."]
        a = calc.eq([a, calc.eq([cw, ch], "*")], "-")
    elif q != "area":
        raise ValueError(f"unknown grid question type {q!r}")
    uu = calc.eq([u, u], "*")
    return per, calc.eq([a, uu], "*")


_SOLVERS = {"shapes": _solve_shapes, "bars": _solve_bars, "grid": _solve_grid}


def solve(facts: dict, readings: list, slip: Optional[tuple] = None) -> tuple:
    """-> (perception step texts, _Calc with the other steps, value)."""
    calc = _Calc(slip)
    per, value = _SOLVERS[facts["family"]](facts["qtype"], facts["given"], readings, calc)
    return per, calc, value


def render(facts: dict, readings: list, choices: Optional[list] = None, slip: Optional[tuple] = None) -> tuple:
    """The solution a reader who saw `readings` writes (slip: see `_Calc`; None for no slip).

    Returns (steps, perception_steps, answer, value): steps carry their "Step k: " prefix;
    perception_steps are 0-based indices of the steps that state a reading (one per reading, in
    order, always first); answer is str(value), or for multiple choice the letter of the option
    equal to value (if value is no option: the nearest option, with a "closest to" step)."""
    per, calc, value = solve(facts, readings, slip)
    ar, answer = calc.steps, str(value)
    if choices is not None:
        text, answer = option_step(choices, answer)
        ar = ar + [text]
    steps = [f"Step {i + 1}: {s}" for i, s in enumerate(per + ar)]
    return steps, list(range(len(per))), answer, value


def option_step(choices: list, value: str, avoid: Optional[str] = None) -> tuple[str, str]:
    """The multiple-choice step that finds `value` among `choices` -> (step text without its header,
    letter). It checks the options in order and stops at the first one that holds the value:

        option_step(["4", "9", "5", "7"], "5") == ("(A) 4 is not 5. (B) 9 is not 5. (C) 5 is 5.", "C")

    Why not "5 is option (C).": that asks for a lookup from a value to its letter, and the tiny
    decoder never learns it (an SFT policy trained on that wording puts exactly the marginal 1/4 on
    each letter, also on its own training problems; docs/results.md). Checking in order needs only
    a copy of each option (letter -> its text, in reading order) and a comparison next to it.
    A value that is no option (only a corruption reaches one) fails every check and ends at the
    nearest option (not the letter `avoid`): "... (D) 25 is not 23. 23 is closest to option (D)." """
    checks = []
    for letter, c in zip(OPTION_LETTERS, choices):
        if c == value:
            return " ".join(checks + [f"({letter}) {c} is {value}."]), letter
        checks.append(f"({letter}) {c} is not {value}.")
    i = min((j for j in range(len(choices)) if OPTION_LETTERS[j] != avoid),
            key=lambda j: (abs(float(choices[j]) - float(value)), j))
    return " ".join(checks + [f"{value} is closest to option ({OPTION_LETTERS[i]})."]), OPTION_LETTERS[i]


# ---- plausible misreadings (multiple-choice distractors; MIE in ursa/mie.py) ------------------

SLIPS = (-10, -2, -1, 1, 2, 10)         # an arithmetic slip's offsets (besides a digit swap)



def misread(readings: list, i: int, y: int) -> list:
    """The readings with reading i replaced by y (a copy)."""
    r = [list(x) for x in readings]
    r[i][1] = y
    return r


def misreadings(facts: dict, readings: list) -> list:
    """Plausible wrong readings in tiers of decreasing plausibility: [[(i, new_value), ...], ...].

    tier 0: off by one (a count +-1, a bar +-1 or read at an adjacent bar's height, a side +-1);
    tier 1: off by two; tier 2: any other valid value. Every candidate keeps the scene valid."""
    fam = facts["family"]
    hi = {"shapes": MAX_SHAPES, "bars": BAR_MAX, "grid": GRID_UNITS}[fam]
    tiers = [[], [], []]
    for i, (key, x) in enumerate(readings):
        near = {x - 1, x + 1}
        if fam == "shapes" and x > 0:   # a count is never misread as 0: its step would just vanish
            near.discard(0)
        if fam == "bars":               # the adjacent bars of the chart
            chart = [c for c, _ in facts["scene"]["bars"]]
            j = chart.index(key)
            near |= {facts["scene"]["bars"][t][1] for t in (j - 1, j + 1) if 0 <= t < len(chart)}
        for tier, vals in enumerate([near, {x - 2, x + 2}, set(range(0, hi + 1))]):
            for y in sorted(vals - ({0} if fam == "shapes" and x > 0 else set())):
                cand = [list(r) for r in readings]
                cand[i][1] = y
                if y != x and _valid_readings(facts, cand) and all((i, y) not in t for t in tiers):
                    tiers[tier].append((i, y))
    return tiers


# ---- multiple choice -------------------------------------------------------------------------

def _numeric_choices(facts: dict, value: int, rng: random.Random) -> list:
    """The true value and 3 distractors: one from a tier-0 misreading, two from misreadings or
    arithmetic slips (+-1, +-2, +-10); non-negative, distinct, in random order."""
    readings = facts["readings"]
    wrong = set()
    for i, y in misreadings(facts, readings)[0]:
        wrong.add(render(facts, misread(readings, i, y))[3])
    wrong = sorted(x for x in wrong if x != value and x >= 0)
    slips = sorted({value + d for d in SLIPS} - {value} - set(wrong))
    slips = [x for x in slips if x >= 0]
    picked = [rng.choice(wrong)] if wrong else []
    pool = sorted((set(wrong) | set(slips)) - set(picked))
    picked += rng.sample(pool, 3 - len(picked))
    opts = [value] + picked
    rng.shuffle(opts)
    return [str(x) for x in opts]


def _with_choices(question: str, choices: list) -> str:
    return question + "\nChoices: " + " ".join(f"({OPTION_LETTERS[i]}) {c}" for i, c in enumerate(choices))


# ---- scenes: sampling and drawing ------------------------------------------------------------

def _sample_shapes(rng: random.Random, kn: WorldKnobs, q: str) -> tuple:
    n = rng.randint(*kn.shapes_count)
    cells = rng.sample(range(16), n)
    shapes = [[cell, rng.choice(KINDS), rng.choice(SHAPE_COLOURS), rng.randint(8, 10),
               rng.randint(-kn.shape_jitter, kn.shape_jitter), rng.randint(-kn.shape_jitter, kn.shape_jitter)]
              for cell in sorted(cells)]
    scene = {"shapes": shapes}
    values = {k: rng.randint(*kn.shape_value) for k in KINDS}
    present = sorted({s[2] for s in shapes}, key=SHAPE_COLOURS.index)
    colours = []
    if q == "colour":
        colours = [rng.choice(present)]
    elif q == "two_colours":           # at least one of the two is present
        first = rng.choice(present)
        colours = sorted([first, rng.choice([c for c in SHAPE_COLOURS if c != first])], key=SHAPE_COLOURS.index)
    given = {"values": values, "colours": colours}
    worth = f"Circles are worth {values['circle']}, squares {values['square']} and triangles {values['triangle']}."
    ask = f"What is the total value of the {_join(colours) + ' ' if colours else ''}shapes?"
    return scene, given, worth + " " + ask


def _sample_bars(rng: random.Random, kn: WorldKnobs, q: str) -> tuple:
    n = rng.randint(*kn.bars_count)
    cols = rng.sample(BAR_COLOURS, n)
    while True:
        hs = [rng.randint(*kn.bar_height) for _ in cols]
        if q != "tallest" or hs.count(max(hs)) == 1:
            break
    scene = {"bars": [[c, h] for c, h in zip(cols, hs)]}
    given = {"pair": sorted(rng.sample(cols, 2), key=cols.index) if q == "sum2" else [],
             "scale": rng.randint(*kn.bar_scale) if q == "scaled_total" else 1}
    if q == "sum2":
        ask = f"What is the sum of the {given['pair'][0]} and {given['pair'][1]} bars?"
    elif q == "scaled_total":
        ask = f"Each grid unit is worth {given['scale']}. What is the total value of all the bars?"
    else:
        ask = {"diff": "How much taller is the tallest bar than the shortest bar?",
               "tallest": "Which bar is the tallest?",
               "total": "What is the total height of all the bars?"}[q]
    return scene, given, ask


def _sample_grid(rng: random.Random, kn: WorldKnobs, q: str) -> tuple:
    lo, hi = kn.grid_side
    if q == "l_area":
        w, h = rng.randint(max(lo, 2), hi), rng.randint(max(lo, 2), hi)
        cut = {"corner": rng.randrange(4), "w": rng.randint(1, w - 1), "h": rng.randint(1, h - 1)}
    else:
        w, h, cut = rng.randint(lo, hi), rng.randint(lo, hi), None
    scene = {"w": w, "h": h, "x0": rng.randint(0, GRID_UNITS - w), "y0": rng.randint(0, GRID_UNITS - h),
             "cut": cut, "fill": rng.randrange(len(GRID_FILLS))}
    given = {"unit": rng.randint(*kn.grid_unit)}
    what = "rectangle" if cut is None else "shape"
    ask = f"Each grid unit is {given['unit']} cm. What is the {'perimeter' if q == 'perimeter' else 'area'} of the {what}?"
    return scene, given, ask


def draw(facts: dict, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Render the scene (deterministic, no anti-aliasing). Coordinates are designed on a 48-px
    canvas and scaled by image_size / 48."""
    s = image_size / 48
    P = lambda v: int(round(v * s))     # noqa: E731  48-px coordinate -> pixels
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    fam, scene = facts["family"], facts["scene"]
    if fam == "shapes":
        for cell, kind, colour, size, dx, dy in scene["shapes"]:
            cx, cy = (cell % 4) * 12 + 6 + dx, (cell // 4) * 12 + 6 + dy     # cell centre
            r = size / 2
            box = [P(cx - r), P(cy - r), P(cx + r) - 1, P(cy + r) - 1]
            if kind == "circle":
                d.ellipse(box, fill=RGB[colour])
            elif kind == "square":
                q = r - 0.5
                d.rectangle([P(cx - q), P(cy - q), P(cx + q) - 1, P(cy + q) - 1], fill=RGB[colour])
            else:
                d.polygon([(P(cx), P(cy - r)), (P(cx - r), P(cy + r) - 1), (P(cx + r) - 1, P(cy + r) - 1)],
                          fill=RGB[colour])
    elif fam == "bars":
        for k in range(1, BAR_MAX + 1):                         # horizontal gridlines
            d.line([P(1), P(BAR_BASE - BAR_PX * k), P(47), P(BAR_BASE - BAR_PX * k)], fill=RGB["grey"])
        for i, (colour, h) in enumerate(scene["bars"]):
            x = BAR_X0 + BAR_PITCH * i
            d.rectangle([P(x), P(BAR_BASE - BAR_PX * h), P(x + BAR_W) - 1, P(BAR_BASE) - 1], fill=RGB[colour])
        d.line([P(1), P(2), P(1), P(BAR_BASE)], fill=RGB["dark"])                    # y axis
        d.line([P(1), P(BAR_BASE), P(47), P(BAR_BASE)], fill=RGB["dark"])            # x axis
    elif fam == "grid":
        g = lambda u: P(GRID_MARGIN + GRID_PX * u)              # noqa: E731  unit -> pixels
        x0, y0, w, h, cut = scene["x0"], scene["y0"], scene["w"], scene["h"], scene["cut"]
        d.rectangle([g(x0), g(y0), g(x0 + w), g(y0 + h)], fill=GRID_FILLS[scene["fill"]])
        if cut is not None:             # corners 0..3: top-left, top-right, bottom-right, bottom-left
            cx = x0 if cut["corner"] in (0, 3) else x0 + w - cut["w"]
            cy = y0 if cut["corner"] in (0, 1) else y0 + h - cut["h"]
            d.rectangle([g(cx), g(cy), g(cx + cut["w"]), g(cy + cut["h"])], fill=(255, 255, 255))
        for u in range(GRID_UNITS + 1):                         # gridlines over the fill
            d.line([g(u), g(0), g(u), g(GRID_UNITS)], fill=RGB["grey"])
            d.line([g(0), g(u), g(GRID_UNITS), g(u)], fill=RGB["grey"])
        pts = _outline(x0, y0, w, h, cut)
        d.line([(g(a), g(b)) for a, b in pts + pts[:1]], fill=RGB["dark"])
    else:
        raise ValueError(f"unknown family {fam!r}")
    return img


def _outline(x0: int, y0: int, w: int, h: int, cut: Optional[dict]) -> list:
    """Corner points (in units) of the rectangle or L-shape, clockwise from the top-left."""
    x1, y1 = x0 + w, y0 + h
    if cut is None:
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    cw, ch, c = cut["w"], cut["h"], cut["corner"]
    return {0: [(x0 + cw, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0 + ch), (x0 + cw, y0 + ch)],
            1: [(x0, y0), (x1 - cw, y0), (x1 - cw, y0 + ch), (x1, y0 + ch), (x1, y1), (x0, y1)],
            2: [(x0, y0), (x1, y0), (x1, y1 - ch), (x1 - cw, y1 - ch), (x1 - cw, y1), (x0, y1)],
            3: [(x0, y0), (x1, y0), (x1, y1), (x0 + cw, y1), (x0 + cw, y1 - ch), (x0, y1 - ch)]}[c]


def describe(facts: dict) -> str:
    """Caption in the words the perception steps use."""
    fam, scene = facts["family"], facts["scene"]
    if fam == "shapes":
        c = shape_counts(scene)
        return _join([_plural(n, f"{col} {k}") for (col, k), n in c.items() if n > 0]) + "."
    if fam == "bars":
        return "A bar chart: " + _join([f"the {col} bar is {h}" for col, h in scene["bars"]]) + "."
    w, h = _plural(scene["w"], "unit"), _plural(scene["h"], "unit")
    if scene["cut"] is None:
        return f"A rectangle {w} wide and {h} tall on a grid."
    cut = scene["cut"]
    return (f"A shape {w} wide and {h} tall on a grid, with a cut-out "
            f"{_plural(cut['w'], 'unit')} wide and {_plural(cut['h'], 'unit')} tall.")


# ---- problems --------------------------------------------------------------------------------

_SAMPLERS = {"shapes": _sample_shapes, "bars": _sample_bars, "grid": _sample_grid}


def make_problem(seed: int, split: str = "train", family: Optional[str] = None,
                 image_size: int = IMAGE_SIZE) -> Problem:
    """One problem, deterministic per (split, seed); the split names its own random stream, so
    train, test and hard never share a draw, and ids ("test-bars-17") never collide."""
    if split not in KNOBS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(KNOBS)}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    kn = KNOBS[split]
    rng = random.Random(f"{split}:{seed}")
    auto = rng.choice(FAMILIES)         # drawn even when family is given: same stream either way
    family = family or auto
    q = rng.choice(getattr(kn, f"{family}_qtypes"))
    scene, given, question = _SAMPLERS[family](rng, kn, q)
    facts = {"family": family, "qtype": q, "scene": scene, "given": given}
    facts["readings"] = true_readings(facts)
    _, _, _, value = render(facts, facts["readings"])
    facts["value"] = value

    choices = None
    if q == "tallest":
        cols = [c for c, _ in scene["bars"]]
        cols += [c for c in BAR_COLOURS if c not in cols][:4 - len(cols)]
        rng.shuffle(cols)
        choices = cols
    elif rng.random() < kn.mc_prob:
        choices = _numeric_choices(facts, value, rng)
    facts["mc"] = choices is not None
    steps, per, answer, _ = render(facts, facts["readings"], choices)
    text_q = describe(facts) + " " + question
    if choices is not None:
        question, text_q = _with_choices(question, choices), _with_choices(text_q, choices)
    return Problem(id=f"{split}-{family}-{seed}", family=family, split=split, seed=seed,
                   question=question, choices=choices, answer=answer, steps=steps,
                   perception_steps=per, facts=facts, caption=describe(facts), text_question=text_q,
                   image=draw(facts, image_size))


def make_problems(n: int, split: str = "train", start: int = 0, image_size: int = IMAGE_SIZE) -> list:
    """Problems for seeds start .. start + n - 1, cycling the families evenly by seed."""
    return [make_problem(s, split, FAMILIES[s % len(FAMILIES)], image_size) for s in range(start, start + n)]


def problem_from_id(pid: str, image_size: int = IMAGE_SIZE) -> Problem:
    """Rebuild a problem from its id ("train-bars-17"), e.g. to corrupt a record read back."""
    parts = pid.split("-")
    if len(parts) != 3 or parts[0] not in KNOBS or parts[1] not in FAMILIES or not parts[2].isdigit():
        raise ValueError(f"not a toy-world problem id: {pid!r} (expected split-family-seed)")
    return make_problem(int(parts[2]), parts[0], parts[1], image_size)


# ---- checker ---------------------------------------------------------------------------------

def check(problem: Problem, response: str) -> bool:
    """Whether a response's final answer matches the problem's (`ursa.answer.judge`)."""
    return judge(response, problem.answer, problem.choices)[1]
