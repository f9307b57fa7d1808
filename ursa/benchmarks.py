"""Readers and rule-based scorers of the six benchmarks of the paper, in their own record formats.

    MathVista testmini, MathVision (MATH-V), MathVerse testmini, DynaMath, WE-MATH, GeoQA

References
- PAPER.md "Evaluation protocol": zero-shot; rule-based matching for WE-MATH and GeoQA, an LLM judge
  for the other four. Here everything is rule based: where a rule cannot decide (MathVerse free form
  with a symbolic answer), the item is counted as "needs judge" and scored wrong in the accuracy.
- PAPER.md "The released URSA-8B architecture": the evaluation prompt (`ursa_prompt`).
- URSA-MATH/URSA-MATH inference/vllm_infer.py: how URSA builds each benchmark's question (MathVerse
  uses the record's own `query_cot`; WE-MATH appends `option`; MathVision appends "A. x B. y ...").
- MathVista (lupantech/MathVista) rules: multi-choice letter -> option text; integer via
  int(float(x)); float via str(round(x, precision)); list via str(list); prediction == answer.
  (No fuzzy "most similar option": an unmatched answer stays unmatched.)
- DynaMath (DynaMath/DynaMath, evaluation/*_json_eval.py): float right iff |pred - gt| <= 1e-3;
  multiple choice by letter; text iff the ground truth occurs in the answer. Average-case accuracy over
  all variants; worst-case accuracy: a seed question counts only if all its variants are right.
- WE-MATH (We-Math/We-Math evaluation/four_dimensional_metrics.py): a multi-step problem (key
  "2steps_multi" / "3steps_multi") and its one-step sub-problems ("2steps_1", "2steps_2", ...) share
  the record "ID". With s = sub-problems right, m = multi-step right:
      IK (insufficient knowledge)      some sub wrong and m wrong
      IG (inadequate generalisation)   all subs right and m wrong
      CM strict / loose                m right and all subs right / at least one sub right
      RM strict / loose                m right and some sub wrong / all subs wrong
      Score = (N - 0.5 IG - RM - IK) / N,  N = number of multi-step problems (525 in testmini);
  RM rate = RM / (CM + RM).
- GeoQA (chen-judge/GeoQA): multiple choice accuracy; the original records hold the question in
  "subject", the options in "choices" and the gold index in "label"; an "answer" letter/text works too.

CLI
    python -m ursa.benchmarks rescore --benchmark mathvista FILE [--response-field response] [--json]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict

from ursa.answer import LETTERS, choice_index, extract_answer, is_equiv, norm_text, parse_number

BENCHMARKS = ("mathvista", "mathvision", "mathverse", "dynamath", "wemath", "geoqa")

URSA_PROMPT = ("you are given a math problem image, please solve the problem step by step. When you get "
               "an answer, please return the correspond option instead of the text content.\nQuestion:")


class BenchmarkError(ValueError):
    """A malformed benchmark file or record; the message names the file and the record."""


def ursa_prompt(question: str) -> str:
    """The evaluation prompt of URSA-8B (PAPER.md): instruction + "\\nQuestion:" + question."""
    return URSA_PROMPT + question


# ----------------------------------------------------------------------------------------------
# reading


def read_records(path: str) -> list[tuple[str, dict]]:
    """Records of a .json (dict id -> record, or list) or .jsonl file, each with its location label
    for error messages: `FILE: record "413"` (dict), `FILE: record 3` (list), `FILE:17` (jsonl line)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise BenchmarkError(f"{path}: cannot read: {e.strerror}") from None
    out = []
    if path.endswith(".jsonl"):
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}:{i}: invalid JSON: {e.msg}") from None
            if not isinstance(rec, dict):
                raise BenchmarkError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            out.append((f"{path}:{i}", rec))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
    if items is None:
        raise BenchmarkError(f"{path}: expected a JSON object or list of records")
    for k, rec in items:
        where = f'{path}: record "{k}"' if isinstance(data, dict) else f"{path}: record {k}"
        if not isinstance(rec, dict):
            raise BenchmarkError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        out.append((where, rec))
    return out


def _field(rec: dict, where: str, *names: str):
    """The first of `names` present in `rec`; else a BenchmarkError naming the first."""
    for n in names:
        if n in rec:
            return rec[n]
    raise BenchmarkError(f'{where}: missing field "{names[0]}"')


def _response(rec: dict, where: str, field: str) -> str | None:
    """The model response of a record (a list of samples -> the first one)."""
    r = _field(rec, where, field)
    if isinstance(r, list):
        r = r[0] if r else None
    if r is not None and not isinstance(r, str):
        raise BenchmarkError(f'{where}: field "{field}" must be a string, got {type(r).__name__}')
    return r


_PAREN_LETTER = re.compile(r"\(([A-J])\)\s*")
_LINE_LETTER = re.compile(r"(?:^|(?<=[\n;]))\s*([A-J])\s*[.:：]\s*")


def _sequential(ms: list) -> bool:
    return len(ms) >= 2 and [m.group(1) for m in ms] == list(LETTERS[:len(ms)])


def parse_choices(text: str) -> list[str]:
    """Options written inside a question: "Choices:\\nA:6\\nB:8", "Choices: (A) yes (B) no",
    "A. 300;B. 400" (WE-MATH). Letters must run A, B, C, ... Returns [] when none are found."""
    if not text:
        return []
    m = list(re.finditer(r"choices?\s*[:：]", text, re.I))
    tail = text[m[-1].end():] if m else text
    for pat in (_PAREN_LETTER, _LINE_LETTER):
        ms = list(pat.finditer(tail))
        if _sequential(ms):
            opts = [tail[a.end():b.start()] for a, b in zip(ms, ms[1:])] + [tail[ms[-1].end():]]
            return [o.strip().rstrip(";,").strip() for o in opts]
    return []


def _letters_block(choices: list[str], style: str = "paren") -> str:
    if style == "paren":
        return "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return " ".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


# ----------------------------------------------------------------------------------------------
# question text per benchmark (what follows "Question:" in URSA's prompt)


def mathvista_question(rec: dict) -> str:
    """MathVista: the question and, for multi-choice, "Choices:\\n(A) ..." (unless already in it)."""
    q = rec.get("question", "")
    ch = rec.get("choices") or []
    if ch and "choices:" not in q.lower():
        q = q + "\nChoices:\n" + _letters_block(ch)
    return q


def mathvision_question(rec: dict) -> str:
    """MathVision: question + " A. x B. y ..." when it has options (URSA's mathv_option_trans)."""
    ops = rec.get("options") or []
    return rec.get("question", "") + (" " + _letters_block(ops, "dot") if ops else "")


def mathverse_question(rec: dict) -> str:
    """MathVerse: URSA feeds the record's own `query_cot` (it carries the instruction and, for
    Vision Only, points at the question drawn in the image); falls back to `question`."""
    return rec.get("query_cot") or rec.get("question", "")


def dynamath_question(rec: dict) -> str:
    return rec.get("question", "")


def wemath_question(rec: dict) -> str:
    """WE-MATH: question + " " + option string (URSA's vllm_infer.py)."""
    return f"{rec.get('question', '')} {rec.get('option', '')}".rstrip()


def geoqa_question(rec: dict) -> str:
    q = rec.get("question") or rec.get("problem") or rec.get("subject") or ""
    ch = rec.get("choices") or rec.get("options") or []
    if ch and "choices:" not in q.lower():
        q = q + "\nChoices:\n" + _letters_block(ch)
    return q


QUESTION = {"mathvista": mathvista_question, "mathvision": mathvision_question,
            "mathverse": mathverse_question, "dynamath": dynamath_question,
            "wemath": wemath_question, "geoqa": geoqa_question}


def question_text(benchmark: str, rec: dict) -> str:
    return QUESTION[benchmark](rec)


def build_prompt(benchmark: str, rec: dict) -> str:
    """The user-turn text URSA evaluates with: ursa_prompt(question), except MathVerse whose
    `query_cot` is used as is (as in URSA's vllm_infer.py)."""
    if benchmark == "mathverse":
        return mathverse_question(rec)
    return ursa_prompt(question_text(benchmark, rec))


# ----------------------------------------------------------------------------------------------
# per-item scorers: (record, location, response) -> item dict with "correct": True/False/None


def _parse_list(s: str):
    """"[1, 2.5, -3]" -> [1, 2.5, -3] keeping int/float literal types (MathVista's str(list)); None if
    not a flat list of numbers. Never evaluates code."""
    t = s.strip().strip("$").strip()
    if not (t.startswith("[") and t.endswith("]")):
        return None
    out = []
    for x in t[1:-1].split(","):
        x = x.strip()
        if re.fullmatch(r"[-+]?\d+", x):
            out.append(int(x))
        elif re.fullmatch(r"[-+]?(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?", x):
            out.append(float(x))
        else:
            return None
    return out


def mathvista_prediction(extraction: str | None, rec: dict, where: str) -> str | None:
    """MathVista's normalisation of an extracted answer into the gold's format."""
    if extraction is None:
        return None
    qtype = _field(rec, where, "question_type")
    atype = _field(rec, where, "answer_type")
    if qtype == "multi_choice":
        choices = _field(rec, where, "choices")
        if not choices:
            raise BenchmarkError(f'{where}: multi_choice record with empty "choices"')
        i = choice_index(extraction, choices)
        return choices[i] if i is not None else extraction.strip()
    if atype == "integer":
        v = parse_number(extraction)
        return str(int(v)) if v is not None else None
    if atype == "float":
        prec = _field(rec, where, "precision")
        if prec is None:
            raise BenchmarkError(f'{where}: float answer with "precision" null')
        v = parse_number(extraction)
        return str(round(v, int(prec))) if v is not None else None
    if atype == "list":
        v = _parse_list(extraction)
        return str(v) if v is not None else extraction.strip()
    return extraction.strip()


def score_mathvista(rec: dict, where: str, response: str | None) -> dict:
    answer = str(_field(rec, where, "answer"))
    ext = extract_answer(response or "")
    pred = mathvista_prediction(ext, rec, where)
    task = (rec.get("metadata") or {}).get("task", "unknown")
    return {"extraction": ext, "prediction": pred, "correct": pred is not None and pred == answer,
            "groups": {"task": task}}


def score_mathvision(rec: dict, where: str, response: str | None) -> dict:
    answer = str(_field(rec, where, "answer"))
    options = rec.get("options") or []
    ext = extract_answer(response or "")
    return {"extraction": ext, "correct": is_equiv(ext, answer, options or None),
            "groups": {"subject": rec.get("subject", "unknown"), "level": str(rec.get("level", "?"))}}


def score_mathverse(rec: dict, where: str, response: str | None) -> dict:
    """Multi-choice by letter or by an option's text (options parsed from the question); free form by
    numeric or normalised-text equality. Anything else: correct = None (needs an LLM judge)."""
    answer = str(_field(rec, where, "answer"))
    qtype = _field(rec, where, "question_type")
    ext = extract_answer(response or "")
    meta = rec.get("metadata") or {}
    groups = {"version": rec.get("problem_version", "unknown"), "subject": meta.get("subject", "unknown")}
    if ext is None:
        return {"extraction": None, "correct": False, "groups": groups}
    if qtype == "multi-choice":
        choices = parse_choices(rec.get("question", ""))
        g = choice_index(answer, choices) if choices else None
        if g is None and len(answer.strip()) == 1 and answer.strip() in LETTERS:
            g = LETTERS.index(answer.strip())
        p = choice_index(ext, choices) if choices else None
        if p is None and len(ext) == 1 and ext in LETTERS:
            p = LETTERS.index(ext)
        verdict = None if p is None or g is None else p == g
    else:
        if norm_text(ext) == norm_text(answer):
            verdict = True
        else:
            pv, gv = parse_number(ext), parse_number(answer)
            verdict = is_equiv(ext, answer) if pv is not None and gv is not None else None
    return {"extraction": ext, "correct": verdict, "groups": groups}


def dynamath_correct(ext: str | None, gt: str, answer_type: str, question: str = "") -> bool:
    """DynaMath's rules: float |pred - gt| <= 1e-3; multiple choice by option; text: gt in answer."""
    if ext is None:
        return False
    if answer_type == "float":
        p, g = parse_number(ext), parse_number(gt)
        return p is not None and g is not None and abs(p - g) <= 1e-3
    if answer_type == "multiple choice":
        return is_equiv(ext, gt, parse_choices(question) or None)
    return norm_text(gt) in norm_text(ext) or is_equiv(ext, gt)


def score_dynamath(rec: dict, where: str, response: str | None) -> dict:
    gt = str(_field(rec, where, "ground_truth", "answer"))
    atype = _field(rec, where, "answer_type")
    seed = str(_field(rec, where, "qid", "id"))
    ext = extract_answer(response or "")
    return {"extraction": ext, "correct": dynamath_correct(ext, gt, atype, rec.get("question", "")),
            "seed": seed, "variant": rec.get("variant", rec.get("image_dir")),
            "groups": {"subject": rec.get("subject", "unknown")}}


def score_wemath(rec: dict, where: str, response: str | None) -> dict:
    answer = str(_field(rec, where, "answer"))
    pid, key = str(_field(rec, where, "ID")), str(_field(rec, where, "key"))
    if not re.fullmatch(r"[23]steps_(?:[123]|multi)", key):
        raise BenchmarkError(f'{where}: field "key" must be like "2steps_1" or "3steps_multi", got {key!r}')
    ext = extract_answer(response or "")
    choices = parse_choices(rec.get("option", "")) or None
    return {"extraction": ext, "correct": is_equiv(ext, answer, choices), "problem": pid, "key": key,
            "groups": {"key": key}}


def score_geoqa(rec: dict, where: str, response: str | None) -> dict:
    choices = rec.get("choices") or rec.get("options") or parse_choices(geoqa_question(rec))
    if "answer" in rec:
        gold = str(rec["answer"])
    else:
        label = _field(rec, where, "answer", "label")
        if not isinstance(label, int) or not 0 <= label < len(choices):
            raise BenchmarkError(f'{where}: field "label" must index "choices", got {label!r}')
        gold = LETTERS[label]
    ext = extract_answer(response or "")
    return {"extraction": ext, "correct": is_equiv(ext, gold, choices or None), "groups": {}}


SCORERS = {"mathvista": score_mathvista, "mathvision": score_mathvision, "mathverse": score_mathverse,
           "dynamath": score_dynamath, "wemath": score_wemath, "geoqa": score_geoqa}


# ----------------------------------------------------------------------------------------------
# aggregate metrics


def _acc(correct: int, n: int) -> dict:
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0}


def dynamath_metrics(items: list[dict]) -> dict:
    """Average case = right / all variants; worst case = seeds whose variants are all right / seeds."""
    by_seed = defaultdict(list)
    for it in items:
        by_seed[it["seed"]].append(bool(it["correct"]))
    worst = sum(all(v) for v in by_seed.values())
    return {"average_case": _acc(sum(bool(it["correct"]) for it in items), len(items)),
            "worst_case": _acc(worst, len(by_seed)),
            "variants_per_seed": sorted({len(v) for v in by_seed.values()})}


def wemath_metrics(items: list[dict], path: str = "") -> dict:
    """The four-dimensional metric (IK, IG, CM, RM) and Score(strict/loose) of WE-MATH."""
    probs = defaultdict(dict)
    for it in items:
        probs[it["problem"]][it["key"]] = bool(it["correct"])
    c = dict(IK=0, IG=0, CM_strict=0, CM_loose=0, RM_strict=0, RM_loose=0)
    steps_acc = {"S1": [0, 0], "S2": [0, 0], "S3": [0, 0]}
    for pid, keys in sorted(probs.items()):
        k = int(next(iter(keys))[0])  # 2 or 3 steps
        need = [f"{k}steps_{i}" for i in range(1, k + 1)] + [f"{k}steps_multi"]
        missing = [x for x in need if x not in keys]
        if missing or len(keys) != len(need):
            raise BenchmarkError(f'{path}: problem "{pid}": expected records {need}, '
                                 f'missing {missing}, got {sorted(keys)}')
        subs = [keys[f"{k}steps_{i}"] for i in range(1, k + 1)]
        m = keys[f"{k}steps_multi"]
        c["IK"] += (not all(subs)) and not m
        c["IG"] += all(subs) and not m
        c["CM_strict"] += all(subs) and m
        c["CM_loose"] += any(subs) and m
        c["RM_strict"] += (not all(subs)) and m
        c["RM_loose"] += (not any(subs)) and m
        steps_acc["S1"][0] += sum(subs)
        steps_acc["S1"][1] += len(subs)
        steps_acc[f"S{k}"][0] += m
        steps_acc[f"S{k}"][1] += 1
    n = len(probs)
    out = {"problems": n, **c}
    for mode in ("strict", "loose"):
        out[f"score_{mode}"] = (n - 0.5 * c["IG"] - c[f"RM_{mode}"] - c["IK"]) / n if n else 0.0
        cm_rm = c[f"CM_{mode}"] + c[f"RM_{mode}"]
        out[f"RM_rate_{mode}"] = c[f"RM_{mode}"] / cm_rm if cm_rm else 0.0
    out.update({k: _acc(*v) for k, v in steps_acc.items()})
    return out


def _record_id(rec: dict, where: str) -> str:
    """The record's own id (pid / id / sample_index / ID+key), else its location."""
    if "ID" in rec and "key" in rec:
        return f"{rec['ID']}/{rec['key']}"
    for k in ("pid", "id", "sample_index", "qid"):
        if k in rec:
            return str(rec[k]) + (f"/{rec['variant']}" if "variant" in rec else
                                  f"/{rec['image_dir']}" if "image_dir" in rec else "")
    return where


def rescore(path: str, benchmark: str, response_field: str = "response") -> dict:
    """Score a responses file (the benchmark's own records plus a response field) by rules.

    Returns {"benchmark", "file", "n", "correct", "accuracy", "groups": {name: {value: {n, correct,
    accuracy}}}, "metrics": {...benchmark-specific...}, "items": [{"id", "extraction", "correct", ...}]}.
    """
    if benchmark not in SCORERS:
        raise BenchmarkError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    items = []
    for where, rec in read_records(path):
        it = SCORERS[benchmark](rec, where, _response(rec, where, response_field))
        it["id"] = _record_id(rec, where)
        it["where"] = where
        items.append(it)
    if not items:
        raise BenchmarkError(f"{path}: no records")
    groups = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for it in items:
        for g, v in it.get("groups", {}).items():
            groups[g][v][0] += it["correct"] is True
            groups[g][v][1] += 1
    n_right = sum(it["correct"] is True for it in items)
    report = {"benchmark": benchmark, "file": path, **_acc(n_right, len(items)),
              "groups": {g: {v: _acc(*cn) for v, cn in sorted(d.items())} for g, d in groups.items()},
              "metrics": {}, "items": items}
    if benchmark == "mathvista":
        gps = report["groups"]["task"].get("geometry problem solving", _acc(0, 0))
        report["metrics"]["gps"] = gps
    elif benchmark == "mathverse":
        judge = sum(it["correct"] is None for it in items)
        report["metrics"]["needs_judge"] = judge
        report["metrics"]["decided"] = _acc(n_right, len(items) - judge)
    elif benchmark == "dynamath":
        report["metrics"] = dynamath_metrics(items)
    elif benchmark == "wemath":
        report["metrics"] = wemath_metrics(items, path)
    return report


def format_report(report: dict) -> str:
    """A plain-text table of a rescore() report."""
    pct = lambda a: f"{a['correct']:>5}/{a['n']:<5} {100 * a['accuracy']:6.2f}%"  # noqa: E731
    lines = [f"{report['benchmark']}  {report['file']}", f"  {'overall':<36} {pct(report)}"]
    m = report["metrics"]
    if report["benchmark"] == "mathvista":
        lines.append(f"  {'GPS (geometry problem solving)':<36} {pct(m['gps'])}")
    if report["benchmark"] == "mathverse":
        lines.append(f"  {'needs an LLM judge (scored wrong)':<36} {m['needs_judge']:>5}")
        lines.append(f"  {'accuracy on rule-decided items':<36} {pct(m['decided'])}")
    if report["benchmark"] == "dynamath":
        lines.append(f"  {'average-case accuracy':<36} {pct(m['average_case'])}")
        lines.append(f"  {'worst-case accuracy (seeds)':<36} {pct(m['worst_case'])}")
    if report["benchmark"] == "wemath":
        lines.append(f"  {'multi-step problems':<36} {m['problems']:>5}")
        for mode in ("strict", "loose"):
            lines.append(f"  Score({mode}) {100 * m[f'score_{mode}']:6.2f}%   IK {m['IK']}  IG {m['IG']}  "
                         f"CM {m[f'CM_{mode}']}  RM {m[f'RM_{mode}']} (rate {100 * m[f'RM_rate_{mode}']:.2f}%)")
        for s in ("S1", "S2", "S3"):
            lines.append(f"  {s + ' accuracy':<36} {pct(m[s])}")
    for g, d in report["groups"].items():
        if len(d) > 1 or report["benchmark"] != "geoqa":
            lines.append(f"  by {g}:")
            lines += [f"    {str(v)[:34]:<34} {pct(a)}" for v, a in d.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ursa.benchmarks", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rescore", help="score saved responses by rules")
    r.add_argument("file", help="responses file: the benchmark's records plus a response field")
    r.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="record format and scorer")
    r.add_argument("--response-field", default="response", help="field holding the model response")
    r.add_argument("--json", action="store_true", help="print the full report as JSON")
    a = p.parse_args(argv)
    try:
        rep = rescore(a.file, a.benchmark, a.response_field)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep, ensure_ascii=False, indent=1) if a.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
