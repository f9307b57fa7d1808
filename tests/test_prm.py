"""Tests of ursa/prm.py: step tags (rules "strict" and "released"), readout positions, label
alignment, the BCE loss (Eq. 4), aggregation, best-of-N (Eq. 10), votes and the PRM metrics, against
hand-computed values."""
import itertools
import math
import random

import pytest
import torch

from ursa import prm
from ursa.prm import (aggregate, auc, best_of_n, count_tags, first_error_hit, insert_tags, join_steps,
                      balance_weight, labels_at, majority_vote, positions_mask, prm_input, prm_loss, prm_user_text,
                      prm_weighted_vote, released_input, released_user_text, response_input,
                      score_responses, score_steps, split_steps, step_metrics, step_scores, tag_steps)
from ursa.tokenizer import Tokenizer, train_toy_tokenizer

T = " и"
SOL = "Step 1: There are 3 red circles.\n\nStep 2: 3 * 5 = 15.\n\n†Answer: 15"


# ---- text ------------------------------------------------------------------------------------

def test_tag_is_space_cyrillic_i():
    assert prm.STEP_TAG == " \u0438" and len(prm.STEP_TAG) == 2


def test_split_and_join_round_trip():
    steps, ans = split_steps(SOL)
    assert steps == ["Step 1: There are 3 red circles.", "Step 2: 3 * 5 = 15."]
    assert ans == "15"
    assert join_steps(steps, ans) == SOL
    assert join_steps(["Step 1: a."], None) == "Step 1: a."


def test_split_variants():
    # preamble stays with step 1; "Step 2" inside a sentence is not a header
    text = "Let us look.\nStep 1: as in Step 2 below.\nStep 2: b.\n†Answer: C"
    assert split_steps(text) == (["Let us look.\nStep 1: as in Step 2 below.", "Step 2: b."], "C")
    assert split_steps("just reasoning\n\n†Answer: 4") == (["just reasoning"], "4")
    assert split_steps("Step 1: a.\n\nStep 2: b.") == (["Step 1: a.", "Step 2: b."], None)
    assert split_steps("†Answer: 4") == ([], "4")


def test_insert_tags_strict_rule_by_hand():
    # with †Answer: every step tagged right after its last non-space character, answer untagged
    assert insert_tags(SOL) == ("Step 1: There are 3 red circles. и\n\nStep 2: 3 * 5 = 15. и\n\n"
                                "†Answer: 15")
    # trailing spaces before the next header: the tag goes before them
    assert insert_tags("Step 1: a.  \n\nStep 2: b. \n†Answer: B") == \
        "Step 1: a. и  \n\nStep 2: b. и \n†Answer: B"
    # without †Answer: the last step gets no tag
    assert insert_tags("Step 1: a.\n\nStep 2: b.\n\nStep 3: c.") == \
        "Step 1: a. и\n\nStep 2: b. и\n\nStep 3: c."
    assert insert_tags("Step 1: a.") == "Step 1: a."
    # no headers: one step, tagged before †Answer:, or at the end when there is none
    assert insert_tags("It is 4.\n\n†Answer: 4") == "It is 4. и\n\n†Answer: 4"
    assert insert_tags("It is 4.\n") == "It is 4. и\n"
    # an empty body has nothing to tag
    assert insert_tags("†Answer: 4") == "†Answer: 4"
    # preamble is part of step 1: no tag before the first header
    assert insert_tags("Look.\nStep 1: a.\nStep 2: b.\n†Answer: A") == \
        "Look.\nStep 1: a. и\nStep 2: b. и\n†Answer: A"


# the three places where the released scorer's rule differs from "strict", by hand
MENTIONS_Q = "Is Step 2 of the proof right?"
MENTIONS_R = "Step 1: as in Step 3 later.\nStep 2: b.\n\n†Answer: 5"
NO_HEADERS = "The sum is 4.\n\n†Answer: 4"
CRLF = "Step 1: a.\r\nStep 2: b.\r\n\r\n†Answer: 2"
HEAD = prm_user_text("", "")[:-len("Question:\n")]          # the instruction line


def test_rules_differ_on_step_mentions_anywhere():
    # strict: only line-start headers of the solution; the mention "Step 3" and the question's "Step 2" are text
    assert insert_tags(MENTIONS_R) == "Step 1: as in Step 3 later. и\nStep 2: b. и\n\n†Answer: 5"
    # released: the whole user text, every "Step k": after the question, inside step 1, then as usual
    assert released_user_text(MENTIONS_Q, MENTIONS_R) == (
        HEAD + "Question:Is Step 2 of the proof right? и\nStep 1: as in и Step 3 later. и\nStep 2: b. и\n\n"
        "†Answer: 5")
    assert released_user_text(MENTIONS_Q, MENTIONS_R) == insert_tags(prm_user_text(MENTIONS_Q, MENTIONS_R),
                                                                     rule="released")


def test_rules_differ_without_headers():
    assert insert_tags(NO_HEADERS) == "The sum is 4. и\n\n†Answer: 4"               # before the answer
    assert insert_tags(NO_HEADERS, rule="released") == NO_HEADERS + " и"           # after it, at the end
    assert released_user_text("How much?", NO_HEADERS) == HEAD + "Question:How much?\n" + NO_HEADERS + " и"
    assert insert_tags("", rule="released") == " и" and insert_tags("") == ""


def test_rules_differ_on_carriage_returns():
    # strict steps back over every whitespace character; released only over " " and "\n"
    assert insert_tags(CRLF) == "Step 1: a. и\r\nStep 2: b. и\r\n\r\n†Answer: 2"
    assert insert_tags(CRLF, rule="released") == "Step 1: a.\r и\nStep 2: b.\r\n\r и\n†Answer: 2"


def test_released_rule_edge_cases_by_hand():
    # no "†Answer:": no tag after the last match, as in strict
    assert insert_tags("Step 1: a.\nStep 2: b.", rule="released") == "Step 1: a. и\nStep 2: b."
    # only blanks after a header's first character: that step gets no tag
    assert insert_tags("Step 1:\nStep 2: b.\n†Answer: 1", rule="released") == "Step 1:\nStep 2: b. и\n†Answer: 1"
    # "Step 12" is one match; a tab counts as content
    assert insert_tags("Step 12: a.\t\nStep 13: b.\n†Answer: 1", rule="released") == \
        "Step 12: a.\t и\nStep 13: b. и\n†Answer: 1"
    # canonical solutions: both rules put the same tags into the solution
    assert released_user_text("How many?", SOL) == prm_user_text("How many?", insert_tags(SOL))
    with pytest.raises(ValueError, match="rule must be one of"):
        insert_tags(SOL, " и")


def test_tag_steps_tags_every_step_on_every_shape():
    rng = random.Random(0)
    for n, with_answer, pad in itertools.product(range(1, 7), (True, False), ("", " ", " \n")):
        steps = [f"Step {k + 1}: value {rng.randint(0, 99)}.{pad}" for k in range(n)]
        ans = "C" if with_answer else None
        text = tag_steps(steps, ans)
        assert count_tags(text) == n
        # each tag sits right after the step's last non-space character
        for k, s in enumerate(steps):
            assert s.rstrip() + T in text
        if with_answer:
            # agrees with the released rule whenever there is an answer line (tag_steps drops
            # trailing whitespace of a step; canonical steps have none)
            assert text == insert_tags(join_steps([s.rstrip() for s in steps], ans))
            assert not text.split("†Answer:")[1].count(T)
        else:
            # the released rule leaves the last step untagged: one tag fewer
            assert count_tags(insert_tags(join_steps(steps, None))) == n - 1
    with pytest.raises(ValueError, match="step 1 is blank"):
        tag_steps(["Step 1: a.", "  "], None)
    with pytest.raises(ValueError, match="already contains"):
        tag_steps(["Step 1: a." + T], None)


def test_prm_user_text_exact():
    assert prm_user_text("What is 2+2?", "Step 1: 4. и\n\n†Answer: 4") == (
        "You are given a problem and a step-by-step solution. You need to check the correctness "
        "of each step.\nQuestion:What is 2+2?\nStep 1: 4. и\n\n†Answer: 4")


# ---- token level -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    texts = [Tokenizer.chat_prompt(prm_user_text("How many red circles?", tag_steps(
        ["Step 1: There are 3 red circles.", "Step 2: 3 * 5 = 15."], "15")))] * 20
    return train_toy_tokenizer(texts, vocab_size=300)


def test_prm_input_reads_only_the_solutions_tags_after_image_expansion(tok):
    # the question itself holds the tag text: that token must not be read
    q = "Is this" + T + " right?"
    tagged = tag_steps(["Step 1: a.", "Step 2: b."], "C")
    ids, pos = prm_input(tok, q, tagged, num_image_tokens=5)
    plain = tok.encode(Tokenizer.chat_prompt(prm_user_text(q, tagged)))     # no expansion
    tag_idx = [i for i, t in enumerate(plain) if t == tok.tag_id]
    assert len(tag_idx) == 3                                               # 1 in the question + 2
    assert ids == tok.expand_image(plain, 5)
    assert pos == [i + 4 for i in tag_idx[1:]]                             # +4: one placeholder -> 5
    assert all(ids[p] == tok.tag_id for p in pos)
    _, pos0 = prm_input(tok, q, tagged, num_image_tokens=5, image=False)
    assert pos0 == [i - 1 for i in tag_idx[1:]]                            # no placeholder at all


def test_released_input_reads_every_tag_of_the_prompt(tok):
    q = "Is this" + T + " right? Step 2 of it"
    for rule, text, read in (
            ("strict", Tokenizer.chat_prompt(prm_user_text(q, insert_tags(MENTIONS_R))), "solution"),
            ("released", Tokenizer.chat_prompt(released_user_text(q, MENTIONS_R)), "all")):
        plain = tok.encode(text)                                            # unexpanded, by hand
        tags = [i for i, t in enumerate(plain) if t == tok.tag_id]
        ids, pos = response_input(tok, q, MENTIONS_R, num_image_tokens=5, rule=rule)
        assert ids == tok.expand_image(plain, 5)
        if read == "all":
            assert len(tags) == 5                  # the question's literal tag + 4 inserted by the rule
            assert pos == [i + 4 for i in tags]
            assert (ids, pos) == released_input(tok, q, MENTIONS_R, 5)
        else:
            assert len(tags) == 3 and pos == [i + 4 for i in tags[1:]]       # the question's is not read
    with pytest.raises(ValueError, match="rule must be one of"):
        response_input(tok, q, MENTIONS_R, 5, rule="official")


def test_labels_at_and_truncation():
    lab, mask = labels_at([[1, 3, 5], [2, 6, 7], []], [[1, 1, 0], [0, 0, 0], []], T=6)
    assert mask.tolist() == [[0, 1, 0, 1, 0, 1], [0, 0, 1, 0, 0, 0], [0] * 6]
    assert lab.tolist() == [[0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0] * 6]
    assert lab.dtype == torch.float32 and mask.dtype == torch.bool
    with pytest.raises(ValueError, match="row 1 has 2 step tags but 1 labels"):
        labels_at([[0], [0, 1]], [[1], [1]], 4)
    with pytest.raises(ValueError, match="2 rows"):
        labels_at([[0], [1]], [[1]], 4)
    assert positions_mask([[0, 9]], 3).tolist() == [[True, False, False]]


class _PositionModel(torch.nn.Module):
    """A stand-in PRM whose value logit at position t is t / 10: the scores reveal the positions read."""

    def __init__(self, num_tokens=2):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        from types import SimpleNamespace
        self.cfg = SimpleNamespace(value_head=True, vision=SimpleNamespace(num_tokens=num_tokens))
        self.seen_rows = []

    def forward(self, ids, px, attention_mask=None, logits=False, values=True):
        from types import SimpleNamespace
        self.seen_rows.append((ids.shape, 0 if px is None else px.shape[0]))
        t = torch.arange(ids.shape[1], dtype=torch.float32).expand(ids.shape) / 10
        return SimpleNamespace(values=t + 0 * self.w)


def test_score_steps_reads_the_tag_positions_in_input_order(tok):
    m = _PositionModel()
    qs = ["How many?", "How many red circles?"]
    tagged = [tag_steps(["Step 1: a."], "1"), tag_steps(["Step 1: There are 3 red circles.", "Step 2: 3 * 5 = 15."], "15")]
    px = torch.zeros(2, 3, 4, 4)
    got = score_steps(m, tok, qs, tagged, px, batch_size=1)
    for q, t, g in zip(qs, tagged, got):
        _, pos = prm_input(tok, q, t, 2)
        assert g == pytest.approx([1 / (1 + math.exp(-p / 10)) for p in pos])
    assert [n for _, n in m.seen_rows] == [1, 1]                    # one image per row
    # a response without any tag scores []; insert_tags is the test-time rule
    assert score_responses(m, tok, ["q"], ["no steps here"], None)[0] == pytest.approx(
        [1 / (1 + math.exp(-prm_input(tok, "q", insert_tags("no steps here"), 2, image=False)[1][0] / 10))])
    assert score_steps(m, tok, ["q"], ["nothing tagged"], None) == [[]]


def test_score_responses_released_rule_reads_its_positions(tok):
    m = _PositionModel()
    qs, rs = [MENTIONS_Q, "How much?", "Q"], [MENTIONS_R, NO_HEADERS, "Step 1: a.\nStep 2: b."]
    px = [torch.zeros(3, 4, 4), None, torch.zeros(3, 4, 4)]
    got = score_responses(m, tok, qs, rs, px, batch_size=2, rule="released")
    for q, r, x, g in zip(qs, rs, px, got):
        text = Tokenizer.chat_prompt(released_user_text(q, r), image=x is not None)
        ids = tok.expand_image(tok.encode(text), 2)
        pos = [i for i, t in enumerate(ids) if t == tok.tag_id]
        assert g == pytest.approx([1 / (1 + math.exp(-p / 10)) for p in pos])
    assert [len(g) for g in got] == [4, 1, 1]
    # the strict readout of the same responses is unchanged: 2, 1 and 1 tags of the solution only
    assert [len(g) for g in score_responses(m, tok, qs, rs, px, rule="strict")] == [2, 1, 1]
    with pytest.raises(ValueError, match="rule must be one of"):
        score_responses(m, tok, qs, rs, px, rule="paper")
    with pytest.raises(ValueError, match="2 questions but 3 solutions"):
        score_responses(m, tok, qs[:2], rs, px, rule="released")


# ---- loss ------------------------------------------------------------------------------------

def test_prm_loss_hand_value_and_accuracy():
    z = torch.tensor([[0.0, 5.0, 2.0]], requires_grad=True)
    y = torch.tensor([[1.0, 1.0, 0.0]])
    m = torch.tensor([[True, False, True]])
    loss, met = prm_loss(z, y, m)
    want = (math.log(2) + math.log(1 + math.e ** 2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert met["num_tags"] == 2 and met["step_acc"] == 0.5 and met["pos_frac"] == 0.5
    loss.backward()
    # d/dz BCE = sigmoid(z) - y, divided by the 2 tags; untagged position gets no gradient
    s2 = 1 / (1 + math.exp(-2))
    assert z.grad.tolist()[0] == pytest.approx([(0.5 - 1) / 2, 0.0, s2 / 2], rel=1e-6)


def test_prm_loss_global_normaliser_weights_micro_batches_evenly():
    torch.manual_seed(0)
    z = torch.randn(4, 6)
    y = (torch.rand(4, 6) > 0.5).float()
    m = torch.rand(4, 6) > 0.4
    full, _ = prm_loss(z, y, m)
    total = int(m.sum())
    parts = sum(prm_loss(z[a:b], y[a:b], m[a:b], num_tags=total)[0] for a, b in ((0, 1), (1, 4)))
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)
    # independent formula: mean over tags of -[y log s + (1-y) log(1-s)]
    s = torch.sigmoid(z[m].double())
    ref = -(y[m] * s.log() + (1 - y[m]) * (1 - s).log()).mean()
    assert full.item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match="smaller than"):
        prm_loss(z, y, m, num_tags=1)


def test_prm_loss_pos_weight_hand_value():
    z = torch.tensor([[0.0, 5.0, 2.0]])
    y = torch.tensor([[1.0, 1.0, 0.0]])
    m = torch.tensor([[True, False, True]])
    loss, _ = prm_loss(z, y, m, pos_weight=3.0)
    # the label-1 tag's -log sigmoid(0) counts three times, the label-0 tag's -log(1 - sigmoid(2)) once
    want = (3 * math.log(2) + math.log(1 + math.e ** 2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_balance_weight_counts_every_step():
    # 5 ones and 2 zeros -> 2 / 5; a data set with one class only -> 1.0
    assert balance_weight([[1, 1, 0], [1, 1, 1, 0]]) == pytest.approx(2 / 5)
    assert balance_weight([[1, 1], [1]]) == 1.0 and balance_weight([[0]]) == 1.0


def test_prm_loss_no_tags_is_zero_with_graph():
    z = torch.zeros(2, 3, requires_grad=True)
    loss, met = prm_loss(z, torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and met["num_tags"] == 0
    loss.backward()
    assert z.grad.abs().sum().item() == 0.0


def test_step_scores_sigmoid_at_tags():
    z = torch.tensor([[3.0, 0.0, -1.0, math.log(3)], [0.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[False, True, False, True], [False, False, False, False]])
    got = step_scores(z, m)
    assert got[0] == pytest.approx([0.5, 0.75]) and got[1] == []


# ---- aggregation, best-of-N, votes -----------------------------------------------------------

def test_aggregate_by_hand():
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "min") == 0.5
    assert aggregate(s, "mean") == pytest.approx(2.2 / 3)
    assert aggregate(s, "last") == 0.8
    assert aggregate(s, "product") == pytest.approx(0.36)
    for how in prm.AGGREGATIONS:
        assert aggregate([], how) == 0.0
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(s, "max")


def test_best_of_n_argmax_and_ties():
    sols = [[0.9, 0.2], [0.6, 0.6], [0.7, 0.3], []]
    assert best_of_n(sols, "mean") == 1          # means 0.55, 0.6, 0.5, 0
    assert best_of_n(sols, "min") == 1           # mins 0.2, 0.6, 0.3, 0
    assert best_of_n(sols, "last") == 1          # lasts 0.2, 0.6, 0.3, 0
    assert best_of_n([[0.9, 0.1], [0.1, 0.9]], "mean") == 0     # tie -> first
    assert best_of_n([[0.5], [0.9, 0.2], [0.9]], "product") == 2


def test_votes_by_hand():
    answers = ["A", "B", "B", None, "A", "C"]
    scores = [0.9, 0.2, 0.3, 1.0, 0.4, 0.7]
    # A: 1.3, B: 0.5, C: 0.7 (the None answer's 1.0 ignored)
    assert prm_weighted_vote(answers, scores) == "A"
    assert prm_weighted_vote(["B", "A", "A"], [0.9, 0.5, 0.3]) == "B"   # 0.9 > 0.8
    assert majority_vote(answers) == "A"       # A and B tie at 2: first to appear
    assert majority_vote(["B", "A", "A"]) == "A"
    assert majority_vote([None, None]) is None and prm_weighted_vote([None], [1.0]) is None


# ---- metrics ---------------------------------------------------------------------------------

def test_auc_by_hand_with_tie():
    # pos 0.9, 0.5; neg 0.5, 0.1: pairs 1 + 1 + 0.5 + 1 = 3.5 of 4
    assert auc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert auc([0.1, 0.2], [1, 0]) == 0.0
    assert math.isnan(auc([0.1, 0.2], [1, 1]))


def test_auc_matches_pairwise_definition():
    rng = random.Random(1)
    for _ in range(20):
        n = rng.randint(2, 30)
        s = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) for _ in range(n)]
        y = [rng.randint(0, 1) for _ in range(n)]
        pos = [a for a, b in zip(s, y) if b == 1]
        neg = [a for a, b in zip(s, y) if b == 0]
        if not pos or not neg:
            continue
        ref = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        assert auc(s, y) == pytest.approx(ref)


def test_step_metrics_by_hand():
    # predicted wrong (< 0.5): steps 1, 3; true wrong: steps 2, 3 -> tp = 1
    m = step_metrics([0.8, 0.3, 0.6, 0.1], [1, 1, 0, 0])
    assert m["n"] == 4 and m["acc"] == 0.5
    assert m["err_precision"] == 0.5 and m["err_recall"] == 0.5 and m["err_f1"] == 0.5
    assert m["auc"] == pytest.approx(0.75)      # pos {0.8, 0.3} vs neg {0.6, 0.1}: 1+1+0+1


def test_first_error_hit_by_hand():
    assert first_error_hit([0.9, 0.7, 0.1, 0.2], [1, 1, 0, 0]) == (True, True)
    assert first_error_hit([0.9, 0.4, 0.2, 0.6], [1, 1, 0, 0]) == (False, True)
    assert first_error_hit([0.9, 0.7, 0.3, 0.1], [1, 1, 0, 0]) == (True, False)
    assert first_error_hit([0.9, 0.7], [1, 1]) == (True, None)
    assert first_error_hit([0.9, 0.4], [1, 1]) == (False, None)
    assert first_error_hit([0.3, 0.3], [0, 0]) == (True, True)   # tie on min -> first
