"""ursa/evaluate.py and ursa/results.py: selection rules, pass@N, intervals, paired bootstrap, the
held-out split; hand-made inputs with hand-computed answers."""
import math
from types import SimpleNamespace

import pytest
import torch

from ursa.evaluate import (acc_record, best_of_n_table, fmt_acc, judge_all, paired_bootstrap,
                           selection_verdicts, wilson)
from ursa.results import split_by_problem

RECS = [{"id": "p0", "answer": "7"}, {"id": "p1", "answer": "B", "choices": ["1", "2", "3", "4"]}]
RESP = [["†Answer: 5", "†Answer: 7", "†Answer: 5", "†Answer: 7"],       # p0: right at 1 and 3, maj tie 5/7 -> 5
        ["†Answer: 2", "†Answer: A", "†Answer: A", "†Answer: (B)"]]    # p1: B = option "2": right at 0 and 3


def samples():
    return judge_all(RECS, RESP)


def test_judge_all_maj_and_pass_by_hand():
    s = samples()
    assert s.correct == [[False, True, False, True], [True, False, False, True]]
    assert s.first_correct() == [False, True]
    assert s.maj(RECS) == [False, False]          # p0: 5 and 7 twice each, 5 first; p1: "A" twice
    assert s.maj(RECS, 2) == [False, True]        # first two: p0 {5, 7} -> 5; p1 {2, A} -> 2 = B
    assert s.pass_at(1) == [False, True] and s.pass_at(2) == [True, True]
    assert s.sample_acc() == pytest.approx(4 / 8)


def test_best_of_n_picks_the_highest_aggregate_not_sample_0():
    s = samples()
    scores = [[[0.9, 0.1], [0.6, 0.7], [0.2], [0.5, 0.5]],    # p0: mean 0.5 0.65 0.2 0.5 -> 1 (right)
              [[0.1], [0.9, 0.8], [0.3], [0.2, 0.95]]]         # p1: mean .1 .85 .3 .575 -> 1 (wrong)
    v = selection_verdicts(RECS, s, scores, 4)
    assert v["mean"] == [True, False]
    assert v["min"] == [True, False]              # p0 min: .1 .6 .2 .5 -> 1; p1: .1 .8 .3 .2 -> 1
    assert v["last"] == [True, True]              # p0 last: .1 .7 .2 .5 -> 1; p1: .1 .8 .3 .95 -> 3
    assert v["product"] == [True, False]          # p0: .09 .42 .2 .25 -> 1; p1: .1 .72 .3 .19 -> 1
    # weighted vote on mean scores: p0 5: .5+.2 = .7, 7: .65+.5 = 1.15 -> 7; p1 "2": .1 + ("(B)" is its own
    # string) ... "A": .85+.3 = 1.15 beats "2" .1 and "B" .575 -> wrong
    assert v["weighted"] == [True, False]
    assert v["pass"] == [True, True] and v["maj"] == [False, False]
    t = best_of_n_table(RECS, s, scores, ns=(1, 2, 4, 8))
    assert list(t) == [1, 2, 4]                                  # N = 8 > 4 samples drawn
    assert t[1]["mean"] == [False, True] and t[1]["pass"] == [False, True]   # N = 1: sample 0 itself
    assert t[2]["mean"] == [True, False]          # p0 {.5, .65} -> 1; p1 {.1, .85} -> 1


def test_wilson_and_formatting_by_hand():
    lo, hi = wilson(41, 100)
    # p = .41, z = 1.96: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    z, n, p = 1.959964, 100, 0.41
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((c - h, c + h))
    assert fmt_acc(41, 100) == f"41.0% [{100 * (c - h):.1f}, {100 * (c + h):.1f}]"
    assert wilson(0, 0) == (0.0, 0.0)
    a = acc_record([True, False, True, True])
    assert (a["acc"], a["n"], a["correct"]) == (0.75, 4, 3)


def test_paired_bootstrap():
    same = paired_bootstrap([1, 0, 1, 1], [1, 0, 1, 1])
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0], "n": 4}
    d = paired_bootstrap([1] * 30 + [0] * 70, [0] * 100, iters=500, seed=3)
    assert d["diff"] == pytest.approx(0.30)
    assert d["ci95"][0] < 0.30 < d["ci95"][1] and d["ci95"][0] > 0.18 and d["ci95"][1] < 0.42
    assert paired_bootstrap([1, 0] * 50, [0, 1] * 50, seed=1) == paired_bootstrap([1, 0] * 50, [0, 1] * 50, seed=1)
    with pytest.raises(ValueError, match="same ones"):
        paired_bootstrap([1], [1, 0])


def test_heldout_split_is_disjoint_by_problem():
    recs = [{"id": f"train-bars-{p}-bel{k}", "problem_id": f"train-bars-{p}"} for p in range(200) for k in range(3)]
    train, held = split_by_problem(recs, 0.2)
    pt, ph = {r["problem_id"] for r in train}, {r["problem_id"] for r in held}
    assert pt.isdisjoint(ph) and len(pt | ph) == 200
    assert 20 <= len(ph) <= 60                                   # about 20% of 200 problems
    assert len(train) + len(held) == len(recs)
    assert split_by_problem(recs, 0.2) == (train, held)          # the same split on every call


def test_process_bench_by_hand():
    from ursa.evaluate import process_bench
    # solution 0: first error at step 2, the PRM's first score below 0.5 is step 2 -> hit
    # solution 1: first error at step 1, the PRM finds none -> miss
    # solution 2: all right, every score >= 0.5 -> hit; solution 3: all right, step 3 below 0.5 -> miss
    fe = [2, 1, None, None]
    labels = [[1, 0, 0], [0, 0], [1, 1, 1], [1, 1, 1]]
    scores = [[0.9, 0.2, 0.4], [0.6, 0.7], [0.8, 0.5, 0.9], [0.9, 0.8, 0.3]]
    q = process_bench(fe, labels, scores)
    assert (q["acc_wrong"], q["acc_right"], q["wrong"], q["right"], q["steps"]) == (0.5, 0.5, 2, 2, 11)
    assert q["f1"] == pytest.approx(0.5)
    # step AUC by hand: 7 label-1 scores vs 4 label-0 scores {0.2, 0.4, 0.6, 0.7}
    ones = [0.9, 0.8, 0.5, 0.9, 0.9, 0.8, 0.3]
    zeros = [0.2, 0.4, 0.6, 0.7]
    want = sum((a > b) + 0.5 * (a == b) for a in ones for b in zeros) / 28
    assert q["step_auc"] == pytest.approx(want)
    # a solution whose last step has no score: only the scored steps count
    q2 = process_bench([None], [[1, 1, 1]], [[0.9, 0.9]])
    assert q2["steps"] == 2 and q2["acc_right"] == 1.0


def test_within_problem_auc_by_hand_ignores_between_problem_separation():
    from ursa.evaluate import within_problem_auc
    correct = [[True, False, False], [True, True], [False, True]]
    # problem 0: right 0.5 vs wrong {0.4, 0.5} -> (1 + 0.5) / 2 = 0.75; problem 1 all right: skipped;
    # problem 2: right 0.1 vs wrong 0.2 -> 0.0. Pooled, right samples would look better (0.5, 0.9 high).
    scores = [[[0.5], [0.4], [0.5]], [[0.9], [0.9]], [[0.2], [0.1]]]
    w = within_problem_auc(correct, scores)
    assert w == {"auc": pytest.approx(0.375), "problems": 2}
    # the aggregation matters: min of [0.9, 0.1] is 0.1 < 0.3, the mean 0.5 > 0.3
    c2, s2 = [[True, False]], [[[0.9, 0.1], [0.3, 0.3]]]
    assert within_problem_auc(c2, s2, "mean")["auc"] == 1.0 and within_problem_auc(c2, s2, "min")["auc"] == 0.0
    assert math.isnan(within_problem_auc([[True]], [[[0.5]]])["auc"])


class _Bigram(torch.nn.Module):
    """A stand-in policy whose next-token logits depend only on the current token: log p(b | a) = W[a, b]."""

    def __init__(self, vocab, num_tokens=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.cfg = SimpleNamespace(vision=SimpleNamespace(num_tokens=num_tokens))

    def forward(self, ids, px, attention_mask=None):
        return SimpleNamespace(logits=self.W[ids])                     # [B, T, V]


def test_step_logprobs_match_incremental_encodings_by_hand():
    from ursa.evaluate import step_logprobs
    from ursa.prm import join_steps
    from ursa.tokenizer import train_toy_tokenizer
    sols = [["Step 1: There are 3 red circles.", "Step 2: 3 * 5 = 15."],
            ["Step 1: There is 1 square.", "Step 2: 1 * 4 = 5.", "Step 3: 5 is option (B)."]]
    qs = ["How many red circles?", "What is the total?"]
    tok = train_toy_tokenizer([join_steps(s, "15") + q for s, q in zip(sols, qs)] * 10, vocab_size=300)
    m = _Bigram(tok.vocab_size)
    lsm = m.W.detach().log_softmax(-1)
    got = step_logprobs(m, tok, qs, sols, torch.zeros(2, 3, 4, 4), batch_size=1)
    assert got == step_logprobs(m, tok, qs, sols, torch.zeros(2, 3, 4, 4), batch_size=2)   # padding changes nothing
    for q, st, g in zip(qs, sols, got):
        prompt = tok.encode_prompt(q, image=True, num_image_tokens=2)
        want = []
        for k in range(len(st)):            # step k = the tokens that encoding steps[:k+1] adds to steps[:k] + "\n\n"
            pre = tok.encode(join_steps(st[:k], None) + "\n\n") if k else []
            ids = prompt + tok.encode(join_steps(st[:k + 1], None))
            want.append(sum(float(lsm[ids[t - 1], ids[t]]) for t in range(len(prompt) + len(pre), len(ids))))
        assert g == pytest.approx(want, abs=1e-5)


def test_headroom_by_hand():
    from ursa.oracle import OracleVerdict
    from ursa.results import headroom
    s = samples()                       # p0: maj 5 wrong, samples 1 and 3 right; p1: maj "A" wrong, 0 and 3 right
    wrong_read = OracleVerdict(["Step 1: There are 3 red circles."], 1, [0], "misread", False)
    wrong_opt = OracleVerdict(["Step 1: 15 is option (A)."], 1, [0], "letter", False)
    right = OracleVerdict(["Step 1: 3 * 5 = 15."], None, [1], "", True)
    ver = [[wrong_read, right, None, right], [right, wrong_opt, wrong_read, right]]
    h = headroom(RECS, s, ver)
    assert (h["problems"], h["right_share"]) == (2, 0.5)
    assert {k: v for k, v in h["wrong_sample_first_errors"].items() if v} == {"perception": 2, "unparsable": 1, "option": 1}
    s.correct[1] = [False] * 4          # p1 never right: no headroom there
    assert headroom(RECS, s, ver)["problems"] == 1


def test_likelihood_best_of_n_and_policy_judge_by_hand(monkeypatch):
    """The judge picks the sample whose least likely step is most likely, among the first n; a sample
    without steps never wins; policy_judge hands each record its own samples' log-likelihoods."""
    from ursa import evaluate
    from ursa.evaluate import likelihood_best_of_n
    from ursa.results import policy_judge
    s = samples()                                  # right: p0 samples 1 and 3; p1 samples 0 and 3
    lp = [[[-1.0, -5.0], [-2.0, -3.0], [], [-0.5]],  # p0: worst steps -5, -3, none, -0.5 -> sample 3
          [[-4.0], [-1.0, -1.5], [-9.0], [-0.1]]]    # p1: -4, -1.5, -9, -0.1 -> sample 3
    assert likelihood_best_of_n(s, lp) == [True, True]
    assert likelihood_best_of_n(s, lp, 2) == [True, False]   # first two: p0 sample 1 (-3), p1 sample 1 (-1.5)
    assert likelihood_best_of_n(s, [[[], [], [-1.0], []], [[], [], [], [-1.0]]]) == [False, True]
    with pytest.raises(ValueError, match="best-of-8"):      # more samples asked than there are
        likelihood_best_of_n(s, lp, 8)
    with pytest.raises(ValueError, match="one step log-likelihood list per sample"):
        likelihood_best_of_n(s, [x[:3] for x in lp])

    # a stand-in policy that finds a step likely only in the response marked "good": the judge must
    # pick, per record, the good one among ITS samples (a mixed-up slice of the flat list would not)
    resp = [["Step 1: a.\n\n†Answer: 5", "Step 1: good.\n\n†Answer: 7", "Step 1: b.\n\n†Answer: 5"],
            ["Step 1: c.\n\n†Answer: A", "Step 1: d.\n\n†Answer: A", "Step 1: good.\n\n†Answer: B"]]
    s2 = judge_all(RECS, resp)
    monkeypatch.setattr(evaluate, "step_logprobs", lambda policy, tok, qs, steps, px, batch_size=32:
                        [[0.0 if "good" in st[0] else -5.0] for st in steps])
    recs = [dict(r, question=f"q{i}") for i, r in enumerate(RECS)]
    j = policy_judge(None, None, recs, s2, torch.zeros(2, 3, 4, 4), {"maj@3": s2.maj(recs)}, 3)
    assert j["best_of_n"]["correct"] == 2 and j["minus_maj"]["diff"] == 1.0     # maj: 5 and A, both wrong


def test_option_step_accuracy_continues_each_mc_record_from_its_option_header(monkeypatch):
    """Only multiple-choice records are probed, each from its own reference prefix and its own
    image; a continuation is judged together with its prefix (the answer line is in it)."""
    import ursa.evaluate as ev
    recs = [{"id": "f", "question": "q0", "answer": "7", "steps": ["Step 1: 3 + 4 = 7."]},
            {"id": "m1", "question": "q1", "answer": "B", "choices": ["1", "2", "3", "4"],
             "steps": ["Step 1: 1 + 1 = 2.", "Step 2: (A) 1 is not 2. (B) 2 is 2."]},
            {"id": "m2", "question": "q2", "answer": "A", "choices": ["5", "6", "7", "8"],
             "steps": ["Step 1: 2 + 3 = 5.", "Step 2: (A) 5 is 5."]}]
    assert ev.option_prefixes(recs) == [(1, "Step 1: 1 + 1 = 2.\n\nStep 2:"), (2, "Step 1: 2 + 3 = 5.\n\nStep 2:")]
    seen = {}

    def fake_sample_texts(model, tok, prompts, pixels, max_new_tokens):
        seen["prompts"], seen["pixels"] = prompts, pixels
        return [[" (A) 1 is not 2. (B) 2 is 2.\n\n†Answer: B"], [" (A) 5 is not 5. (B) 6 is 5.\n\n†Answer: B"]], None

    monkeypatch.setattr(ev, "sample_texts", fake_sample_texts)
    monkeypatch.setattr(ev, "prompts_for", lambda rs, tok, cfg, prefixes: [(r["question"], p) for r, p in zip(rs, prefixes)])
    pixels = torch.arange(3.0).view(3, 1)
    r = ev.option_step_accuracy(SimpleNamespace(cfg=None), None, recs, pixels, 128)
    assert seen["prompts"] == [("q1", "Step 1: 1 + 1 = 2.\n\nStep 2:"), ("q2", "Step 1: 2 + 3 = 5.\n\nStep 2:")]
    assert seen["pixels"].flatten().tolist() == [1.0, 2.0]
    assert (r["n"], r["correct"]) == (2, 1)         # m1 answers B (right), m2 answers B (wrong: A)
    assert ev.option_step_accuracy(SimpleNamespace(cfg=None), None, recs[:1], pixels, 128)["n"] == 0


def test_error_kind_by_hand():
    """The first wrong step's first clause names the kind; an option check counts as "option"."""
    from ursa.oracle import OracleVerdict
    from ursa.results import error_kind
    steps = ["Step 1: There are 3 circles.", "Step 2: 3 * 5 = 16.", "Step 3: (A) 15 is not 16. (B) 16 is 16.",
             "Step 4: 15 is option (A)."]
    kinds = [error_kind(OracleVerdict(steps, k, [1] * (k - 1) + [0] * (5 - k), "", False)) for k in (1, 2, 3, 4)]
    assert kinds == ["perception", "arithmetic", "option", "option"]
    assert error_kind(None) == "unparsable"
    assert error_kind(OracleVerdict(steps[:1], None, [1], "", True)) == "right"
    assert error_kind(OracleVerdict(steps[:1], None, [1], "", False, complete=False)) == "incomplete"
    assert error_kind(OracleVerdict(steps[:1], None, [1], "", False)) == "answer line"


def test_step_features_and_labels_by_hand():
    from types import SimpleNamespace

    from ursa.evaluate import STEP_SCALE, step_features, step_labels
    assert step_features([-0.5, -2.0]) == [[-0.5, 0.0, 0.0], [-2.0, 1 / STEP_SCALE, 1.0]]
    assert step_features([]) == []
    v = SimpleNamespace(labels=[1, 0])
    assert step_labels(v, 3, correct=True) == [1.0, 0.0, 1.0]      # past the oracle's list: the outcome
    assert step_labels(v, 1, correct=False) == [1.0]
    assert step_labels(None, 2, correct=True) == [0.0, 0.0]        # unparsable: every step wrong


def test_fit_logistic_is_the_regularised_optimum():
    """At the returned weights the gradient of mean BCE + L2 |w|^2 (bias free) vanishes: an
    independent check of the optimum, computed by hand from the closed-form gradient."""
    from ursa.evaluate import CEILING_L2, fit_logistic
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g)
    y = (X[:, 0] - 0.5 * X[:, 1] + 0.3 * torch.randn(200, generator=g) > 0).float()
    w = fit_logistic(X, y)
    A = torch.cat([X, torch.ones(200, 1)], 1)
    p = torch.sigmoid(A @ w)
    grad = A.T @ (p - y) / 200
    grad[:-1] += 2 * CEILING_L2 * w[:-1]
    assert grad.abs().max() < 1e-4
    assert w[0] > 0 > w[1]                                           # the signs of the true rule


def test_fitted_best_of_n_picks_by_the_fitted_readout_per_held_out_fold():
    """Step label 1 iff the step's log-prob feature is high. Each problem's right sample has only
    high steps, the wrong ones one low step; the right one sits at a different index per problem,
    and a sample with no steps never wins. Picking the lowest score, or a fold's own training
    problems, would not give all right."""
    from ursa.evaluate import fitted_best_of_n, step_features
    feats, labels, correct = [], [], []
    for i in range(8):
        right = i % 3
        row_f, row_l, row_c = [], [], []
        for j in range(4):
            if j == 3:
                lps = []                                             # no steps
            elif j == right:
                lps = [-0.1, -0.2, -0.1]
            else:
                lps = [-0.1, -3.0 - 0.1 * j, -0.2]
            row_f.append(step_features(lps))
            row_l.append([1.0 if lp > -1 else 0.0 for lp in lps])
            row_c.append(j == right)
        feats.append(row_f), labels.append(row_l), correct.append(row_c)
    correct[5][3] = True                                            # the stepless sample is "right": still never picked
    assert fitted_best_of_n(feats, labels, correct) == [True] * 8
    flipped = [[[1.0 - y for y in ys] for ys in row] for row in labels]   # a readout fitted to the opposite labels
    assert fitted_best_of_n(feats, flipped, correct) == [False] * 8
    with pytest.raises(ValueError, match="1 problem"):
        fitted_best_of_n(feats[:1], labels[:1], correct[:1])


def test_filtered_majority_votes_among_the_samples_a_kind_verifier_keeps():
    from ursa.evaluate import filtered_majority
    s = samples()
    kinds = [["perception", "right", "perception", "right"],     # p0: answers 5, 7, 5, 7
             ["right", "option", "option", "right"]]             # p1: answers 2 (= B), A, A, (B)
    assert filtered_majority(s, RECS, kinds, ()) == s.maj(RECS) == [False, False]
    assert filtered_majority(s, RECS, kinds, ("arithmetic",)) == [False, False]   # nothing of that kind
    assert filtered_majority(s, RECS, kinds, ("perception",)) == [True, False]    # p0 keeps 7, 7
    assert filtered_majority(s, RECS, kinds, ("option",)) == [False, True]        # p1 keeps 2, B: both right
    assert filtered_majority(s, RECS, kinds, ("perception", "right")) == [False, False]  # p0: all dropped -> all
    # four vote (5 first); p1 keeps A, A
    assert filtered_majority(s, RECS, kinds, ("perception",), n=2) == [True, True]      # p0: 5 dropped, 7 kept;
    # p1: 2 and A tie, 2 first
    with pytest.raises(ValueError, match="one kind per sample"):           # kinds of other samples (greedy's)
        filtered_majority(s, RECS, [k[:1] for k in kinds], ("perception",))


def test_option_quote_verifier_drops_the_samples_that_misquote_an_option():
    """Only p1 has options (1, 2, 3, 4); its two "A" samples check "(A) 2", which the question does
    not say, so the vote keeps "2" (= B) and "(B)": right. p0 is free-form: nothing dropped, maj 5."""
    from ursa.results import option_quote_verifier
    resp = [RESP[0], ["†Answer: 2", "Step 1: (A) 2 is 2.\n\n†Answer: A", "Step 1: (A) 2 is 2.\n\n†Answer: A",
                      "Step 1: (A) 1 is not 2. (B) 2 is 2.\n\n†Answer: (B)"]]
    s = judge_all(RECS, resp)
    q = option_quote_verifier(RECS, s)
    assert (q["flagged"], q["flagged_right"]) == (2, 0)
    assert q["best_of_n"]["correct"] == 1 and q["minus_maj"]["diff"] == pytest.approx(0.5)   # maj: 5 and A


def test_kind_verifiers_vote_among_kept_samples_against_the_same_maj():
    from ursa.results import KIND_VERIFIERS, kind_verifiers
    s = samples()
    kinds = [["perception", "right", "perception", "right"],     # p0: answers 5, 7, 5, 7 (maj 5: wrong)
             ["right", "option", "option", "right"]]             # p1: answers 2 (= B), A, A, (B) (maj A: wrong)
    kv = kind_verifiers(RECS, s, kinds)
    assert set(kv) == set(KIND_VERIFIERS)
    acc = {k: e["best_of_n"]["acc"] for k, e in kv.items()}
    # perception: p0 keeps 7, 7 (right), p1 all (A). arithmetic: nothing dropped, both wrong. option and
    # the two wider verifiers: p1 keeps 2, B (right), p0 all.
    assert acc == {"perception": 0.5, "arithmetic": 0.0, "option": 0.5, "arithmetic + option": 0.5,
                   "all but perception": 0.5}
    assert kv["perception"]["minus_maj"]["diff"] == pytest.approx(0.5)     # maj@4 is wrong on both
    assert kv["arithmetic"]["minus_maj"]["diff"] == pytest.approx(0.0)
