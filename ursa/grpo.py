"""PS-GRPO math: rewards, group advantages, the clipped policy loss (Stage III).

Pure functions over tensors, scores and token lists; nothing here runs a model, a PRM or a sampler
(train.py's grpo stage wires them together: sample -> judge -> score -> `rollout_rewards` ->
`rollout_advantages` -> `rollout_batch` -> `policy_loss`).

References
    URSA (Luo, Zheng et al., arXiv 2501.04686), Stage III "PS-GRPO" (docs/paper.md):
      Eq. 5  drop-moment   delta = max_j (r_j - r_{j+1}) / r_j over a rollout's PRM step scores
      Eq. 6  PS reward     R = 1 (correct, delta < rho); 1 - gamma (correct, delta >= rho); 0 (wrong)
      Eq. 7  advantage     A_i = (R_i - mean_G R) / std_G R, the same for every token of rollout i
      Eq. 8  objective     GRPO clipped surrogate with a beta * KL(pi || pi_ref) term
      Eq. 9  Variant 2     A_t = r_step,t * norm_G(mean r_step) + norm_G(r_outcome)  (Appendix B.1)
             Variant 1     R = r_outcome + mean_t r_step,t                           (Appendix B.1)
    DeepSeekMath (Shao et al., 2024): GRPO and the k3 KL estimator exp(q - p) - (q - p) - 1.
    DAPO (Yu et al., 2025): token-level aggregation ("token").
    Dr. GRPO (Liu et al., 2025): aggregation by a constant ("constant").

Conventions
    B sequences in a batch (B = prompts x G when rollouts are flattened), G rollouts per prompt,
    T completion positions, V vocabulary. Masks are bool [B, T]: True on tokens that count.
    Every loss returns (loss, metrics) with metrics a dict of python floats.

Micro-batching. Every aggregation of policy_loss is a plain sum over valid tokens divided by a number
that does not depend on the micro-batch (num_seqs, num_tokens or constant, counted by the caller over
the WHOLE optimizer step, and across ranks), so summing the micro-batch losses (no extra division by
the number of micro-batches) gives exactly the loss and the gradient of one big batch.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Scores = Union[Sequence[float], torch.Tensor]


# ---- rewards -----------------------------------------------------------------------------------

def outcome_reward(correct: torch.Tensor) -> torch.Tensor:
    """Rule-based outcome reward of vanilla GRPO: 1.0 for a correct final answer, else 0.0.

    correct: [G] bool  ->  [G] float32
    """
    return correct.to(torch.bool).to(torch.float32)


def _check_scores(scores: Scores, where: str) -> list[float]:
    """PRM step scores as python floats (float64 arithmetic), each a probability in [0, 1]."""
    vals = scores.detach().flatten().tolist() if isinstance(scores, torch.Tensor) else list(scores)
    out = []
    for j, r in enumerate(vals):
        r = float(r)
        if not (0.0 <= r <= 1.0):   # also rejects NaN
            raise ValueError(f"{where}: step score {j} is {r}; PRM step scores must lie in [0, 1] "
                             f"(pass sigmoid probabilities, not logits)")
        out.append(r)
    return out


def drop_moment(scores: Scores) -> float:
    """Largest RELATIVE drop between consecutive PRM step scores (Eq. 5).

        delta = max_j (r_j - r_{j+1}) / r_j,   j = 1 .. n-1

    scores: [n] step scores r_1..r_n in [0, 1] (list or tensor)  ->  python float
    - fewer than 2 scores: no consecutive pair, delta = 0.0;
    - delta MAY BE NEGATIVE: for strictly increasing scores every term is negative and the max is the
      least negative one, e.g. [0.5, 0.6, 0.9] -> max(-0.2, -0.5) = -0.2. That is the formula as
      written; it only matters through delta >= rho, and rho > 0, so a negative delta never penalises;
    - r_j == 0: the relative drop from a step scored 0 is undefined (0/0 or -x/0) and a score of 0
      cannot drop any further, so such pairs are skipped; if every pair is skipped, delta = 0.0.
    Computed in float64 python arithmetic, so delta == rho comparisons are exact where the inputs are.
    """
    r = _check_scores(scores, "drop_moment")
    terms = [(r[j] - r[j + 1]) / r[j] for j in range(len(r) - 1) if r[j] > 0.0]
    return max(terms) if terms else 0.0


def _check_group(correct: torch.Tensor, step_scores: Sequence[Scores], who: str) -> None:
    if correct.dim() != 1:
        raise ValueError(f"{who}: correct must be [G], got shape {tuple(correct.shape)}")
    if len(step_scores) != correct.shape[0]:
        raise ValueError(f"{who}: {correct.shape[0]} rollouts in correct but {len(step_scores)} "
                         f"lists of step scores")


def ps_reward(correct: torch.Tensor, step_scores: Sequence[Scores], gamma: float = 0.5,
              rho: float = 0.3) -> torch.Tensor:
    """Process-supervised reward of PS-GRPO (Eq. 6).

        R_i = 1          if rollout i is correct and delta_i <  rho
              1 - gamma  if rollout i is correct and delta_i >= rho   (a drop-moment: penalised)
              0          if rollout i is wrong (whatever its step scores)

    correct: [G] bool; step_scores: G lists of PRM scores (one per step, any length)  ->  [G] float32
    delta_i = drop_moment(step_scores[i]) (Eq. 5); a correct rollout with < 2 scored steps has
    delta = 0 and gets 1. Paper's main setting: gamma = 0.5, rho = 0.3.
    """
    _check_group(correct, step_scores, "ps_reward")
    rewards = []
    for ok, s in zip(correct.tolist(), step_scores):
        if not ok:
            rewards.append(0.0)
        else:
            rewards.append(1.0 - gamma if drop_moment(s) >= rho else 1.0)
    return torch.tensor(rewards, dtype=torch.float32)


def _mean_step_score(scores: Scores, where: str) -> float:
    r = _check_scores(scores, where)
    return sum(r) / len(r) if r else 0.0


def variant1_reward(correct: torch.Tensor, step_scores: Sequence[Scores]) -> torch.Tensor:
    """Appendix B.1, Variant 1: the PRM scalar added to the outcome reward.

        R_i = r_outcome,i + mean_t r_step,i,t

    correct: [G] bool; step_scores: G lists  ->  [G] float32 (in [0, 2]).
    A rollout with no scored step has mean step score 0.
    """
    _check_group(correct, step_scores, "variant1_reward")
    means = [_mean_step_score(s, f"variant1_reward: rollout {i}") for i, s in enumerate(step_scores)]
    return outcome_reward(correct) + torch.tensor(means, dtype=torch.float32)


def mixed_groups(correct: torch.Tensor) -> torch.Tensor:
    """RL prompt filter (URSA, Stage III): keep a prompt only when its G samples are neither
    all correct nor all wrong (otherwise every outcome advantage is 0).

    correct: [B, G] bool  ->  [B] bool
    """
    c = correct.to(torch.bool)
    return c.any(dim=-1) & ~c.all(dim=-1)


# ---- advantages --------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (Eq. 7), one scalar per rollout.

        A_{b,i} = (R_{b,i} - mean_i R_{b,:}) / (std_i R_{b,:} + eps)     (scale_std=True)
        A_{b,i} =  R_{b,i} - mean_i R_{b,:}                              (scale_std=False, Dr. GRPO)

    rewards: [B, G] (B prompts, G rollouts each)  ->  [B, G], same float dtype (float32 at least).
    std is the UNBIASED sample std (torch.std, Bessel's correction 1/(G-1)), as in the common GRPO
    implementations (DeepSeekMath-style code, TRL, verl), so numbers compare with theirs; the
    population std differs by the constant factor sqrt((G-1)/G) for a fixed G (0.935 at G = 8),
    which only rescales the step size. A group whose rewards are all equal has advantages exactly 0
    (set explicitly, not through 0 / eps, so float rounding of the mean can not leak a tiny
    nonzero value, and never NaN).
    """
    if rewards.dim() != 2:
        raise ValueError(f"group_advantages: rewards must be [B, G], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: a group needs at least 2 rollouts, got G = "
                         f"{rewards.shape[1]} (every advantage would be 0)")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    adv = r - r.mean(dim=1, keepdim=True)                                  # [B, G]
    if scale_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)                     # unbiased std
    flat = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))    # [B, 1]
    return torch.where(flat, torch.zeros_like(adv), adv)


def variant2_advantages(correct: torch.Tensor, step_scores: Sequence[Scores], token_step: torch.Tensor,
                        scale_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Appendix B.1, Variant 2 (Eq. 9): step-level advantages, mapped onto tokens.

        A_{i,t} = r_step,i,t * norm_G(m)_i + norm_G(r_outcome)_i,    m_i = mean_t r_step,i,t

    How Eq. 9 is read here:
    - norm_G is the Eq. 7 normalisation over the G rollouts of ONE prompt (group_advantages: minus
      the group mean, divided by the unbiased std + eps; an all-equal group gives 0);
    - it is applied to two per-rollout scalars: the mean PRM step score m_i and the outcome reward
      r_outcome,i (1/0);
    - the step part is then weighted by the rollout's own score of step t: every token of step t of
      rollout i gets r_step,i,t * norm_G(m)_i + norm_G(r_outcome)_i;
    - a token that belongs to no step (token_step == -1: the answer line, template tokens) gets the
      outcome part norm_G(r_outcome)_i only; padding is removed later by the loss mask.

    correct: [G] bool; step_scores: G lists (rollout i has n_i scores, steps 0..n_i-1);
    token_step: [G, T] int, the 0-based step index of each completion token, or -1
    ->  [G, T] float32 advantages.
    A rollout with no scored step has m_i = 0.
    """
    _check_group(correct, step_scores, "variant2_advantages")
    G = correct.shape[0]
    if token_step.dim() != 2 or token_step.shape[0] != G:
        raise ValueError(f"variant2_advantages: token_step must be [G={G}, T], got shape "
                         f"{tuple(token_step.shape)}")
    rows = [_check_scores(s, f"variant2_advantages: rollout {i}") for i, s in enumerate(step_scores)]
    n_max = max((len(r) for r in rows), default=0)
    # column 0 holds 0.0 for "no step" (index -1); step k sits in column k + 1
    table = torch.zeros(G, n_max + 1, dtype=torch.float32)                 # [G, n_max + 1]
    for i, r in enumerate(rows):
        if r:
            table[i, 1:len(r) + 1] = torch.tensor(r, dtype=torch.float32)
        bad = (token_step[i] < -1) | (token_step[i] >= len(r))
        if bad.any():
            t = int(bad.nonzero()[0, 0])
            raise ValueError(f"variant2_advantages: rollout {i}, token {t} has step index "
                             f"{int(token_step[i, t])} but the rollout has {len(r)} scored steps "
                             f"(valid: -1 .. {len(r) - 1})")
    mean_step = torch.tensor([sum(r) / len(r) if r else 0.0 for r in rows])       # [G]
    norm_m = group_advantages(mean_step[None], scale_std, eps)[0]                  # [G]
    norm_o = group_advantages(outcome_reward(correct)[None], scale_std, eps)[0]    # [G]
    r_tok = table.gather(1, (token_step.long() + 1).cpu())                         # [G, T]
    adv = r_tok * norm_m[:, None] + norm_o[:, None]                                # [G, T]
    return adv.to(token_step.device)


# ---- log-probabilities and masks ---------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(target) under the sampling distribution softmax(logits / temperature).

    logits: [B, T, V] ALREADY aligned (logits[:, t] predicts targets[:, t]: pass logits[:, :-1] and
    input_ids[:, 1:]);
    targets: [B, T] int  ->  [B, T] float32 (float64 if the logits are).
    Computed as logit[target] - logsumexp(logits), which equals gathering log_softmax without
    materialising the [B, T, V] log-probabilities. Use the temperature the rollouts were sampled
    with (Table 15: 1.0) so that old, new and reference log-probs are of the same distribution.
    """
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"token_logprobs: need logits [B, T, V] and targets [B, T], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        x = x / temperature
    picked = x.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)      # [B, T]
    return picked - torch.logsumexp(x, dim=-1)                          # [B, T]


# ---- the GRPO objective ------------------------------------------------------------------------

def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (DeepSeekMath; the KL term of Eq. 8).

        k3 = exp(ref - logp) - (ref - logp) - 1  >= 0,   = 0 iff logp == ref

    logp, ref_logp: [...] log-probs of the sampled tokens  ->  [...] (same shape)
    Written as expm1(d) - d: the naive exp(d) - d - 1 cancels catastrophically for small |d| and can
    come out slightly negative in float32; expm1(d) >= d holds after rounding, so this never does.
    """
    d = ref_logp - logp
    return (torch.expm1(d) - d).clamp_min(0.0)


LOSS_AGGREGATIONS = ("seq-mean", "token", "constant")   # how policy_loss sums over tokens and sequences


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                ref_logp: Optional[torch.Tensor] = None, clip_eps: float = 0.2, beta: float = 0.0,
                agg: str = "seq-mean", num_tokens: Optional[float] = None,
                num_seqs: Optional[float] = None, constant: Optional[float] = None
                ) -> tuple[torch.Tensor, dict]:
    """GRPO clipped surrogate with a k3 KL penalty (Eq. 8), to MINIMISE.

    Per valid token (i, t), with ratio = exp(logp - old_logp) = pi_theta / pi_old:
        l_{i,t} = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A) + beta * k3(logp, ref)

    Aggregation (|o_i| = valid tokens of sequence i; sums run over valid tokens only):
        "seq-mean"  (paper, Eq. 8)  sum_i (1/|o_i|) sum_t l_{i,t} / num_seqs      (default num_seqs = B)
        "token"     (DAPO)          sum_{i,t} l_{i,t} / num_tokens                (default mask.sum())
        "constant"  (Dr. GRPO)      sum_{i,t} l_{i,t} / constant       (e.g. G * max_len; required)
    With micro-batches, pass num_seqs / num_tokens / constant of the WHOLE optimizer step (all
    micro-batches, all ranks) and sum the micro-batch losses: the gradient equals one big batch's.
    (A sequence is never split across micro-batches, so |o_i| is always local.) Sequences with no
    valid token add 0 but still count in the default num_seqs. A count below 1 is taken as 1, so a
    step with no valid token gives loss 0, not NaN.

    logp: [B, T] current policy (requires grad); old_logp: [B, T] behaviour policy (detached;
    on-policy: logp.detach()); advantages: [B] (one per sequence, Eq. 7) or [B, T] (Variant 2);
    mask: [B, T] bool; ref_logp: [B, T] reference policy, needed when beta > 0.
    Masked positions are zeroed before any arithmetic, so -inf / NaN there can not poison the
    gradient.
    Returns (loss scalar, metrics): loss, pg_loss, kl_loss (the aggregated parts), clip_frac
    (fraction of valid tokens where the clipped branch is active, i.e. has zero gradient), ratio
    (mean), kl (mean k3, when ref_logp is given), tokens (valid tokens in this call).
    """
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"policy_loss: agg must be one of {LOSS_AGGREGATIONS}, got {agg!r}")
    if logp.dim() != 2:
        raise ValueError(f"policy_loss: logp must be [B, T], got shape {tuple(logp.shape)}")
    B, T = logp.shape
    for name, x in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(x.shape)}, logp has {(B, T)}")
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"policy_loss: advantages must be [B={B}] or [B, T]=[{B}, {T}], got "
                         f"{tuple(advantages.shape)}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"policy_loss: beta = {beta} > 0 needs ref_logp")
    if agg == "constant" and (constant is None or constant <= 0):
        raise ValueError(f"policy_loss: agg 'constant' needs constant > 0 (e.g. G * max_len), got {constant}")

    dtype = torch.promote_types(logp.dtype, torch.float32)
    m = mask.to(torch.bool)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    lp = torch.where(m, logp.to(dtype), zero)                                   # [B, T]
    old = torch.where(m, old_logp.detach().to(dtype), zero)                     # [B, T]
    adv = advantages.detach().to(dtype)
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv                 # [B] -> [B, T]
    adv = torch.where(m, adv, zero)

    ratio = torch.exp(lp - old)                                                 # [B, T]
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    pg = -torch.minimum(ratio * adv, clipped * adv)                             # [B, T]
    if ref_logp is not None:
        ref = torch.where(m, ref_logp.detach().to(dtype), zero)
        kl = torch.where(m, kl_k3(lp, ref), zero)                               # [B, T]
    else:
        kl = torch.zeros_like(pg)
    mf = m.to(dtype)
    pg, kl_pen = pg * mf, beta * kl * mf                                        # [B, T] each

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        if agg == "seq-mean":
            per_seq = x.sum(dim=1) / mf.sum(dim=1).clamp_min(1.0)               # [B]
            return per_seq.sum() / (float(B) if num_seqs is None else max(float(num_seqs), 1.0))
        if agg == "token":
            n = mf.sum().clamp_min(1.0) if num_tokens is None else max(float(num_tokens), 1.0)
            return x.sum() / n
        return x.sum() / float(constant)

    pg_loss, kl_loss = aggregate(pg), aggregate(kl_pen)
    loss = pg_loss + kl_loss

    with torch.no_grad():
        n_valid = mf.sum()
        denom = n_valid.clamp_min(1.0)
        clip_active = ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))
        metrics = {
            "loss": float(loss),
            "pg_loss": float(pg_loss),
            "kl_loss": float(kl_loss),
            "clip_frac": float((clip_active & m).sum() / denom),
            "ratio": float((ratio * mf).sum() / denom),
            "tokens": float(n_valid),
        }
        if ref_logp is not None:
            metrics["kl"] = float((kl * mf).sum() / denom)
    return loss, metrics


# ---- from rollouts to the loss's inputs ----------------------------------------------------------

REWARDS = ("outcome", "ps", "v1", "v2")   # vanilla GRPO, PS-GRPO (Eq. 6), Appendix B.1 Variants 1 and 2


def rollout_rewards(kind: str, correct: torch.Tensor, step_scores: Sequence[Scores], gamma: float = 0.5,
                    rho: float = 0.3) -> torch.Tensor:
    """The scalar reward of every rollout under reward `kind`.

        outcome  1 / 0 for a right / wrong answer (vanilla GRPO)
        ps       Eq. 6 (outcome, times 1 - gamma when the PRM shows a drop-moment >= rho)
        v1       Variant 1: outcome + mean step score
        v2       Variant 2: the outcome reward; its step part enters the advantage (rollout_advantages)

    correct: [R] bool; step_scores: R lists of PRM step scores  ->  [R] float32."""
    if kind == "outcome" or kind == "v2":
        _check_group(correct, step_scores, "rollout_rewards")
        return outcome_reward(correct)
    if kind == "ps":
        return ps_reward(correct, step_scores, gamma=gamma, rho=rho)
    if kind == "v1":
        return variant1_reward(correct, step_scores)
    raise ValueError(f"unknown reward {kind!r}: choose one of {', '.join(REWARDS)}")


def rollout_advantages(kind: str, rewards: torch.Tensor, correct: torch.Tensor, step_scores: Sequence[Scores],
                       token_step: Optional[torch.Tensor] = None, scale_std: bool = True) -> torch.Tensor:
    """Advantages of B groups of G rollouts, flattened rollout-major (row b * G + j).

    rewards, correct: [B, G]; step_scores: B * G lists; token_step: [B * G, T] step index of every
    target position (-1: no step), needed for kind "v2" only.
    -> [B * G] (one advantage per rollout, Eq. 7) or, for "v2", [B * G, T] (Eq. 9 per token)."""
    B, G = rewards.shape
    if kind != "v2":
        return group_advantages(rewards, scale_std=scale_std).reshape(B * G)     # [B, G] -> [R]
    if token_step is None or token_step.shape[0] != B * G:
        raise ValueError("rollout_advantages: Variant 2 needs token_step [B * G, T]")
    return torch.cat([variant2_advantages(correct[b], step_scores[b * G:(b + 1) * G], token_step[b * G:(b + 1) * G],
                                          scale_std=scale_std) for b in range(B)])  # [R, T]


def token_step_index(text: str, token_starts: Sequence[int], n_scores: int) -> list[int]:
    """For Variant 2: the PRM step (0-based) each response token belongs to.

    text: the decoded response; token_starts: each token's first character in `text`; n_scores:
    how many steps the PRM scored. Steps are prm.split_steps(text)'s, located in order in text; a
    token belongs to the first step whose span ends after the token starts (so the blank line
    before "Step k+1" belongs to step k+1). Tokens after the last scored step (the answer line, an
    untagged last step, the stop token) get -1."""
    from ursa.prm import split_steps
    steps, _ = split_steps(text)
    spans, pos = [], 0
    for st in steps:
        b = text.find(st, pos)
        spans.append(b + len(st))
        pos = b + len(st)
    out = []
    for c in token_starts:
        k = next((i for i, e in enumerate(spans) if c < e), len(spans))
        out.append(k if k < n_scores else -1)
    return out


def rollout_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training batch of R rollouts: prompt + response, right-padded.

    Returns ids [R, T] long, attention mask [R, T] long, and the target mask [R, T-1] bool, aligned
    with targets ids[:, 1:]: True where the target is a response token (up to and including its
    stop token), never on the prompt or padding."""
    if len(prompts) != len(responses):
        raise ValueError(f"rollout_batch: {len(prompts)} prompts but {len(responses)} responses")
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    R = len(prompts)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    am = torch.zeros((R, T), dtype=torch.long)
    tmask = torch.zeros((R, T), dtype=torch.bool)                 # [R, T] target tokens
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        am[i, :len(p) + len(r)] = 1
        tmask[i, len(p):len(p) + len(r)] = True
    return ids, am, tmask[:, 1:]                                  # [R, T-1]: aligned with ids[:, 1:]


def token_step_tensor(prompt_lens: Sequence[int], token_steps: Sequence[Sequence[int]], T: int) -> torch.Tensor:
    """[R, T-1] step index per target position (aligned with ids[:, 1:] of rollout_batch): the
    target at position P - 1 + k is response token k of a row whose prompt has P tokens; -1 elsewhere."""
    out = torch.full((len(prompt_lens), T - 1), -1, dtype=torch.long)
    for i, (P, ts) in enumerate(zip(prompt_lens, token_steps)):
        if ts:
            out[i, P - 1:P - 1 + len(ts)] = torch.tensor(list(ts), dtype=torch.long)
    return out
