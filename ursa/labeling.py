"""Step labels for PRM training (Stage II, DualMath): Monte Carlo estimates, BEL, MIE.

References (docs/paper.md, "Stage II: DualMath and the PRM"):
- mc(y[1..i]) = (correct completions sampled from the prefix y[1..i]) / N; a step is "potentially
  correct" when mc > 0 (Math-Shepherd, Wang et al. 2023).
- Per-step Monte Carlo (Math-Shepherd's baseline): probe every prefix, N * n completions.
- Binary Error Locating (BEL, Algorithm 1): a binary search for the first wrong step of an
  incorrect solution, N * O(log n) completions; WRONGSTEPLABELING(y, l) labels the steps before it
  correct and it and every later step incorrect.
- Misinterpretation Insertion Engine (MIE): corrupt a fact read from the image in a correct solution
  and continue from there; every step from the insertion on is incorrect.

Everything here is generic. The policy is a batched callable

    complete(requests: list[tuple[item, list[str]]], n: int) -> list[list[bool]]

which, for each (problem item, prefix steps y[1..i]) request, samples n completions from the prefix
and says which reached the right answer. Probes that can share a call do (per_step_mc: one call;
bel: one call per round of the lockstep binary searches), because the real sampler is batched.
Labels are 1 (correct) / 0 (incorrect), one per step, always of the form 1..1 0..0.

Indices: BEL's first_error is 1-BASED (step k = steps[k - 1]); MIE's insert_index is 0-BASED (the
index into steps of the first corrupted step), as the world's corrupt() returns it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ursa.prm import ANSWER_MARK, STEP_TAG

Complete = Callable[[list, int], list]       # complete(requests, n) -> list[list[bool]]
SOURCES = ("bel", "mie", "correct")
RECORD_FIELDS = ("id", "image", "question", "steps", "labels", "answer", "source")


# ---- the policy call -------------------------------------------------------------------------

def _call(complete: Complete, requests: list, n: int) -> list[list[bool]]:
    """One batched call, with its answer checked: one list of n booleans per request."""
    out = complete(requests, n)
    if len(out) != len(requests):
        raise ValueError(f"complete() returned {len(out)} results for {len(requests)} requests")
    for k, r in enumerate(out):
        if len(r) != n:
            raise ValueError(f"complete() returned {len(r)} completions for request {k}, expected {n}")
    return out


def wrong_step_labels(num_steps: int, first_error: int) -> list[int]:
    """WRONGSTEPLABELING: 1-based first_error k in 1..num_steps -> [1] * (k - 1) + [0] * (n - k + 1)."""
    if not 1 <= first_error <= num_steps:
        raise ValueError(f"first_error {first_error} outside 1..{num_steps}")
    return [1] * (first_error - 1) + [0] * (num_steps - first_error + 1)


def mc_estimate(complete: Complete, item: Any, steps: Sequence[str], i: int, n: int) -> float:
    """mc(y[1..i]): fraction of n completions from the first i steps (i = 0: the bare question)
    that reach the right answer."""
    if not 0 <= i <= len(steps):
        raise ValueError(f"mc_estimate: prefix length {i} outside 0..{len(steps)}")
    (res,) = _call(complete, [(item, list(steps[:i]))], n)
    return sum(bool(c) for c in res) / n


# ---- per-step Monte Carlo (Math-Shepherd) ----------------------------------------------------

@dataclass
class MCResult:
    labels: list[int]                 # 1 until the first step with mc == 0, 0 from there on
    mc: list[float]                   # mc(y[1..i]) for i = 1..n
    first_error: Optional[int]        # 1-based first step with mc == 0; None when every mc > 0


def per_step_mc(complete: Complete, items_and_steps: Sequence[tuple[Any, Sequence[str]]],
                n: int) -> tuple[list[MCResult], int]:
    """Math-Shepherd's baseline: probe every prefix y[1..i], i = 1..len(steps), of every solution in
    ONE complete() call. Step i is potentially correct iff mc(y[1..i]) > 0; labels are 1 until the
    first step with mc == 0 and 0 from there on (hard estimation). Returns the results and the
    number of completions spent (n * total steps).

    Unlike bel(), the full solution y[1..n] IS probed (its answer line is resampled), so a wrong
    solution whose every prefix has mc > 0 gets all labels 1 here, while bel() blames its last step.
    """
    _check_solutions(items_and_steps)
    requests = [(item, list(steps[:i])) for item, steps in items_and_steps
                for i in range(1, len(steps) + 1)]
    flat = _call(complete, requests, n)
    results, k = [], 0
    for _, steps in items_and_steps:
        mc = [sum(bool(c) for c in flat[k + i]) / n for i in range(len(steps))]
        k += len(steps)
        first = next((i + 1 for i, m in enumerate(mc) if m == 0), None)
        labels = [1] * len(steps) if first is None else wrong_step_labels(len(steps), first)
        results.append(MCResult(labels=labels, mc=mc, first_error=first))
    return results, n * len(requests)


# ---- Binary Error Locating (Algorithm 1) ------------------------------------------------------

@dataclass
class BELResult:
    first_error: int                  # 1-based first wrong step (1 also when unsolved, see bel())
    labels: list[int]                 # wrong_step_labels(len(steps), first_error)
    probes: int                       # binary-search rounds spent on this solution
    unsolved: bool = False            # even the bare question gave no correct completion
    trace: list = field(default_factory=list)   # (prefix length mid, correct completions) per probe


def bel(complete: Complete, items_and_steps: Sequence[tuple[Any, Sequence[str]]],
        n: int) -> tuple[list[BELResult], int]:
    """Binary Error Locating on INCORRECT solutions (Algorithm 1), all searches in lockstep:

        l = 0, r = len(steps)
        while l < r:
            mid = (l + r) // 2
            sample n completions from y[1..mid]          # mid = 0: the bare question
            if none is correct: r = mid  else: l = mid + 1

    Each round sends the probes of every unfinished search in ONE complete() call.
    Returns the results and the completions spent (n * total probes).

    What the final l means. Let P(k) = "mc(y[1..k]) == 0", with P(len(steps)) taken as true WITHOUT
    probing (the solution's answer is wrong; mid < r <= len(steps) so y[1..n] is never sampled).
    Assuming P is monotone (once a prefix cannot reach the answer, longer ones cannot either), the
    loop keeps P(r) true and P(l - 1) false, so it ends at l = the smallest k in 0..n with P(k):
      - l = k >= 1: y[1..k-1] still reaches the answer (it was probed at mid = k - 1, or k - 1 = 0 was
        probed as the bare question) and y[1..k] does not: step k is the FIRST WRONG STEP
        (first_error = l, 1-based); steps 1..k-1 are labelled 1, steps k..n 0.
      - a wrong solution whose every probed prefix has mc > 0 ends at l = n: the last step is blamed.
      - l = 0: even the bare question (mid = 0) gave no correct completion, so no step can be blamed
        on evidence. Rule here: label EVERY step incorrect (first_error = 1) and set unsolved=True,
        so the caller can count such records or drop them.
    """
    _check_solutions(items_and_steps)
    lo = [0] * len(items_and_steps)
    hi = [len(steps) for _, steps in items_and_steps]
    traces: list[list] = [[] for _ in items_and_steps]
    while True:
        active = [s for s in range(len(items_and_steps)) if lo[s] < hi[s]]
        if not active:
            break
        mids = {s: (lo[s] + hi[s]) // 2 for s in active}
        requests = [(items_and_steps[s][0], list(items_and_steps[s][1][:mids[s]])) for s in active]
        outs = _call(complete, requests, n)
        for s, res in zip(active, outs):
            n_ok = sum(bool(c) for c in res)
            traces[s].append((mids[s], n_ok))
            if n_ok == 0:
                hi[s] = mids[s]
            else:
                lo[s] = mids[s] + 1
    results = []
    for s, (_, steps) in enumerate(items_and_steps):
        unsolved = lo[s] == 0
        first = 1 if unsolved else lo[s]
        results.append(BELResult(first_error=first, labels=wrong_step_labels(len(steps), first),
                                 probes=len(traces[s]), unsolved=unsolved, trace=traces[s]))
    return results, n * sum(r.probes for r in results)


def _check_solutions(items_and_steps) -> None:
    for k, pair in enumerate(items_and_steps):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"solution {k}: expected an (item, steps) pair")
        if len(pair[1]) == 0:
            raise ValueError(f"solution {k}: has no steps to label")


# ---- records ---------------------------------------------------------------------------------

def _item_field(item: Any, key: str):
    if not isinstance(item, Mapping):
        raise ValueError(f"item must be a problem record (a mapping with id, image, question), "
                         f"got {type(item).__name__}")
    if key not in item:
        raise ValueError(f"item {item.get('id', '?')}: missing field {key!r}")
    return item[key]


def make_record(item: Mapping, steps: Sequence[str], labels: Sequence[int], answer: str,
                source: str, rid: Optional[str] = None) -> dict:
    """A step-labelled solution (ursa/data.py's DualMath record): {"id", "image", "question", "steps",
    "labels", "answer", "source"}. item: a problem record (id, image, question); answer: the
    SOLUTION's own final answer (its †Answer line), not necessarily the right one; rid: the record id
    (default item["id"]; pass a unique one when an item yields several records). Validated."""
    rec = {"id": rid if rid is not None else _item_field(item, "id"),
           "image": _item_field(item, "image"), "question": _item_field(item, "question"),
           "steps": list(steps), "labels": [int(y) for y in labels], "answer": answer,
           "source": source}
    validate_record(rec, f"record {rec['id']}")
    return rec


def correct_record(item: Mapping, steps: Sequence[str], answer: Optional[str] = None,
                   rid: Optional[str] = None) -> dict:
    """A correct solution: every step labelled 1. answer defaults to item["answer"]."""
    ans = answer if answer is not None else _item_field(item, "answer")
    return make_record(item, steps, [1] * len(steps), ans, "correct", rid)


def mie_record(item: Mapping, steps: Sequence[str],
               insert_fn: Callable[[Any], tuple[list[str], str, int]],
               rid: Optional[str] = None) -> dict:
    """MIE: insert_fn(item) -> (new_steps, new_answer, insert_index) corrupts the correct solution
    `steps` at 0-based insert_index (e.g. a misread image fact) and continues from there. Labels:
    1 before insert_index, 0 from it on. The steps before the insertion must equal `steps`'s (their
    label 1 is only justified because they are the correct solution's steps)."""
    new_steps, new_answer, idx = insert_fn(item)
    where = f"mie {rid if rid is not None else _item_field(item, 'id')}"
    if not 0 <= idx < len(new_steps):
        raise ValueError(f"{where}: insert_index {idx} outside 0..{len(new_steps) - 1}")
    if list(new_steps[:idx]) != list(steps[:idx]):
        raise ValueError(f"{where}: the steps before insert_index {idx} differ from the correct "
                         f"solution's")
    labels = [1] * idx + [0] * (len(new_steps) - idx)
    return make_record(item, new_steps, labels, new_answer, "mie", rid)


def validate_record(rec: Any, where: str) -> None:
    """Raise ValueError(f"{where}: ...") unless rec is a well-formed step-labelled solution:
    the seven fields (extra fields are allowed); id, question, answer strings; image a string path
    or None; steps a non-empty list of non-blank strings free of the step tag and of "†Answer:";
    labels 0/1 ints, one per step, monotone (1..1 0..0); source bel | mie | correct; a "correct"
    record all 1, a "bel"/"mie" record at least one 0."""
    if not isinstance(rec, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
    for k in RECORD_FIELDS:
        if k not in rec:
            raise ValueError(f'{where}: missing field "{k}"')
    for k in ("id", "question", "answer"):
        if not isinstance(rec[k], str):
            raise ValueError(f'{where}: field "{k}" must be a string, got {type(rec[k]).__name__}')
    if rec["image"] is not None and not isinstance(rec["image"], str):
        raise ValueError(f'{where}: field "image" must be a path string or null')
    steps, labels = rec["steps"], rec["labels"]
    if not isinstance(steps, list) or not steps:
        raise ValueError(f'{where}: "steps" must be a non-empty list')
    for i, s in enumerate(steps):
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"{where}: step {i} must be a non-blank string")
        if STEP_TAG in s:
            raise ValueError(f"{where}: step {i} contains the step tag {STEP_TAG!r}")
        if ANSWER_MARK in s:
            raise ValueError(f"{where}: step {i} contains {ANSWER_MARK!r} (the answer goes in \"answer\")")
    if not isinstance(labels, list) or any(type(y) is not int or y not in (0, 1) for y in labels):
        raise ValueError(f'{where}: "labels" must be a list of 0/1 integers, got {labels!r}')
    if len(labels) != len(steps):
        raise ValueError(f"{where}: {len(labels)} labels for {len(steps)} steps")
    if any(a < b for a, b in zip(labels, labels[1:])):
        raise ValueError(f"{where}: labels must be 1..1 0..0 (no correct step after a wrong one), "
                         f"got {labels}")
    src = rec["source"]
    if src not in SOURCES:
        raise ValueError(f'{where}: "source" must be one of {SOURCES}, got {src!r}')
    if src == "correct" and 0 in labels:
        raise ValueError(f"{where}: a \"correct\" record must have every label 1, got {labels}")
    if src != "correct" and 0 not in labels:
        raise ValueError(f"{where}: a {src!r} record must have a wrong step (a label 0), got {labels}")
