"""The process reward model's math: step tags, the PRM loss, step scores, aggregation, best-of-N.

References:
- The URSA paper (Luo, Zheng et al., "Unlocking Multimodal Mathematical Reasoning via Process Reward
  Model", arXiv 2501.04686), Stage II: the PRM reads a scalar value head at step-tag positions; the
  step score is the sigmoid of that logit; training is binary cross-entropy over the tagged steps
  (Eq. 4). Test time: best-of-N = argmax_i of the aggregate (mean; min is also reported) of
  solution i's step scores (Eq. 10); self-consistency (majority vote) is the baseline.
- URSA-MATH/URSA-MATH, inference/prm_infer_score.py: the released URSA-RM-8B scorer (tag rule
  "released" below; a response without a tag scores 0).
- Math-Shepherd (Wang et al. 2023) for the "step tag" idea and the step-level PRM metrics.

Solutions look like

    Step 1: There are 3 red circles.\n\nStep 2: 3 * 5 = 15.\n\n†Answer: 15

The step tag is " и" (space + U+0438); the tokenizer maps it to one token id, and the readout only
sees that id. The PRM's user turn is PRM_INSTRUCTION + "\nQuestion:" + question + "\n" + solution.

Two tag rules, both offered by insert_tags(text, rule) and score_responses(..., rule):

- "strict" (this project's; the toy PRM trains and is read with it; the default). A step header is
  "Step <digits>" at the START of a line; everything before the first "†Answer:" is the body. Only
  the solution is tagged, and only the solution's tags are read. A tag goes right after the last
  non-whitespace character of each step (before each following header and before "†Answer:"); the
  answer line carries none; without "†Answer:" the last step gets none (the response was probably
  cut off); without any header the whole body is one step, tagged at its end (before "†Answer:").

      insert_tags("Step 1: a. See Step 3.\r\nStep 2: b.\n\n†Answer: 4")
      == "Step 1: a. See Step 3. и\r\nStep 2: b. и\n\n†Answer: 4"

- "released" (URSA-RM-8B's authors' scorer, what the released RM was trained and evaluated with).
  It is applied to the WHOLE user text (instruction, question and response) and EVERY tag token of
  the prompt is read. Every "Step <digits>" anywhere counts (in the question, mid-line mentions).
  Before each match but the first, scanning back from the match, a tag goes after the first
  character that is neither a space nor "\n" ("\r" and tabs count as content); the scan stops
  before the character right after the previous match, and finding nothing means no tag. One more
  tag goes the same way before "†Answer:" (scanning back to the last match; none without
  "†Answer:"). With no "Step <digits>" at all, one tag is appended at the very end, after the answer.

      insert_tags("Q: Is Step 3 right?\nStep 1: a.\r\nStep 2: b.\n\n†Answer: 4", rule="released")
      == "Q: Is Step 3 right? и\nStep 1: a.\r и\nStep 2: b. и\n\n†Answer: 4"
      insert_tags("It is 4.\n\n†Answer: 4", rule="released") == "It is 4.\n\n†Answer: 4 и"

  On canonical solutions (headers at line starts, no "Step k" in the question, "\n" line ends, an
  answer line) the two rules place the same tags in the solution.

`tag_steps` (training inputs from DualMath records) tags EVERY given step, so each label has its tag
even when the record has no answer line; with an answer it agrees with insert_tags on canonical
solutions.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ursa.tokenizer import STEP_TAG, Tokenizer   # the tag " и": space + CYRILLIC SMALL LETTER I (U+0438)

ANSWER_MARK = "†Answer:"
STEP_HEADER = re.compile(r"^[ \t]*Step \d+\b", re.MULTILINE)

PRM_INSTRUCTION = ("You are given a problem and a step-by-step solution. "
                   "You need to check the correctness of each step.")

AGGREGATIONS = ("min", "mean", "last", "product")


# ---- text: steps, tags, prompt ---------------------------------------------------------------

def _split_body(text: str) -> tuple[str, Optional[str]]:
    """(body before the first "†Answer:", text after it or None when there is no marker)."""
    k = text.find(ANSWER_MARK)
    if k < 0:
        return text, None
    return text[:k], text[k + len(ANSWER_MARK):]


def _step_starts(body: str) -> list[int]:
    """Character offsets of the step headers in body (the first step also owns any preamble)."""
    return [m.start() for m in STEP_HEADER.finditer(body)]


def split_steps(solution: str) -> tuple[list[str], Optional[str]]:
    """Solution text -> (steps, answer).

    steps: the stripped step texts, each INCLUDING its "Step k:" header; text before the first
    header is kept with the first step; no header at all -> the whole body is one step (an empty
    body -> no steps). answer: the stripped text after "†Answer:", or None when there is none.
    join_steps(*split_steps(s)) == s for a canonical solution s.
    """
    body, answer = _split_body(solution)
    starts = _step_starts(body)
    cuts = [0] + starts[1:] + [len(body)]
    steps = [body[a:b].strip() for a, b in zip(cuts[:-1], cuts[1:])]
    steps = [s for s in steps if s]
    return steps, (answer.strip() if answer is not None else None)


def join_steps(steps: Sequence[str], answer: Optional[str]) -> str:
    """Steps (with their "Step k:" headers) and the bare answer -> the canonical solution text.
    answer None -> no "†Answer:" line."""
    text = "\n\n".join(steps)
    if answer is not None:
        text = (text + "\n\n" if text else "") + f"{ANSWER_MARK} {answer}"
    return text


def _end_of_content(text: str, pos: int) -> int:
    """Offset just after the last non-whitespace character before pos (0 if there is none)."""
    j = pos
    while j > 0 and text[j - 1].isspace():
        j -= 1
    return j


def _insert_at(text: str, points: Sequence[int], tag: str) -> str:
    """text with `tag` inserted at each offset of `points` (ascending, distinct)."""
    out, prev = [], 0
    for p in points:
        out += [text[prev:p], tag]
        prev = p
    out.append(text[prev:])
    return "".join(out)


def _strict_tags(text: str, tag: str) -> str:
    """Rule "strict" (module docstring): tags inside the solution only, headers at line starts."""
    body, answer = _split_body(text)
    starts = _step_starts(body)
    points = [_end_of_content(body, s) for s in starts[1:]]
    end = _end_of_content(body, len(body))
    if end > 0 and (answer is not None or not starts):
        points.append(end)
    tagged = _insert_at(body, points, tag)
    return tagged if answer is None else tagged + ANSWER_MARK + answer


RELEASED_STEP = re.compile(r"Step \d+")   # the released scorer's pattern: anywhere, any context
RELEASED_BLANK = " \n"                    # the only characters it steps back over ("\r" is content)


def _released_point(text: str, pos: int, floor: int) -> Optional[int]:
    """Just after the last character of text[floor + 1:pos] that is not in RELEASED_BLANK; None if
    there is none (pos <= floor + 1 included: e.g. pos = -1 for a missing "†Answer:")."""
    j = pos - 1
    while j > floor:
        if text[j] not in RELEASED_BLANK:
            return j + 1
        j -= 1
    return None


def _released_tags(text: str, tag: str) -> str:
    """Rule "released" (module docstring), as URSA-MATH/URSA-MATH inference/prm_infer_score.py
    places its tags: scan back from each "Step k" match but the first to just after the previous
    match, and from "†Answer:" to just after the last match; no match: append the tag at the end."""
    spans = [(m.start(), m.end()) for m in RELEASED_STEP.finditer(text)]
    if not spans:
        return text + tag
    points = [_released_point(text, start, prev_end) for (_, prev_end), (start, _) in zip(spans, spans[1:])]
    points.append(_released_point(text, text.find(ANSWER_MARK), spans[-1][1]))
    return _insert_at(text, [p for p in points if p is not None], tag)


TAG_RULES = ("strict", "released")


def insert_tags(text: str, rule: str = "strict", *, tag: str = STEP_TAG) -> str:
    """Insert step tags into `text` by `rule` (module docstring, with an example of each):

    "strict": `text` is a solution; a tag after the last non-whitespace character before every
    line-start "Step k" header but the first, and before "†Answer:"; the answer line gets none;
    without "†Answer:" the last step gets none; no header: one tag at the end of the body; a blank
    body: none.
    "released": `text` is the whole user text (see released_user_text); the released scorer's rule.
    """
    if rule == "strict":
        return _strict_tags(text, tag)
    if rule == "released":
        return _released_tags(text, tag)
    raise ValueError(f"insert_tags: rule must be one of {TAG_RULES}, got {rule!r}")


def tag_steps(steps: Sequence[str], answer: Optional[str], tag: str = STEP_TAG) -> str:
    """Tag EVERY step (training inputs; a DualMath record has a label for each step):
    "Step 1: a. и\\n\\nStep 2: b. и\\n\\n†Answer: C". Unlike insert_tags the last step is tagged
    even when answer is None. A blank step, or a step already containing the tag, is an error."""
    parts = []
    for k, s in enumerate(steps):
        if not s.strip():
            raise ValueError(f"tag_steps: step {k} is blank")
        if tag in s:
            raise ValueError(f"tag_steps: step {k} already contains the step tag {tag!r}: {s[:60]!r}")
        parts.append(s.rstrip() + tag)
    return join_steps(parts, answer)


def count_tags(text: str, tag: str = STEP_TAG) -> int:
    """Number of step tags in text."""
    return text.count(tag)


def prm_user_text(question: str, tagged_solution: str) -> str:
    """The PRM's user turn without the image token (the caller prepends <|image|>)."""
    return f"{PRM_INSTRUCTION}\nQuestion:{question}\n{tagged_solution}"


def released_user_text(question: str, response: str) -> str:
    """The user turn URSA-RM-8B's scorer builds: prm_user_text(question, response) tagged as a whole
    by rule "released" (its question's "Step k" mentions included)."""
    return insert_tags(prm_user_text(question, response), rule="released")


# ---- token level: the PRM's input and where it is read ----------------------------------------

def prm_input(tok: Tokenizer, question: str, tagged_solution: str, num_image_tokens: int,
              image: bool = True) -> tuple[list[int], list[int]]:
    """The PRM's input ids and its readout positions, for training and scoring alike.

    ids: URSA's ChatML prompt whose user turn is `<|image|>` + prm_user_text(question, tagged),
    with the placeholder expanded to num_image_tokens positions. positions: the indices (into ids)
    of the step-tag tokens INSIDE the tagged solution, in order; a tag token that the question
    happens to contain is never read. The whole text is encoded at once (so the ids are exactly
    what a plain encode gives) and the tokenizer's character offsets tell which tags are inside."""
    marked = Tokenizer.chat_prompt(prm_user_text(question, "\x00"), image)
    start = marked.rfind("\x00")
    text = marked[:start] + tagged_solution + marked[start + 1:]
    end = start + len(tagged_solution)
    enc = tok.tok.encode(text, add_special_tokens=False)
    ids, positions = [], []
    for t, (a, _) in zip(enc.ids, enc.offsets):
        if t == tok.tag_id and start <= a < end:
            positions.append(len(ids))
        ids.extend([t] * num_image_tokens if t == tok.image_id else [t])
    return ids, positions


def released_input(tok: Tokenizer, question: str, response: str, num_image_tokens: int,
                   image: bool = True) -> tuple[list[int], list[int]]:
    """Like prm_input, for rule "released": the user turn is `<|image|>` + released_user_text
    (question, response), and EVERY step-tag token of the prompt is read, the question's too (as
    the released scorer reads `input_ids == tag_id` over its whole input)."""
    text = Tokenizer.chat_prompt(released_user_text(question, response), image)
    ids, positions = [], []
    for t in tok.tok.encode(text, add_special_tokens=False).ids:
        if t == tok.tag_id:
            positions.append(len(ids))
        ids.extend([t] * num_image_tokens if t == tok.image_id else [t])
    return ids, positions


def response_input(tok: Tokenizer, question: str, response: str, num_image_tokens: int,
                   image: bool = True, rule: str = "strict") -> tuple[list[int], list[int]]:
    """(ids, readout positions) of a raw response under tag rule `rule`: "strict" is
    prm_input(tok, question, insert_tags(response), ...), "released" is released_input."""
    if rule == "strict":
        return prm_input(tok, question, insert_tags(response), num_image_tokens, image)
    if rule == "released":
        return released_input(tok, question, response, num_image_tokens, image)
    raise ValueError(f"response_input: rule must be one of {TAG_RULES}, got {rule!r}")


def positions_mask(positions: Sequence[Sequence[int]], T: int) -> torch.Tensor:
    """[B, T] bool, True at each row's readout positions (positions >= T are dropped)."""
    mask = torch.zeros((len(positions), T), dtype=torch.bool)
    for b, pos in enumerate(positions):
        pos = [p for p in pos if p < T]
        mask[b, pos] = True
    return mask


def labels_at(positions: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
              T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put each row's step labels at its readout positions.

    positions: B lists (from prm_input); labels: B lists of 0/1, one per position; T: the batch's
    sequence length. A position >= T (the row was truncated on the right) is dropped with its
    label. Returns (label tensor [B, T] float, 0 off the tags; tag mask [B, T] bool)."""
    if len(positions) != len(labels):
        raise ValueError(f"labels_at: {len(positions)} rows of positions but {len(labels)} label lists")
    out = torch.zeros((len(positions), T), dtype=torch.float32)
    for b, (pos, lab) in enumerate(zip(positions, labels)):
        if len(pos) != len(lab):
            raise ValueError(f"labels_at: row {b} has {len(pos)} step tags but {len(lab)} labels")
        keep = [(p, y) for p, y in zip(pos, lab) if p < T]
        if keep:
            out[b, [p for p, _ in keep]] = torch.tensor([float(y) for _, y in keep])
    return out, positions_mask(positions, T)


# ---- loss and scores -------------------------------------------------------------------------

def prm_loss(value_logits: torch.Tensor, label_tensor: torch.Tensor, tag_mask: torch.Tensor,
             num_tags: Optional[int] = None, pos_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Binary cross-entropy over the tagged steps (Eq. 4):

        L = -(1 / num_tags) * sum_{tags} [ w y log sigmoid(z) + (1 - y) log(1 - sigmoid(z)) ]

    with w = pos_weight (Eq. 4 is w = 1; `balance_weight` gives the w that makes the label-1 and
    label-0 tags of a data set weigh the same in total).

    value_logits, label_tensor: [B, T] float; tag_mask: [B, T] bool.
    num_tags: the number of tags in the WHOLE optimizer step (all micro-batches, all ranks), so
    summing the micro-batch losses weights every tag the same; default the local tag_mask.sum().
    metrics: loss, step_acc (prediction "correct" iff sigmoid(z) >= 0.5, i.e. z >= 0), num_tags
    (local), pos_frac (share of label-1 tags). No tags -> loss 0 (still attached to the graph).
    """
    if not (value_logits.shape == label_tensor.shape == tag_mask.shape):
        raise ValueError(f"prm_loss: shapes differ: value_logits {tuple(value_logits.shape)}, "
                         f"labels {tuple(label_tensor.shape)}, tag_mask {tuple(tag_mask.shape)}")
    mask = tag_mask.bool()
    local = int(mask.sum())
    denom = local if num_tags is None else int(num_tags)
    if denom < local:
        raise ValueError(f"prm_loss: num_tags {denom} is smaller than the {local} tags in this batch")
    z = value_logits[mask].float()                               # [N]
    y = label_tensor[mask].float()                               # [N]
    if local == 0:
        loss = value_logits.sum() * 0.0
        return loss, {"loss": 0.0, "step_acc": float("nan"), "num_tags": 0, "pos_frac": float("nan")}
    w = None if pos_weight == 1.0 else torch.tensor(float(pos_weight), device=z.device)
    loss = F.binary_cross_entropy_with_logits(z, y, reduction="sum", pos_weight=w) / denom
    with torch.no_grad():
        acc = ((z >= 0).float() == y).float().mean().item()
    return loss, {"loss": loss.item(), "step_acc": acc, "num_tags": local,
                  "pos_frac": y.mean().item()}


def balance_weight(labels: Sequence[Sequence[int]]) -> float:
    """The pos_weight of prm_loss that gives label-1 and label-0 steps equal total weight:
    (number of 0 labels) / (number of 1 labels) over every step of every record (1.0 if a class is absent)."""
    ones = sum(int(v) for row in labels for v in row)
    zeros = sum(len(row) for row in labels) - ones
    return zeros / ones if ones and zeros else 1.0


def step_scores(value_logits: torch.Tensor, tag_mask: torch.Tensor) -> list[list[float]]:
    """value_logits [B, T], tag_mask [B, T] bool -> per row, sigmoid(value_logits) at its tags, in order."""
    if value_logits.dim() != 2 or value_logits.shape != tag_mask.shape:
        raise ValueError(f"step_scores: expected two [B, T] tensors, got {tuple(value_logits.shape)} "
                         f"and {tuple(tag_mask.shape)}")
    p = torch.sigmoid(value_logits.float())
    return [p[b][tag_mask[b].bool()].tolist() for b in range(p.shape[0])]


# ---- THE step-score readout (toy GRPO reward, evaluation, the released URSA-RM-8B) -------------

def _batch_inputs(model, questions: Sequence[str], texts: Sequence[str], pixels, who: str) -> list:
    """Checks shared by score_steps and score_responses; returns the per-row images (or Nones)."""
    if not model.cfg.value_head:
        raise ValueError(f"{who}: this model has no value head (`score`)")
    n = len(texts)
    if len(questions) != n:
        raise ValueError(f"{who}: {len(questions)} questions but {n} solutions")
    px = [None] * n if pixels is None else list(pixels)
    if len(px) != n:
        raise ValueError(f"{who}: {len(px)} images but {n} solutions")
    return px


@torch.no_grad()
def score_encoded(model, tok: Tokenizer, enc: Sequence[tuple], px: Sequence, batch_size: int = 64
                  ) -> list[list[float]]:
    """sigmoid(value head) at each row's readout positions. enc: per row (ids, positions) as
    prm_input / response_input give them; px: per row a [3, S, S] image or None (a row's ids hold
    <|image|> positions exactly when it has one). Rows are sorted by length into batches (less
    padding), right-padded and masked, so each row computes what it computes alone; the model is
    put in eval mode for the call and its mode restored."""
    n = len(enc)
    was_training = model.training
    model.eval()
    p0 = next(model.parameters())
    order = sorted(range(n), key=lambda i: -len(enc[i][0]))
    out: list = [None] * n
    for s in range(0, n, batch_size):
        rows = order[s:s + batch_size]
        T = len(enc[rows[0]][0])
        ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
        am = torch.zeros((len(rows), T), dtype=torch.long)
        for b, i in enumerate(rows):
            ids[b, :len(enc[i][0])] = torch.tensor(enc[i][0])
            am[b, :len(enc[i][0])] = 1
        imgs = [px[i] for i in rows if px[i] is not None]
        pv = torch.stack(imgs).to(p0.device, p0.dtype) if imgs else None
        v = model(ids.to(p0.device), pv, attention_mask=am.to(p0.device), logits=False, values=True).values
        for i, sc in zip(rows, step_scores(v.cpu(), positions_mask([enc[i][1] for i in rows], T))):
            out[i] = sc
    if was_training:
        model.train()
    return out


def score_steps(model, tok: Tokenizer, questions: Sequence[str], tagged: Sequence[str],
                pixels=None, batch_size: int = 64) -> list[list[float]]:
    """Step scores of tagged solutions: for each, sigmoid(value head) at its solution's tags
    (prm_input; rule "strict" readout).

    questions / tagged: one per solution (tagged by insert_tags or tag_steps); pixels: None (no
    images), a tensor [n, 3, S, S] in [0, 1], or a list of [3, S, S] tensors or None (a text-only
    item gets no <|image|>). A solution with no tag scores []. See score_encoded for batching."""
    px = _batch_inputs(model, questions, tagged, pixels, "score_steps")
    enc = [prm_input(tok, q, t, model.cfg.vision.num_tokens, image=x is not None)
           for q, t, x in zip(questions, tagged, px)]
    return score_encoded(model, tok, enc, px, batch_size)


def score_responses(model, tok: Tokenizer, questions: Sequence[str], responses: Sequence[str],
                    pixels=None, batch_size: int = 64, rule: str = "strict") -> list[list[float]]:
    """Step scores of raw responses under tag rule `rule` (module docstring).

    "strict" (default; the toy PRM, GRPO reward and evaluation): score_steps of insert_tags(r).
    "released" (URSA-RM-8B): the whole user text tagged by the released rule, every tag of the
    prompt read (released_input). A response without any tag scores [] (aggregate -> 0)."""
    if rule == "strict":
        return score_steps(model, tok, questions, [insert_tags(r) for r in responses], pixels, batch_size)
    if rule not in TAG_RULES:
        raise ValueError(f"score_responses: rule must be one of {TAG_RULES}, got {rule!r}")
    px = _batch_inputs(model, questions, responses, pixels, "score_responses")
    enc = [released_input(tok, q, r, model.cfg.vision.num_tokens, image=x is not None)
           for q, r, x in zip(questions, responses, px)]
    return score_encoded(model, tok, enc, px, batch_size)


# ---- test time: aggregation, best-of-N, votes -----------------------------------------------

def aggregate(scores: Sequence[float], how: str = "mean") -> float:
    """Solution score from its step scores: min | mean | last | product; no tags -> 0.0 (the
    released scorer's rule: a response without a tag scores 0)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregate: unknown aggregation {how!r}; choose one of {AGGREGATIONS}")
    if len(scores) == 0:
        return 0.0
    if how == "min":
        return float(min(scores))
    if how == "mean":
        return float(sum(scores) / len(scores))
    if how == "last":
        return float(scores[-1])
    return float(math.prod(scores))


def best_of_n(per_solution_scores: Sequence[Sequence[float]], how: str = "mean") -> int:
    """Eq. 10: index of the solution with the largest aggregate score; ties -> the first."""
    if len(per_solution_scores) == 0:
        raise ValueError("best_of_n: no solutions")
    agg = [aggregate(s, how) for s in per_solution_scores]
    return max(range(len(agg)), key=lambda i: (agg[i], -i))


def majority_vote(answers: Sequence[Optional[str]]) -> Optional[str]:
    """Self-consistency: the most frequent answer (None ignored; ties -> the first to appear;
    all None -> None). Answers are compared as given: normalise them first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    return max(counts, key=lambda a: counts[a])   # Counter keeps first-seen order; max keeps first


def prm_weighted_vote(answers: Sequence[Optional[str]], agg_scores: Sequence[float]) -> Optional[str]:
    """The answer whose solutions' aggregate PRM scores sum highest (None answers ignored; ties ->
    the first to appear; all None -> None)."""
    if len(answers) != len(agg_scores):
        raise ValueError(f"prm_weighted_vote: {len(answers)} answers but {len(agg_scores)} scores")
    total: dict = {}
    for a, s in zip(answers, agg_scores):
        if a is not None:
            total[a] = total.get(a, 0.0) + float(s)
    if not total:
        return None
    return max(total, key=lambda a: total[a])


# ---- PRM evaluation on labelled steps ------------------------------------------------------

def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Rank-based ROC AUC (Mann-Whitney U): P(score of a label-1 step > score of a label-0 step),
    ties counted half. One class missing -> nan."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"auc: scores {s.shape} and labels {y.shape} must be equal 1-D shapes")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos + n_neg != len(y):
        raise ValueError("auc: labels must be 0 or 1")
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):                     # average 1-based rank over each run of equal scores
        j = i
        while j + 1 < len(s) and s_sorted[j + 1] == s_sorted[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def step_metrics(scores: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> dict:
    """Step-level PRM metrics over a flat list of steps. A step is predicted correct iff
    score >= threshold. Error detection treats label 0 as the positive class:
    err_precision = P(label 0 | predicted wrong), err_recall = P(predicted wrong | label 0).
    Undefined ratios are nan."""
    if len(scores) != len(labels):
        raise ValueError(f"step_metrics: {len(scores)} scores but {len(labels)} labels")
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    pred = (s >= threshold).astype(int)
    nan = float("nan")
    pred_err, true_err = pred == 0, y == 0
    tp = int((pred_err & true_err).sum())
    prec = tp / int(pred_err.sum()) if pred_err.any() else nan
    rec = tp / int(true_err.sum()) if true_err.any() else nan
    f1 = 2 * prec * rec / (prec + rec) if (prec == prec and rec == rec and prec + rec > 0) else nan
    return {"n": len(s), "acc": float((pred == y).mean()) if len(s) else nan,
            "auc": auc(s, y) if len(s) else nan, "err_precision": prec, "err_recall": rec,
            "err_f1": f1}


def first_error_hit(scores: Sequence[float], labels: Sequence[int],
                    threshold: float = 0.5) -> tuple[bool, Optional[bool]]:
    """Does the PRM locate the first wrong step (the first label 0) of one solution?

    Returns (by_threshold, by_min):
      by_threshold: the first step with score < threshold is the first label-0 step (a solution
        with no label 0 counts as a hit when no score is below threshold);
      by_min: the lowest-scoring step (first on ties) is the first label-0 step; None when the
        solution has no label-0 step (the rule always names a step, so it does not apply).
    """
    if len(scores) != len(labels):
        raise ValueError(f"first_error_hit: {len(scores)} scores but {len(labels)} labels")
    true_first = next((i for i, y in enumerate(labels) if y == 0), None)
    pred_first = next((i for i, s in enumerate(scores) if s < threshold), None)
    by_threshold = pred_first == true_first
    if true_first is None or len(scores) == 0:
        return by_threshold, None
    lowest = min(range(len(scores)), key=lambda i: (scores[i], i))
    return by_threshold, lowest == true_first
