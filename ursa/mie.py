"""The toy world's Misinterpretation Insertion Engine (URSA, Stage II, MIE): one wrong step in a
correct solution, every later step recomputed consistently from it.

    steps, answer, k = corrupt(problem, random.Random(0), kind="any")    # k: 0-based first wrong step

Kinds: "perception" (one image fact misread: the paper's insertion), "arithmetic" (one equation's
result slipped), "option" (the right value, but two options read swapped, so the checks stop at
another one), "any" (one that applies,
perception twice as likely). The toy MIE re-renders the solution from the changed fact
(ursa.world.render) instead of letting a model continue: deterministic, always coherent, free.
"""
from __future__ import annotations

import random

from ursa.world import OPTION_LETTERS, SLIPS, Problem, misread, misreadings, option_step, render, solve, stated_readings

CORRUPTION_KINDS = ("perception", "arithmetic", "option", "any")
ANY_WEIGHTS = {"perception": 2, "arithmetic": 1, "option": 1}   # kind="any": perception twice as likely


def slipped_values(x: int) -> list:
    """The plausible wrong results of an equation whose true result is x, ascending: x +- 1, 2, 10
    and x with two adjacent digits swapped (21 -> 12; no leading zero), all non-negative."""
    d = str(x)
    swaps = {int(d[:i] + d[i + 1] + d[i] + d[i + 2:]) for i in range(len(d) - 1) if d[i] != d[i + 1]
             and (i > 0 or d[i + 1] != "0")} if x >= 0 else set()
    return sorted(y for y in {x + s for s in SLIPS} | swaps if y >= 0 and y != x)


def _misread_plan(problem: Problem) -> tuple:
    """(ok, pool). ok: [(insert_index, steps, answer)] of the most plausible tier of misreadings
    that change the answer (multiple choice: to another option). pool (used when ok is empty):
    [(insert_index, free-form steps, value)] of the most plausible non-empty tier."""
    facts, choices, readings = problem.facts, problem.choices, problem.facts["readings"]
    tiers = misreadings(facts, readings)
    for tier in tiers:
        ok = []
        for i, y in tier:
            r = misread(readings, i, y)
            steps, _, ans, value = render(facts, r, choices)
            if ans != problem.answer and (choices is None or str(value) in choices):
                ok.append((stated_readings(facts, r).index(i), steps, ans))
        if ok:
            return ok, []
    pool = []
    for i, y in tiers[0] or tiers[1] or tiers[2]:
        r = misread(readings, i, y)
        steps, _, _, value = render(facts, r)
        pool.append((stated_readings(facts, r).index(i), steps, value))
    return [], pool


def _slip_plan(problem: Problem) -> tuple:
    """(ok, pool) as `_misread_plan`, over every (equation, `slipped_values`) pair; pool: every
    slip that changes the value."""
    facts, choices, readings = problem.facts, problem.choices, problem.facts["readings"]
    per, calc, value = solve(facts, readings)
    ok, pool = [], []
    for j, x in enumerate(calc.results):
        k = len(per) + calc.eq_steps[j]
        for y in slipped_values(x):
            steps, _, ans, v = render(facts, readings, choices, (j, y))
            if v != value:
                pool.append((k, render(facts, readings, None, (j, y))[0], v))
                if ans != problem.answer and (choices is None or str(v) in choices):
                    ok.append((k, steps, ans))
    return ok, pool


def _corrupt_planned(problem: Problem, rng: random.Random, plan, none: str) -> tuple:
    """Draw from plan(problem)'s ok list, else (multiple choice) from its pool, ending with the
    nearest option other than the true one (every check fails, then "23 is closest to option (C).")."""
    ok, pool = plan(problem)
    if ok:
        k, steps, ans = ok[rng.randrange(len(ok))]
        return steps, ans, k
    if problem.choices is None or not pool:
        raise ValueError(f"{problem.id}: {none}")
    k, steps, value = rng.choice(pool)
    text, letter = option_step(problem.choices, str(value), avoid=problem.answer)
    return steps + [f"Step {len(steps) + 1}: {text}"], letter, k


def _corrupt_option(problem: Problem, rng: random.Random) -> tuple:
    if problem.choices is None:
        raise ValueError(f"{problem.id}: corruption kind 'option' needs a multiple-choice problem")
    value, choices = problem.facts["value"], problem.choices
    gold = OPTION_LETTERS.index(problem.answer)
    others = [k for k in range(len(choices)) if k != gold]
    if isinstance(value, int) and rng.random() < 0.5:       # the distractor nearest to the value
        j = min(others, key=lambda k: (abs(float(choices[k]) - value), k))
    else:                                                   # any other option
        j = rng.choice(others)
    swapped = list(choices)                 # the options as misread: the true one and j exchanged
    swapped[gold], swapped[j] = choices[j], choices[gold]
    text, letter = option_step(swapped, str(value))
    k = len(problem.steps) - 1          # the option step is always last
    return problem.steps[:k] + [f"Step {k + 1}: {text}"], letter, k


_CORRUPTERS = {
    "perception": lambda p, rng: _corrupt_planned(p, rng, _misread_plan, "no misreading changes the answer"),
    "arithmetic": lambda p, rng: _corrupt_planned(p, rng, _slip_plan, "corruption kind 'arithmetic' does not "
                                                  "apply (no equation whose slip changes the answer)"),
    "option": _corrupt_option}


def corruption_kinds(problem: Problem) -> list:
    """The corruption kinds (not "any") that apply to a problem, in CORRUPTION_KINDS order."""
    kinds = []
    for kind, plan in (("perception", _misread_plan), ("arithmetic", _slip_plan)):
        ok, pool = plan(problem)
        if ok or (problem.choices is not None and pool):
            kinds.append(kind)
    return kinds + (["option"] if problem.choices is not None else [])


def corrupt(problem: Problem, rng: random.Random, kind: str = "perception") -> tuple:
    """MIE (URSA, Stage II, MIE): one wrong step in a correct solution, everything after it
    recomputed consistently from the wrong step.

    kind "perception" (the default): misread one image fact. The misreading is drawn from the
    most plausible tier of `misreadings` that changes the answer.
    kind "arithmetic": one equation states a slipped result (`slipped_values`: +-1, +-2, +-10 or
    two digits swapped), drawn uniformly among the (equation, slip) pairs that change the answer.
    kind "option" (multiple choice only): the value is right, but the option step reads the true
    option and another one swapped, so its checks stop at that other option: with probability 1/2
    the numeric distractor nearest to the value, else any other. Its first wrong check copies one
    of the two swapped options wrongly ("(B) 22 is 22." where B is 25, or "(A) 25 is not 22." where
    A is 22, when the true option comes first).
    kind "any": one of the kinds that apply (`corruption_kinds`), weighted by ANY_WEIGHTS.
    Multiple choice, perception and arithmetic: only wrong values that are options count; if none
    exists, one is drawn from all candidates and the solution's checks all fail and end at the
    nearest option other than the true one ("... 23 is closest to option (C).").

    Returns (new_steps, new_answer, insert_index): insert_index is the 0-based index of the first
    wrong step (steps before it are unchanged; it and every later step are wrong); new_answer !=
    problem.answer. A kind that cannot apply -> ValueError naming the problem and the kind."""
    if kind not in CORRUPTION_KINDS:
        raise ValueError(f"{problem.id}: unknown corruption kind {kind!r}; choose one of {', '.join(CORRUPTION_KINDS)}")
    if kind == "any":
        kinds = corruption_kinds(problem)
        if not kinds:
            raise ValueError(f"{problem.id}: no corruption kind applies")
        kind = rng.choice([k for k in kinds for _ in range(ANY_WEIGHTS[k])])
    return _CORRUPTERS[kind](problem, rng)
