"""The toy world's step oracle: the true correctness of every step of ANY response to a toy problem
(rendered, corrupted by MIE, or sampled from a model), computed from the problem's facts.

    oracle_steps(problem, response) -> OracleVerdict | None
    oracle_steps_of(problem, steps, answer) -> OracleVerdict | None     (a DualMath record's fields)

The correct solutions. From the true readings (`ursa.world.true_readings`) the oracle builds the
steps a correct solution contains, each with what must come before it:
- one reading per fact the world's solution states (shapes: only the kinds present; bars: the two
  asked bars for a sum of two, else every bar; grid: the sides, and the cut-out's), no prerequisite;
- every computation needs ALL readings, plus the computations whose results it uses: the world's
  equations ("3 * 2 = 6.", the sum of all products "6 + 3 + 6 = 15.", "21 * 2 = 42.", ...),
  "The tallest is 8 and the shortest is 2." (before "8 - 2 = 6.") and "The tallest is the red bar.";
- multiple choice: the option step needs the final value. The world writes it as checks of the
  options in order, stopping at the one that holds the value ("(A) 20 is not 22. (B) 22 is 22.");
  naming the option directly ("22 is option (B).") is right as well.
A correct solution states each of these steps once, each after what it needs, and nothing else.
Order: the readings may come in any order (the world always scans in one fixed order, but a true
reading is true whenever it is stated, and a reader may look at the picture in any order), and so
may independent computations (the shapes' products then follow whichever order the kinds were read
in); every reading comes before the first computation, because every world solution reads first.

The rule. Step k is wrong iff steps 1..k are not the start of any correct solution; the first such
step is `first_error`, and it and every later step are labelled 0 (DualMath: 1 before it). So the
first error is the first step that is
- a reading whose value is not the image's for the key it names (a misreading: "4 red circles"
  where the image has 3, a phantom "1 square" where it has none, a bar or cut-out the image lacks),
  or a true reading a correct solution does not state there: a repeat, a fact the question does not
  need ("The red bar is 2." for the sum of two other bars, "There are 2 circles." when it asks for
  red shapes), "There are 0 squares.";
- an equation that is false ("3 * 5 = 16."), whatever its operands;
- a true equation that is not a computation the solution can make there: wrong operands ("3 * 3 =
  9." with a square's value 3 for a circle worth 2), a repeat, a computation while a reading is
  still missing (a skipped reading shows here), one whose inputs are not computed yet (a skipped
  product shows at the sum that uses it), or after the solution is complete. Harmless variants
  that are accepted: the operands of + and * in any order; "-" only in its order; one equation per
  computation, as the world writes it (not a sum in two partial sums, not "3 * 2 + 1 * 3 = 9.");
- a statement other than the one needed ("The tallest is 8 and the shortest is 3." when it is 2);
- an option step that names a letter other than the option holding the value ("22 is option (C)."
  where C is 25, or a letter with no option), maps a value other than the final one, comes before
  the final value, says "closest to" (the true value is always an option), or repeats; any option
  step in a free-form problem;
- an option check ("(B) 22 is 22.") that skips or repeats an option (checks go (A), (B), ... in
  order), copies an option wrongly ("(B) 25 is not 22." where B is 22), compares with a value other
  than the final one, states a false comparison ("(A) 20 is 22."), comes before the final value or
  after the option is found, or appears in a free-form problem.
Steps are judged against the TRUE readings, so a correct computation on a misread count is no
error of its own: the misreading, earlier, is the first error, and labels after it are 0 anyway.

The answer line carries no step tag: it only sets answer_correct (`ursa.answer.judge`). When every
step is right but the answer line disagrees or is missing, first_error stays None, all labels are
1 and answer_correct is False. When the steps stop before the final value (or its option step),
first_error is None as well and `complete` is False.

What parses (anything else -> None: no guess, and never an exception): the steps as
`ursa.prm.split_steps` cuts them, each starting with "Step <n>" (":" or "." after it optional;
the number is not checked, numbering carries no correctness); a step's body may hold several
sentences (merged steps; each split at ". " or a line break, each may repeat a "Step <n>:" header,
the step is right iff all are), each one of the world's templates, case-insensitively, with any
whitespace (also none around "=", "+", "-", "*", and "×" for "*"), with or without the final
period, "is"/"are", "unit"/"units" and a singular or plural noun whatever the number ("There is 1
circles."), "rectangle" or "shape" for the grid figure, "(B)" or "B" for an option ("(B)" in a check). Numbers are
ASCII digits, at most 9 of them. No steps, a step without a sentence, a sentence matching no
template (number words, units, prose, decimals) -> None.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ursa.answer import judge
from ursa.prm import ANSWER_MARK, split_steps
from ursa.world import BAR_COLOURS, KINDS, OPTION_LETTERS, SHAPE_COLOURS, stated_readings, true_readings

MAX_TERMS = 20                      # longer equations are no world template (keeps parsing cheap)
_NUM = r"([0-9]{1,9})"              # no world number has 10 digits; bounded, so int() is cheap
_FLAGS = re.I | re.A                # case-insensitive; ASCII digits and letters only
_HEADER = re.compile(r"step\s*[0-9]{1,9}\s*[:.]?\s*", _FLAGS)
_SENTENCES = re.compile(r"\.\s+|\n+")
_TEMPLATES = [                      # matched against one sentence, spaces collapsed, final period cut
    ("shapes", re.compile(rf"there (?:is|are) {_NUM} (?:({'|'.join(SHAPE_COLOURS)}) )?({'|'.join(KINDS)})s?", _FLAGS)),
    ("bars", re.compile(rf"the ({'|'.join(BAR_COLOURS)}) bar is {_NUM}", _FLAGS)),
    ("grid", re.compile(rf"the (rectangle|shape|cut-out) is {_NUM} units? (wide|tall)", _FLAGS)),
    ("eq", re.compile(rf"{_NUM}((?: ?[-+*×] ?[0-9]{{1,9}}){{1,{MAX_TERMS - 1}}}) ?= ?(-?[0-9]{{1,9}})", _FLAGS)),
    ("extremes", re.compile(rf"the tallest is {_NUM} and the shortest is {_NUM}", _FLAGS)),
    ("tallest", re.compile(rf"the tallest is the ({'|'.join(BAR_COLOURS)}) bar", _FLAGS)),
    ("total", re.compile(rf"the total is {_NUM}", _FLAGS)),
    ("option", re.compile(r"(\w{1,20}) is (closest to )?option \(?([a-j])\)?", _FLAGS)),
    ("check", re.compile(r"\(([a-j])\) (\w{1,20}) is (not )?(\w{1,20})", _FLAGS)),
]


@dataclass
class OracleVerdict:
    steps: list                     # the response's step texts, headers included
    first_error: Optional[int]      # 1-based index of the first wrong step; None: every step right
    labels: list                    # 1 before first_error, 0 from it on (all 1 when None)
    reason: str                     # why the first wrong step is wrong; "" when none is
    answer_correct: bool            # the final answer judged against problem.answer
    complete: bool = True           # every step right and none missing: the steps reach the final
                                    # value (and its option); False whenever first_error is set


@dataclass(frozen=True)
class _Node:
    """One step a correct solution must contain: kind "read" (content (key, value)), "eq" (op,
    sorted or ordered operands, result), "extremes" (hi, lo), "tallest" (colour,), "total" (n,),
    "option" (value text, letter); needs: indices of the nodes that must come first."""
    kind: str
    content: tuple
    needs: frozenset
    text: str                       # the canonical wording, for reasons


# ---- parsing -----------------------------------------------------------------------------------

def _eq_clause(first: str, rest: str, result: str) -> tuple:
    """An equation's parts -> ("eq", op, operands, result, value of the left side, left side text);
    op "mixed" when the operators differ. * binds before + and -."""
    toks = re.findall(r"[0-9]+|[-+*×]", first + rest)
    nums, ops = [int(t) for t in toks[::2]], ["*" if o == "×" else o for o in toks[1::2]]
    terms = [nums[0]]
    for o, x in zip(ops, nums[1:]):
        if o == "*":
            terms[-1] *= x
        else:
            terms.append(x if o == "+" else -x)
    lhs = " ".join(str(nums[0]) if i == 0 else f"{ops[i - 1]} {x}" for i, x in enumerate(nums))
    return "eq", ops[0] if len(set(ops)) == 1 else "mixed", tuple(nums), int(result), sum(terms), lhs


def _clause(text: str) -> Optional[tuple]:
    """One sentence -> a parsed clause tuple (first element its kind), or None when it is none of
    the world's templates."""
    s = " ".join(text.split())
    m = _HEADER.match(s)
    if m and m.end() < len(s):
        s = s[m.end():]
    s = re.sub(r" ?\.$", "", s)
    for kind, pat in _TEMPLATES:
        m = pat.fullmatch(s)
        if m is None:
            continue
        g = m.groups()
        if kind == "shapes":
            return "read", (f"{g[1].lower()} " if g[1] else "") + g[2].lower(), int(g[0])
        if kind == "bars":
            return "read", f"{g[0].lower()} bar", int(g[1])
        if kind == "grid":
            side = "width" if g[2].lower() == "wide" else "height"
            return "read", ("cut " if g[0].lower() == "cut-out" else "") + side, int(g[1])
        if kind == "eq":
            return _eq_clause(*g)
        if kind == "extremes":
            return "extremes", int(g[0]), int(g[1])
        if kind in ("tallest", "total"):
            return kind, g[0].lower() if kind == "tallest" else int(g[0])
        if kind == "check":
            return "check", g[0].upper(), g[1].lower(), bool(g[2]), g[3].lower()
        return "option", g[0].lower(), g[2].upper(), bool(g[1])
    return None


def parse_step(step: str) -> Optional[list]:
    """A step's text -> its clauses (one per sentence, in order), or None when the step does not
    start with a "Step <n>" header, has no sentence, or has a sentence matching no template."""
    if not isinstance(step, str):
        return None
    s = step.strip()
    m = _HEADER.match(s)
    if m is None or not s[:4] == "Step":
        return None
    out = []
    for sent in _SENTENCES.split(s[m.end():]):
        if sent.strip():
            c = _clause(sent)
            if c is None:
                return None
            out.append(c)
    return out or None


# ---- the correct solution's steps --------------------------------------------------------------

def _key(family: str, key: str) -> str:
    """A world reading key -> the oracle's key ("red" bar -> "red bar"; shapes and grid unchanged)."""
    return f"{key} bar" if family == "bars" else key


def image_values(facts: dict) -> dict:
    """Every key a reading of this image can name -> its true value (shapes: every kind and every
    colour-kind, zero counts included; bars: the chart's bars; grid: the sides, the cut-out's if any)."""
    fam, scene = facts["family"], facts["scene"]
    if fam == "shapes":
        out = {k: 0 for k in KINDS} | {f"{c} {k}": 0 for c in SHAPE_COLOURS for k in KINDS}
        for _cell, kind, colour, *_ in scene["shapes"]:
            out[kind] += 1
            out[f"{colour} {kind}"] += 1
        return out
    if fam == "bars":
        return {f"{col} bar": h for col, h in scene["bars"]}
    out = {"width": scene["w"], "height": scene["h"]}
    if scene["cut"] is not None:
        out.update({"cut width": scene["cut"]["w"], "cut height": scene["cut"]["h"]})
    return out


def _is_shape(key: str) -> bool:
    return key.endswith(KINDS)


def _read_text(key: str, v: int) -> str:
    """'4 red circles', 'the red bar as 5', 'the cut width as 2 units'."""
    if _is_shape(key):
        return f"{v} {key}" if v == 1 else f"{v} {key}s"
    return f"the {key} as {v}" + ("" if key.endswith("bar") else " unit" if v == 1 else " units")


def _key_name(key: str) -> str:
    """'the red circles', 'the red bar', 'the cut width'."""
    return f"the {key}s" if _is_shape(key) else f"the {key}"


def _truth_text(key: str, t: Optional[int]) -> str:
    """What the image holds for a key: 'the image has 3', 'the image has none', 'the image shows
    4', 'the image has no orange bar', 'the image has no cut-out'."""
    if _is_shape(key):
        return f"the image has {t or 'none'}"
    if t is None:
        return "the image has no " + ("cut-out" if key.startswith("cut") else "grid figure" if key in
                                      ("width", "height") else key)
    return f"the image shows {t}"


def _plan(problem) -> list:
    """The steps of a correct solution as _Nodes (see the module docstring)."""
    facts, choices = problem.facts, problem.choices
    fam, q, g = facts["family"], facts["qtype"], facts["given"]
    tr = true_readings(facts)
    nodes = [_Node("read", (_key(fam, k), v), frozenset(), _read_text(_key(fam, k), v))
             for k, v in (tr[i] for i in stated_readings(facts, tr))]
    reads = frozenset(range(len(nodes)))

    def add(kind, content, inputs, text):
        nodes.append(_Node(kind, content, reads | frozenset(inputs), text))
        return len(nodes) - 1, content[-1]

    def eq(op, terms, inputs=()):
        r = sum(terms) if op == "+" else terms[0] * terms[1] if op == "*" else terms[0] - terms[1]
        ops = tuple(terms) if op == "-" else tuple(sorted(terms))
        return add("eq", (op, ops, r), inputs, f" {op} ".join(map(str, terms)) + f" = {r}")

    if fam == "shapes":
        prods = [eq("*", [n, g["values"][key.split()[-1]]]) for key, n in tr if n > 0]
        final = (prods[0] if len(prods) == 1 else eq("+", [r for _, r in prods], [i for i, _ in prods])) \
            if prods else add("total", (0,), (), "the total is 0")
    elif fam == "bars":
        hs = [h for _, h in tr]
        if q in ("sum2", "total", "scaled_total"):
            final = eq("+", hs)
            if q == "scaled_total":
                final = eq("*", [final[1], g["scale"]], [final[0]])
        elif q == "diff":
            ext, _ = add("extremes", (max(hs), min(hs)), (), f"the tallest is {max(hs)} and the shortest is {min(hs)}")
            final = eq("-", [max(hs), min(hs)], [ext])
        else:
            col = next(c for c, h in tr if h == max(hs))
            final = add("tallest", (col,), (), f"the tallest is the {col} bar")
    else:
        v, u = dict((k, x) for k, x in tr), g["unit"]
        if q == "perimeter":
            s = eq("+", [v["width"], v["height"]])
            p = eq("*", [2, s[1]], [s[0]])
            final = eq("*", [p[1], u], [p[0]])
        else:
            a = eq("*", [v["width"], v["height"]])
            if q == "l_area":
                c = eq("*", [v["cut width"], v["cut height"]])
                a = eq("-", [a[1], c[1]], [a[0], c[0]])
            uu = eq("*", [u, u])
            final = eq("*", [a[1], uu[1]], [a[0], uu[0]])
    if choices is not None:
        add("option", (str(facts["value"]), problem.answer), [final[0]], f"{facts['value']} is option {problem.answer}")
    return nodes


# ---- judging the steps -----------------------------------------------------------------------

class _Walk:
    """One response's walk through the correct solution's steps: which are done."""

    def __init__(self, problem):
        self.problem, self.nodes, self.done = problem, _plan(problem), set()
        self.values = image_values(problem.facts)
        self.checked = 0                    # option checks made so far: the next one is for (A) + checked

    def _ready(self) -> list:
        return [i for i, n in enumerate(self.nodes) if i not in self.done and n.needs <= self.done]

    def _waits(self, needs: frozenset) -> str:
        """Why a step needing `needs` (not all done) cannot come yet: the first step it waits for
        (readings have the lowest indices, so an unread fact is named first)."""
        first = self.nodes[min(needs - self.done)]
        if first.kind == "read":
            return f"before reading {_key_name(first.content[0])}"
        return f"before {first.text}, which it uses"

    def _take(self, kind: str, content: tuple, what: str) -> Optional[str]:
        """Mark the ready node (kind, content) done -> None; else the reason the step `what` (e.g.
        "computes 3 * 3 = 9") is wrong: a repeat, too early, or not a step the solution needs."""
        ready = [i for i in self._ready() if self.nodes[i].kind == kind and self.nodes[i].content == content]
        if ready:
            self.done.add(ready[0])
            return None
        same = [i for i, n in enumerate(self.nodes) if n.kind == kind and n.content == content]
        if same and all(i in self.done for i in same):
            return f"{what}, a repeat of an earlier step"
        if same:                                    # a needed step whose inputs are not all there
            waiting = next(i for i in same if i not in self.done)
            return f"{what} {self._waits(self.nodes[waiting].needs)}"
        if kind == "read":
            return f"{what}, a fact the solution does not state"
        reads = frozenset(i for i, n in enumerate(self.nodes) if n.kind == "read")
        if not reads <= self.done:                  # every computation needs every reading
            return f"{what} {self._waits(reads)}"
        want = [self.nodes[i].text for i in self._ready()]
        return f"{what}; next the solution needs {' or '.join(want)}" if want else \
            f"{what} after the solution is complete"

    def step(self, c: tuple) -> Optional[str]:
        """One clause -> None when it is right (and now done), else the reason it is wrong."""
        kind = c[0]
        if kind == "read":
            key, v = c[1], c[2]
            if self.values.get(key) != v:
                return f"reads {_read_text(key, v)}; {_truth_text(key, self.values.get(key))}"
            return self._take("read", (key, v), f"reads {_read_text(key, v)}")
        if kind == "eq":
            _, op, terms, r, lhs, text = c
            if lhs != r:
                return f"states {text} = {r}, which is false (it is {lhs})"
            ops = terms if op == "-" else tuple(sorted(terms))
            return self._take("eq", (op, ops, r), f"computes {text} = {r}")
        if kind == "option":
            return self._option(*c[1:])
        if kind == "check":
            return self._check(*c[1:])
        what = {"extremes": "states the tallest is {} and the shortest is {}",
                "tallest": "states the tallest is the {} bar", "total": "states the total is {}"}[kind].format(*c[1:])
        return self._take(kind, c[1:], what)

    def _option(self, v: str, letter: str, closest: bool) -> Optional[str]:
        p = self.problem
        if p.choices is None:
            return f"names option {letter}, but the question has no options"
        opt = len(self.nodes) - 1           # the option node is always the last
        if opt in self.done:
            return f"names option {letter}, a repeat of an earlier step"
        if not self.nodes[opt].needs <= self.done:
            return f"names an option {self._waits(self.nodes[opt].needs)}"
        value, gold = self.nodes[opt].content
        if v != value.lower():
            return f"maps {v} to an option; the value is {value}"
        if closest:
            return f"says {v} is closest to option {letter}; {v} is option {gold}"
        if letter != gold:
            held = p.choices[OPTION_LETTERS.index(letter)] if letter in OPTION_LETTERS[:len(p.choices)] else None
            return (f"names option {letter} (" + ("there is no such option" if held is None else f"which is {held}")
                    + f"); {v} is option {gold}")
        self.done.add(opt)
        return None

    def _check(self, letter: str, held: str, negated: bool, v: str) -> Optional[str]:
        """One option check "(B) 22 is [not] 22" (see the module docstring)."""
        p = self.problem
        said = f"({letter}) {held} is {'not ' if negated else ''}{v}"
        if p.choices is None:
            return f"checks {said}, but the question has no options"
        opt = len(self.nodes) - 1
        if opt in self.done:
            return f"checks {said} after the option is found"
        if not self.nodes[opt].needs <= self.done:
            return f"checks an option {self._waits(self.nodes[opt].needs)}"
        value = self.nodes[opt].content[0].lower()
        if v != value:
            return f"checks {said}; the value is {value}"
        want = OPTION_LETTERS[self.checked]
        if letter != want:
            return f"checks {said}; the next option to check is ({want})"
        true = p.choices[self.checked].lower()
        if held != true:
            return f"checks {said}; ({letter}) is {true}"
        if negated == (held == v):
            return f"checks {said}, which is false"
        self.checked += 1
        if not negated:
            self.done.add(opt)
        return None


def _verdict(problem, steps: list, parsed: list, answer_correct: bool) -> OracleVerdict:
    walk = _Walk(problem)
    for k, clauses in enumerate(parsed, start=1):
        for c in clauses:
            why = walk.step(c)
            if why is not None:
                return OracleVerdict(list(steps), k, [1] * (k - 1) + [0] * (len(steps) - k + 1),
                                     f"step {k} {why}", answer_correct, False)
    return OracleVerdict(list(steps), None, [1] * len(steps), "", answer_correct,
                         len(walk.done) == len(walk.nodes))


def oracle_steps_of(problem, steps: list, answer: Optional[str]) -> Optional[OracleVerdict]:
    """The verdict on a solution given as steps (each with its "Step k:" header) and its bare
    answer (None: no answer line), e.g. a DualMath record; None when a step does not parse (see the
    module docstring) or there are no steps. answer_correct judges "†Answer: <answer>"."""
    if not isinstance(steps, (list, tuple)) or not steps:
        return None
    parsed = [parse_step(s) for s in steps]
    if any(p is None for p in parsed):
        return None
    ok = isinstance(answer, str) and judge(f"{ANSWER_MARK} {answer}", problem.answer, problem.choices)[1]
    return _verdict(problem, steps, parsed, ok)


def oracle_steps(problem, response: str) -> Optional[OracleVerdict]:
    """The verdict on a response's text (cut by `ursa.prm.split_steps`); None when it has no steps
    or a step does not parse. answer_correct is `ursa.answer.judge` on the whole response, as the
    evaluation and the GRPO reward judge it. Never raises on any text."""
    if not isinstance(response, str):
        return None
    steps, _ = split_steps(response)
    verdict = oracle_steps_of(problem, steps, None)
    if verdict is not None:
        verdict.answer_correct = judge(response, problem.answer, problem.choices)[1]
    return verdict


_CHECK = dict(_TEMPLATES)["check"]


def misquoted_options(choices: Optional[list], response: str) -> list:
    """The option checks anywhere in a response ("(B) 22 is [not] 22") whose option text is not the
    question's text of that letter, in order, as "(B) 22" strings; a letter past the last option counts.
    Unlike the oracle's verdict this reads every step, also after the first error (a wrong value
    often ends in a check that misquotes an option to match it), and needs only the question's text,
    not the image. A free-form question (choices None) has nothing to misquote: []."""
    if not choices or not isinstance(response, str):
        return []
    out = []
    for m in _CHECK.finditer(response):
        k = ord(m.group(1).upper()) - ord("A")
        if k >= len(choices) or m.group(2).lower() != str(choices[k]).lower():
            out.append(f"({m.group(1).upper()}) {m.group(2)}")
    return out
