"""Answer extraction and equivalence for math responses: the toy world, the GRPO reward, DualMath
labelling and the benchmark scorers use it; docs/answer_matching.md gives the rules with examples.

    extract_answer(text) -> str | None      is_equiv(pred, gold, choices=None, *, rel_tol, precision)
    parse_number(text) -> float | None      choice_index(pred, choices, *, rel_tol, precision) -> int | None
    normalize_letter(s), option_letter(s), norm_text(s), repair_braces(s)
    judge(response, gold, choices=None) -> (extracted or None, correct): THE judge of the project

Every public function is total: any str gives an answer or "no answer", never an exception. Work is
linear in the input: brace scans touch only braces, rewrites are a fixed number of regex passes, and
the numeric parser never sees more than _MAX_NUMERIC_CHARS characters. Nothing is ever eval'ed.
"""
from __future__ import annotations

import functools
import math
import re
from fractions import Fraction
from typing import NamedTuple

LETTERS = "ABCDEFGHIJ"

_MAX_NUMERIC_CHARS = 2000   # a longer span is compared as text only (no answer is a 2000-char number)
_MAX_LITERAL = 100          # digits in one literal (int() of long digit runs is quadratic)
_MAX_BITS = 1000            # exact numerator/denominator size; 2**1000 still converts to a finite float
_MAX_EXP = 300              # |exponent| of a power: 10^300 is about the largest power a float holds
_MAX_DEPTH = 60             # nesting of ( / ^ / sqrt: each level costs ~5 Python frames
_MAX_TUPLE_DEPTH = 3        # tuples of tuples of tuples
_LATEX_PASSES = 20          # innermost-first rewrite passes (deeper nesting stays text)
_MAX_LATEX_CHARS = 10000    # longer spans skip them (compared as raw text: no answer is that long)
_MEMO_CHARS = 300           # longest string whose common form is memoised (8192 of them at most)
_ABS_TOL = 1e-9             # absolute slack of the float rule, so that 0 and 1e-12 compare equal

# ----------------------------------------------------------------------------------------------
# braces and extraction

_BRACE_RE = re.compile(r"[{}]")
_NONSPACE_RE = re.compile(r"\S")
_ANSWER_BOX_RE = re.compile(r"Answer\s*[:：]\s*\$*\s*$", re.I)    # just before a box
_LINE_RE = re.compile(r"\S[^\n]*")      # from the first non-space on: the rest of its line


def _brace_scan(s: str) -> tuple[dict[int, int], list[int], int]:
    """(position of each `{` -> its matching `}`, positions of `}` that close nothing, number of `{`
    left open). One pass over the braces only; `\\{` `\\}` count like plain braces."""
    match, stack, stray = {}, [], []
    for m in _BRACE_RE.finditer(s):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            match[stack.pop()] = m.start()
        else:
            stray.append(m.start())
    return match, stray, len(stack)


def repair_braces(s: str) -> str:
    """Drop every `}` that closes nothing, append one `}` per `{` left open: "10\\sqrt{2" ->
    "10\\sqrt{2}", "5}" -> "5"."""
    if "}" not in s or "{" not in s:                  # the common cases, without a scan
        return s.replace("}", "") + "}" * s.count("{")
    _, stray, n_open = _brace_scan(s)
    if stray:
        cuts = [-1] + stray + [len(s)]
        s = "".join(s[a + 1:b] for a, b in zip(cuts, cuts[1:]))
    return s + "}" * n_open


def _boxed_spans(text: str) -> list[tuple[int, int, int]]:
    """Every non-empty `\\boxed{..}` / `\\fbox{..}` as (backslash position, content start, content
    end); an unclosed box runs to the end of its line (one forward newline pointer: linear)."""
    found = list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))
    match, out, eol = _brace_scan(text)[0] if found else {}, [], -1
    for m in found:
        end = match.get(m.end() - 1)
        if end is None:
            if eol < m.end():
                eol = text.find("\n", m.end())
                eol = len(text) if eol < 0 else eol
            end = eol
        if _NONSPACE_RE.search(text, m.end(), end):       # stops at the first non-space
            out.append((m.start(), m.end(), end))
    return out


_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|boxed)\s*\{")


def _unwrap(s: str) -> str:
    """Strip whitespace, markdown bold, one enclosing \\text{..} (when its brace closes at the very
    end), trailing periods and leading colons."""
    s = s.strip()
    for _ in range(3):
        s = s.strip().strip("*").strip()
        m = _WRAPPER_RE.match(s)
        if m and s.endswith("}") and _brace_scan(s)[0].get(m.end() - 1) == len(s) - 1:
            s = s[m.end():-1]
        s = s.rstrip(" \t\r\n.。").lstrip(":： \t\r\n").strip()
    return s


# ways to name option X once a leading "Option" / "the correct answer is" is dropped:
# "C", "(C)", "[C] 6cm", "C.", "C: 6cm", "C)", "C because .."
_LETTER_FORMS = (r"({x})", r"\(({x})\)(?:\s.*)?", r"\[({x})\](?:\s.*)?", r"({x})[.:：)](?:\s.*)?",
                 r"({x}),?\s+(?:because|since|as)\b.*")
_UPPER_FORMS = [re.compile(f.format(x="[A-J]"), re.S) for f in _LETTER_FORMS]
_ANY_CASE_FORMS = [re.compile(f.format(x="[A-Ja-j]"), re.S) for f in _LETTER_FORMS]
_LETTER_PREFIX_RE = re.compile(r"^(?i:(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)\b"
                               r"(?:\s+is)?\s*[:：]?\s*)(?=\S)")


def option_letter(s: str, lower: bool = False) -> str | None:
    """The option letter (upper case) that `s` names, or None. Lower-case letters ("c", "(c)")
    count only when `lower`: callers pass it when options are given (a bare "c" may be a variable)."""
    t = _unwrap(str(s)).strip("$ ").strip()
    t = re.sub(r"^\\(?:text|textbf|mathrm|mathbf)\s*\{([A-Ja-j])\}", r"\1", t)
    t = _LETTER_PREFIX_RE.sub("", t, count=1)
    for rx in (_ANY_CASE_FORMS if lower else _UPPER_FORMS):
        m = rx.fullmatch(t)
        if m:
            return m.group(1).upper()
    return None


def normalize_letter(s: str) -> str:
    """"(B)" / "B." / "B: 6cm" / "[B]" / "B)" / "Option B" / "\\text{B}" -> "B"; anything else
    (lower-case letters included) unchanged. "B 6cm" stays: it may be a label."""
    return option_letter(s) or s


_LINE_PATTERNS = (r"†\s*Answer\s*[:：]", r"correct answer is\s*[:：]?", r"Answer\s*[:：]", r"†",
                  r"the answer is\s*[:：]?")


def extract_answer(text: str | None) -> str | None:
    """The answer span of a response by URSA's pattern order, or None when nothing matches.

    Order: `Answer: \\boxed{}`, `\\boxed{}`, `†Answer:`, "correct answer is", "Answer:", `†`,
    "The answer is"; the LAST occurrence of a pattern wins; boxes nest; an empty box is no answer.
    The span gets braces repaired ("10\\sqrt{2" -> "10\\sqrt{2}"), markdown and one \\text{}
    stripped, an upper-case option letter normalised. URSA's own `extract_answer_try_all_methods`
    (URSA-MATH/URSA-MATH inference/vllm_infer.py) takes the first match, a non-nested box, and the
    whole response when nothing matches; this one does not, on purpose."""
    text = "" if text is None else str(text)
    boxes, cand = _boxed_spans(text), None
    if boxes:
        _, a, b = next((x for x in reversed(boxes) if _ANSWER_BOX_RE.search(text[max(0, x[0] - 40):x[0]])),
                       boxes[-1])
        cand = text[a:b]
    else:
        for pat in _LINE_PATTERNS:
            last = None
            for last in re.finditer(pat, text, re.I):
                pass
            if last is not None:
                line = _LINE_RE.search(text, last.end())     # this line, or the next non-blank one
                cand = line.group() if line else None
                break
    cand = _unwrap(repair_braces(cand)) if cand else None
    return normalize_letter(cand) if cand else None


# ----------------------------------------------------------------------------------------------
# the common form of both sides

_SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_ARG = r"\{([^{}]*)\}"
_PASS_RULES = [(re.compile(p), r) for p, r in (      # innermost first, _LATEX_PASSES times at most
    (rf"\\frac\s*{_ARG}\s*{_ARG}", r"((\1)/(\2))"), (r"\\frac\s*([0-9])\s*([0-9])", r"((\1)/(\2))"),
    (rf"\\sqrt\s*\[([^\[\]{{}}]*)\]\s*{_ARG}", r"((\2)^(1/(\1)))"), (rf"\\sqrt\s*{_ARG}", r"sqrt((\1))"),
    (rf"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mathit|mbox|operatorname|boxed|fbox)\s*{_ARG}",
     r" \1 "))]
_SYMBOLS = [("\\(", " "), ("\\)", " "), ("\\[", " "), ("\\]", " "),
            ("\\pi", " pi "), ("π", " pi "), ("√", " sqrt"), ("\\sqrt", " sqrt"), ("\\cdot", "*"),
            ("\\times", "*"), ("\\ast", "*"), ("×", "*"), ("·", "*"), ("∙", "*"),
            ("\\div", "/"), ("÷", "/"), ("−", "-"), ("–", "-"), ("—", "-"),
            ("\\approx", "≈"), ("\\left", ""), ("\\right", ""), ("\\displaystyle", ""),
            ("\\!", ""), ("\\,", " "), ("\\;", " "), ("\\:", " "), ("\\quad", " "), ("~", " "),
            ("{,}", ","), ("\\%", "%"), ("\\{", "{"), ("\\}", "}"), ("￥", "¥")]
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|\{\s*degrees?\s*\}")
_TIMES_X_RE = re.compile(r"(?<=[0-9)])[ \t]?[xX][ \t]?(?=[0-9(.])")        # 3 x 4, 1.5 x 10^3
_CURRENCY_RE = re.compile(r"([＄€¥£])\s*")


def _plain(s: str) -> str:
    """_plain_form, memoised for answer-sized strings (a judge sees the same golds and options often)."""
    return _plain_memo(s) if len(s) <= _MEMO_CHARS else _plain_form(s)


def _plain_form(s: str) -> str:
    """Both sides' common form: repaired braces; no \\( \\) \\[ \\] or $ delimiters; `\\$` (or the
    `$` next to a number when their count is odd: "$5") as the currency sign "＄"; superscripts as
    ^(n); degrees as "°" (^\\circ, \\circ, \\degree, {degrees}); \\frac{a}{b} -> ((a)/(b)),
    \\sqrt{x} -> sqrt((x)), \\text{..} unwrapped; \\pi / π -> pi, \\times / × / · / x between
    numbers -> *, ÷ -> /; a leading currency sign moved after the number; braces as parentheses."""
    s = repair_braces(s).replace("\\$", "＄")
    if s.count("$") % 2:
        s = re.sub(r"\$(?=\s?[0-9.])|(?<=[0-9])\s?\$", "＄", s, count=1)
    s = s.replace("$", " ")
    s = re.sub(r"[⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺]+", lambda m: f"^({m.group().translate(_SUPERSCRIPT)})", s)
    s = _DEGREE_RE.sub("°", re.sub(r"\\[dt]frac", r"\\frac", s))
    for _ in range(_LATEX_PASSES if len(s) <= _MAX_LATEX_CHARS else 0):
        new = s
        for rx, rep in _PASS_RULES:
            new = rx.sub(rep, new)
        if new == s:
            break
        s = new
    s = re.sub(r"(?<=[0-9])\\,(?=[0-9]{3})", "", s)            # 1\,000
    for a, b in _SYMBOLS:
        s = s.replace(a, b)
    s = _TIMES_X_RE.sub("*", s).replace("{", "(").replace("}", ")").strip()
    m = _CURRENCY_RE.match(s)
    return s[m.end():] + " " + m.group(1) if m and len(s) > m.end() else s


_plain_memo = functools.lru_cache(maxsize=8192)(_plain_form)


def _text_key(s: str) -> str:
    """Case- and whitespace-free form of a plain string, trailing periods dropped."""
    return re.sub(r"\s+", "", s).lower().rstrip(".")


def norm_text(s: str) -> str:
    """Case- and space-free text of an answer after the common normalisation ("60^{\\circ}" and
    "60°", "\\pi" and "π", "$x$" and "\\(x\\)" give the same text)."""
    return _text_key(_plain(_unwrap(str(s))))


# ----------------------------------------------------------------------------------------------
# numbers: a small safe parser with exact rational arithmetic

_NUM_RE = re.compile(r"(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]*)?(?:[eE][-+]?[0-9]{1,3}(?![0-9]))?"
                     r"|\.[0-9]+(?:[eE][-+]?[0-9]{1,3}(?![0-9]))?")
_NAME_RE = re.compile(r"[A-Za-z]+")
_WS_RE = re.compile(r"[ \t\r\n]*")


def _fin(v):
    """`v` if it is a finite float or a Fraction of bounded size, else ValueError."""
    if (max(v.numerator.bit_length(), v.denominator.bit_length()) > _MAX_BITS if isinstance(v, Fraction)
            else not math.isfinite(v)):
        raise ValueError("number too large")
    return v


def _pow(b, e):
    """b ** e: exact for a rational base and a small integer exponent, else a float; ValueError when
    out of range (|e| > _MAX_EXP, 0 to a negative power, a negative base to a fractional power)."""
    integral = isinstance(e, Fraction) and e.denominator == 1
    if abs(e) > _MAX_EXP or (b == 0 and e <= 0 and not (integral and e == 0)) or (b < 0 and not integral):
        raise ValueError("power out of range")
    if integral and isinstance(b, Fraction):
        if max(b.numerator.bit_length(), b.denominator.bit_length()) * abs(e) <= _MAX_BITS:
            return b ** int(e)
    try:
        return _fin(float(b) ** (int(e) if integral else float(e)))
    except (OverflowError, ZeroDivisionError):
        raise ValueError("power out of range") from None


class _Parser:
    """Recursive descent; every method returns a number (a Fraction while the arithmetic is exact, a
    float once pi or a root enters) or raises ValueError:
        expr := term (('+'|'-') term)*        term := unary (('*'|'/') unary | implicit unary)*
        unary := ('+'|'-')* atom ('^' unary)?  atom := number | 'pi' | 'sqrt' atom | '(' expr ')'
    Implicit multiplication only before '(' / pi / sqrt ("2\\sqrt{3}", "3\\pi"). Parsing stops at the
    first token it does not know (self.i); the caller decides whether the rest is a unit. `dec`
    records a literal written with a decimal point or an exponent."""

    def __init__(self, s: str):
        self.s, self.i, self.depth, self.dec = s, 0, 0, False

    def peek(self) -> str:
        """The next token: a run of letters, or one character ("" at the end)."""
        self.i = _WS_RE.match(self.s, self.i).end()
        m = _NAME_RE.match(self.s, self.i)
        return m.group() if m else self.s[self.i:self.i + 1]

    def expr(self):
        v = self.term()
        while (op := self.peek()) in ("+", "-"):
            self.i += 1
            w = self.term()
            v = _fin(v + w if op == "+" else v - w)
        return v

    def term(self):
        v = self.unary()
        while (c := self.peek()) in ("*", "/", "(", "pi", "sqrt"):
            self.i += c in ("*", "/")
            w = self.unary()
            if c == "/" and w == 0:
                raise ValueError("division by zero")
            v = _fin(v / w if c == "/" else v * w)
        return v

    def unary(self):
        neg = False
        while (c := self.peek()) in ("+", "-"):
            neg, self.i = neg ^ (c == "-"), self.i + 1
        v = self.atom()
        if self.peek() == "^":
            self.i += 1
            v = _pow(v, self.unary())
        return -v if neg else v

    def atom(self):
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise ValueError("nested too deeply")
        c = self.peek()
        if c == "(":
            self.i += 1
            v = self.expr()
            if self.peek() != ")":
                raise ValueError("unbalanced parenthesis")
            self.i += 1
        elif c == "pi":
            self.i, v = self.i + 2, math.pi
        elif c == "sqrt":
            self.i += 4
            v = self.atom()
            if v < 0:
                raise ValueError("square root of a negative number")
            v = math.sqrt(v)
        else:
            m = _NUM_RE.match(self.s, self.i)
            if not m or m.end() - m.start() > _MAX_LITERAL:
                raise ValueError(f"not a number at {self.s[self.i:self.i + 10]!r}")
            self.i, lit = m.end(), m.group().replace(",", "")
            self.dec = self.dec or any(ch in lit for ch in ".eE")
            v = _fin(Fraction(lit))
        self.depth -= 1     # (after a ValueError the parser is discarded: depth no longer matters)
        return v


_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_SCALES = {"thousand": 1000, "million": 10 ** 6}


def _words_to_number(s: str) -> int | None:
    """"seven" -> 7, "twenty-one" -> 21, "one thousand two hundred" -> 1200; else None."""
    toks = [t for t in re.split(r"[\s\-]+", s.lower().strip()) if t and t != "and"]
    total, cur = 0, 0
    for t in toks:
        if t in _WORDS or t in _TENS:
            cur += _WORDS.get(t, 0) + _TENS.get(t, 0)
        elif t == "hundred":
            cur = max(cur, 1) * 100
        elif t in _SCALES:
            total, cur = total + max(cur, 1) * _SCALES[t], 0
        else:
            return None
    return total + cur if toks else None


# ----------------------------------------------------------------------------------------------
# units

_UNIT_GROUPS = {  # canonical unit: its synonyms (matched after lower-casing)
    "mm": "millimeter millimeters millimetre millimetres", "cm": "centimeter centimeters centimetre centimetres",
    "m": "meter meters metre metres", "km": "kilometer kilometers kilometre kilometres",
    "in": "inch inches", "ft": "foot feet", "yd": "yard yards", "mi": "mile miles",
    "mg": "milligram milligrams", "g": "gram grams", "kg": "kilogram kilograms kgs",
    "lb": "pound pounds lbs", "ml": "milliliter milliliters millilitre millilitres",
    "l": "liter liters litre litres", "s": "sec secs second seconds", "min": "mins minute minutes",
    "h": "hr hrs hour hours", "day": "days", "week": "weeks", "month": "months", "year": "years yr yrs",
    "°": "deg degree degrees", "rad": "radian radians", "%": "percent percentage",
    "℃": "celsius", "℉": "fahrenheit", "＄": "dollar dollars usd", "€": "euro euros eur",
    "¥": "yuan yen rmb cny", "£": "gbp", "cent": "cents ¢",
}
_UNITS = {w: c for c, syns in _UNIT_GROUPS.items() for w in (c, *syns.split())}
_UNIT_TOKEN = re.compile(r"[ \t]*([^\W\d_]+|[°%℃℉＄€¥£¢])"
                         r"(?:[ \t]*\^[ \t]*\(?[ \t]*([-+]?[0-9])[ \t]*\)?|([23])(?![0-9]))?")
_BAD_UNIT = "\0"    # the text after a number is not a unit: the answer is not a quantity


def _canon_unit(rest: str, apart: bool = True) -> str:
    """Canonical unit of the text after a number: "" (none), _BAD_UNIT, or e.g. "cm^2", "m/s", "°".
    Synonyms map through _UNIT_GROUPS; "square"/"sq"/"cubic" raise the next word's power; "per" and
    "/" start the denominator; "unit(s)" is no unit. An unknown word stays (lower-case, no plural s)
    if it has 3+ letters and stands `apart` from the number; else (x, ab, digits) _BAD_UNIT."""
    s = rest.strip().lower()
    if len(s) > 80:
        return _BAD_UNIT
    s = re.sub(r"(?:°|degrees?)[ \t]*(?:c|celsius)\b", "℃", s)
    s = re.sub(r"(?:°|degrees?)[ \t]*(?:f|fahrenheit)\b", "℉", s)
    parts, den, power, i = ([], []), False, 1, 0
    while i < len(s):
        if s[i] in " \t*" or (s[i] == "/" and not den):
            den, i = den or s[i] == "/", i + 1
            continue
        m = _UNIT_TOKEN.match(s, i)
        if not m:
            return _BAD_UNIT
        w, e, i = m.group(1), int(m.group(2) or m.group(3) or 1), m.end()
        if w == "per" and not den:
            den = True
        elif w in ("square", "sq", "cubic"):
            power = 3 if w == "cubic" else 2
        elif w in ("unit", "units"):
            power = 1
        else:
            c = _UNITS.get(w)
            if c is None and (len(w) < 3 or (m.start(1) == 0 and not apart)):
                return _BAD_UNIT
            if c is None:
                c = w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
            parts[den].append(c if e * power == 1 else f"{c}^{e * power}")
            power = 1
    if den and not parts[1]:
        return _BAD_UNIT
    return " ".join(parts[0]) + ("/" + " ".join(parts[1]) if parts[1] else "")


# ----------------------------------------------------------------------------------------------
# what an answer is: a quantity, a range, a tuple, or text (None)

_Qty = NamedTuple("_Qty", [("value", object), ("dec", bool), ("unit", str)])   # value: Fraction/float
_Range = NamedTuple("_Range", [("lo", _Qty), ("hi", _Qty)])
_Tuple = NamedTuple("_Tuple", [("brackets", str), ("items", list)])   # "()", "[]" or ""; plain items
_LIT = r"(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?"
_RANGE_RE = re.compile(rf"({_LIT})[ \t]*(?:-|\bto\b)[ \t]*({_LIT})(?![0-9.^(*/])(.*)", re.S)
_NAME_LHS_RE = re.compile(r"(?:[A-Za-z\\∠][A-Za-z0-9_\\∠'() \t]*)?")
_SPLIT_RE = re.compile(r"[()\[\]{},;]")


def _items(s: str, depth: int) -> list[str] | None:
    """The 2+ non-empty items of `s` between commas/semicolons outside any bracket, or None."""
    if depth >= _MAX_TUPLE_DEPTH:
        return None
    out, level, last = [], 0, 0
    for m in _SPLIT_RE.finditer(s):
        ch = m.group()
        level += (ch in "([{") - (ch in ")]}")
        if ch in ",;" and level == 0:
            out.append(s[last:m.start()].strip())
            last = m.end()
    out.append(s[last:].strip())
    return out if len(out) >= 2 and all(out) else None


def _split_name(s: str) -> tuple[str | None, str]:
    """("x", "5") for "x = 5" / "x ≈ 5" / "= 5" (one relation, a name on the left); (None, s) else."""
    rel = [i for i, ch in enumerate(s) if ch in "=≈"]
    lhs = s[:rel[0]].strip() if len(rel) == 1 else None
    if lhs is None or len(lhs) > 40 or not _NAME_LHS_RE.fullmatch(lhs):
        return None, s
    return lhs.replace(" ", ""), s[rel[0] + 1:].strip()


def _quantity(s: str) -> _Qty | None:
    """A number (an expression, or number words) with an optional unit, or None."""
    p = _Parser(s)
    try:
        v = p.expr()
    except (ValueError, ArithmeticError, RecursionError):
        words = s.split()
        for k in range(min(len(words), 8), 0, -1):
            n = _words_to_number(" ".join(words[:k]))
            unit = _canon_unit(" ".join(words[k:])) if n is not None else _BAD_UNIT
            if unit != _BAD_UNIT and (unit in _UNITS or unit == ""):
                return _Qty(Fraction(n), False, unit)
        return None
    unit = _canon_unit(s[p.i:], apart=s[p.i - 1:p.i].isspace())
    return None if unit == _BAD_UNIT else _Qty(v, p.dec, unit)


def _parse_plain(s: str, depth: int = 0):
    """A plain string as _Qty, _Range or _Tuple; None when it is text (or too long to be a number).

    "x = 5" is the quantity 5 (one relation, a name on the left); "x = 5, y = 3" is a tuple of two
    named values; "y = 2x + 1" and "5 + 3 = 8" are text. "10-12" / "10 to 12" (two plain literals)
    is a range, never the number -2. "(1, 2)", "[1, 2]" and "1, 2" are tuples."""
    s = s.strip().rstrip(".").strip()
    if not s or len(s) > _MAX_NUMERIC_CHARS:
        return None
    name, value = _split_name(s)
    if name is None and ("=" in s or "≈" in s):
        items = _items(s, depth)
        named = items is not None and all(_split_name(x)[0] is not None for x in items)
        return _Tuple("", items) if named else None
    if value[:1] + value[-1:] in ("()", "[]"):
        items = _items(value[1:-1], depth)
        if items:
            return _Tuple(value[0] + value[-1], items)
    m = _RANGE_RE.fullmatch(value)
    unit = _canon_unit(m.group(3)) if m else _BAD_UNIT
    if unit != _BAD_UNIT:
        return _Range(*(_Qty(Fraction(x.replace(",", "")), "." in x, unit) for x in m.group(1, 2)))
    q = _quantity(value)
    if q is not None or name is not None:
        return q
    items = _items(value, depth)
    return _Tuple("", items) if items else None


# ----------------------------------------------------------------------------------------------
# equivalence


def _num_close(a, a_dec: bool, b, b_dec: bool, rel_tol: float, precision) -> bool:
    """The number rule of is_equiv: exact integers exactly; else `precision` decimals if given; else
    exact rationals (no decimals written) exactly; else math.isclose(rel_tol, abs_tol=_ABS_TOL)."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        if (a.denominator == 1 and b.denominator == 1) or (precision is None and not a_dec and not b_dec):
            return a == b
    if precision is not None:
        return float(round(a, int(precision))) == float(round(b, int(precision)))
    return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=_ABS_TOL)


def _qty_equal(a: _Qty, b: _Qty, rel_tol: float, precision) -> bool:
    """Units given on both sides must be the same canonical unit; a unit on one side only is
    ignored. A percent against a bare number also matches as a fraction ("75%" = "0.75")."""
    if a.unit and b.unit and a.unit != b.unit:
        return False
    cands = [a.value] + ([a.value / 100] if a.unit == "%" and not b.unit else []) \
        + ([a.value * 100] if b.unit == "%" and not a.unit else [])
    return any(_num_close(c, a.dec, b.value, b.dec, rel_tol, precision) for c in cands)


def _equiv_plain(p: str, g: str, rel_tol: float, precision, depth: int = 0) -> bool:
    """Two plain strings: the same text (case-insensitive, but a lone letter keeps its case), else
    the same kind (quantity, range, tuple) with equal parts. Text never equals a number."""
    kp, kg = _text_key(p), _text_key(g)
    if kp == kg:
        return bool(kp) and (not (len(kp) == 1 and kp.isalpha()) or p.strip(" .") == g.strip(" ."))
    a, b = _parse_plain(p, depth), _parse_plain(g, depth)
    if a is None or b is None or type(a) is not type(b):
        return False
    if isinstance(a, _Qty):
        return _qty_equal(a, b, rel_tol, precision)
    if isinstance(a, _Range):
        return _qty_equal(a.lo, b.lo, rel_tol, precision) and _qty_equal(a.hi, b.hi, rel_tol, precision)
    if (a.brackets and b.brackets and a.brackets != b.brackets) or len(a.items) != len(b.items):
        return False                    # "(1, 2)" is an open interval, "[1, 2]" a closed one
    pairs = list(zip(a.items, b.items))
    na, nb = ([_split_name(x)[0] for x in t.items] for t in (a, b))
    if None not in na and None not in nb and len(set(na)) == len(na) and set(na) == set(nb):
        by_name = dict(zip(nb, b.items))                   # "x = 5, y = 3" = "y = 3, x = 5"
        pairs = [(x, by_name[n]) for x, n in zip(a.items, na)]
    return all(_equiv_plain(x, y, rel_tol, precision, depth + 1) for x, y in pairs)


def _prep(s) -> str:
    return _plain(_unwrap(normalize_letter(str(s))))


def choice_index(pred: str | None, choices, *, rel_tol: float = 1e-4, precision=None) -> int | None:
    """Which option `pred` names, or None (none, or ambiguous: never the "closest" option).

    In order: an upper-case letter form within range ("C", "(C)", "[C]", "C.", "C)", "Option C",
    "the correct answer is C because .."); the unique option with the same normalised text; a
    lower-case letter form ("c", "(c)": with options given a letter is a letter); the unique
    option equal by value (is_equiv's rules)."""
    if pred is None or not choices or isinstance(choices, str):
        return None
    pred, choices = str(pred), [str(c) for c in choices]
    n = min(len(choices), len(LETTERS))
    upper = option_letter(pred)
    if upper is not None and LETTERS.index(upper) < n:
        return LETTERS.index(upper)
    key = norm_text(pred)
    hits = [i for i, c in enumerate(choices) if key and norm_text(c) == key]
    if hits:
        return hits[0] if len(hits) == 1 else None
    lower = option_letter(pred, lower=True)
    if lower is not None and LETTERS.index(lower) < n:
        return LETTERS.index(lower)
    p = _prep(pred)
    hits = [i for i, c in enumerate(choices) if _equiv_plain(p, _prep(c), rel_tol, precision)]
    return hits[0] if len(hits) == 1 else None


def is_equiv(pred: str | None, gold, choices=None, *, rel_tol: float = 1e-4, precision=None) -> bool:
    """Whether prediction `pred` answers `gold`. Never raises; None answers nothing.

    With `choices` (option texts in order A, B, ..) and a gold that names an option (a letter or an
    option's text): right iff `pred` names the same option (see choice_index). Otherwise both sides
    are normalised (see _plain) and compared as:
      numbers  exact integers compare exactly ("10001" != "10000", "2003 \\times 2001" != "2002^{2}");
               otherwise, with precision=k, both are rounded to k decimals and compared; with
               precision=None (the default, the toy world) floats agree within rel_tol and exact
               rationals must be identical; "75%" also equals 0.75;
      units    equal canonical units compare, different ones never ("31.4 m" != "31.4cm"); a unit
               on one side only is ignored ("6" = "6 cm");
      ranges   "10-12" equals only a range; tuples / named pairs elementwise ("x = 5, y = 3" =
               "(5, 3)"), "(..)" against "[..]" never;
      text     case- and space-insensitive, except that a lone letter keeps its case ("c" != "C"
               without options: a bare "c" may be a variable); empty text equals nothing.
    """
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if choices and not isinstance(choices, str):
        g = choice_index(gold, choices, rel_tol=rel_tol, precision=precision)
        if g is not None:
            return choice_index(pred, choices, rel_tol=rel_tol, precision=precision) == g
    return _equiv_plain(_prep(pred), _prep(gold), rel_tol, precision)


def parse_number(text: str | None) -> float | None:
    """The value of a numeric answer ("x = 5", "1,000 g", "3\\pi", "75%" -> 75.0, "seven"), or None
    for text, ranges ("10-12") and tuples. Never evaluates code."""
    q = None if text is None else _parse_plain(_plain(_unwrap(str(text))))
    return float(q.value) if isinstance(q, _Qty) else None


def judge(response: str | None, gold, choices=None, *, rel_tol: float = 1e-4,
          precision=None) -> tuple[str | None, bool]:
    """THE answer judge of the project (toy evaluation, the GRPO reward, DualMath labelling, the
    world's checker): (the extracted answer or None, whether it answers `gold`)."""
    ext = extract_answer(response)
    return ext, is_equiv(ext, gold, choices, rel_tol=rel_tol, precision=precision)
