"""Tests of ursa/labeling.py: BEL (Algorithm 1) against an oracle policy whose first wrong step is
known, its probe count against hand-traced searches, per-step Monte Carlo, batching, records."""
import math

import pytest

from ursa.labeling import (bel, correct_record, make_record, mc_estimate, mie_record, per_step_mc,
                           validate_record, wrong_step_labels)

N = 4   # completions per probe


class Oracle:
    """complete() for solutions whose first wrong step is known: item = {"id", "e"}; a prefix of k
    steps reaches the right answer (all n completions) iff k < e, else none does.
    e = 0: even the bare question fails; e = len(steps) + 1: every prefix succeeds."""

    def __init__(self, mixed=False):
        self.calls = []          # one list of (id, prefix length) per call
        self.mixed = mixed       # good prefixes return only one correct completion of n

    def __call__(self, requests, n):
        self.calls.append([(item["id"], len(prefix)) for item, prefix in requests])
        out = []
        for item, prefix in requests:
            ok = len(prefix) < item["e"]
            out.append(([True] + [False] * (n - 1)) if (ok and self.mixed) else [ok] * n)
        return out

    def probed(self, sid):
        return [k for call in self.calls for i, k in call if i == sid]


def steps_of(n):
    return [f"Step {k + 1}: s{k + 1}." for k in range(n)]


def item(e, sid="q"):
    return {"id": sid, "e": e, "image": "images/q.png", "question": "How many?", "answer": "7"}


# Probes traced BY HAND through Algorithm 1 (l = 0, r = n; mid = (l + r) // 2; a prefix of mid
# steps fails iff mid >= e):  (n, e) -> prefix lengths probed, in order.
HAND = {
    (1, 1): [0],
    (2, 1): [1, 0], (2, 2): [1],
    (3, 1): [1, 0], (3, 2): [1, 2], (3, 3): [1, 2],
    (4, 1): [2, 1, 0], (4, 2): [2, 1], (4, 3): [2, 3], (4, 4): [2, 3],
    (7, 1): [3, 1, 0], (7, 7): [3, 5, 6],
    (9, 1): [4, 2, 1, 0], (9, 5): [4, 7, 6, 5], (9, 9): [4, 7, 8],
}


def test_wrong_step_labels():
    assert wrong_step_labels(4, 1) == [0, 0, 0, 0]
    assert wrong_step_labels(4, 3) == [1, 1, 0, 0]
    assert wrong_step_labels(4, 4) == [1, 1, 1, 0]
    with pytest.raises(ValueError):
        wrong_step_labels(4, 5)


def test_bel_hand_traces():
    for (n, e), probes in HAND.items():
        orc = Oracle()
        (res,), spent = bel(orc, [(item(e), steps_of(n))], N)
        assert orc.probed("q") == probes, (n, e)
        assert res.first_error == e and not res.unsolved
        assert res.probes == len(probes) and spent == len(probes) * N
        assert res.labels == [1] * (e - 1) + [0] * (n - e + 1)


def test_bel_finds_every_error_with_log_cost_and_agrees_with_per_step_mc():
    for n in range(1, 10):
        lo, hi = math.floor(math.log2(n + 1)), math.ceil(math.log2(n + 1))
        for e in range(1, n + 1):
            orc = Oracle()
            (res,), spent = bel(orc, [(item(e), steps_of(n))], N)
            assert res.first_error == e, (n, e)
            # a binary search over the n + 1 candidates 0..n halves them each probe
            assert lo <= res.probes <= hi, (n, e, res.probes)
            assert spent == res.probes * N
            # every probe is a proper prefix (y[1..n] is never sampled)
            assert all(0 <= k < n for k in orc.probed("q"))
            mc_orc = Oracle()
            (mc,), mc_spent = per_step_mc(mc_orc, [(item(e), steps_of(n))], N)
            assert mc.labels == res.labels and mc.first_error == e
            assert mc.mc == [1.0] * (e - 1) + [0.0] * (n - e + 1)
            assert mc_spent == n * N and len(mc_orc.calls) == 1
        # total over all e: sum of the depths in the search, bounded by n * ceil(log2(n + 1))
        assert sum(bel(Oracle(), [(item(e), steps_of(n))], N)[0][0].probes
                   for e in range(1, n + 1)) <= n * hi


def test_bel_edge_cases():
    # error in step 1 of a 5-step solution: 2 -> 1 -> 0 (the bare question succeeds)
    orc = Oracle()
    (r,), _ = bel(orc, [(item(1), steps_of(5))], N)
    assert r.first_error == 1 and r.labels == [0] * 5 and orc.probed("q") == [2, 1, 0]
    assert r.trace == [(2, 0), (1, 0), (0, N)]
    # error in the last step
    (r,), _ = bel(Oracle(), [(item(5), steps_of(5))], N)
    assert r.first_error == 5 and r.labels == [1, 1, 1, 1, 0]
    # a wrong solution whose every prefix has mc > 0: BEL blames the last step ...
    orc = Oracle()
    (r,), _ = bel(orc, [(item(6), steps_of(5))], N)
    assert r.first_error == 5 and r.labels == [1, 1, 1, 1, 0] and not r.unsolved
    assert orc.probed("q") == [2, 4]
    # ... while per-step MC, which also samples from y[1..n], finds no error
    (m,), _ = per_step_mc(Oracle(), [(item(6), steps_of(5))], N)
    assert m.first_error is None and m.labels == [1] * 5
    # the question alone never succeeds: l = 0 -> every step 0, flagged
    orc = Oracle()
    (r,), _ = bel(orc, [(item(0), steps_of(5))], N)
    assert r.unsolved and r.first_error == 1 and r.labels == [0] * 5
    assert orc.probed("q") == [2, 1, 0]


def test_bel_counts_any_correct_completion_as_success():
    # good prefixes give 1 correct completion of N (mc = 1/N > 0): same search as all-correct
    for (n, e), probes in HAND.items():
        orc = Oracle(mixed=True)
        (r,), _ = bel(orc, [(item(e), steps_of(n))], N)
        assert r.first_error == e and orc.probed("q") == probes


def test_bel_batched_one_call_per_round():
    cases = [((9, 5), "a"), ((4, 2), "b"), ((1, 1), "c"), ((9, 9), "d"), ((3, 3), "e")]
    sols = [(item(e, sid), steps_of(n)) for (n, e), sid in cases]
    orc = Oracle()
    results, spent = bel(orc, sols, N)
    rounds = [len(HAND[ne]) for ne, _ in cases]                  # 4, 2, 1, 3, 2
    assert len(orc.calls) == max(rounds) == 4
    # round j holds exactly the searches with more than j probes
    assert [len(c) for c in orc.calls] == [sum(r > j for r in rounds) for j in range(4)]
    for ((n, e), sid), r in zip(cases, results):
        assert r.first_error == e and orc.probed(sid) == HAND[(n, e)]
    assert spent == sum(rounds) * N
    # per-step MC over the same solutions: one call, N x total steps
    orc = Oracle()
    mcs, mc_spent = per_step_mc(orc, sols, N)
    assert len(orc.calls) == 1 and mc_spent == (9 + 4 + 1 + 9 + 3) * N
    assert [m.labels for m in mcs] == [r.labels for r in results]


def test_mc_estimate_and_bad_policy_answers():
    class Half:
        def __call__(self, requests, n):
            return [[k % 2 == 0 for k in range(n)] for _ in requests]
    assert mc_estimate(Half(), item(1), steps_of(3), 2, 4) == 0.5
    assert mc_estimate(Oracle(), item(3), steps_of(3), 2, 4) == 1.0
    assert mc_estimate(Oracle(), item(3), steps_of(3), 3, 4) == 0.0
    with pytest.raises(ValueError, match="prefix length 4"):
        mc_estimate(Oracle(), item(3), steps_of(3), 4, 4)
    with pytest.raises(ValueError, match="3 completions for request 0, expected 4"):
        bel(lambda reqs, n: [[True] * 3 for _ in reqs], [(item(1), steps_of(2))], 4)
    with pytest.raises(ValueError, match="0 results for 1 requests"):
        bel(lambda reqs, n: [], [(item(1), steps_of(2))], 4)
    with pytest.raises(ValueError, match="solution 1: has no steps"):
        bel(Oracle(), [(item(1), steps_of(2)), (item(1), [])], 4)


# ---- records ---------------------------------------------------------------------------------

def test_records():
    it = item(0)
    good = steps_of(4)
    rec = correct_record(it, good)
    assert rec == {"id": "q", "image": "images/q.png", "question": "How many?", "steps": good,
                   "labels": [1, 1, 1, 1], "answer": "7", "source": "correct"}
    bad = good[:2] + ["Step 3: s3 misread.", "Step 4: s4 recomputed."]
    rec = mie_record(it, good, lambda x: (bad, "9", 2), rid="q-mie")
    assert rec["labels"] == [1, 1, 0, 0] and rec["answer"] == "9" and rec["id"] == "q-mie"
    assert mie_record(it, good, lambda x: (bad[:1] + bad[1:], "9", 0))["labels"] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="insert_index 4 outside"):
        mie_record(it, good, lambda x: (bad, "9", 4))
    with pytest.raises(ValueError, match="before insert_index 3 differ"):
        mie_record(it, good, lambda x: (bad, "9", 3))
    rec = make_record(it, good, [1, 0, 0, 0], "5", "bel", rid="q-bel-0")
    assert rec["source"] == "bel"


@pytest.mark.parametrize("change, msg", [
    (lambda r: r.pop("labels"), 'missing field "labels"'),
    (lambda r: r.update(labels=[1, 0]), "2 labels for 3 steps"),
    (lambda r: r.update(labels=[1, 0, 1]), "1..1 0..0"),
    (lambda r: r.update(labels=[1, 0, 2]), "0/1 integers"),
    (lambda r: r.update(labels=[1, 1, 1]), "must have a wrong step"),
    (lambda r: r.update(source="correct"), "must have every label 1"),
    (lambda r: r.update(source="gemini"), '"source" must be one of'),
    (lambda r: r.update(steps=[]), "non-empty list"),
    (lambda r: r.update(steps=["Step 1: a. и", "b", "c"]), "contains the step tag"),
    (lambda r: r.update(steps=["a", "b", "c †Answer: 3"]), "contains '†Answer:'"),
    (lambda r: r.update(answer=3), 'field "answer" must be a string'),
])
def test_validate_record_errors(change, msg):
    rec = {"id": "x", "image": "i.png", "question": "q", "steps": ["a", "b", "c"],
           "labels": [1, 0, 0], "answer": "3", "source": "bel"}
    validate_record(dict(rec), "data/dualmath.jsonl:3")
    change(rec)
    with pytest.raises(ValueError, match=msg) as ei:
        validate_record(rec, "data/dualmath.jsonl:3")
    assert str(ei.value).startswith("data/dualmath.jsonl:3: ")
