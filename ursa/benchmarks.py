"""Rule-based scorers of the six benchmarks of the paper, on their own record formats.

    MathVista testmini, MathVision (MATH-V), MathVerse testmini, DynaMath, WE-MATH, GeoQA

Files are read by ursa.bench_files (JSON, JSONL, URSA-MATH's released CSV outputs, VLMEvalKit's
TSV); docs/benchmarks.md lists the accepted files and columns and the command for each released file.

API (what eval.py calls)
    rescore(path, benchmark, response_field=None) -> report   score a responses file by rules
    format_report(report) -> str                              the printed table
    write_verdicts(path, report)                              every item's id, extraction,
                                                              prediction, gold and verdict
    read_records(path, benchmark=None), build_prompt(benchmark, rec), record_image_bytes(rec)
                                                              for generation

The paper scores WE-MATH and GeoQA by rules and the other four with an LLM judge; here everything is
rule based. Where a rule cannot decide (MathVerse free form with a symbolic answer) the item counts as
"needs judge" and is scored wrong in the accuracy.

Rules per benchmark (numbers: how a float prediction is compared)
- MathVista (lupantech/MathVista evaluation/calculate_score.py): multi-choice: an option letter ->
  that option's text; integer answers: str(int(x)) == answer (int() truncates, as int(float(x)));
  float answers: str(round(x, precision)) == answer with the record's `precision` (when absent, as in
  some TSV files: the number of decimals of the gold answer); list answers: str(list) == answer;
  then prediction == answer exactly. No "most similar option": an unmatched answer stays unmatched.
- MathVision (mathllm/MATH-V evaluation/evaluate.py and utils.py is_equal): right iff the
  prediction equals the gold letter or the gold option's value: same text (case-insensitive), or
  both numbers rounded to 2 decimals equal (is_equiv(precision=2); integers compare exactly).
- DynaMath (DynaMath/DynaMath evaluation/*_json_eval.py): float right iff |pred - gt| <= 1e-3;
  multiple choice by option; text iff the ground truth occurs in the answer. Average-case accuracy
  over all variants; worst-case accuracy: a seed question counts only if all its variants are right.
- MathVerse: multi-choice by option letter or text (options parsed from the question); free form by
  normalised text or numeric equality (is_equiv defaults), else "needs judge".
- WE-MATH (We-Math/We-Math evaluation/four_dimensional_metrics.py): by option (is_equiv defaults). A
  multi-step problem (key "2steps_multi" / "3steps_multi") and its one-step sub-problems ("2steps_1",
  "2steps_2", ...) share the record "ID". With the sub-problems and the multi-step problem scored:
      IK (insufficient knowledge)      some sub wrong and multi wrong
      IG (inadequate generalisation)   all subs right and multi wrong
      CM strict / loose                multi right and all subs right / at least one sub right
      RM strict / loose                multi right and some sub wrong / all subs wrong
      Score = (N - 0.5 IG - RM - IK) / N,  N = number of multi-step problems (525 in testmini);
  RM rate = RM / (CM + RM).
- GeoQA (chen-judge/GeoQA): multiple choice accuracy; the original records hold the question in
  "subject", the options in "choices" and the gold index in "label"; an "answer" letter/text works too.

Prompts: URSA-MATH/URSA-MATH inference/vllm_infer.py builds each benchmark's question (MathVerse
uses the record's own `query_cot`; WE-MATH appends `option`; MathVision appends "A. x B. y ...").
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

from ursa import io
from ursa.answer import LETTERS, choice_index, extract_answer, is_equiv, norm_text, parse_number
from ursa.bench_files import (BENCHMARKS, BenchmarkError, benchmark_name, read_records,  # noqa: F401
                              record_image_bytes)

URSA_PROMPT = ("you are given a math problem image, please solve the problem step by step. When you get "
               "an answer, please return the correspond option instead of the text content.\nQuestion:")

# fields tried, in order, for the model output when no response_field is named: "response" (this
# project, URSA's infer_mathvista.csv, and infer_wemath.json where it holds the processed answer
# "Answer: C"), "model_answer" (URSA's infer_mathvision.csv; the raw output in infer_wemath.json),
# "prediction" (VLMEvalKit result files)
RESPONSE_FIELDS = ("response", "model_answer", "prediction")

MATHVISION_PRECISION = 2      # MATH-V utils.py is_equal: round(x, 2) on both sides
DYNAMATH_ABS_TOL = 1e-3       # DynaMath: |pred - gt| <= 0.001
GPS_TASK = "geometry problem solving"
MATHVISTA_META_GROUPS = ("task", "category", "context", "grade", "language", "source")


def ursa_prompt(question: str) -> str:
    """URSA-8B's evaluation prompt (URSA-MATH inference/vllm_infer.py): instruction + "\\nQuestion:" +
    question."""
    return URSA_PROMPT + question


_PAREN_LETTER = re.compile(r"\(([A-J])\)\s*")
_LINE_LETTER = re.compile(r"(?:^|(?<=[\n;]))\s*([A-J])\s*[.:：]\s*")


def _sequential(ms: list) -> bool:
    return len(ms) >= 2 and [m.group(1) for m in ms] == list(LETTERS[:len(ms)])


def parse_choices(text: str | None) -> list[str]:
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
    q = rec.get("question") or ""
    ch = rec.get("choices") or []
    if ch and "choices:" not in q.lower():
        q = q + "\nChoices:\n" + _letters_block(ch)
    return q


def mathvision_question(rec: dict) -> str:
    """MathVision: question + " A. x B. y ..." when it has options (URSA's mathv_option_trans)."""
    ops = rec.get("options") or []
    return (rec.get("question") or "") + (" " + _letters_block(ops, "dot") if ops else "")


def mathverse_question(rec: dict) -> str:
    """MathVerse: URSA feeds the record's own `query_cot` (it carries the instruction and, for
    Vision Only, points at the question drawn in the image); falls back to `question`."""
    return rec.get("query_cot") or rec.get("question") or ""


def dynamath_question(rec: dict) -> str:
    return rec.get("question") or ""


def wemath_question(rec: dict) -> str:
    """WE-MATH: question + " " + option string (URSA's vllm_infer.py)."""
    return f"{rec.get('question') or ''} {rec.get('option') or ''}".rstrip()


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
    return QUESTION[benchmark_name(benchmark)](rec)


def build_prompt(benchmark: str, rec: dict) -> str:
    """The user-turn text URSA evaluates with: ursa_prompt(question), except MathVerse whose
    `query_cot` is used as is (as in URSA's vllm_infer.py)."""
    b = benchmark_name(benchmark)
    if b == "mathverse":
        return mathverse_question(rec)
    return ursa_prompt(question_text(b, rec))


# ----------------------------------------------------------------------------------------------
# per-item scorers: (record, location, response) -> item dict with "extraction", "prediction",
# "gold", "correct" (True / False / None = needs a judge) and "groups" (name -> value or list)


def _field(rec: dict, where: str, *names: str):
    """The first of `names` present (and not an empty cell) in `rec`; else a BenchmarkError."""
    for n in names:
        if rec.get(n) is not None:
            return rec[n]
    raise BenchmarkError(f'{where}: missing field "{names[0]}"')


def _choice_pred(ext: str | None, choices) -> str | None:
    """The option letter `ext` names, else `ext` itself (what a verdict file shows as prediction)."""
    i = choice_index(ext, choices) if ext is not None and choices else None
    return LETTERS[i] if i is not None else ext


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


def mathvista_precision(rec: dict, where: str) -> int:
    """Decimals a MathVista float answer is rounded to: the record's `precision`, else the number of
    decimals written in the gold answer ("51.04" -> 2); neither -> BenchmarkError."""
    if rec.get("precision") is not None:
        return int(rec["precision"])
    m = re.fullmatch(r"\s*[-+]?\d*\.(\d+)\s*", str(rec.get("answer") or ""))
    if m is None:
        raise BenchmarkError(f'{where}: float answer with "precision" absent and no decimals in "answer"')
    return len(m.group(1))


def mathvista_prediction(extraction: str | None, rec: dict, where: str) -> str | None:
    """MathVista's normalisation of an extracted answer into the gold's format (module docstring)."""
    if extraction is None:
        return None
    qtype = _field(rec, where, "question_type")
    atype = _field(rec, where, "answer_type")
    if qtype == "multi_choice":
        choices = rec.get("choices")
        if not choices:
            raise BenchmarkError(f'{where}: multi_choice record with empty "choices"')
        i = choice_index(extraction, choices)
        return choices[i] if i is not None else extraction.strip()
    if atype in ("integer", "float"):
        v = parse_number(extraction)
        if v is None or not math.isfinite(v):
            return None
        return str(int(v)) if atype == "integer" else str(round(v, mathvista_precision(rec, where)))
    if atype == "list":
        v = _parse_list(extraction)
        return str(v) if v is not None else extraction.strip()
    return extraction.strip()


def score_mathvista(rec: dict, where: str, response: str | None) -> dict:
    answer = str(_field(rec, where, "answer"))
    ext = extract_answer(response or "")
    pred = mathvista_prediction(ext, rec, where)
    meta = rec.get("metadata") or {}
    groups = {"question_type": rec.get("question_type"), "answer_type": rec.get("answer_type")}
    for k in MATHVISTA_META_GROUPS:
        groups[k] = meta.get(k, rec.get(k)) or "unknown"
    groups["skills"] = list(meta.get("skills") or [])
    return {"extraction": ext, "prediction": pred, "gold": answer,
            "correct": pred is not None and pred == answer, "groups": groups}


def score_mathvision(rec: dict, where: str, response: str | None) -> dict:
    answer = str(_field(rec, where, "answer"))
    options = rec.get("options") or []
    ext = extract_answer(response or "")
    return {"extraction": ext, "prediction": _choice_pred(ext, options), "gold": answer,
            "correct": is_equiv(ext, answer, options or None, precision=MATHVISION_PRECISION),
            "groups": {"subject": rec.get("subject") or "unknown", "level": str(rec.get("level", "?"))}}


def score_mathverse(rec: dict, where: str, response: str | None) -> dict:
    """Multi-choice by letter or by an option's text (options parsed from the question); free form by
    numeric or normalised-text equality. Anything else: correct = None (needs an LLM judge)."""
    answer = str(_field(rec, where, "answer"))
    qtype = _field(rec, where, "question_type")
    ext = extract_answer(response or "")
    meta = rec.get("metadata") or {}
    groups = {"version": rec.get("problem_version") or "unknown", "subject": meta.get("subject", "unknown")}
    out = {"extraction": ext, "prediction": ext, "gold": answer, "correct": False, "groups": groups}
    if ext is None:
        return out
    if qtype == "multi-choice":
        choices = parse_choices(rec.get("question"))
        g = choice_index(answer, choices) if choices else None
        if g is None and len(answer.strip()) == 1 and answer.strip() in LETTERS:
            g = LETTERS.index(answer.strip())
        p = choice_index(ext, choices) if choices else None
        if p is None and len(ext) == 1 and ext in LETTERS:
            p = LETTERS.index(ext)
        out["prediction"] = LETTERS[p] if p is not None else ext
        out["correct"] = None if p is None or g is None else p == g
    elif norm_text(ext) == norm_text(answer):
        out["correct"] = True
    else:
        pv, gv = parse_number(ext), parse_number(answer)
        out["correct"] = is_equiv(ext, answer) if pv is not None and gv is not None else None
    return out


def dynamath_correct(ext: str | None, gt: str, answer_type: str, question: str = "") -> bool:
    """DynaMath's rules: float |pred - gt| <= 1e-3; multiple choice by option; text: gt in answer."""
    if ext is None:
        return False
    if answer_type == "float":
        p, g = parse_number(ext), parse_number(gt)
        return p is not None and g is not None and abs(p - g) <= DYNAMATH_ABS_TOL
    if answer_type == "multiple choice":
        return is_equiv(ext, gt, parse_choices(question) or None)
    return norm_text(gt) in norm_text(ext) or is_equiv(ext, gt)


def score_dynamath(rec: dict, where: str, response: str | None) -> dict:
    gt = str(_field(rec, where, "ground_truth", "answer"))
    atype = _field(rec, where, "answer_type")
    seed = str(_field(rec, where, "qid", "id"))
    ext = extract_answer(response or "")
    return {"extraction": ext, "prediction": ext, "gold": gt,
            "correct": dynamath_correct(ext, gt, atype, rec.get("question") or ""),
            "seed": seed, "variant": rec.get("variant", rec.get("image_dir")),
            "groups": {"subject": rec.get("subject") or "unknown"}}


def score_wemath(rec: dict, where: str, response: str | None) -> dict:
    answer = str(_field(rec, where, "answer"))
    pid, key = str(_field(rec, where, "ID")), str(_field(rec, where, "key"))
    if not re.fullmatch(r"[23]steps_(?:[123]|multi)", key):
        raise BenchmarkError(f'{where}: field "key" must be like "2steps_1" or "3steps_multi", got {key!r}')
    ext = extract_answer(response or "")
    choices = rec.get("choices") or parse_choices(rec.get("option")) or None
    return {"extraction": ext, "prediction": _choice_pred(ext, choices), "gold": answer,
            "correct": is_equiv(ext, answer, choices), "problem": pid, "key": key, "groups": {"key": key}}


def score_geoqa(rec: dict, where: str, response: str | None) -> dict:
    choices = rec.get("choices") or rec.get("options") or parse_choices(geoqa_question(rec))
    if rec.get("answer") is not None:
        gold = str(rec["answer"])
    else:
        label = _field(rec, where, "answer", "label")
        if not isinstance(label, int) or not 0 <= label < len(choices):
            raise BenchmarkError(f'{where}: field "label" must index "choices", got {label!r}')
        gold = LETTERS[label]
    ext = extract_answer(response or "")
    return {"extraction": ext, "prediction": _choice_pred(ext, choices), "gold": gold,
            "correct": is_equiv(ext, gold, choices or None), "groups": {}}


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
    """The four-dimensional metric (IK, IG, CM, RM) and Score(strict/loose) of WE-MATH. Every problem
    needs all its records (sub-problems and multi-step); a missing one is a BenchmarkError."""
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
    """The record's own id (pid / id / sample_index / qid, with the DynaMath variant; ID/key for
    WE-MATH), else its location."""
    if rec.get("ID") is not None and rec.get("key") is not None:
        return f"{rec['ID']}/{rec['key']}"
    for k in ("pid", "id", "sample_index", "qid"):
        if rec.get(k) is not None:
            var = rec.get("variant", rec.get("image_dir"))
            return str(rec[k]) + (f"/{var}" if var is not None and k in ("id", "qid") else "")
    return where


def response_field_of(records: list[tuple[str, dict]], response_field: str | None = None) -> str:
    """The field holding the model output: `response_field` when named, else the first of
    RESPONSE_FIELDS present in the first record (so one field is used for the whole file)."""
    if response_field is not None:
        return response_field
    where, first = records[0]
    for f in RESPONSE_FIELDS:
        if f in first:
            return f
    raise BenchmarkError(f'{where}: missing field "response" (nor "model_answer" nor "prediction"); '
                         'name the field holding the model output with response_field')


def _response(rec: dict, where: str, field: str) -> str | None:
    """The model response of a record (a list of samples -> the first one; an empty cell -> None)."""
    if field not in rec:
        has = [f for f in RESPONSE_FIELDS if f in rec]
        hint = f' (the record has "{has[0]}": name that field, or leave it unset to pick it)' if has else ""
        raise BenchmarkError(f'{where}: missing field "{field}"{hint}')
    r = rec[field]
    if isinstance(r, list):
        r = r[0] if r else None
    if r is not None and not isinstance(r, str):
        raise BenchmarkError(f'{where}: field "{field}" must be a string, got {type(r).__name__}')
    return r


def score_records(records: list[tuple[str, dict]], benchmark: str, response_field: str | None = None
                  ) -> list[dict]:
    """Score (where, record) pairs (as read_records gives) item by item: per item the scorer's dict
    plus "id" and "where". No aggregate metric (a partial WE-MATH file scores item by item here)."""
    b = benchmark_name(benchmark)
    if not records:
        return []
    field = response_field_of(records, response_field)
    items = []
    for where, rec in records:
        it = SCORERS[b](rec, where, _response(rec, where, field))
        it["id"] = _record_id(rec, where)
        it["where"] = where
        items.append(it)
    return items


def _groups(items: list[dict]) -> dict:
    """{group: {value: {n, correct, accuracy}}}; a list value (MathVista skills) counts per element."""
    groups = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for it in items:
        for g, v in it.get("groups", {}).items():
            for x in (v if isinstance(v, list) else [v]):
                groups[g][str(x)][0] += it["correct"] is True
                groups[g][str(x)][1] += 1
    return {g: {v: _acc(*cn) for v, cn in sorted(d.items())} for g, d in groups.items()}


def rescore(path: str, benchmark: str, response_field: str | None = None) -> dict:
    """Score a responses file (the benchmark's records plus the model output) by rules.

    benchmark: any case ("MathVista"); response_field: the field holding the model output; None picks
    the first of "response", "model_answer", "prediction" the file has (URSA's infer_wemath.json has
    both: "response" is the processed answer its numbers come from, "model_answer" the raw output).

    Returns {"benchmark", "file", "response_field", "n", "correct", "accuracy",
    "groups": {name: {value: {n, correct, accuracy}}}, "metrics": {...benchmark-specific...},
    "items": [{"id", "where", "extraction", "prediction", "gold", "correct", ...}]}."""
    b = benchmark_name(benchmark)
    records = read_records(path, b)
    if not records:
        raise BenchmarkError(f"{path}: no records")
    field = response_field_of(records, response_field)
    items = score_records(records, b, field)
    n_right = sum(it["correct"] is True for it in items)
    report = {"benchmark": b, "file": str(path), "response_field": field, **_acc(n_right, len(items)),
              "groups": _groups(items), "metrics": {}, "items": items}
    if b == "mathvista":
        report["metrics"]["gps"] = report["groups"]["task"].get(GPS_TASK, _acc(0, 0))
    elif b == "mathverse":
        judge = sum(it["correct"] is None for it in items)
        report["metrics"]["needs_judge"] = judge
        report["metrics"]["decided"] = _acc(n_right, len(items) - judge)
    elif b == "dynamath":
        report["metrics"] = dynamath_metrics(items)
    elif b == "wemath":
        report["metrics"] = wemath_metrics(items, str(path))
    return report


def verdicts(report: dict) -> list[dict]:
    """Per item: {"id", "where", "extraction", "prediction", "gold", "verdict"} (verdict True / False,
    or None where only an LLM judge could decide)."""
    return [{"id": it["id"], "where": it["where"], "extraction": it["extraction"],
             "prediction": it.get("prediction"), "gold": it.get("gold"), "verdict": it["correct"]}
            for it in report["items"]]


def write_verdicts(path: str, report: dict) -> None:
    """Write a rescore() report's verdicts atomically: a .jsonl path gets one verdict per line; any
    other path a JSON object with the summary (benchmark, file, response_field, n, correct, accuracy,
    groups, metrics) and "verdicts": the list."""
    if str(path).endswith(".jsonl"):
        io.write_jsonl(path, verdicts(report))
        return
    summary = {k: report[k] for k in ("benchmark", "file", "response_field", "n", "correct", "accuracy",
                                      "groups", "metrics")}
    io.write_json(path, {**summary, "verdicts": verdicts(report)})


def format_report(report: dict) -> str:
    """A plain-text table of a rescore() report: overall, the benchmark's own metrics, then accuracy
    by each group (MathVista: question_type, answer_type, task, ... as its calculate_score.py)."""
    pct = lambda a: f"{a['correct']:>5}/{a['n']:<5} {100 * a['accuracy']:6.2f}%"  # noqa: E731
    lines = [f"{report['benchmark']}  {report['file']}  (responses: \"{report['response_field']}\")",
             f"  {'overall':<36} {pct(report)}"]
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
        if d:
            lines.append(f"  by {g}:")
            lines += [f"    {str(v)[:34]:<34} {pct(a)}" for v, a in d.items()]
    return "\n".join(lines)
