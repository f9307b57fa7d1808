"""Evaluation on problem records: sampling, judging, maj@N, pass@N, PRM best-of-N, paired comparisons.

    s = sample(model, tok, records, base, n=16, temperature=1.0)    # Samples: responses, extracted, correct
    s.first_correct()                  # per record: sample 0 right (greedy when temperature = 0)
    s.maj(records, 8)                  # per record: the majority answer of the first 8 right (self-consistency)
    s.pass_at(8)                       # per record: any of the first 8 right (the ceiling of any verifier)
    scores = prm_scores(prm, tok, records, s.responses, pixels)     # THE readout, ursa.prm.score_responses
    best_of_n_table(records, s, scores)                              # Table 2's shape, per N and aggregation
    paired_bootstrap(a, b)             # mean(a - b) over problems with a 95% interval

Per-record verdict lists (not just counts) are kept everywhere so that two policies or two
selection rules can be compared problem by problem (a paired test is far tighter than comparing
two intervals). Accuracies are reported with 95% Wilson intervals.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ursa.answer import is_equiv, judge
from ursa.data import read_jsonl, record_pixels
from ursa.generate import sample_texts
from ursa.prm import AGGREGATIONS, aggregate, best_of_n, majority_vote, prm_weighted_vote, score_responses

Z95 = 1.959964                  # two-sided 95% normal quantile
BOOTSTRAP_ITERS = 2000          # resamples of the paired bootstrap (interval ends stable to ~0.1 point)
BEST_OF_N_NS = (1, 2, 4, 8, 16, 32)


# ---- intervals --------------------------------------------------------------------------------

def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n ((0, 0) when n = 0)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def fmt_acc(k: int, n: int) -> str:
    """"41.0% [36.8, 45.4]": accuracy and its 95% Wilson interval, in percent."""
    lo, hi = wilson(k, n)
    return f"{100 * k / max(n, 1):.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def acc_record(verdicts: Sequence[bool]) -> dict:
    """{"acc", "n", "correct", "ci95": [lo, hi]} of a list of per-problem verdicts."""
    k, n = int(sum(bool(v) for v in verdicts)), len(verdicts)
    lo, hi = wilson(k, n)
    return {"acc": k / max(n, 1), "n": n, "correct": k, "ci95": [lo, hi]}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], iters: int = BOOTSTRAP_ITERS,
                     seed: int = 0) -> dict:
    """Mean of a_i - b_i over problems and its 95% percentile-bootstrap interval.

    a, b: per-problem scores of two systems on the SAME problems (1/0 verdicts, or accuracies).
    Problems are resampled with replacement `iters` times (seeded); the interval is the 2.5th and
    97.5th percentile of the resampled mean differences. Returns {"diff", "ci95": [lo, hi], "n"}."""
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap: {len(a)} and {len(b)} problems; a paired test needs the same ones")
    n = len(a)
    if n == 0:
        return {"diff": 0.0, "ci95": [0.0, 0.0], "n": 0}
    d = [float(x) - float(y) for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    lo, hi = means[int(0.025 * (iters - 1))], means[int(math.ceil(0.975 * (iters - 1)))]
    return {"diff": sum(d) / n, "ci95": [lo, hi], "n": n}


# ---- problems ----------------------------------------------------------------------------------

def load_problems(path) -> list[dict]:
    return read_jsonl(path, required=("id", "image", "question", "answer"))


def problem_pixels(records, base: Path, vision_cfg, mode: str = "normal") -> torch.Tensor:
    """[n, 3, S, S] in [0, 1]; mode "blank" (all grey) or "shuffled" (the next problem's image)."""
    if mode not in ("normal", "blank", "shuffled"):
        raise ValueError(f"image mode must be normal, blank or shuffled, got {mode!r}")
    px = torch.stack([record_pixels(r, base, vision_cfg) for r in records])
    if mode == "blank":
        px = torch.full_like(px, 0.5)
    elif mode == "shuffled":
        px = px.roll(1, dims=0)
    return px


def prompts_for(records, tok, cfg, prefixes: Optional[Sequence[str]] = None) -> list[list[int]]:
    """URSA's chat prompt of each problem (one <|image|> expanded to the tower's positions)."""
    return [tok.encode_prompt(r["question"], image=True, num_image_tokens=cfg.vision.num_tokens,
                              assistant_prefix=(prefixes[i] if prefixes else ""))
            for i, r in enumerate(records)]


def gold(rec: dict) -> tuple[str, Optional[list]]:
    return str(rec["answer"]), rec.get("choices")


# ---- samples and their verdicts ----------------------------------------------------------------

@dataclass
class Samples:
    """n responses per record and their verdicts: responses[i][j], extracted[i][j], correct[i][j];
    when sampled here, `speed` = {"completions_s", "new_tokens_s", "decoded_tokens_s" (new tokens computed, those
    after a row's stop included: what the sampler bench counts), "seconds"} of the sampling."""
    responses: list
    extracted: list
    correct: list
    speed: Optional[dict] = None

    @property
    def n(self) -> int:
        return len(self.responses[0]) if self.responses else 0

    def first_correct(self) -> list[bool]:
        """Per record: sample 0 is right (the greedy verdict when sampled at temperature 0)."""
        return [c[0] for c in self.correct]

    def sample_acc(self) -> float:
        """Accuracy of a single sample, averaged over all samples."""
        flat = [x for c in self.correct for x in c]
        return sum(flat) / max(1, len(flat))

    def maj(self, records, n: Optional[int] = None) -> list[bool]:
        """Per record: the most frequent extracted answer of the first n samples is right
        (self-consistency; answers compared as extracted, ties -> the first seen)."""
        n = n or self.n
        return [is_equiv(majority_vote(e[:n]), *gold(r)) for r, e in zip(records, self.extracted)]

    def pass_at(self, n: Optional[int] = None) -> list[bool]:
        """Per record: at least one of the first n samples is right (the verifier's ceiling)."""
        n = n or self.n
        return [any(c[:n]) for c in self.correct]


def judge_all(records, responses: list) -> Samples:
    """Judge every response (ursa.answer.judge, the project's one judge) against its record."""
    ext, cor = [], []
    for r, rs in zip(records, responses):
        v = [judge(t, *gold(r)) for t in rs]
        ext.append([e for e, _ in v])
        cor.append([c for _, c in v])
    return Samples(list(responses), ext, cor)


@torch.no_grad()
def sample(model, tok, records, base: Path, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
           max_new_tokens: int = 96, batch_size: int = 64, seed: int = 0, image_mode: str = "normal",
           pixels: Optional[torch.Tensor] = None, quiet: bool = False) -> Samples:
    """Sample n responses per record (greedy at temperature 0) and judge them.
    pixels: the records' preprocessed images when the caller has them already."""
    px = problem_pixels(records, base, model.cfg.vision, image_mode) if pixels is None else pixels
    prompts = prompts_for(records, tok, model.cfg)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    bar = tqdm(total=len(records) * n, desc=f"sample x{n}", disable=quiet, leave=False)
    t0 = time.perf_counter()
    texts, gens = sample_texts(model, tok, prompts, px, num_samples=n, batch_size=max(1, batch_size // n),
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               generator=g, progress=bar)
    dt = max(time.perf_counter() - t0, 1e-9)
    bar.close()
    s = judge_all(records, texts)
    s.speed = {"completions_s": len(records) * n / dt, "new_tokens_s": sum(int(x.lengths.sum()) for x in gens) / dt,
               "decoded_tokens_s": sum(x.decoded for x in gens) / dt, "seconds": dt}
    return s


def prm_scores(prm, tok, records, responses: list, pixels: torch.Tensor, batch_size: int = 64) -> list:
    """scores[i][j]: the PRM's step scores of response j of record i (ursa.prm.score_responses)."""
    qs, tx, idx = [], [], []
    for i, (r, rs) in enumerate(zip(records, responses)):
        for t in rs:
            qs.append(r["question"]), tx.append(t), idx.append(i)
    flat = score_responses(prm, tok, qs, tx, pixels[torch.tensor(idx, dtype=torch.long)], batch_size)
    out, k = [], 0
    for rs in responses:
        out.append(flat[k:k + len(rs)])
        k += len(rs)
    return out


# ---- best-of-N (Table 2's shape) ---------------------------------------------------------------

def selection_verdicts(records, s: Samples, scores: list, n: int) -> dict:
    """Per record, on its first n samples: which selection rule ends on a right answer.

    Keys: "maj" (self-consistency), "pass" (any right), each aggregation of ursa.prm.AGGREGATIONS
    (PRM best-of-N, Eq. 10 uses "mean"), "weighted" (the answer whose mean-aggregated PRM scores sum
    highest). Values: lists of bools, one per record."""
    out = {"maj": s.maj(records, n), "pass": s.pass_at(n), "weighted": []}
    for a in AGGREGATIONS:
        out[a] = [s.correct[i][best_of_n(scores[i][:n], a)] for i in range(len(records))]
    for i, r in enumerate(records):
        w = prm_weighted_vote(s.extracted[i][:n], [aggregate(x, "mean") for x in scores[i][:n]])
        out["weighted"].append(is_equiv(w, *gold(r)))
    return out


def best_of_n_table(records, s: Samples, scores: list, ns: Sequence[int] = BEST_OF_N_NS) -> dict:
    """{N: {rule: per-record verdicts}} for every N in ns up to the samples drawn."""
    return {n: selection_verdicts(records, s, scores, n) for n in ns if n <= s.n}


RULE_NAMES = {"maj": "maj@N", "pass": "pass@N", "weighted": "PRM-weighted vote",
              **{a: f"PRM {a}" for a in AGGREGATIONS}}


def format_best_of_n(table: dict, greedy: Optional[Sequence[bool]] = None) -> str:
    """The best-of-N table as Markdown, accuracies in percent."""
    rules = ["maj"] + list(AGGREGATIONS) + ["weighted", "pass"]
    head = ["N"] + (["greedy"] if greedy is not None else []) + [RULE_NAMES[r] for r in rules]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    g = [f"{100 * sum(greedy) / max(1, len(greedy)):.1f}"] if greedy is not None else []
    for n, v in table.items():
        lines.append("| " + " | ".join([str(n)] + g + [f"{100 * sum(v[r]) / max(1, len(v[r])):.1f}" for r in rules]) + " |")
    return "\n".join(lines)


def by_family(records, verdicts: Sequence[bool]) -> dict:
    """{family: acc_record} for records that carry a "family" field."""
    fams = sorted({r["family"] for r in records if "family" in r})
    return {f: acc_record([v for r, v in zip(records, verdicts) if r.get("family") == f]) for f in fams}


def prm_diagnosis(records, s: Samples, scores: list, rho: float = 0.3) -> str:
    """Why does best-of-N pick what it picks? Mean / min step scores and drop-moment rates (delta >=
    rho, Eq. 5) of right vs wrong samples, and of samples with fewer steps than the reference
    solution (the length bias of Appendix B.1)."""
    from statistics import mean
    from ursa.grpo import drop_moment
    from ursa.prm import split_steps
    rows = [(c, len(split_steps(t)[0]) < len(r.get("steps", [])), aggregate(x, "mean"), aggregate(x, "min"),
             drop_moment(x) if x else 0.0)
            for i, r in enumerate(records) for t, c, x in zip(s.responses[i], s.correct[i], scores[i])]
    out = []
    for name, sel in (("right samples", [r for r in rows if r[0]]), ("wrong samples", [r for r in rows if not r[0]]),
                      ("fewer steps than the reference", [r for r in rows if r[1]]),
                      ("as many steps or more", [r for r in rows if not r[1]])):
        if sel:
            out.append(f"{name:<32} {len(sel):5d}  accuracy {100 * mean(r[0] for r in sel):5.1f}%  PRM mean "
                       f"{mean(r[2] for r in sel):.3f}  min {mean(r[3] for r in sel):.3f}  drop-moment >= {rho}: "
                       f"{100 * mean(r[4] >= rho for r in sel):.0f}%")
    return "\n".join(out)


# ---- the PRM against the truth (ProcessBench-style) ----------------------------------------------

def first_below(scores: Sequence[float], threshold: float = 0.5) -> Optional[int]:
    """The PRM's predicted first wrong step: 1-based index of the first score below threshold,
    None when every step scores at least threshold (the solution is judged all right)."""
    return next((i + 1 for i, s in enumerate(scores) if s < threshold), None)


def process_bench(first_errors: Sequence[Optional[int]], labels: Sequence[Sequence[int]],
                  scores: Sequence[Sequence[float]], threshold: float = 0.5) -> dict:
    """ProcessBench-style quality of a PRM on solutions whose true step labels are known.

    first_errors[i]: the true 1-based first wrong step of solution i (None: every step right);
    labels[i]: its true step labels; scores[i]: the PRM's step scores (a solution whose last step
    carries no tag has one score fewer: steps beyond the scores are not judged). Predicted first
    error = first_below(scores). Returns acc_wrong (exact first error on solutions with an error),
    acc_right (no error predicted on all-right solutions), f1 (their harmonic mean), step_auc
    (scores against the true labels, over every scored step), and the counts."""
    from ursa.prm import auc
    hit_w = [first_below(s, threshold) == f for f, s in zip(first_errors, scores) if f is not None]
    hit_r = [first_below(s, threshold) is None for f, s in zip(first_errors, scores) if f is None]
    aw = sum(hit_w) / len(hit_w) if hit_w else float("nan")
    ar = sum(hit_r) / len(hit_r) if hit_r else float("nan")
    f1 = 2 * aw * ar / (aw + ar) if hit_w and hit_r and aw + ar > 0 else float("nan")
    fs = [x for s, lab in zip(scores, labels) for x in s[:len(lab)]]
    fl = [y for s, lab in zip(scores, labels) for y in lab[:len(s)]]
    return {"acc_wrong": aw, "acc_right": ar, "f1": f1, "step_auc": auc(fs, fl) if fs else float("nan"),
            "wrong": len(hit_w), "right": len(hit_r), "steps": len(fs)}


def within_problem_auc(correct: Sequence[Sequence[bool]], scores: Sequence[Sequence[Sequence[float]]],
                       how: str = "mean") -> dict:
    """How well a PRM ranks the samples OF ONE PROBLEM, which is all best-of-N asks of it.

    For every problem with both right and wrong samples: P(aggregate(right sample) >
    aggregate(wrong sample)) over its (right, wrong) pairs, ties counted half (ursa.prm.aggregate,
    rule `how`); averaged over those problems. 0.5 is a judge that cannot tell them apart, however
    well its scores separate easy problems from hard ones (which a pooled step AUC also rewards).
    Returns {"auc": mean (nan if no problem is mixed), "problems": number of mixed problems}."""
    from ursa.prm import auc
    per = [auc([aggregate(x, how) for x in ss], [int(bool(ok)) for ok in c])
           for c, ss in zip(correct, scores) if any(c) and not all(c)]
    return {"auc": sum(per) / len(per) if per else float("nan"), "problems": len(per)}


def option_prefixes(records) -> list[tuple[int, str]]:
    """(record index, response prefix) of every multiple-choice record with reference steps: the
    reference steps before its last (option) step, then that step's header ("...\n\nStep 6:"),
    the point where a policy must turn the right value into a letter."""
    from ursa.prm import join_steps
    out = []
    for i, r in enumerate(records):
        steps = r.get("steps") or []
        if r.get("choices") and steps:
            k = len(steps)
            out.append((i, join_steps(list(steps[:-1]) + [f"Step {k}:"], None)))
    return out


@torch.no_grad()
def option_step_accuracy(model, tok, records, pixels: torch.Tensor, max_new_tokens: int) -> dict:
    """Can the policy name the option once the value is right? For every multiple-choice record
    (`option_prefixes`): greedy continuation of the reference solution from its option step's
    header, judged as a whole response (prefix + continuation). acc_record of the verdicts; a
    policy that cannot map the value to its letter scores about 25% (1 in 4 options)."""
    items = option_prefixes(records)
    if not items:
        return acc_record([])
    idx = [i for i, _ in items]
    prompts = prompts_for([records[i] for i in idx], tok, model.cfg, [pre for _, pre in items])
    texts, _ = sample_texts(model, tok, prompts, pixels[idx], max_new_tokens=max_new_tokens)
    return acc_record([judge(pre + t[0], *gold(records[i]))[1] for (i, pre), t in zip(items, texts)])


@torch.no_grad()
def step_logprobs(policy, tok, questions: Sequence[str], steps: Sequence[Sequence[str]], pixels: torch.Tensor,
                  batch_size: int = 32) -> list[list[float]]:
    """The policy as its own judge: log p(step k | image, question, steps before k), teacher-forced.

    steps[i]: solution i's step texts (headers included), encoded as SFT encodes a response (the
    steps joined by blank lines); pixels: [n, 3, S, S]. A token counts for step k when its first
    character lies inside step k's text (the blank lines between steps count for none). Returns per
    solution one summed log-probability per step, so a step the policy would not have written scores low."""
    from ursa.prm import join_steps
    rows, spans = [], []
    for q, st in zip(questions, steps):
        text = join_steps(st, None)
        enc = tok.tok.encode(text, add_special_tokens=False)
        prompt = tok.encode_prompt(q, image=True, num_image_tokens=policy.cfg.vision.num_tokens)
        starts, pos = [], 0
        for s in st:
            starts.append(text.index(s, pos))
            pos = starts[-1] + len(s)
        owner = [next((k for k, b in enumerate(starts) if b <= a < b + len(st[k])), -1) for a, _ in enc.offsets]
        rows.append(prompt + enc.ids)
        spans.append((len(prompt), owner, len(st)))
    dev = next(policy.parameters()).device
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        T = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        am = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r)], am[i, :len(r)] = torch.tensor(r), 1
        logits = policy(ids.to(dev), pixels[s:s + batch_size].to(dev), attention_mask=am.to(dev)).logits
        lp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None].to(dev))[..., 0].cpu()  # [b, T-1]
        for i, (P, owner, n) in enumerate(spans[s:s + batch_size]):
            per = [0.0] * n
            for j, k in enumerate(owner):            # response token j is ids[P + j], predicted at P + j - 1
                if k >= 0:
                    per[k] += float(lp[i, P + j - 1])
            out.append(per)
    return out


def likelihood_best_of_n(s: Samples, logprobs: list, n: Optional[int] = None) -> list[bool]:
    """Per record: best-of-n with the policy's own step log-likelihoods as the judge (logprobs[i][j]:
    step_logprobs of sample j): the sample whose least likely step is most likely wins (a sample
    without steps never does). What a verifier that knows only what the policy knows can pick.
    logprobs must hold one list per sample of each record and n at most s.n (ValueError otherwise:
    a judge handed fewer samples would still pick, and nothing downstream could tell)."""
    n = n or s.n
    if n > s.n or len(logprobs) != len(s.correct) or any(len(lp) != len(c) for lp, c in zip(logprobs, s.correct)):
        raise ValueError(f"likelihood_best_of_n: best-of-{n} needs {len(s.correct)} records of at least {n} samples, "
                         f"each with one step log-likelihood list per sample; got {s.n} samples per record and "
                         f"{len(logprobs)} rows of {sorted({len(lp) for lp in logprobs})} lists")
    out = []
    for c, lp in zip(s.correct, logprobs):
        worst = [min(x) if x else float("-inf") for x in lp[:n]]
        out.append(c[max(range(len(worst)), key=worst.__getitem__)])
    return out


# ---- the ceiling of a verifier that knows what the policy knows (scripts/verifier_ceiling.py) ----

CEILING_FOLDS = 2
CEILING_L2 = 1e-3    # ridge on the weights (not the bias): keeps LBFGS finite on separable folds
STEP_SCALE = 8.0     # k / 8: the toy's solutions have 3-8 steps, so the feature stays near [0, 1]


def step_features(logprobs: list[float]) -> list[list[float]]:
    """Per step k of one sample: [log p(step k), k / STEP_SCALE, 1 if k is the last step]."""
    n = len(logprobs)
    return [[lp, k / STEP_SCALE, float(k == n - 1)] for k, lp in enumerate(logprobs)]


def step_labels(verdict, n_steps: int, correct: bool) -> list[float]:
    """The oracle's label of each step (1 right, 0 wrong); an unparsable response's steps are all 0;
    steps past the oracle's list take the sample's outcome."""
    if verdict is None:
        return [0.0] * n_steps
    lab = list(verdict.labels)
    return [float(lab[k]) if k < len(lab) else float(correct) for k in range(n_steps)]


def fit_logistic(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Weights [d + 1] (bias last) minimising mean BCE + L2 * |w|^2, by LBFGS. X: [m, d], y: [m]."""
    A = torch.cat([X, torch.ones(len(X), 1)], 1)
    w = torch.zeros(A.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(A @ w, y) + CEILING_L2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach()


def fitted_best_of_n(feats: list, labels: list, correct: list, folds: int = CEILING_FOLDS) -> list[bool]:
    """feats[i][j]: step features of sample j of problem i; labels likewise (per step); correct[i][j].
    For each fold f, fit on the problems with i % folds != f (features standardised on them), then
    per problem of fold f pick the sample with the largest sum of log sigmoid(z_k) (a sample without
    steps never wins). Returns per problem whether the pick is right."""
    if len(feats) < folds:
        raise ValueError(f"fitted_best_of_n: {len(feats)} problem(s) for {folds} folds; each fold is "
                         f"fitted on the other folds' problems, so at least {folds} are needed")
    out = [False] * len(feats)
    for f in range(folds):
        rows = [(x, y) for i in range(len(feats)) if i % folds != f
                for xs, ys in zip(feats[i], labels[i]) for x, y in zip(xs, ys)]
        X = torch.tensor([x for x, _ in rows], dtype=torch.float64)
        y = torch.tensor([y for _, y in rows], dtype=torch.float64)
        mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
        w = fit_logistic(((X - mu) / sd).float(), y.float()).double()
        for i in range(f, len(feats), folds):
            best, pick = float("-inf"), None
            for j, xs in enumerate(feats[i]):
                if not xs:
                    continue
                z = torch.cat([(torch.tensor(xs, dtype=torch.float64) - mu) / sd,
                               torch.ones(len(xs), 1, dtype=torch.float64)], 1) @ w
                s = float(F.logsigmoid(z).sum())
                if s > best:
                    best, pick = s, j
            out[i] = pick is not None and bool(correct[i][pick])
    return out


def filtered_majority(s: Samples, records, kinds: list, drop: Sequence[str], n: Optional[int] = None) -> list[bool]:
    """Per record: majority vote over the first n samples whose first-error kind (kinds[i][j], e.g.
    ursa.results.error_kind of the oracle's verdict; one per sample of s, else ValueError) is not in
    `drop`; all n samples when every one is dropped. What best-of-n gets from a verifier that flags
    exactly the errors of the dropped kinds and knows nothing else (ties keep majority_vote's rule:
    the first answer seen)."""
    n = n or s.n
    if len(kinds) != len(records) or any(len(k) != len(e) for k, e in zip(kinds, s.extracted)):
        raise ValueError(f"filtered_majority: kinds must hold one kind per sample of each of the {len(records)} "
                         f"records ({s.n} samples each); got {len(kinds)} rows of {sorted({len(k) for k in kinds})}")
    out = []
    for r, e, k in zip(records, s.extracted, kinds):
        kept = [a for a, kind in zip(e[:n], k[:n]) if kind not in drop] or e[:n]
        out.append(is_equiv(majority_vote(kept), *gold(r)))
    return out
