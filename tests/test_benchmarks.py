"""Benchmark readers and rule-based scorers: the two made-up-response fixtures (expected verdicts
stored in each record), excerpts of URSA-MATH's released outputs in their own formats (verdicts and
breakdowns counted by hand below), a VLMEvalKit-style TSV built here, and small hand-built cases."""
import base64
import csv
import io
import json
import os

import pytest
from PIL import Image

from ursa import benchmarks as B
from ursa import bench_files as BF

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "bench")
MATHVISTA = os.path.join(FIX, "mathvista_testmini_fixture.json")
MATHVISION = os.path.join(FIX, "mathvision_test_fixture.jsonl")
# header + real rows of URSA-MATH/URSA-MATH outputs/infer_mathvista.csv (pids 1 2 3 7 9 10 13 17 19),
# outputs/infer_mathvision.csv (ids 1 2 3 15 19 22 24 27) and outputs/infer_wemath.json (the first
# sub-problem "2steps_1" of problems 1 2 4 5 6 9), unchanged
VISTA_CSV = os.path.join(FIX, "infer_mathvista_excerpt.csv")
VISION_CSV = os.path.join(FIX, "infer_mathvision_excerpt.csv")
WEMATH_JSON = os.path.join(FIX, "infer_wemath_excerpt.json")


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- shared fixtures

def test_mathvista_fixture_items_and_totals():
    rep = B.rescore(MATHVISTA, "mathvista")
    recs = json.load(open(MATHVISTA, encoding="utf-8"))
    assert len(rep["items"]) == 12
    for it in rep["items"]:
        r = recs[it["id"]]
        assert it["extraction"] == r["expected_extraction"], it["id"]
        assert it["prediction"] == r["expected_prediction"], it["id"]
        assert int(it["correct"]) == r["expected_correct"], it["id"]
    assert (rep["correct"], rep["n"]) == (7, 12)                 # README: 7/12 = 58.33%
    assert rep["accuracy"] == pytest.approx(7 / 12)
    gps = rep["metrics"]["gps"]
    assert (gps["correct"], gps["n"]) == (3, 4)                  # README: pids 6, 413, 642, 410
    assert "GPS" in B.format_report(rep) and "58.33%" in B.format_report(rep)


def test_mathvision_fixture_items_and_totals():
    # MATH-V's own rule (2-decimal rounding, is_equiv(precision=2)) gives the same 6 verdicts as before
    rep = B.rescore(MATHVISION, "mathvision")
    lines = [json.loads(l) for l in open(MATHVISION, encoding="utf-8")]
    assert [it["id"] for it in rep["items"]] == [r["id"] for r in lines]
    for it, r in zip(rep["items"], lines):
        assert it["extraction"] == r["expected_extraction"], r["id"]
        assert int(it["correct"]) == r["expected_correct"], r["id"]
    assert (rep["correct"], rep["n"]) == (3, 6)                  # README: 3/6 = 50%


# ---------------------------------------------------------------- MathVerse

def test_mathverse_rules_and_judge_count(tmp_path):
    mc_q = "In the figure, find angle B.\nChoices:\nA:30°\nB:40°\nC:50°\nD:60°"
    recs = [
        # multi-choice by letter: right
        {"sample_index": "1", "problem_version": "Text Dominant", "question": mc_q, "answer": "B",
         "question_type": "multi-choice", "response": "Step 1: ...\n†Answer: B"},
        # multi-choice answered by option text: right
        {"sample_index": "2", "problem_version": "Text Lite", "question": mc_q, "answer": "B",
         "question_type": "multi-choice", "response": "†Answer: 40°"},
        # multi-choice, wrong letter
        {"sample_index": "3", "problem_version": "Vision Intensive", "question": mc_q, "answer": "B",
         "question_type": "multi-choice", "response": "†Answer: C"},
        # Vision Only: options are in the image, a text answer cannot be decided by rule
        {"sample_index": "4", "problem_version": "Vision Only", "question": "", "answer": "B",
         "question_type": "multi-choice", "response": "†Answer: 40°"},
        # free form numeric, right with units
        {"sample_index": "5", "problem_version": "Text Dominant", "question": "Find L.", "answer": "14",
         "question_type": "free-form", "response": "†Answer: 14 cm"},
        # free form symbolic, different text: needs a judge
        {"sample_index": "6", "problem_version": "Text Dominant", "question": "Find f.", "answer": "y=2x+1",
         "question_type": "free-form", "response": "†Answer: y = 1 + 2x"},
        # no answer line: wrong (decided)
        {"sample_index": "7", "problem_version": "Text Lite", "question": "Find L.", "answer": "14",
         "question_type": "free-form", "response": "It is fourteen."},
    ]
    path = tmp_path / "mathverse_testmini.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    rep = B.rescore(str(path), "mathverse")
    verdicts = [it["correct"] for it in rep["items"]]
    assert verdicts == [True, True, False, None, True, None, False]
    assert (rep["correct"], rep["n"]) == (3, 7)
    assert rep["metrics"]["needs_judge"] == 2
    assert (rep["metrics"]["decided"]["correct"], rep["metrics"]["decided"]["n"]) == (3, 5)
    assert rep["groups"]["version"]["Text Dominant"]["n"] == 3


def test_mathverse_prompt_is_query_cot():
    rec = {"question": "", "query_cot": "According to the question shown in the image, ..."}
    assert B.build_prompt("mathverse", rec) == rec["query_cot"]


# ---------------------------------------------------------------- DynaMath

def test_dynamath_average_vs_worst_case(tmp_path):
    def rec(seed, variant, gt, atype, resp, q="Find x."):
        return {"id": seed, "question": q, "ground_truth": gt, "answer_type": atype,
                "subject": "algebra", "image_dir": f"trial{variant}", "response": resp}
    recs = [
        # seed 1: all three variants right -> counts in the worst case
        rec(1, 1, "2.0944", "float", "†Answer: 2.094"),          # |2.094 - 2.0944| = 4e-4 <= 1e-3
        rec(1, 2, "B", "multiple choice", "†Answer: B", "Is it? Choices: (A) yes (B) no"),
        rec(1, 3, "Sep", "text", "†Answer: Sep"),
        # seed 2: two of three right -> not in the worst case
        rec(2, 1, "12", "float", "†Answer: 12"),
        rec(2, 2, "12", "float", "†Answer: 12.01"),              # off by 1e-2 > 1e-3: wrong
        rec(2, 3, "A", "multiple choice", "†Answer: yes", "Is it? Choices: (A) yes (B) no"),
    ]
    rep = B.rescore(_write_jsonl(tmp_path / "dynamath.jsonl", recs), "dynamath")
    assert [it["correct"] for it in rep["items"]] == [True, True, True, True, False, True]
    m = rep["metrics"]
    assert (m["average_case"]["correct"], m["average_case"]["n"]) == (5, 6)
    assert (m["worst_case"]["correct"], m["worst_case"]["n"]) == (1, 2)
    assert m["average_case"]["accuracy"] != m["worst_case"]["accuracy"]
    assert "worst-case" in B.format_report(rep)


# ---------------------------------------------------------------- WE-MATH

def _wemath_records():
    """Five problems; truth table of (sub-problems right, multi-step right), by hand:
    P1 2-step (T, T) T -> CM strict, CM loose
    P2 2-step (T, F) T -> RM strict, CM loose
    P3 3-step (T, T, T) F -> IG
    P4 2-step (F, F) T -> RM strict, RM loose
    P5 2-step (F, T) F -> IK
    """
    table = {"2steps_1": ([True, True], True), "2steps_2": ([True, False], True),
             "3steps_1": ([True, True, True], False), "2steps_3": ([False, False], True),
             "2steps_4": ([False, True], False)}
    recs = []
    for pid, (subs, multi) in table.items():
        k = int(pid[0])
        roles = [(f"{k}steps_{i + 1}", s) for i, s in enumerate(subs)] + [(f"{k}steps_multi", multi)]
        for key, right in roles:
            recs.append({"ID": pid, "key": key, "question": "How long is it?",
                         "option": "A. 3 m;B. 4 m;C. 5 m; D. No correct answer", "answer": "C",
                         "response": "Step 1: ...\n†Answer: " + ("C" if right else "A")})
    return recs


def test_wemath_four_dimensional_metric(tmp_path):
    path = tmp_path / "wemath_testmini.json"
    path.write_text(json.dumps(_wemath_records()), encoding="utf-8")
    m = B.rescore(str(path), "wemath")["metrics"]
    assert m["problems"] == 5
    assert (m["IK"], m["IG"]) == (1, 1)
    assert (m["CM_strict"], m["CM_loose"]) == (1, 2)
    assert (m["RM_strict"], m["RM_loose"]) == (2, 1)
    assert m["score_strict"] == pytest.approx((5 - 0.5 * 1 - 2 - 1) / 5)   # 0.3
    assert m["score_loose"] == pytest.approx((5 - 0.5 * 1 - 1 - 1) / 5)    # 0.5
    assert m["RM_rate_strict"] == pytest.approx(2 / 3)
    assert m["RM_rate_loose"] == pytest.approx(1 / 3)
    assert (m["S1"]["correct"], m["S1"]["n"]) == (7, 11)
    assert (m["S2"]["correct"], m["S2"]["n"]) == (3, 4)
    assert (m["S3"]["correct"], m["S3"]["n"]) == (0, 1)


def test_wemath_option_text_answer(tmp_path):
    recs = _wemath_records()
    recs[0]["response"] = "†Answer: 5 m"          # the text of option C
    path = tmp_path / "w.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    assert B.rescore(str(path), "wemath")["items"][0]["correct"] is True


def test_wemath_missing_multi_record_is_an_error(tmp_path):
    recs = [r for r in _wemath_records() if not (r["ID"] == "2steps_2" and r["key"] == "2steps_multi")]
    path = tmp_path / "w.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    with pytest.raises(B.BenchmarkError, match='problem "2steps_2".*2steps_multi'):
        B.rescore(str(path), "wemath")


# ---------------------------------------------------------------- GeoQA

def test_geoqa_multiple_choice(tmp_path):
    ch = ["40°", "50°", "60°", "70°"]
    recs = [
        {"id": 0, "subject": "Find angle ABC.", "choices": ch, "label": 1, "response": "†Answer: B"},
        {"id": 1, "subject": "Find angle ABC.", "choices": ch, "label": 2, "response": "†Answer: 60°"},
        {"id": 2, "subject": "Find angle ABC.", "choices": ch, "label": 3, "response": "†Answer: A"},
        {"id": 3, "question": "Find AC.", "choices": ["6cm", "8cm"], "answer": "8cm",
         "response": "Answer: \\boxed{B}"},
    ]
    rep = B.rescore(_write_jsonl(tmp_path / "geoqa_test.jsonl", recs), "geoqa")
    assert [it["correct"] for it in rep["items"]] == [True, True, False, True]
    assert (rep["correct"], rep["n"]) == (3, 4)


# ---------------------------------------------------------------- errors name file and record

def test_missing_answer_error_dict_json(tmp_path):
    recs = json.load(open(MATHVISTA, encoding="utf-8"))
    del recs["413"]["answer"]
    path = tmp_path / "mathvista.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    with pytest.raises(B.BenchmarkError) as e:
        B.rescore(str(path), "mathvista")
    assert str(e.value) == f'{path}: record "413": missing field "answer"'
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_missing_answer_error_jsonl_line(tmp_path):
    lines = [json.loads(l) for l in open(MATHVISION, encoding="utf-8")]
    del lines[1]["answer"]
    path = _write_jsonl(tmp_path / "x.jsonl", lines)
    with pytest.raises(B.BenchmarkError) as e:
        B.rescore(path, "mathvision")
    assert str(e.value) == f'{path}:2: missing field "answer"'


def test_missing_response_and_bad_json(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "1", "answer": "3"}\n', encoding="utf-8")
    with pytest.raises(B.BenchmarkError, match=r'x\.jsonl:1: missing field "response"'):
        B.rescore(str(path), "mathvision")
    with pytest.raises(B.BenchmarkError, match=r'x\.jsonl:1: missing field "output"'):
        B.rescore(str(path), "mathvision", response_field="output")
    path.write_text('{"id": "1", "answer": "3", "response": "†Answer: 3"}\n{oops\n', encoding="utf-8")
    with pytest.raises(B.BenchmarkError, match=r"x\.jsonl:2: not valid JSON"):
        B.rescore(str(path), "mathvision")


def test_missing_unreadable_and_unknown_files(tmp_path):
    with pytest.raises(B.BenchmarkError, match=r"nope\.csv: no such file"):
        B.rescore(str(tmp_path / "nope.csv"), "mathvista")
    (tmp_path / "d.json").mkdir()
    with pytest.raises(B.BenchmarkError, match=r"d\.json: is a folder"):
        B.rescore(str(tmp_path / "d.json"), "mathvista")
    (tmp_path / "r.txt").write_text("x", encoding="utf-8")
    with pytest.raises(B.BenchmarkError, match=r"r\.txt: unknown file type '\.txt'; expected \.json"):
        B.rescore(str(tmp_path / "r.txt"), "mathvista")
    (tmp_path / "bin.csv").write_bytes(b"pid,answer\n1,\xff\xfe\n")
    with pytest.raises(B.BenchmarkError, match=r"bin\.csv: not UTF-8 text"):
        B.rescore(str(tmp_path / "bin.csv"), "mathvista")
    (tmp_path / "short.csv").write_text("pid,answer,response\n1,2\n", encoding="utf-8")
    with pytest.raises(B.BenchmarkError, match=r"short\.csv:2: 2 cells, but the header has 3"):
        B.rescore(str(tmp_path / "short.csv"), "mathvista")


def test_benchmark_names_case_insensitive():
    assert B.rescore(MATHVISTA, "MathVista")["correct"] == 7
    assert B.rescore(MATHVISION, "MATH-V")["benchmark"] == "mathvision"
    assert [B.benchmark_name(n) for n in ("WE-MATH", "GeoQA", "DynaMath", "mathverse")] == [
        "wemath", "geoqa", "dynamath", "mathverse"]
    with pytest.raises(B.BenchmarkError) as e:
        B.rescore(MATHVISTA, "mathvista2")
    assert str(e.value) == ("unknown benchmark 'mathvista2'; choose from mathvista, mathvision, mathverse, "
                            "dynamath, wemath, geoqa")


# ---------------------------------------------------------------- prompts and question text

def test_ursa_prompt_exact():
    assert B.ursa_prompt("What is x?") == (
        "you are given a math problem image, please solve the problem step by step. When you get an "
        "answer, please return the correspond option instead of the text content.\nQuestion:What is x?")


def test_question_builders():
    mv = {"question": "Find AC.", "choices": ["6cm", "7cm"]}
    assert B.mathvista_question(mv) == "Find AC.\nChoices:\n(A) 6cm\n(B) 7cm"
    already = {"question": "Find AC.\nChoices:\n(A) 6cm\n(B) 7cm", "choices": ["6cm", "7cm"]}
    assert B.mathvista_question(already) == already["question"]
    assert B.mathvision_question({"question": "Which?", "options": ["1", "2"]}) == "Which? A. 1 B. 2"
    assert B.mathvision_question({"question": "How many?", "options": []}) == "How many?"
    assert B.wemath_question({"question": "OA = ( ) m", "option": "A. 3;B. 4"}) == "OA = ( ) m A. 3;B. 4"
    assert B.build_prompt("dynamath", {"question": "Q?"}) == B.ursa_prompt("Q?")


@pytest.mark.parametrize("text,choices", [
    ("Find it.\nChoices:\nA:30°\nB:40°\nC:50°", ["30°", "40°", "50°"]),
    ("Is it? Choices: (A) yes (B) no", ["yes", "no"]),
    ("A. 300, 400;B. 400, 300; C. No correct answer", ["300, 400", "400, 300", "No correct answer"]),
    ("How many apples are there?", []),
])
def test_parse_choices(text, choices):
    assert B.parse_choices(text) == choices


# ---------------------------------------------------------------- URSA's released outputs, as released

def _line_of(path, text):
    """1-based line on which `text` starts in the file (independent of the csv module)."""
    body = open(path, encoding="utf-8").read()
    return body[:body.index(text)].count("\n") + 1


def test_released_mathvista_csv_reader():
    recs = dict((r["pid"], (w, r)) for w, r in B.read_records(VISTA_CSV))
    assert list(recs) == ["1", "2", "3", "7", "9", "10", "13", "17", "19"]
    w2, r2 = recs["2"]
    assert w2 == f"{VISTA_CSV}:{_line_of(VISTA_CSV, '1,1,what is the total volume')}"   # after a 26-line row
    assert "" not in r2 and r2["Unnamed: 0"] == "1"          # the pandas row number column is dropped
    assert r2["precision"] is None and r2["unit"] == "g" and r2["choices"] is None   # empty cells: absent
    assert r2["answer"] == "1000" and r2["answer_type"] == "integer"
    p1 = recs["1"][1]["precision"]
    assert p1 == 1 and type(p1) is int                       # "1.0" -> 1
    assert recs["1"][1]["response"].count("\n") == 18 and recs["1"][1]["response"].endswith("†Answer: 0.0115 m")
    assert recs["3"][1]["choices"] == ["135°", "140°", "145°", "150°"]
    assert recs["3"][1]["question"].startswith("△ABC的两内角平分线OB、OC相交于点O，若∠A＝110°")
    assert recs["7"][1]["choices"] == ["half", "quarter", "o'clock", "quarter to", "quarter past"]
    assert recs["10"][1]["choices"] == list("ABCDE")
    meta = recs["17"][1]["metadata"]
    assert meta["task"] == "geometry problem solving"
    assert meta["skills"] == ["geometry reasoning", "algebraic reasoning"]
    assert meta["img_width"] == 125 and meta["language"] == "chinese"


def test_released_mathvista_csv_scores_and_breakdown():
    rep = B.rescore(VISTA_CSV, "mathvista")
    assert rep["response_field"] == "response"
    by_id = {it["id"]: it for it in rep["items"]}
    # by hand: pid 1 round(0.0115, 1) = 0.0 != 1.2; 7 "E" is "quarter past"; 10 "A" is option "A", gold "E";
    # 13 "zero" -> 0; 19 600 != 400; 3, 9, 17 letters name the gold options; 2: 1000
    assert [by_id[p]["correct"] for p in ("1", "2", "3", "7", "9", "10", "13", "17", "19")] == [
        False, True, True, False, True, False, True, True, False]
    assert (by_id["1"]["extraction"], by_id["1"]["prediction"], by_id["1"]["gold"]) == ("0.0115 m", "0.0", "1.2")
    assert (by_id["3"]["prediction"], by_id["7"]["prediction"]) == ("145°", "quarter past")
    assert (rep["correct"], rep["n"]) == (5, 9)
    assert (rep["metrics"]["gps"]["correct"], rep["metrics"]["gps"]["n"]) == (3, 3)   # pids 3, 9, 17
    g = {name: {v: (a["correct"], a["n"]) for v, a in d.items()} for name, d in rep["groups"].items()}
    assert g["question_type"] == {"free_form": (2, 4), "multi_choice": (3, 5)}
    assert g["answer_type"] == {"float": (0, 1), "integer": (2, 3), "text": (3, 5)}
    assert g["task"] == {"figure question answering": (1, 2), "geometry problem solving": (3, 3),
                         "math word problem": (0, 1), "textbook question answering": (0, 1),
                         "visual question answering": (1, 2)}
    assert g["language"] == {"chinese": (3, 3), "english": (2, 6)}
    assert g["skills"]["numeric commonsense"] == (1, 3)     # pids 2, 7, 19: a skill list counts per skill
    text = B.format_report(rep)
    assert "by question_type:" in text and "by answer_type:" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("multi_choice"))
    assert row.split()[1:] == ["3/5", "60.00%"]
    assert "55.56%" in text and "100.00%" in text


def test_string_choices_are_read_not_matched_by_character(tmp_path):
    # the released CSV keeps choices as a string; once read, "B" names the option "7cm", not "'"
    recs = json.load(open(MATHVISTA, encoding="utf-8"))
    rec = dict(recs["6"], choices=str(recs["6"]["choices"]), response="†Answer: B", pid="6")
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"6": rec}), encoding="utf-8")
    it = B.rescore(str(path), "mathvista")["items"][0]
    assert (it["prediction"], it["correct"]) == ("7cm", False)
    rec["response"] = "†Answer: A"
    path.write_text(json.dumps({"6": rec}), encoding="utf-8")
    assert B.rescore(str(path), "mathvista")["items"][0]["correct"] is True


@pytest.mark.parametrize("cell,shown", [("A, B", "'A, B'"), ("['A', 'B'", "\"['A', 'B'\""),
                                        ("{'A': 1}", "\"{'A': 1}\"")])
def test_choices_not_a_list_is_an_error_naming_file_and_record(tmp_path, cell, shown):
    path = tmp_path / "m.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["pid", "question", "choices", "answer", "response"])
        w.writerow(["1", "Find x.\nSecond line.", "['1', '2']", "1", "†Answer: A"])
        w.writerow(["2", "Find y.", cell, "A", "†Answer: A"])
    with pytest.raises(B.BenchmarkError) as e:
        B.read_records(str(path))
    assert str(e.value) == (f'{path}:4: field "choices" must be a list (or a Python list literal such as '
                            f'"[\'A\', \'B\']"), got {shown}')
    path2 = tmp_path / "m.json"
    path2.write_text(json.dumps({"413": {"choices": 5}}), encoding="utf-8")
    with pytest.raises(B.BenchmarkError, match=r'm\.json: record "413": field "choices" must be a list, got int 5'):
        B.read_records(str(path2))


@pytest.mark.parametrize("raw,want", [("1.0", 1), ("2", 2), (" 3 ", 3), (2.0, 2), (None, None), ("", None)])
def test_precision_becomes_an_integer(raw, want):
    out = BF.normalise_record({"precision": raw}, "f:2")["precision"]
    assert out == want and (want is None or type(out) is int)


@pytest.mark.parametrize("raw", ["1.5", "one", True, [1]])
def test_bad_precision_is_an_error(raw):
    with pytest.raises(B.BenchmarkError, match=r'^f:2: field "precision" must be an integer, got '):
        BF.normalise_record({"precision": raw}, "f:2")


def test_released_mathvision_csv():
    recs = B.read_records(VISION_CSV)
    r = {rec["id"]: rec for _, rec in recs}
    assert r["1"]["options"] == [] and r["1"]["solution"] is None and r["1"]["level"] == 2
    assert r["19"]["options"][3] == "$2 \\cdot 4 \\cdot 3$" and r["27"]["level"] == 5
    rep = B.rescore(VISION_CSV, "MathVision")
    assert rep["response_field"] == "model_answer"            # the released file has no "response"
    with pytest.raises(B.BenchmarkError) as e:
        B.rescore(VISION_CSV, "mathvision", response_field="response")
    assert str(e.value) == (f'{VISION_CSV}:2: missing field "response" (the record has "model_answer": '
                            'name that field, or leave it unset to pick it)')
    # by hand: 1 60=60; 2 A; 3 A!=C; 15 "Wednesday" = option A; 19 the text of option D; 22 C!=E;
    # 24 "2h15min" = option B "2 h 15 min"; 27 E!=A
    assert [(it["id"], it["correct"]) for it in rep["items"]] == [
        ("1", True), ("2", True), ("3", False), ("15", True), ("19", True), ("22", False), ("24", True),
        ("27", False)]
    assert [it["prediction"] for it in rep["items"]][3:5] == ["A", "D"]
    assert (rep["correct"], rep["n"]) == (5, 8)
    assert (rep["groups"]["subject"]["arithmetic"]["correct"], rep["groups"]["subject"]["arithmetic"]["n"]) == (5, 6)
    assert "3/6" in B.format_report(B.rescore(MATHVISION, "mathvision"))


def test_mathvision_rounds_to_two_decimals_but_integers_exactly(tmp_path):
    recs = [{"id": str(i), "options": [], "answer": g, "response": f"†Answer: {p}"}
            for i, (g, p) in enumerate([("2.5", "2.504"), ("2.5", "2.51"), ("0.33", "1/3"),
                                        ("10000", "10001"), ("60", "60.0")])]
    rep = B.rescore(_write_jsonl(tmp_path / "v.jsonl", recs), "mathvision")
    assert [it["correct"] for it in rep["items"]] == [True, False, True, False, True]


def test_released_wemath_json_response_fields():
    recs = B.read_records(WEMATH_JSON)
    assert recs[0][0] == f"{WEMATH_JSON}: record 0" and recs[0][1]["model_answer"][0].endswith("†Answer: E")
    # "response" holds URSA's processed answer ("Answer: C"), "model_answer" the raw output (a list)
    processed = [it["correct"] for it in B.score_records(recs, "wemath")]
    raw = [it["correct"] for it in B.score_records(recs, "WE-MATH", "model_answer")]
    # by hand (gold C A B A C D): processed E A A E C A; raw E A "Cuboid ①" "1" (= "1 cm") "31.4cm" A
    assert processed == [False, True, False, False, True, False]
    assert raw == [False, True, False, True, True, False]
    # only the first sub-problem of each problem is in the excerpt: the 4-D metric refuses it
    with pytest.raises(B.BenchmarkError, match=r'problem "2steps_1": expected records .*missing '
                                               r"\['2steps_2', '2steps_multi'\]"):
        B.rescore(WEMATH_JSON, "wemath")


# ---------------------------------------------------------------- verdict files (eval.py --json FILE)

def test_write_verdicts_json_and_jsonl(tmp_path):
    rep = B.rescore(VISTA_CSV, "mathvista")
    B.write_verdicts(str(tmp_path / "v.json"), rep)
    doc = json.load(open(tmp_path / "v.json", encoding="utf-8"))
    assert (doc["benchmark"], doc["n"], doc["correct"], doc["response_field"]) == ("mathvista", 9, 5, "response")
    assert doc["metrics"]["gps"]["n"] == 3 and doc["groups"]["answer_type"]["float"]["n"] == 1
    v = doc["verdicts"]
    assert [x["id"] for x in v] == ["1", "2", "3", "7", "9", "10", "13", "17", "19"]
    assert v[0] == {"id": "1", "where": f"{VISTA_CSV}:2", "extraction": "0.0115 m", "prediction": "0.0",
                    "gold": "1.2", "verdict": False}
    assert v[3]["prediction"] == "quarter past" and v[3]["gold"] == "quarter"
    assert sum(x["verdict"] for x in v) == 5
    B.write_verdicts(str(tmp_path / "v.jsonl"), rep)
    lines = [json.loads(l) for l in open(tmp_path / "v.jsonl", encoding="utf-8")]
    assert lines == v


def test_write_verdicts_keeps_needs_judge_as_null(tmp_path):
    recs = [{"sample_index": "1", "question": "Find f.", "answer": "y=2x+1", "question_type": "free-form",
             "response": "†Answer: y = 1 + 2x"}]
    rep = B.rescore(_write_jsonl(tmp_path / "mv.jsonl", recs), "mathverse")
    B.write_verdicts(str(tmp_path / "out.jsonl"), rep)
    assert json.loads(open(tmp_path / "out.jsonl", encoding="utf-8").read())["verdict"] is None


# ---------------------------------------------------------------- VLMEvalKit TSV

def _png_b64(size=(3, 2), color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _write_tsv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_vlmeval_tsv_mathvista(tmp_path):
    img = _png_b64((3, 2))
    header = ["index", "image", "question", "answer", "answer_option", "choices", "question_type",
              "answer_type", "task", "skills", "prediction"]
    path = _write_tsv(tmp_path / "MathVista_MINI.tsv", header, [
        ["1", img, "Find AC.", "7cm", "B", "['6cm', '7cm']", "multi_choice", "text",
         "geometry problem solving", "['geometry reasoning']", "Step 1: ...\n†Answer: B"],
        ["2", "1", "What is x?", "1.25", "", "", "free_form", "float", "math word problem",
         "['arithmetic reasoning']", "†Answer: 1.249"],            # image of row 1; 2 decimals from gold
        ["3", _png_b64((5, 4)), "How many?", "3", "", "", "free_form", "integer", "math word problem",
         "['arithmetic reasoning']", "†Answer: 4"],
    ])
    recs = B.read_records(path, "MathVista")
    (w1, r1), (_, r2), (_, r3) = recs
    assert w1 == f"{path}:2" and r1["pid"] == "1" and r1["index"] == "1" and "image" not in r1
    assert r1["choices"] == ["6cm", "7cm"] and r1["metadata"] == {"task": "geometry problem solving",
                                                                 "skills": ["geometry reasoning"]}
    assert r2["choices"] is None and r2["image_base64"] == img
    assert Image.open(io.BytesIO(B.record_image_bytes(r1))).size == (3, 2)
    assert Image.open(io.BytesIO(B.record_image_bytes(r3))).size == (5, 4)
    assert B.record_image_bytes({"question": "text only"}) is None
    assert B.build_prompt("mathvista", r1).endswith("Find AC.\nChoices:\n(A) 6cm\n(B) 7cm")
    rep = B.rescore(path, "mathvista")
    assert rep["response_field"] == "prediction"               # VLMEvalKit's result column
    assert [it["correct"] for it in rep["items"]] == [True, True, False]   # round(1.249, 2) = 1.25
    assert (rep["metrics"]["gps"]["correct"], rep["metrics"]["gps"]["n"]) == (1, 1)
    with pytest.raises(B.BenchmarkError, match=r"MathVista_MINI\.tsv: a VLMEvalKit \.tsv is read for one benchmark"):
        B.read_records(path)


def test_vlmeval_tsv_other_benchmarks(tmp_path):
    img = _png_b64()
    mv = _write_tsv(tmp_path / "MathVision.tsv", ["index", "image", "question", "answer", "choices", "category",
                                                 "prediction"],
                    [["7", img, "Which?", "B", "['1', '2']", "counting", "†Answer: 2"]])
    (_, r), = B.read_records(mv, "mathvision")
    assert (r["id"], r["options"], r["subject"]) == ("7", ["1", "2"], "counting")
    assert B.rescore(mv, "mathvision")["items"][0]["correct"] is True
    wm = _write_tsv(tmp_path / "WeMath.tsv", ["index", "image", "ID", "key", "question", "A", "B", "C", "D",
                                             "E", "answer", "prediction"],
                    [["1", img, "2steps_1", "2steps_1", "OA = ( ) m", "300", "3000", "No correct answer",
                      "", "", "B", "†Answer: 3000"]])
    (_, r), = B.read_records(wm, "wemath")
    assert r["choices"] == ["300", "3000", "No correct answer"]
    assert r["option"] == "A. 300;B. 3000;C. No correct answer"
    assert B.wemath_question(r) == "OA = ( ) m A. 300;B. 3000;C. No correct answer"
    assert B.score_records(B.read_records(wm, "wemath"), "wemath")[0]["correct"] is True
    dm = _write_tsv(tmp_path / "DynaMath.tsv", ["index", "image", "qid", "varid", "question", "answer",
                                               "answer_type", "subject", "prediction"],
                    [["1", img, "5", "1", "Find x.", "2.0944", "float", "algebra", "†Answer: 2.094"],
                     ["2", "1", "5", "2", "Find x.", "1.5", "float", "algebra", "†Answer: 1.6"]])
    rep = B.rescore(dm, "dynamath")
    assert [it["id"] for it in rep["items"]] == ["5/1", "5/2"]
    assert [it["gold"] for it in rep["items"]] == ["2.0944", "1.5"]
    assert (rep["metrics"]["worst_case"]["correct"], rep["metrics"]["worst_case"]["n"]) == (0, 1)
    gq = _write_tsv(tmp_path / "GeoQA.tsv", ["index", "image", "question", "A", "B", "answer", "prediction"],
                    [["0", img, "Find AC.", "6cm", "8cm", "B", "†Answer: 8cm"]])
    (_, r), = B.read_records(gq, "geoqa")
    assert (r["id"], r["choices"]) == ("0", ["6cm", "8cm"])
    assert B.rescore(gq, "geoqa")["items"][0]["correct"] is True


def test_vlmeval_tsv_bad_image_reference(tmp_path):
    path = _write_tsv(tmp_path / "t.tsv", ["index", "image", "question", "answer", "prediction"],
                      [["1", _png_b64(), "Q?", "1", "†Answer: 1"], ["2", "9", "Q?", "1", "†Answer: 1"]])
    with pytest.raises(B.BenchmarkError) as e:
        B.read_records(path, "mathvision")
    assert str(e.value) == (f"{path}:3: field \"image\" is neither base64 image data nor the index of a row "
                            "holding an image: '9'")
    with pytest.raises(B.BenchmarkError, match=r'^r: field "image_base64" is not valid base64$'):
        B.record_image_bytes({"image_base64": "not base64!" * 10}, "r")


def test_mathvista_number_rules_follow_calculate_score(tmp_path):
    def rec(pid, atype, answer, pred, precision=None):
        return {"pid": pid, "question": "Q?", "choices": None, "precision": precision, "answer": answer,
                "question_type": "free_form", "answer_type": atype, "response": f"†Answer: {pred}"}
    recs = [rec("1", "integer", "2", "2.7"),            # int(float("2.7")) = 2: truncates, as the official scorer
            rec("2", "integer", "3", "2.7"),
            rec("3", "float", "51.04", "51.043", "2.0"),  # str(round(51.043, 2)) = "51.04"
            rec("4", "float", "51.04", "51.046", 2),
            rec("5", "float", "1.5", "1.50", 1)]
    rep = B.rescore(_write_jsonl(tmp_path / "m.jsonl", recs), "mathvista")
    assert [it["prediction"] for it in rep["items"]] == ["2", "2", "51.04", "51.05", "1.5"]
    assert [it["correct"] for it in rep["items"]] == [True, False, True, False, True]
