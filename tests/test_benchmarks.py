"""Benchmark readers and rule-based scorers: the two shared fixtures (expected verdicts per item and
totals from tests/fixtures/bench, copied from shared/bench/README.md) and small hand-built cases."""
import json
import os

import pytest

from ursa import benchmarks as B

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "bench")
MATHVISTA = os.path.join(FIX, "mathvista_testmini_fixture.json")
MATHVISION = os.path.join(FIX, "mathvision_test_fixture.jsonl")


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

def test_missing_answer_error_dict_json(tmp_path, capsys):
    recs = json.load(open(MATHVISTA, encoding="utf-8"))
    del recs["413"]["answer"]
    path = tmp_path / "mathvista.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    with pytest.raises(B.BenchmarkError) as e:
        B.rescore(str(path), "mathvista")
    assert str(e.value) == f'{path}: record "413": missing field "answer"'
    assert B.main(["rescore", "--benchmark", "mathvista", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'error: {path}: record "413": missing field "answer"' and "\n" not in err


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
    path.write_text('{"id": "1", "answer": "3", "response": "†Answer: 3"}\n{oops\n', encoding="utf-8")
    with pytest.raises(B.BenchmarkError, match=r"x\.jsonl:2: invalid JSON"):
        B.rescore(str(path), "mathvision")


def test_cli_prints_report(capsys):
    assert B.main(["rescore", "--benchmark", "mathvision", MATHVISION]) == 0
    out = capsys.readouterr().out
    assert "3/6" in out and "50.00%" in out


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
