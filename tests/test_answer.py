"""Answer extraction (URSA's pattern order) and equivalence, on hand-written responses."""
import math

import pytest

from ursa.answer import choice_index, extract_answer, is_equiv, normalize_letter, parse_number


# ---------------------------------------------------------------- extraction

def test_ursa_answer_line():
    r = "Step 1: There are 3 red circles.\n\nStep 2: 3 * 4 = 12.\n\n†Answer: 12"
    assert extract_answer(r) == "12"


def test_boxed_nested_braces_and_last_box():
    assert extract_answer("Answer: \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    r = "first \\boxed{3}, then corrected: \\boxed{\\dfrac{\\sqrt{3}}{2}}."
    assert extract_answer(r) == "\\dfrac{\\sqrt{3}}{2}"


def test_pattern_order():
    # `Answer: \boxed{}` beats a later bare \boxed
    assert extract_answer("Answer: \\boxed{3}\nCheck: \\boxed{4}") == "3"
    # any \boxed beats the †Answer line
    assert extract_answer("†Answer: 5\nso \\boxed{6}") == "6"
    # †Answer beats a plain Answer:
    assert extract_answer("Answer: 3\n†Answer: 4\n") == "4"
    # "correct answer is" beats "The answer is"
    assert extract_answer("The answer is 7\nThe correct answer is 8") == "8"
    # "Answer:" beats a bare dagger and "The answer is"
    assert extract_answer("The answer is 1\nAnswer: 2") == "2"
    assert extract_answer("so † 9\nThe answer is 1") == "9"


def test_answer_line_variants():
    assert extract_answer("†Answer: 42.") == "42"
    assert extract_answer("Answer：5") == "5"          # full-width colon
    assert extract_answer("**Answer:** 7") == "7"
    assert extract_answer("†Answer:\n\n13") == "13"     # value on the next line
    assert extract_answer("Answer: \\boxed{}\n†Answer: 5") == "5"  # an empty box is no answer


@pytest.mark.parametrize("line,letter", [
    ("†Answer: (B)", "B"), ("†Answer: B.", "B"), ("†Answer: B: 6cm", "B"), ("†Answer: (B) 6cm", "B"),
    ("Answer: \\boxed{\\text{C}}", "C"), ("The correct answer is option D.", "D"), ("†Answer: E", "E"),
])
def test_choice_letter(line, letter):
    assert extract_answer("Step 1: reasoning.\n" + line) == letter


def test_letter_not_taken_from_words():
    assert normalize_letter("Because 5") == "Because 5"
    assert normalize_letter("A = 5") == "A = 5"


def test_no_answer_line_is_none_and_incorrect():
    r = "The image shows five people; four of them face the camera, so the fraction is 0.8."
    assert extract_answer(r) is None
    assert extract_answer("") is None
    assert is_equiv(extract_answer(r), "0.8") is False


# ---------------------------------------------------------------- numbers

@pytest.mark.parametrize("text,value", [
    ("12", 12), ("-3.5", -3.5), ("1,234", 1234), ("1,000 g", 1000), ("3/4", 0.75),
    ("\\frac{3}{4}", 0.75), ("\\dfrac{1}{8}", 0.125), ("$\\frac{143}{14}$", 143 / 14),
    ("2\\sqrt{3}", 2 * math.sqrt(3)), ("3\\pi", 3 * math.pi), ("27000 - 4500π", 27000 - 4500 * math.pi),
    ("\\frac{\\sqrt{3}}{2}", math.sqrt(3) / 2), ("seven", 7), ("twelve", 12), ("twenty-one", 21),
    ("6cm", 6), ("40°", 40), ("40^\\circ", 40), ("12 cm^2", 12), ("5 m/s", 5), ("x = 5", 5),
    ("75%", 75), ("1.2e-3", 0.0012), ("\\frac{1}{16} \\mathrm{~m}^{2}", 1 / 16),
])
def test_parse_number(text, value):
    assert parse_number(text) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("text", ["abc", "5 or 6", "2x+3", "[1, 2]", "__import__('os').system('x')",
                                  "9**9**9**9", "1/0", "10^10^10"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


# ---------------------------------------------------------------- equivalence

def test_numbers_with_tolerance():
    assert is_equiv("1.00001", "1")
    assert not is_equiv("1.001", "1")
    assert is_equiv("1.001", "1", rel_tol=1e-2)
    assert is_equiv("-3.50", "-3.5")
    assert not is_equiv("5", "6")
    assert is_equiv("1,000", "1000")
    assert is_equiv("3/4", "0.75") and is_equiv("\\frac{3}{4}", "0.75")
    assert is_equiv("seven", "7")
    assert is_equiv("27000 - 4500π", "27000-4500\\pi")
    assert is_equiv("75%", "0.75") and is_equiv("75%", "75")
    assert is_equiv("6cm", "6")


def test_choice_letter_and_text():
    choices = ["6cm", "7cm", "4cm", "5cm"]
    assert is_equiv("A", "6cm", choices)          # letter vs gold choice text
    assert is_equiv("6cm", "A", choices)          # text vs gold letter
    assert is_equiv("6 cm", "A", choices)         # text with a space in the unit
    assert is_equiv("6", "6cm", choices)          # numeric value of the option
    assert not is_equiv("B", "6cm", choices)
    assert not is_equiv("7 cm", "A", choices)


def test_no_fuzzy_closest_option():
    choices = ["6cm", "7cm", "4cm", "5cm"]
    assert choice_index("6.5", choices) is None
    assert not is_equiv("6.5", "A", choices)
    assert choice_index("F", choices) is None     # letter out of range is not an option
    # an exact text match wins; two options with the same value are ambiguous: no match
    assert choice_index("2", ["2", "2.0", "3"]) == 0
    assert choice_index("2.00", ["2", "2.0", "3"]) is None


def test_text_and_lists():
    assert is_equiv("Yes", "yes")
    assert is_equiv("North East", "northeast")
    assert not is_equiv("north", "south")
    assert is_equiv("[1, 2]", "[1,2]")
    assert is_equiv("[2014, 2016]", "[2014.0, 2016]")
    assert not is_equiv("[2014, 2015]", "[2014, 2016]")
    assert not is_equiv(None, "1")
