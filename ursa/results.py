"""The toy recipe's results: every stage's policy evaluated, written to results.json, rendered to
results.md (and the ablation's to ablation.json / ablation.md).

    res = evaluate_recipe(run, recipe, times, rt)     # after `python train.py` trained every stage
    text = render_results(res)                        # results.md is rendered from results.json only

results.json holds every number the README quotes: per policy and test set the accuracy with n and
its 95% Wilson interval; maj@N, pass@N and PRM best-of-N per N and aggregation; paired differences
(best-of-N minus maj@N, PS-GRPO minus SFT) with paired-bootstrap 95% intervals over problems; the
DualMath label statistics; the PRM's held-out metrics; each stage's wall seconds.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional

import torch

from ursa import io
from ursa.evaluate import (BEST_OF_N_NS, RULE_NAMES, acc_record, best_of_n_table, by_family, filtered_majority,
                           load_problems, option_step_accuracy, paired_bootstrap, prm_scores, problem_pixels, sample)
from ursa.dualmath import label_quality
from ursa.plots import line_chart
from ursa.prm import AGGREGATIONS, auc, first_error_hit, step_scores
from ursa.trainer import read_metrics

POLICIES = (("align", "after alignment"), ("sft", "SFT"), ("grpo", "PS-GRPO"))
EQ10_RULE = "mean"              # the paper's best-of-N aggregation (Eq. 10)
TREND_STEPS = 5                 # "first -> last" of a curve: mean over its first / last 5 logged steps


# ---- the PRM on labelled steps ---------------------------------------------------------------

def split_by_problem(records, heldout_frac: float, seed: int = 0) -> tuple[list, list]:
    """(train, held-out) by problem: a problem's records never straddle the split (a hash of the
    problem id decides, so the split is the same on every run and machine)."""
    def h(r) -> float:
        pid = r.get("problem_id", r["id"])
        return int(hashlib.sha1(f"{seed}:{pid}".encode()).hexdigest()[:8], 16) / 2 ** 32
    return [r for r in records if h(r) >= heldout_frac], [r for r in records if h(r) < heldout_frac]


@torch.no_grad()
def prm_label_metrics(model, data, pad_id: int, batch_size: int = 64) -> dict:
    """Step accuracy at 0.5, ROC AUC, and first-error accuracy (the first step below 0.5 is the
    first label-0 step) on records that have a wrong step. data: ursa.data.PRMExamples."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    scores = []
    for s in range(0, len(data), batch_size):
        b, _, mask = data.batch(list(range(s, min(len(data), s + batch_size))), pad_id)
        v = model(b.input_ids.to(dev), b.pixel_values.to(dev), attention_mask=b.attention_mask.to(dev),
                  logits=False, values=True).values
        scores.extend(step_scores(v.float().cpu(), mask))
    model.train(was)
    flat_s = [x for sc in scores for x in sc]
    flat_l = [y for sc, lab in zip(scores, data.labels) for y in lab[:len(sc)]]
    errs = [(sc, lab[:len(sc)]) for sc, lab in zip(scores, data.labels) if 0 in lab[:len(sc)]]
    hits = sum(first_error_hit(sc, lab)[0] for sc, lab in errs)
    return {"step_acc": sum((x >= 0.5) == bool(y) for x, y in zip(flat_s, flat_l)) / max(1, len(flat_s)),
            "auc": auc(flat_s, flat_l), "first_error_acc": hits / max(1, len(errs)),
            "steps": len(flat_s), "solutions": len(scores)}


# ---- tables ---------------------------------------------------------------------------------

def table(rows: list) -> str:
    """Markdown table of rows (the first is the header), columns padded."""
    w = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = ["| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(rows[0])) + " |",
           "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |" for r in rows[1:]])


def pct(a: dict) -> str:
    """acc_record -> "41.0% [36.8, 45.4]"."""
    return f"{100 * a['acc']:.1f}% [{100 * a['ci95'][0]:.1f}, {100 * a['ci95'][1]:.1f}]"


def diff_pct(d: dict) -> str:
    """paired_bootstrap -> "+3.2 [+1.1, +5.3]" (points)."""
    return f"{100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"


# ---- the recipe ------------------------------------------------------------------------------

def _policy_eval(model, tok, test, hard, data: Path, recipe, prm, quiet: bool, samples: bool = True
                 ) -> tuple[dict, dict, dict]:
    """Greedy on test and hard; if `samples`, N = recipe.bon_samples samples at T = 1: maj@N, pass@N
    and (with a PRM) best-of-N. Returns (summary for results.json, per-problem verdicts for paired
    tests, {"greedy", "pixels" (the test images as this policy sees them), "samples", "scores"}
    for the PRM and option measurements)."""
    mx, N = recipe.max_new_tokens, (recipe.bon_samples if samples else 1)
    px = problem_pixels(test, data, model.cfg.vision)
    g_t = sample(model, tok, test, data, max_new_tokens=mx, pixels=px, quiet=quiet)
    g_h = sample(model, tok, hard, data, max_new_tokens=mx, quiet=quiet)
    out = {"test_greedy": acc_record(g_t.first_correct()), "hard_greedy": acc_record(g_h.first_correct()),
           "test_greedy_by_family": by_family(test, g_t.first_correct()), "sampling": {"greedy": g_t.speed}}
    verdicts, extra = {"greedy": g_t.first_correct()}, {"greedy": g_t, "pixels": px}
    if N > 1:
        s = sample(model, tok, test, data, n=N, temperature=1.0, max_new_tokens=mx, pixels=px, quiet=quiet)
        out["sample_acc_T1"] = s.sample_acc()
        out["sampling"][f"{N}_samples_T1"] = s.speed
        extra["samples"] = s
        if prm is not None:
            extra["scores"] = prm_scores(prm, tok, test, s.responses, px)
            bon = best_of_n_table(test, s, extra["scores"])
        else:
            bon = {n: {"maj": s.maj(test, n), "pass": s.pass_at(n)} for n in BEST_OF_N_NS if n <= N}
        out["best_of_n"] = {str(n): {r: acc_record(v) for r, v in rules.items()} for n, rules in bon.items()}
        verdicts.update({f"{r}@{n}": v for n, rules in bon.items() for r, v in rules.items()})
    return out, verdicts, extra


def oracle_verdicts(records, s) -> list:
    """The oracle's verdict (ursa/oracle.py) on every sample of every toy record: [i][j] ->
    OracleVerdict or None (unparsable)."""
    from ursa import world
    from ursa.oracle import oracle_steps
    return [[oracle_steps(world.problem_from_id(r["id"]), t) for t in rs] for r, rs in zip(records, s.responses)]


ERROR_KINDS = ("right", "perception", "arithmetic", "option", "answer line", "incomplete", "unparsable")
_CLAUSE_KIND = {"read": "perception", "option": "option", "check": "option"}   # every other clause: arithmetic


def error_kind(v) -> str:
    """What went wrong first in a toy response, by the oracle's verdict: "right" (every step and
    the answer right), "perception" (the first wrong step misreads or mis-selects a fact),
    "arithmetic" (a false or misplaced computation), "option" (a wrong option letter or option check), "answer
    line" (every step right, the answer line wrong), "incomplete" (the steps stop early),
    "unparsable" (the oracle cannot read it)."""
    from ursa.oracle import parse_step
    if v is None:
        return "unparsable"
    if v.first_error is None:
        return "right" if v.answer_correct else ("incomplete" if not v.complete else "answer line")
    clauses = parse_step(v.steps[v.first_error - 1]) or [("?",)]
    return _CLAUSE_KIND.get(clauses[0][0], "arithmetic")


# Verifiers that flag exactly some kinds of first error (error_kind) and nothing else: what catching
# each kind is worth to best-of-N (kind_verifiers)
KIND_VERIFIERS = {"perception": ("perception",), "arithmetic": ("arithmetic",), "option": ("option",),
                  "arithmetic + option": ("arithmetic", "option"),
                  "all but perception": ("arithmetic", "option", "answer line", "incomplete", "unparsable")}


def kind_verifiers(records, s, kinds: list) -> dict:
    """Per KIND_VERIFIERS entry: maj@N among the samples it keeps (ursa.evaluate.filtered_majority; kinds[i][j]
    is error_kind of sample j of record i) as an acc_record, and its paired difference to maj@N."""
    maj = s.maj(records)
    out = {}
    for name, drop in KIND_VERIFIERS.items():
        picked = filtered_majority(s, records, kinds, drop)
        out[name] = {"best_of_n": acc_record(picked), "minus_maj": paired_bootstrap(picked, maj)}
    return out


def option_quote_verifier(records, s) -> dict:
    """maj@N among the samples none of whose option checks misquotes the question (ursa.oracle.
    misquoted_options, any step): a verifier that reads only the text. best_of_n (acc_record), minus_maj
    (paired against maj@N), flagged (samples dropped) and flagged_right (of them, right ones)."""
    from ursa.oracle import misquoted_options
    flags = [["misquote" if misquoted_options(r.get("choices"), t) else "ok" for t in ts]
             for r, ts in zip(records, s.responses)]
    picked = filtered_majority(s, records, flags, ("misquote",))
    flagged = [c for f, cr in zip(flags, s.correct) for k, c in zip(f, cr) if k == "misquote"]
    return {"best_of_n": acc_record(picked), "minus_maj": paired_bootstrap(picked, s.maj(records)),
            "flagged": len(flagged), "flagged_right": sum(flagged)}


def headroom(records, s, verdicts: list) -> dict:
    """Where a verifier could gain over self-consistency: the problems whose majority answer over all
    of s's samples is wrong while some sample is right ("problems"), the mean share of right samples
    on them ("right_share"), and the oracle's first-error kind (error_kind) of their wrong samples."""
    idx = [i for i, (m, p) in enumerate(zip(s.maj(records), s.pass_at())) if p and not m]
    kinds = {k: 0 for k in ERROR_KINDS if k != "right"}
    for i in idx:
        for ok, v in zip(s.correct[i], verdicts[i]):
            if not ok:
                k = error_kind(v)
                kinds[k] = kinds.get(k, 0) + 1
    share = sum(sum(s.correct[i]) / len(s.correct[i]) for i in idx) / len(idx) if idx else float("nan")
    return {"problems": len(idx), "right_share": share, "wrong_sample_first_errors": kinds}


def error_breakdown(records, verdicts: list) -> dict:
    """{family: {kind: count}} of the first sample's error kind per record (see error_kind)."""
    out: dict = {}
    for r, vs in zip(records, verdicts):
        fam = out.setdefault(r.get("family", "all"), {k: 0 for k in ERROR_KINDS})
        fam[error_kind(vs[0])] += 1
    return out


def prm_quality(verdicts: list, scores: list, correct: Optional[list] = None) -> dict:
    """ProcessBench-style metrics of one PRM on sampled solutions with oracle step labels
    (unparsable solutions skipped and counted); with `correct` (the samples' verdicts, [i][j])
    also the within-problem AUC of the Eq. 10 aggregate (ursa.evaluate.within_problem_auc)."""
    from ursa.evaluate import process_bench, within_problem_auc
    flat = [(v, sc) for vs, ss in zip(verdicts, scores) for v, sc in zip(vs, ss)]
    ok = [(v, sc) for v, sc in flat if v is not None]
    q = process_bench([v.first_error for v, _ in ok], [v.labels for v, _ in ok], [sc for _, sc in ok])
    q["unparsable"] = len(flat) - len(ok)
    if correct is not None:
        w = within_problem_auc(correct, scores, EQ10_RULE)
        q["within_problem_auc"], q["mixed_problems"] = w["auc"], w["problems"]
    return q


def mie_pairs(records, seed: int = 0) -> list:
    """Clean pairs for the judges below: for every toy record, its reference solution (kind None) and
    one MIE corruption of it per corruption kind that applies (ursa.mie); the two differ from the
    corrupted step on, and only there is one wrong. Items (record index, kind, steps, answer,
    corrupted step index or None)."""
    import random
    from ursa import world
    from ursa.mie import corrupt, corruption_kinds
    rng = random.Random(seed)
    out = []
    for i, r in enumerate(records):
        p = world.problem_from_id(r["id"])
        out.append((i, None, list(p.steps), p.answer, None))
        for kind in corruption_kinds(p):
            steps, answer, k = corrupt(p, rng, kind=kind)
            out.append((i, kind, steps, answer, k))
    return out


def pair_shares(pairs: list, scores: list, aggregate_fn=None) -> dict:
    """Per corruption kind: n, step_lower (share of pairs whose corrupted step scores below the
    reference's same step) and, with aggregate_fn, solution_lower (the whole solution's aggregate
    lower). 0.5 is a judge that cannot see the error; a verifier is near 1."""
    ref = {i: s for (i, kind, *_), s in zip(pairs, scores) if kind is None}
    out: dict = {}
    for (i, kind, _, _, k), s in zip(pairs, scores):
        if kind is None:
            continue
        e = out.setdefault(kind, {"n": 0, "step_lower": 0, "solution_lower": 0})
        e["n"] += 1
        e["step_lower"] += s[k] < ref[i][k]
        if aggregate_fn is not None:
            e["solution_lower"] += aggregate_fn(s) < aggregate_fn(ref[i])
    return {kind: {"n": e["n"], "step_lower": e["step_lower"] / e["n"],
                   **({"solution_lower": e["solution_lower"] / e["n"]} if aggregate_fn is not None else {})}
            for kind, e in out.items()}


def mie_pair_test(prm, tok, records, pixels: torch.Tensor, seed: int = 0) -> dict:
    """The PRM on clean pairs (mie_pairs): per corruption kind, the share whose corrupted step the
    PRM scores below the reference's (step_lower) and whose Eq. 10 aggregate is lower (solution_lower)."""
    from ursa.prm import aggregate, score_steps, tag_steps
    pairs = mie_pairs(records, seed)
    sc = score_steps(prm, tok, [records[i]["question"] for i, *_ in pairs], [tag_steps(st, a) for _, _, st, a, _ in pairs],
                     pixels[torch.tensor([i for i, *_ in pairs], dtype=torch.long)])
    return pair_shares(pairs, sc, lambda s: aggregate(s, EQ10_RULE))


def policy_pair_test(policy, tok, records, pixels: torch.Tensor, seed: int = 0) -> dict:
    """The policy's own step log-likelihood (ursa.evaluate.step_logprobs) on the same clean pairs:
    per kind, the share whose corrupted step the policy finds less likely than the reference's step.
    What the policy already knows about each kind of error, for comparison with the PRM's shares."""
    from ursa.evaluate import step_logprobs
    pairs = mie_pairs(records, seed)
    lp = step_logprobs(policy, tok, [records[i]["question"] for i, *_ in pairs], [st for _, _, st, _, _ in pairs],
                       pixels[torch.tensor([i for i, *_ in pairs], dtype=torch.long)])
    return pair_shares(pairs, lp)


def policy_judge(policy, tok, records, s, pixels: torch.Tensor, verdicts: dict, N: int) -> dict:
    """Best-of-N over the same samples with the policy's own step log-likelihoods as the judge
    (ursa.evaluate.likelihood_best_of_n): what a verifier that knows only what the policy knows can
    pick, against maj@N (verdicts: _policy_eval's per-record verdicts of the policy)."""
    from ursa.evaluate import likelihood_best_of_n, step_logprobs
    from ursa.prm import split_steps
    n = s.n
    lps = step_logprobs(policy, tok, [r["question"] for r in records for _ in range(n)],
                        [split_steps(t)[0] for ts in s.responses for t in ts], pixels.repeat_interleave(n, dim=0))
    v = likelihood_best_of_n(s, [lps[i * n:(i + 1) * n] for i in range(len(records))], N)
    return {"best_of_n": acc_record(v), "minus_maj": paired_bootstrap(v, verdicts[f"maj@{N}"]), "n": N}


def evaluate_recipe(run: Path, recipe, times: dict, rt, quiet: bool = False) -> dict:
    """Evaluate every trained policy of the run; write results.json and results.md; print them."""
    from ursa.tokenizer import Tokenizer
    from ursa.weights import load_model
    data = Path(recipe.data_dir)
    tok = Tokenizer.from_file(run / "tokenizer.json")
    test, hard = load_problems(data / "test.jsonl"), load_problems(data / "test_hard.jsonl")
    t0 = time.time()
    prm = load_model(run / "prm" / "model", device=rt.device).eval() if (run / "prm" / "model").exists() else None
    res: dict = {"policies": {}, "paired": {}, "settings": {"bon_samples": recipe.bon_samples, "n_test": len(test),
                                                           "n_hard": len(hard), "eq10_rule": EQ10_RULE}}
    per = {}
    for stage, label in POLICIES:
        if not (run / stage / "model").exists():
            continue
        model = load_model(run / stage / "model", device=rt.device).eval()
        # the aligned model (about 7% greedy on the toy) gets greedy only: its 16 samples per problem run to the
        # token budget and took longer than the SFT policy's, for the maj@N of a policy that cannot do the task
        summary, per[stage], extra = _policy_eval(model, tok, test, hard, data, recipe,
                                                  prm if stage != "align" else None, quiet, samples=stage != "align")
        summary["label"] = label
        if stage == "sft":
            summary["greedy_errors"] = error_breakdown(test, oracle_verdicts(test, extra["greedy"]))
        if stage == "sft" and "samples" in extra:
            sample_verdicts = oracle_verdicts(test, extra["samples"])
            res["kind_verifiers"] = kind_verifiers(test, extra["samples"],
                                                   [[error_kind(v) for v in row] for row in sample_verdicts])
        if stage == "sft" and "scores" in extra:
            res["prm_quality"] = prm_quality(sample_verdicts, extra["scores"], extra["samples"].correct)
            res["prm_pairs"] = mie_pair_test(prm, tok, test, problem_pixels(test, data, prm.cfg.vision))
            res["policy_pairs"] = policy_pair_test(model, tok, test, extra["pixels"])
            res["policy_judge"] = policy_judge(model, tok, test, extra["samples"], extra["pixels"], per["sft"],
                                               N=recipe.bon_samples)
            plot_best_of_n(run / "best_of_n.png", summary, "SFT policy on the toy test")
        if stage == "sft":
            summary["option_step"] = option_step_accuracy(model, tok, test, extra["pixels"], recipe.max_new_tokens)
            for mode in ("blank", "shuffled"):
                b = sample(model, tok, test, data, image_mode=mode, max_new_tokens=recipe.max_new_tokens, quiet=quiet)
                summary[f"test_greedy_{mode}_images"] = acc_record(b.first_correct())
        res["policies"][stage] = summary
    N = recipe.bon_samples
    for stage in ("sft", "grpo"):
        v = per.get(stage, {})
        if f"{EQ10_RULE}@{N}" in v:
            res["paired"][f"{stage}_best_of_{N}_minus_maj_{N}"] = paired_bootstrap(v[f"{EQ10_RULE}@{N}"], v[f"maj@{N}"])
    if "sft" in per and "grpo" in per:
        res["paired"]["grpo_minus_sft_greedy"] = paired_bootstrap(per["grpo"]["greedy"], per["sft"]["greedy"])
    if (run / "label" / "state.json").exists():
        res["label"] = io.read_json(run / "label" / "state.json", "label state")
        res["label_quality"] = label_quality(run / "label")
    if (run / "prm" / "state.json").exists():
        res["prm_heldout"] = io.read_json(run / "prm" / "state.json", "PRM state").get("heldout", {})
    times = {**times, "eval": time.time() - t0}
    res["times_s"] = {k: round(v, 1) for k, v in times.items()}
    io.write_json(run / "results.json", res)
    text = render_results(res)
    io.write_text(run / "results.md", text + "\n")
    if not quiet:
        print("\n" + text)
    return res


def plot_best_of_n(path: Path, summary: dict, title: str):
    """Accuracy against N (Table 2's shape): greedy, maj@N, PRM best-of-N (Eq. 10), pass@N."""
    bon = summary["best_of_n"]
    ns = [int(n) for n in bon]
    series = {"greedy": [(n, summary["test_greedy"]["acc"]) for n in ns],
              "maj@N (self-consistency)": [(n, bon[str(n)]["maj"]["acc"]) for n in ns]}
    if EQ10_RULE in bon[str(ns[0])]:
        series[f"PRM best-of-N ({EQ10_RULE})"] = [(n, bon[str(n)][EQ10_RULE]["acc"]) for n in ns]
        series["PRM best-of-N (min)"] = [(n, bon[str(n)]["min"]["acc"]) for n in ns]
    series["pass@N (any right)"] = [(n, bon[str(n)]["pass"]["acc"]) for n in ns]
    line_chart(path, series, title=title, xlabel="N (samples per problem)", ylabel="accuracy", log2_x=True,
               x_ticks=ns)


def format_pair_test(pairs: dict, judge: str = "PRM") -> str:
    """One line: mie_pair_test's (judge "PRM") or policy_pair_test's (judge "policy") shares per kind."""
    parts = [f"{kind} {100 * e['step_lower']:.1f}% (n={e['n']})" for kind, e in pairs.items()]
    what = "scores lower" if judge == "PRM" else "is less likely under the policy"
    return (f"{judge} on clean pairs (reference vs one MIE corruption; share whose corrupted step {what}, "
            "0.5 = blind): " + ", ".join(parts))


def render_results(res: dict) -> str:
    """results.md from results.json alone."""
    P = res["policies"]
    rows = [("policy", "toy test (greedy)", "hard test (greedy)")]
    for stage, p in P.items():
        rows.append((p["label"], pct(p["test_greedy"]), pct(p["hard_greedy"])))
        for mode in ("blank", "shuffled"):
            if f"test_greedy_{mode}_images" in p:
                rows.append((f"{p['label']}, {mode} images", pct(p[f"test_greedy_{mode}_images"]), "-"))
    out = [table(rows)]
    for stage, p in P.items():
        if "greedy_errors" in p:
            fams = p["greedy_errors"]
            out.append(f"{p['label']} greedy responses on the toy test, by where they first go wrong (the world's "
                       f"oracle):\n" + table([("family",) + ERROR_KINDS] + [(f,) + tuple(c[k] for k in ERROR_KINDS)
                                                                           for f, c in fams.items()]))
        if p.get("option_step", {}).get("n"):
            out.append(f"{p['label']}, option step continued from the reference solution's right value (greedy, "
                       f"`ursa.evaluate.option_step_accuracy`): {pct(p['option_step'])} of {p['option_step']['n']} "
                       f"multiple-choice problems (1 in 4 options: 25%).")
    for stage, p in P.items():
        if "best_of_n" not in p:
            continue
        rules = [r for r in ["maj"] + list(AGGREGATIONS) + ["weighted", "pass"] if r in next(iter(p["best_of_n"].values()))]
        head = ["N"] + [RULE_NAMES[r] + (" (Eq. 10)" if r == EQ10_RULE else "") for r in rules]
        body = [[n] + [f"{100 * v[r]['acc']:.1f}" for r in rules] for n, v in p["best_of_n"].items()]
        out.append(f"{p['label']} policy, {res['settings']['bon_samples']} samples per test problem at T = 1.0 "
                   f"(accuracy %; greedy {100 * p['test_greedy']['acc']:.1f}):\n" + table([head] + body))
    if res.get("paired"):
        out.append("Paired differences over test problems (points, 95% bootstrap interval):\n" + table(
            [("comparison", "difference")] + [(k, diff_pct(d)) for k, d in res["paired"].items()]))
    if "prm_heldout" in res and res["prm_heldout"]:
        h = res["prm_heldout"]
        out.append(f"PRM on held-out DualMath: step accuracy {100 * h['step_acc']:.1f}%, AUC "
                   f"{h['auc'] if h['auc'] is None else round(h['auc'], 3)}, first-error accuracy "
                   f"{100 * h['first_error_acc']:.1f}% ({h['steps']} steps, {h['solutions']} solutions)")
    if res.get("prm_quality"):
        q = res["prm_quality"]
        out.append(f"PRM against the oracle on the SFT policy's test samples (ProcessBench-style: the first step "
                   f"scoring below 0.5 is the predicted first error): exact first error on {q['wrong']} wrong "
                   f"solutions {100 * q['acc_wrong']:.1f}%, no error predicted on {q['right']} right ones "
                   f"{100 * q['acc_right']:.1f}%, F1 {100 * q['f1']:.1f}, step AUC {q['step_auc']:.3f} "
                   f"({q['unparsable']} unparsable samples skipped)"
                   + (f"; within-problem AUC {q['within_problem_auc']:.3f} over {q['mixed_problems']} problems with "
                      f"right and wrong samples (0.5: no better than chance at what best-of-N asks)"
                      if "within_problem_auc" in q else ""))
    if res.get("prm_pairs"):
        out.append(format_pair_test(res["prm_pairs"]))
    if res.get("policy_pairs"):
        out.append(format_pair_test(res["policy_pairs"], "policy"))
    if res.get("policy_judge"):
        j = res["policy_judge"]
        out.append(f"The policy's own step likelihoods as the judge, best-of-{j['n']} over the same samples: "
                   f"{pct(j['best_of_n'])} ({diff_pct(j['minus_maj'])} points against maj@{j['n']})")
    if res.get("kind_verifiers"):
        N = res["settings"]["bon_samples"]
        rows = [("a verifier that flags exactly", f"best-of-{N} (maj@{N} of the samples it keeps)", f"minus maj@{N}")]
        rows += [(k, pct(e["best_of_n"]), diff_pct(e["minus_maj"])) for k, e in res["kind_verifiers"].items()]
        out.append(f"What catching each kind of first error (the oracle's) is worth on the SFT policy's {N} samples "
                   f"(`ursa.evaluate.filtered_majority`):\n" + table(rows))
    if res.get("label_quality"):
        rows = [("labels", "solutions", "exact first error", "too early", "too late", "unparsable")]
        names = {"bel": "BEL records", "mie": "MIE records", "correct": "correct records",
                 "compare_bel": "BEL (compared subset)", "compare_mc": "per-step MC (compared subset)"}
        for k, c in res["label_quality"].items():
            if c["solutions"]:
                rows.append((names.get(k, k), c["solutions"], f"{100 * c['exact_rate']:.1f}%",
                             f"{100 * c['too_early_rate']:.1f}%", f"{100 * c['too_late_rate']:.1f}%", c["unparsable"]))
        out.append("DualMath labels against the oracle's first wrong step:\n" + table(rows))
    out.append("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["times_s"].items()))
    return "\n\n".join(out)


def evaluate_prm_ablation(run: Path, recipe, prms: dict, rt, quiet: bool = False) -> dict:
    """Several PRMs (prms: name -> run sub-folder) judged on the SAME SFT samples of the test set:
    best-of-N per N and aggregation, ProcessBench-style quality against the oracle, and the paired
    difference of each PRM's best-of-N (Eq. 10) to the first's. Writes prm_ablation.json / .md."""
    from ursa.tokenizer import Tokenizer
    from ursa.weights import load_model
    data, N = Path(recipe.data_dir), recipe.bon_samples
    tok = Tokenizer.from_file(run / "tokenizer.json")
    test = load_problems(data / "test.jsonl")
    policy = load_model(run / "sft" / "model", device=rt.device).eval()
    px = problem_pixels(test, data, policy.cfg.vision)
    s = sample(policy, tok, test, data, n=N, temperature=1.0, max_new_tokens=recipe.max_new_tokens, pixels=px, quiet=quiet)
    verdicts = oracle_verdicts(test, s)
    res, per, first = {"prms": {}, "paired": {}, "bon_samples": N}, {}, None
    for name, d in prms.items():
        prm = load_model(run / d / "model", device=rt.device).eval()
        scores = prm_scores(prm, tok, test, s.responses, px)
        bon = best_of_n_table(test, s, scores)
        per[name] = bon[N][EQ10_RULE]
        res["prms"][name] = {"best_of_n": {str(n): {r: acc_record(v) for r, v in rules.items()} for n, rules in bon.items()},
                             "quality": prm_quality(verdicts, scores, s.correct), "pairs": mie_pair_test(prm, tok, test, px)}
        first = first or name
        if name != first:
            res["paired"][f"{name}_minus_{first}_best_of_{N}"] = paired_bootstrap(per[name], per[first])
    io.write_json(run / "prm_ablation.json", res)
    rows = [("PRM labels", f"best-of-{N} ({EQ10_RULE})", f"maj@{N}", f"pass@{N}", "first error exact (wrong)",
             "no error (right)", "F1", "step AUC", "within-problem AUC", "clean pairs (perception / arithmetic / option)")]
    for name, e in res["prms"].items():
        b, q = e["best_of_n"][str(N)], e["quality"]
        rows.append((name, pct(b[EQ10_RULE]), pct(b["maj"]), pct(b["pass"]), f"{100 * q['acc_wrong']:.1f}%",
                     f"{100 * q['acc_right']:.1f}%", f"{100 * q['f1']:.1f}", f"{q['step_auc']:.3f}",
                     f"{q['within_problem_auc']:.3f}",
                     " / ".join(f"{100 * e['pairs'][k]['step_lower']:.0f}%" if k in e["pairs"] else "-"
                                for k in ("perception", "arithmetic", "option"))))
    text = table(rows) + "".join(f"\n\n{k}: {diff_pct(d)} points (paired 95% interval)" for k, d in res["paired"].items())
    io.write_text(run / "prm_ablation.md", text + "\n")
    if not quiet:
        print("\n" + text)
    return res


def _trend(metrics: list, key: str) -> Optional[list]:
    vals = [m[key] for m in metrics if key in m and m[key] is not None]
    if not vals:
        return None
    a, b = vals[:TREND_STEPS], vals[-TREND_STEPS:]
    return [sum(a) / len(a), sum(b) / len(b)]


def evaluate_ablation(run: Path, recipe, dirs: dict, times: dict, rt, quiet: bool = False) -> dict:
    """SFT vs each GRPO reward (dirs: reward -> run sub-folder): greedy accuracy with intervals,
    the paired difference to SFT, and the curves' first -> last values."""
    from ursa.tokenizer import Tokenizer
    from ursa.weights import load_model
    data = Path(recipe.data_dir)
    tok = Tokenizer.from_file(run / "tokenizer.json")
    test, hard = load_problems(data / "test.jsonl"), load_problems(data / "test_hard.jsonl")
    res, per = {"policies": {}, "paired": {}}, {}
    for key, d in [("sft", "sft")] + list(dirs.items()):
        model = load_model(run / d / "model", device=rt.device).eval()
        a = sample(model, tok, test, data, max_new_tokens=recipe.max_new_tokens, quiet=quiet)
        b = sample(model, tok, hard, data, max_new_tokens=recipe.max_new_tokens, quiet=quiet)
        per[key] = a.first_correct()
        entry = {"test_greedy": acc_record(per[key]), "hard_greedy": acc_record(b.first_correct())}
        if key != "sft":
            m = read_metrics(run / d / "metrics.jsonl")
            entry["curves"] = {k: _trend(m, k) for k in ("acc", "reward", "resp_len", "n_steps", "kl", "drop_rate")}
            entry["wall_s"] = round(times.get(key, 0.0), 1)
            res["paired"][f"{key}_minus_sft"] = paired_bootstrap(per[key], per["sft"])
        res["policies"][key] = entry
    if "ps" in per and "outcome" in per:
        res["paired"]["ps_minus_outcome"] = paired_bootstrap(per["ps"], per["outcome"])
    io.write_json(run / "ablation.json", res)
    plot_curves(run, dirs)
    text = render_ablation(res, recipe)
    io.write_text(run / "ablation.md", text + "\n")
    if not quiet:
        print("\n" + text)
    return res


def smooth(vals: list, k: int = TREND_STEPS) -> list:
    """Trailing moving average over k points (the first points average what there is)."""
    return [sum(vals[max(0, i - k + 1):i + 1]) / len(vals[max(0, i - k + 1):i + 1]) for i in range(len(vals))]


def plot_curves(run: Path, dirs: dict):
    """Fig. 4's shape: training accuracy, response length and steps per response over the GRPO
    steps of each reward (moving average of 5 steps): grpo_acc.png, grpo_resp_len.png, grpo_n_steps.png."""
    for key, ylabel in (("acc", "training accuracy"), ("resp_len", "response tokens"), ("n_steps", "steps per response")):
        series = {}
        for r, d in dirs.items():
            m = [x for x in read_metrics(run / d / "metrics.jsonl") if key in x]
            if m:
                series[ABLATION_NAMES.get(r, r)] = list(zip([x["step"] for x in m], smooth([x[key] for x in m])))
        if series:
            line_chart(run / f"grpo_{key}.png", series, title=f"GRPO rewards: {ylabel} over training",
                       xlabel="optimizer step", ylabel=ylabel)


ABLATION_NAMES = {"sft": "SFT", "outcome": "GRPO (outcome reward)", "ps": "PS-GRPO",
                  "v1": "Variant 1 (outcome + mean step)", "v2": "Variant 2 (step-level advantage)"}


def render_ablation(res: dict, recipe) -> str:
    def fl(c, k, scale=1.0, fmt="{:.1f}"):
        v = c.get(k)
        return "-" if not v else f"{fmt.format(scale * v[0])} -> {fmt.format(scale * v[1])}"
    rows = [("policy", "toy test greedy", "hard test greedy", "vs SFT (points)", "train acc", "resp. tokens", "steps")]
    for k, e in res["policies"].items():
        c = e.get("curves", {})
        d = res["paired"].get(f"{k}_minus_sft")
        rows.append((ABLATION_NAMES.get(k, k), pct(e["test_greedy"]), pct(e["hard_greedy"]), diff_pct(d) if d else "-",
                     fl(c, "acc", 100), fl(c, "resp_len"), fl(c, "n_steps", fmt="{:.2f}")))
    return table(rows) + (f"\n\n(first -> last: mean over the first / last {TREND_STEPS} logged GRPO steps; "
                          f"{recipe.grpo.steps} steps x {recipe.rl.prompts} prompts x {recipe.rl.group} rollouts)")
