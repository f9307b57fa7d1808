"""Answer extraction and answer equivalence for math responses (toy world and benchmarks).

References
- PAPER.md, "Evaluation protocol": the extraction order used with URSA outputs:
  `Answer: \\boxed{}`, `\\boxed{}`, `†Answer:`, "correct answer is", "Answer:", `†`, "The answer is".
- PAPER.md, "Stage I": URSA's response style ends with `†Answer: X`.

Public API
    extract_answer(text) -> str | None          the answer span of a response, or None
    is_equiv(pred, gold, choices=None, rel_tol=1e-4) -> bool
    parse_number(text) -> float | None          a tiny SAFE parser (never eval) of numeric answers
    choice_index(pred, choices) -> int | None   which option a prediction names (letter or text)

Extraction keeps the answer span close to what the model wrote ("1,000 g", "$\\frac{1}{2}$"); only a
choice letter is normalised ("(B)", "B.", "B: 6cm" -> "B"). Normalisation for comparison (LaTeX,
units, thousands separators, number words) happens in is_equiv / parse_number.
"""
from __future__ import annotations

import math
import re

LETTERS = "ABCDEFGHIJ"

# ----------------------------------------------------------------------------------------------
# extraction


def _boxed_spans(text: str) -> list[tuple[int, int, int]]:
    """All `\\boxed{...}` (and `\\fbox{...}`) as (backslash position, content start, content end),
    with balanced braces (one linear pass); an unclosed box runs to the end of the text."""
    match, stack = {}, []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            match[stack.pop()] = i
    return [(m.start(), m.end(), match.get(m.end() - 1, len(text)))
            for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]


def _rest_of_line(text: str, pos: int) -> str:
    """Text from `pos` to the end of its line; if that is empty, the next non-empty line."""
    rest = text[pos:]
    lines = rest.split("\n")
    first = lines[0].strip()
    if first:
        return first
    for line in lines[1:]:
        if line.strip():
            return line.strip()
    return ""


_LETTER_ONLY_RE = re.compile(r"^\(?([A-J])\)?[.:：]?$")


def _unwrap(s: str) -> str:
    """Strip whitespace, markdown bold, surrounding \\text{}, trailing periods."""
    s = s.strip()
    for _ in range(3):
        s = s.strip().strip("*").strip()
        m = re.fullmatch(r"\\(?:text|textbf|mathrm|mathbf)\s*\{(.*)\}", s, re.S)
        if m:
            s = m.group(1)
        s = re.sub(r"[\s.。]+$", "", s)
        s = s.lstrip(":： ").strip()
    return s


def normalize_letter(s: str) -> str:
    """"(B)" / "B." / "B: 6cm" / "(B) 6cm" / "\\text{B}" -> "B"; anything else unchanged.

    A single capital A-J alone, in parentheses, or followed by one of `.:)` and optional text, is an
    option letter; so is "Option B". "B 6cm" (no punctuation) is left alone: it may be a label.
    """
    t = _unwrap(s).strip("$ ").strip()
    t = re.sub(r"^\\text\s*\{([A-J])\}", r"\1", t)
    m = _LETTER_ONLY_RE.match(t)
    if m:
        return m.group(1)
    m = re.match(r"^\(([A-J])\)(?:\s.*)?$", t, re.S) or re.match(r"^([A-J])[.:：)](?:\s.*)?$", t, re.S)
    if m:
        return m.group(1)
    m = re.match(r"^(?:option|choice)\s*\(?([A-J])\)?(?:[.:：)]?(?:\s.*)?)?$", t, re.S | re.I)
    if m:
        return m.group(1).upper()
    return s


def extract_answer(text: str) -> str | None:
    """The answer span of a response, by URSA's pattern order (PAPER.md, "Evaluation protocol").

    Order: `Answer: \\boxed{}`, `\\boxed{}`, `†Answer:`, "correct answer is", "Answer:", `†`,
    "The answer is". For each pattern the LAST occurrence wins; boxes use a balanced-brace parser.
    Returns None when no pattern matches (a response without an answer line), or when the span is empty.

    Differences from URSA's own `extract_answer_try_all_methods` (URSA-MATH/URSA-MATH,
    inference/vllm_infer.py), on purpose: it takes the FIRST match of a line pattern, a non-nested
    `\\\\boxed\\{(.*?)\\}`, and returns the whole response when nothing matches; here the last match, nested
    braces, and None.
    """
    if not text:
        return None
    cand = None
    # 1. `Answer: \boxed{...}`  2. any `\boxed{...}` (the last one)
    boxes = [(p, a, b) for p, a, b in _boxed_spans(text) if text[a:b].strip()]  # empty box: no answer
    answer_boxes = [(p, a, b) for p, a, b in boxes
                    if re.search(r"Answer\s*[:：]\s*\$*\s*$", text[max(0, p - 40):p], re.I)]
    if answer_boxes or boxes:
        _, a, b = (answer_boxes or boxes)[-1]
        cand = text[a:b]
    else:
        # 3..7: line patterns, in order; the last occurrence of the first pattern that matches
        for pat in (r"†\s*Answer\s*[:：]", r"correct answer is\s*[:：]?", r"Answer\s*[:：]", r"†",
                    r"the answer is\s*[:：]?"):
            ms = list(re.finditer(pat, text, re.I))
            if ms:
                cand = _rest_of_line(text, ms[-1].end())
                break
    if cand is None:
        return None
    cand = _unwrap(cand)
    if not cand:
        return None
    return normalize_letter(cand)


# ----------------------------------------------------------------------------------------------
# numbers: a tiny safe parser


_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10 ** 6}


def _words_to_number(s: str) -> float | None:
    """"seven" -> 7, "twenty-one" -> 21, "one thousand two hundred" -> 1200; else None."""
    toks = [t for t in re.split(r"[\s\-]+", s.lower().strip()) if t and t != "and"]
    if not toks:
        return None
    total, cur, seen = 0, 0, False
    for t in toks:
        if t in _WORDS:
            cur += _WORDS[t]
        elif t in _TENS:
            cur += _TENS[t]
        elif t == "hundred":
            cur = max(cur, 1) * 100
        elif t in _SCALES:
            total += max(cur, 1) * _SCALES[t]
            cur = 0
        else:
            return None
        seen = True
    return float(total + cur) if seen else None


def _latex_to_plain(s: str) -> str:
    """Rewrite the LaTeX of simple numeric answers into the tiny parser's syntax.

    \\frac{a}{b}, \\dfrac, \\tfrac -> ((a)/(b)); \\sqrt{x} -> sqrt((x)); \\sqrt[n]{x} -> ((x)^(1/(n)));
    \\pi, π -> pi; \\cdot, \\times, × -> *; \\div, ÷ -> /; ^\\circ, \\degree -> °; \\% -> %; {,} -> ,;
    \\text{..}, \\mathrm{..} -> their content; \\left, \\right, $, \\, \\! \\; ~ dropped.
    """
    s = s.replace("$", "").replace("\\!", "").replace("\\,", " ").replace("\\;", " ").replace("~", " ")
    s = s.replace("\\left", "").replace("\\right", "").replace("{,}", ",").replace("\\%", "%")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "°", s)
    s = s.replace("\\degree", "°").replace("\\circ", "°")
    s = re.sub(r"\\(?:text|mathrm|mathbf|textbf|operatorname|mbox)\s*\{([^{}]*)\}", r" \1 ", s)
    s = re.sub(r"\\[dt]?frac", r"\\frac", s)
    # \frac{a}{b}, \sqrt[n]{x}, \sqrt{x}: innermost first, so nesting works
    for _ in range(20):
        new = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))", s)
        new = re.sub(r"\\frac\s*(\d)\s*(\d)", r"((\1)/(\2))", new)  # \frac12
        new = re.sub(r"\\sqrt\s*\[([^\[\]{}]*)\]\s*\{([^{}]*)\}", r"((\2)^(1/(\1)))", new)
        new = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt((\1))", new)
        new = re.sub(r"\\sqrt\s*(\d+(?:\.\d+)?)", r"sqrt(\1)", new)
        if new == s:
            break
        s = new
    s = s.replace("\\pi", " pi ").replace("π", " pi ").replace("√", " sqrt")
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("×", "*").replace("·", "*")
    s = s.replace("\\div", "/").replace("÷", "/").replace("−", "-").replace("–", "-")
    s = s.replace("{", "(").replace("}", ")")
    return s


_NUM_RE = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?")
_NAME_RE = re.compile(r"[A-Za-z]+")
_UNIT_WORD = r"(?:[A-Za-z°²³µΩ'\"]+(?:\s*\^\s*\(?-?\d+\)?|\d)?|%)"
_UNIT_RE = re.compile(rf"{_UNIT_WORD}(?:\s*(?:/|per\b)\s*{_UNIT_WORD})?(?:\s+{_UNIT_WORD})*")


class _Parser:
    """Recursive descent over:  expr := term (('+'|'-') term)*;  term := unary (('*'|'/'|implicit) unary)*;
    unary := '-' unary | power;  power := atom ('^' unary)?;  atom := number | 'pi' | 'sqrt' atom | '(' expr ')'.
    Parsing stops at the first token it does not know; the caller decides whether the rest is a unit."""

    def __init__(self, s: str):
        self.s, self.i = s, 0

    def ws(self):
        while self.i < len(self.s) and self.s[self.i] in " \t\n":
            self.i += 1

    def peek(self) -> str:
        self.ws()
        return self.s[self.i] if self.i < len(self.s) else ""

    def name_at(self) -> str | None:
        self.ws()
        m = _NAME_RE.match(self.s, self.i)
        return m.group(0) if m else None

    def expr(self) -> float:
        v = self.term()
        while self.peek() in ("+", "-") and self.peek():
            op = self.s[self.i]
            save = self.i
            self.i += 1
            try:
                w = self.term()
            except ValueError:
                self.i = save
                break
            v = v + w if op == "+" else v - w
        return v

    def starts_atom(self) -> bool:
        c = self.peek()
        return bool(c) and (c.isdigit() or c in "(." or self.name_at() in ("pi", "sqrt"))

    def term(self) -> float:
        v = self.unary()
        while True:
            c = self.peek()
            if c in ("*", "/") and c:
                save = self.i
                self.i += 1
                try:
                    w = self.unary()
                except ValueError:
                    self.i = save
                    break
                if c == "/":
                    if w == 0:
                        raise ValueError("division by zero")
                    v = v / w
                else:
                    v = v * w
            elif self.starts_atom():  # implicit multiplication: 2\sqrt{3}, 3\pi, 2(1+x)
                v = v * self.power()
            else:
                return v

    def unary(self) -> float:
        if self.peek() == "-":
            self.i += 1
            return -self.unary()
        if self.peek() == "+":
            self.i += 1
            return self.unary()
        return self.power()

    def power(self) -> float:
        v = self.atom()
        if self.peek() == "^":
            save = self.i
            self.i += 1
            try:
                e = self.unary()
            except ValueError:
                self.i = save
                return v
            if abs(e) > 300 or (v < 0 and e != int(e)):
                raise ValueError("exponent out of range")
            v = v ** e
        return v

    def atom(self) -> float:
        c = self.peek()
        if c == "(":
            self.i += 1
            v = self.expr()
            if self.peek() != ")":
                raise ValueError("unbalanced parenthesis")
            self.i += 1
            return v
        name = self.name_at()
        if name == "pi":
            self.i += 2
            return math.pi
        if name == "sqrt":
            self.i += 4
            v = self.atom()
            if v < 0:
                raise ValueError("sqrt of a negative number")
            return math.sqrt(v)
        m = _NUM_RE.match(self.s, self.i)
        if m:
            self.i = m.end()
            return float(m.group(0).replace(",", ""))
        raise ValueError(f"unexpected {self.s[self.i:self.i + 10]!r}")


def parse_number_ex(text: str | None) -> tuple[float, bool] | None:
    """(value, is_percent) of a numeric answer, or None. Never evaluates code.

    Accepts integers, decimals, "1,234", negatives, "3/4", \\frac / \\dfrac, \\sqrt, pi in simple forms
    ("2\\sqrt{3}", "3\\pi", "27000 - 4500π"), number words ("seven"), a leading "x =" (the part after the
    last "="), and a trailing unit ("6cm", "40°", "12 cm^2", "1,000 g", "75%").
    """
    if text is None:
        return None
    s = _latex_to_plain(str(text)).strip()
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    s = s.strip().rstrip(".").strip()
    if not s:
        return None
    p = _Parser(s)
    try:
        v = p.expr()
    except (ValueError, OverflowError, ZeroDivisionError, RecursionError):
        v = None
    if v is None:
        w = _words_to_number(re.sub(r"\b(?:percent|degrees?|units?|cm|m|g|kg|grams?|meters?|centimeters?)\b.*$", "", s.lower()))
        if w is None:
            return None
        return w, "percent" in s.lower()
    rest = s[p.i:].strip()
    if rest and not _UNIT_RE.fullmatch(rest):
        return None
    if isinstance(v, complex) or math.isnan(v) or math.isinf(v):
        return None
    return float(v), ("%" in rest or "percent" in rest.lower())


def parse_number(text: str | None) -> float | None:
    """The numeric value of an answer (a percent sign is dropped: "75%" -> 75.0), or None."""
    r = parse_number_ex(text)
    return None if r is None else r[0]


# ----------------------------------------------------------------------------------------------
# equivalence


def norm_text(s: str) -> str:
    """Case- and space-insensitive text form: LaTeX wrappers and trailing periods dropped."""
    s = _unwrap(str(s))
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = re.sub(r"\\(?:text|mathrm|mathbf|textbf)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s).replace("\\,", "").replace("~", "")
    s = re.sub(r"\s+", "", s).lower()
    return s.rstrip(".")


def _nums_equal(a: float, b: float, rel_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


def _num_equiv(pred: str, gold: str, rel_tol: float) -> bool | None:
    """True/False when both sides parse as numbers; None when either does not."""
    p, g = parse_number_ex(pred), parse_number_ex(gold)
    if p is None or g is None:
        return None
    (pv, pp), (gv, gp) = p, g
    cands = {pv} | ({pv / 100} if pp and not gp else set()) | ({pv * 100} if gp and not pp else set())
    return any(_nums_equal(c, gv, rel_tol) for c in cands)


def _split_list(s: str) -> list[str] | None:
    """"[1, 2]" / "(1, 2)" -> ["1", "2"] (top-level commas only); None when not a bracketed list."""
    t = _unwrap(s).replace("$", "").replace("\\left", "").replace("\\right", "").strip()
    if len(t) < 2 or t[0] + t[-1] not in ("[]", "()"):
        return None
    items, depth, cur = [], 0, ""
    for ch in t[1:-1]:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    if len(items) < 2 or any(not x.strip() for x in items):
        return None
    return [x.strip() for x in items]


def _plain_equiv(pred: str, gold: str, rel_tol: float) -> bool:
    """Equivalence without options: numbers (with tolerance), lists elementwise, else normalised text."""
    if norm_text(pred) == norm_text(gold):
        return True
    num = _num_equiv(pred, gold, rel_tol)
    if num is not None:
        return num
    pl, gl = _split_list(pred), _split_list(gold)
    if pl is not None and gl is not None:
        return len(pl) == len(gl) and all(_plain_equiv(a, b, rel_tol) for a, b in zip(pl, gl))
    return False


def choice_index(pred: str | None, choices: list[str], rel_tol: float = 1e-4) -> int | None:
    """Which option `pred` names: an option letter (A.. within range), else the unique option whose
    normalised text, or else whose numeric value (with units stripped), equals `pred`. None if none or
    ambiguous: never the "closest" option."""
    if pred is None or not choices:
        return None
    letter = normalize_letter(pred)
    if len(letter) == 1 and letter in LETTERS[:len(choices)]:
        return LETTERS.index(letter)
    t = norm_text(pred)
    hits = [i for i, c in enumerate(choices) if norm_text(c) == t]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        return None
    pv = parse_number_ex(pred)
    if pv is None:
        return None
    hits = [i for i, c in enumerate(choices) if _num_equiv(pred, c, rel_tol)]
    return hits[0] if len(hits) == 1 else None


def is_equiv(pred: str | None, gold: str, choices: list[str] | None = None, rel_tol: float = 1e-4) -> bool:
    """Whether prediction `pred` answers gold `gold`.

    With `choices` (option texts, in order A, B, ...): `gold` may be a letter or an option's text;
    `pred` may be a letter or an option's text (matched by normalised text or numeric value). The
    answer is right iff both name the same option. Without choices: numbers equal within `rel_tol`
    (a percent may be written as 75% or 0.75), lists elementwise, else case/space-insensitive text.
    """
    if pred is None:
        return False
    pred, gold = str(pred), str(gold)
    if choices:
        g = choice_index(gold, choices, rel_tol)
        if g is not None:
            p = choice_index(pred, choices, rel_tol)
            return p == g
    return _plain_equiv(normalize_letter(pred), normalize_letter(gold), rel_tol)


def judge(response: str | None, gold, choices: list[str] | None = None) -> tuple[str | None, bool]:
    """THE answer judge of the project (toy evaluation, the GRPO reward, DualMath labelling, the
    world's checker): (the extracted answer or None, whether it answers `gold`)."""
    ext = extract_answer(response or "")
    return ext, is_equiv(ext, str(gold), choices)
