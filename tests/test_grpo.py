"""Tests of ursa/grpo.py against hand-computed numbers and slow per-token reference loops."""
import math

import pytest
import torch

from ursa.grpo import (drop_moment, group_advantages, kl_k3, mixed_groups, outcome_reward, policy_loss,
                       ps_reward, rollout_advantages, rollout_batch, rollout_rewards, token_logprobs,
                       token_step_index, token_step_tensor, variant1_reward, variant2_advantages)

torch.set_num_threads(1)
S3 = math.sqrt(3.0)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, check_dtype=False)


# ---- rewards -----------------------------------------------------------------------------------

def test_outcome_reward():
    close(outcome_reward(torch.tensor([True, False, True])), torch.tensor([1.0, 0.0, 1.0]))


def test_drop_moment_hand_values():
    # [0.9, 0.6, 0.7]: terms (0.9-0.6)/0.9 = 1/3 and (0.6-0.7)/0.6 = -1/6 -> max = 1/3
    assert drop_moment([0.9, 0.6, 0.7]) == pytest.approx(1 / 3, abs=1e-12)
    # the drop is RELATIVE: [0.4, 0.2] drops by 0.2 absolute but (0.4-0.2)/0.4 = 0.5 relative
    assert drop_moment([0.4, 0.2]) == pytest.approx(0.5, abs=1e-12)
    # the largest of several drops: [1.0, 0.8, 0.4, 0.3] -> 0.2/1.0 = 0.2, 0.4/0.8 = 0.5, 0.1/0.4 = 0.25
    assert drop_moment([1.0, 0.8, 0.4, 0.3]) == pytest.approx(0.5, abs=1e-12)
    # a tensor gives the same as a list
    assert drop_moment(torch.tensor([1.0, 0.75, 0.5])) == pytest.approx(max(0.25 / 1.0, 0.25 / 0.75))


def test_drop_moment_may_be_negative_and_edge_cases():
    # strictly increasing: terms (0.5-0.6)/0.5 = -0.2 and (0.6-0.9)/0.6 = -0.5 -> delta = -0.2 < 0
    assert drop_moment([0.5, 0.6, 0.9]) == pytest.approx(-0.2, abs=1e-12)
    assert drop_moment([0.7]) == 0.0            # fewer than 2 scores
    assert drop_moment([]) == 0.0
    # r_j == 0: the pair (0.0 -> 0.5) is skipped; nothing else -> 0.0
    assert drop_moment([0.0, 0.5]) == 0.0
    # [0.5, 0.0, 0.4]: (0.5-0)/0.5 = 1.0; (0 -> 0.4) skipped -> 1.0
    assert drop_moment([0.5, 0.0, 0.4]) == pytest.approx(1.0)
    for bad in ([0.5, 1.5], [0.5, -0.1], [0.5, float("nan")]):
        with pytest.raises(ValueError, match="must lie in"):
            drop_moment(bad)


def test_ps_reward_threshold_is_inclusive():
    # rho = 0.25 is exact in binary floating point, and so is (1.0 - 0.75) / 1.0 = 0.25
    correct = torch.tensor([True, True, True, True, False, False])
    scores = [[1.0, 0.75],        # delta = 0.25 == rho -> drop-moment -> 1 - gamma = 0.7
              [1.0, 0.76],        # delta = 0.24 <  rho -> 1
              [1.0, 0.74],        # delta = 0.26 >  rho -> 0.7
              [0.9],              # one step: delta = 0 -> 1
              [1.0, 1.0],         # wrong answer -> 0, however smooth its scores
              [1.0, 0.1]]         # wrong answer -> 0
    close(ps_reward(correct, scores, gamma=0.3, rho=0.25), torch.tensor([0.7, 1.0, 0.7, 1.0, 0.0, 0.0]))


def test_ps_reward_paper_setting():
    # gamma 0.5, rho 0.3: [0.9, 0.6, 0.7] has delta 1/3 >= 0.3 -> 0.5; [0.9, 0.8, 0.85] has
    # delta (0.9-0.8)/0.9 = 0.111 -> 1; increasing scores (negative delta) -> 1; wrong -> 0
    correct = torch.tensor([True, True, True, False])
    scores = [[0.9, 0.6, 0.7], [0.9, 0.8, 0.85], [0.2, 0.5, 0.9], [0.9, 0.6, 0.7]]
    close(ps_reward(correct, scores), torch.tensor([0.5, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="3 rollouts in correct but 2"):
        ps_reward(torch.tensor([True, True, False]), [[0.5], [0.5]])


def test_variant1_reward():
    # correct: 1 + (0.8 + 0.6)/2 = 1.7; wrong: 0 + 0.5 = 0.5; correct with no steps: 1 + 0 = 1
    got = variant1_reward(torch.tensor([True, False, True]), [[0.8, 0.6], [0.5], []])
    close(got, torch.tensor([1.7, 0.5, 1.0]))


def test_mixed_groups():
    c = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert mixed_groups(c).tolist() == [False, False, True]


# ---- advantages --------------------------------------------------------------------------------

def test_group_advantages_hand_values():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.5],
                      [1.0, 0.0, 1.0, 0.0]])
    # row 0: mean 0.625, deviations [0.375, -0.625, 0.375, -0.125];
    #   unbiased var = (0.140625 + 0.390625 + 0.140625 + 0.015625) / 3 = 0.6875 / 3
    s0 = math.sqrt(0.6875 / 3)
    # row 1: mean 0.5, deviations +-0.5; unbiased var = 4 * 0.25 / 3 = 1/3 -> A = 0.5 * sqrt(3)
    want = torch.tensor([[0.375 / s0, -0.625 / s0, 0.375 / s0, -0.125 / s0],
                         [0.5 * S3, -0.5 * S3, 0.5 * S3, -0.5 * S3]], dtype=torch.float64)
    close(group_advantages(r.double(), eps=0.0), want, 1e-9)
    # eps is added to the std: row 1 with eps = 0.1 -> 0.5 / (1/sqrt(3) + 0.1)
    close(group_advantages(r, eps=0.1)[1, 0], torch.tensor(0.5 / (1 / S3 + 0.1)))
    # std scaling off (Dr. GRPO): plain deviations from the group mean
    close(group_advantages(r, scale_std=False), torch.tensor([[0.375, -0.625, 0.375, -0.125],
                                                              [0.5, -0.5, 0.5, -0.5]]))


def test_group_advantages_flat_group_is_exactly_zero():
    # 0.1 * 3 rounds, so the mean of [0.1, 0.1, 0.1] is not exactly 0.1 in float: still exactly 0
    r = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    for scale in (True, False):
        for eps in (0.0, 1e-6):
            a = group_advantages(r, scale_std=scale, eps=eps)
            assert not torch.isnan(a).any()
            assert (a[:3] == 0).all()
            assert (a[3] != 0).all()
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        group_advantages(torch.tensor([[1.0], [0.0]]))


def test_variant2_advantages_hand_values():
    correct = torch.tensor([True, True, False])
    scores = [[0.8, 0.6], [0.9, 0.9, 0.3], [0.5]]
    # mean step scores m = [0.7, 0.7, 0.5]; mean 1.9/3; deviations [1/15, 1/15, -2/15];
    #   unbiased var = (1/225 + 1/225 + 4/225) / 2 = 1/75 -> std = 1/(5 sqrt 3)
    #   norm(m) = [sqrt3/3, sqrt3/3, -2 sqrt3/3] = [1/sqrt3, 1/sqrt3, -2/sqrt3]
    # outcome [1, 1, 0]: deviations [1/3, 1/3, -2/3]; var = (1/9 + 1/9 + 4/9)/2 = 1/3
    #   norm(o) = [1/sqrt3, 1/sqrt3, -2/sqrt3]
    token_step = torch.tensor([[0, 0, 1, -1],     # steps 0, 0, 1, then the answer line
                               [0, 1, 2, 2],
                               [0, -1, -1, -1]])
    want = torch.tensor([
        [0.8 / S3 + 1 / S3, 0.8 / S3 + 1 / S3, 0.6 / S3 + 1 / S3, 1 / S3],      # no-step token: outcome only
        [0.9 / S3 + 1 / S3, 0.9 / S3 + 1 / S3, 0.3 / S3 + 1 / S3, 0.3 / S3 + 1 / S3],
        [0.5 * (-2 / S3) - 2 / S3, -2 / S3, -2 / S3, -2 / S3]])
    close(variant2_advantages(correct, scores, token_step, eps=0.0), want, 1e-5)
    # without std scaling: norm(m) = [1/15, 1/15, -2/15], norm(o) = [1/3, 1/3, -2/3]
    got = variant2_advantages(correct, scores, token_step, scale_std=False)
    close(got[0, 0], torch.tensor(0.8 / 15 + 1 / 3))
    close(got[2, 0], torch.tensor(0.5 * (-2 / 15) - 2 / 3))
    with pytest.raises(ValueError, match="rollout 2, token 1 has step index 1"):
        variant2_advantages(correct, scores, torch.tensor([[0, 0], [0, 0], [0, 1]]))


# ---- log-probs and masks -----------------------------------------------------------------------

def test_token_logprobs_matches_log_softmax_at_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    targets = torch.randint(0, 11, (2, 5), generator=g)
    for temp in (1.0, 0.7, 1.5):
        got = token_logprobs(logits, targets, temperature=temp)
        ref = torch.log_softmax(logits.double() / temp, dim=-1)
        want = torch.tensor([[ref[b, t, targets[b, t]].item() for t in range(5)] for b in range(2)])
        close(got, want, 1e-5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(logits, targets, temperature=0.0)


def test_targets_of_shifted_logits_are_the_next_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 7, generator=g)
    ids = torch.randint(0, 7, (2, 6), generator=g)
    got = token_logprobs(logits[:, :-1], ids[:, 1:])           # what the grpo stage passes
    assert got.shape == (2, 5)
    lsm = torch.log_softmax(logits, dim=-1)
    for b in range(2):
        for t in range(5):   # position t's logits predict the token at t + 1
            assert got[b, t].item() == pytest.approx(lsm[b, t, ids[b, t + 1]].item(), abs=1e-6)


# ---- from rollouts to the loss's inputs (the grpo stage's wiring) -------------------------------

def test_rollout_batch_masks_the_response_by_position_even_when_pad_is_the_stop_id():
    PAD = 2                                     # Qwen pads with <|endoftext|>, which is also a stop id
    ids, am, mask = rollout_batch([[7, 8, 9], [7, 8]], [[5, 2], [6, 6, 6, 2]], PAD)
    assert ids.tolist() == [[7, 8, 9, 5, 2, PAD], [7, 8, 6, 6, 6, 2]]
    assert am.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # targets are ids[:, 1:]: row 0's targets 8 9 5 2 PAD -> the response 5 and its stop 2 only
    assert mask.tolist() == [[False, False, True, True, False], [False, True, True, True, True]]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rollout_batch([[1], [2]], [[3]], 0)


def test_reward_dispatch_each_kind_by_hand():
    correct = torch.tensor([True, True, False, True])
    scores = [[0.9, 0.8], [0.9, 0.5], [0.9, 0.9], [0.6]]       # drops: 1/9, 4/9 (>= 0.3), 0, none
    close(rollout_rewards("outcome", correct, scores), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    close(rollout_rewards("ps", correct, scores, gamma=0.5, rho=0.3), torch.tensor([1.0, 0.5, 0.0, 1.0]))
    close(rollout_rewards("v1", correct, scores), torch.tensor([1.85, 1.7, 0.9, 1.6]))
    close(rollout_rewards("v2", correct, scores), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="unknown reward 'x'"):
        rollout_rewards("x", correct, scores)


def test_rollout_advantages_groups_and_variant2():
    r = torch.tensor([[1.0, 0.0], [0.5, 0.5]])                   # B = 2 groups of G = 2
    c = torch.tensor([[True, False], [True, True]])
    scores = [[0.8], [0.4], [0.9], [0.3]]
    # Eq. 7 per group: (1 - 0.5) / std([1, 0]) = 0.5 / 0.7071; the flat group gives 0
    close(rollout_advantages("ps", r, c, scores), torch.tensor([0.5 / 0.5 ** 0.5, -0.5 / 0.5 ** 0.5, 0.0, 0.0]), 1e-5)
    ts = torch.tensor([[0, -1], [0, 0], [-1, 0], [0, 0]])
    adv = rollout_advantages("v2", r, c, scores, ts)
    assert adv.shape == (4, 2)
    close(adv[:2], variant2_advantages(c[0], scores[:2], ts[:2]))   # group 0 on its own rows
    close(adv[2:], variant2_advantages(c[1], scores[2:], ts[2:]))
    with pytest.raises(ValueError, match="needs token_step"):
        rollout_advantages("v2", r, c, scores)


def test_token_step_index_by_hand():
    text = "Step 1: a.\n\nStep 2: b.\n\n†Answer: 4"
    # tokens: "Step 1: a." | "\n\n" | "Step 2: b." | "\n\n" | "†Answer: 4"
    starts = [0, 10, 12, 22, 24]
    assert token_step_index(text, starts, 2) == [0, 1, 1, -1, -1]
    assert token_step_index(text, starts, 1) == [0, -1, -1, -1, -1]      # only step 1 scored
    assert token_step_index(text, [0, 5, 11, 13, 21], 2) == [0, 0, 1, 1, 1]


def test_token_step_tensor_aligns_with_targets():
    # prompt of 3 tokens: response token k is target position 3 - 1 + k
    t = token_step_tensor([3, 2], [[0, 0, 1], [0]], T=6)
    assert t.tolist() == [[-1, -1, 0, 0, 1], [-1, 0, -1, -1, -1]]
    ids, _, mask = rollout_batch([[7, 7, 7], [7, 7]], [[1, 1, 1], [1]], 0)
    assert ((t >= 0) == mask[:, :5]).all()


# ---- KL and the policy loss --------------------------------------------------------------------

def test_kl_k3():
    # d = ref - logp = ln 2: 2 - ln 2 - 1 = 0.306853; d = -1: e^-1 + 1 - 1 = 0.367879
    got = kl_k3(torch.tensor([0.0, 0.0]), torch.tensor([math.log(2.0), -1.0]))
    close(got, torch.tensor([1 - math.log(2.0), math.exp(-1.0)]))
    g = torch.Generator().manual_seed(2)
    for scale in (1e-4, 1e-2, 1.0, 5.0):      # tiny differences stress cancellation in float32
        lp = -torch.rand(1000, generator=g) * 5
        ref = lp + torch.randn(1000, generator=g) * scale
        assert (kl_k3(lp, ref) >= 0).all()
        assert (kl_k3(lp, lp) == 0).all()
        want = torch.exp(ref.double() - lp.double()) - (ref.double() - lp.double()) - 1
        close(kl_k3(lp, ref), want, 1e-6)


def slow_policy_loss(logp, old, adv, mask, ref, eps, beta, agg, num_tokens=None, num_seqs=None,
                     constant=None):
    """Eq. 8 one token at a time with python floats."""
    B, T = logp.shape
    seq_terms, total, n_tok = [], 0.0, 0
    for i in range(B):
        s, n_i = 0.0, 0
        for t in range(T):
            if not mask[i, t]:
                continue
            a = float(adv[i] if adv.dim() == 1 else adv[i, t])
            r = math.exp(float(logp[i, t]) - float(old[i, t]))
            rc = min(max(r, 1 - eps), 1 + eps)
            d = float(ref[i, t]) - float(logp[i, t])
            term = -min(r * a, rc * a) + beta * (math.exp(d) - d - 1)
            s, n_i = s + term, n_i + 1
        seq_terms.append(s / n_i if n_i else 0.0)
        total, n_tok = total + s, n_tok + n_i
    if agg == "seq-mean":
        return sum(seq_terms) / (num_seqs or B)
    if agg == "token":
        return total / (num_tokens or n_tok)
    return total / constant


def random_batch(seed, B=5, T=7, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4   # ratios well outside 1 +- 0.2
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    lengths = torch.tensor([7, 3, 5, 1, 6][:B])
    mask = torch.arange(T)[None] < lengths[:, None]                          # [B, T], uneven lengths
    shape = (B, T) if per_token_adv else (B,)
    adv = torch.randn(*shape, generator=g, dtype=torch.float64)
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("agg", ["seq-mean", "token", "constant"])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_policy_loss_matches_slow_loop(agg, per_token_adv):
    logp, old, adv, mask, ref = random_batch(3, per_token_adv=per_token_adv)
    logp[~mask] = float("-inf")             # garbage at masked positions must not leak in
    kw = dict(constant=5 * 7) if agg == "constant" else {}
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, mask, ref_logp=ref, clip_eps=0.2, beta=0.05, agg=agg, **kw)
    want = slow_policy_loss(logp, old, adv, mask, ref, 0.2, 0.05, agg, **kw)
    close(loss, torch.tensor(want, dtype=torch.float64))
    assert 0 < m["clip_frac"] < 1 and m["tokens"] == 22
    # the gradient equals central differences of the slow loop; exactly 0 (not NaN) on padding
    loss.backward()
    assert (x.grad[~mask] == 0).all()
    h = 1e-6
    for i, t in mask.nonzero().tolist():
        up, dn = logp.clone(), logp.clone()
        up[i, t] += h
        dn[i, t] -= h
        fd = (slow_policy_loss(up, old, adv, mask, ref, 0.2, 0.05, agg, **kw)
              - slow_policy_loss(dn, old, adv, mask, ref, 0.2, 0.05, agg, **kw)) / (2 * h)
        assert x.grad[i, t].item() == pytest.approx(fd, abs=1e-6)
    # explicit global counts are used as given
    loss, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.05, agg=agg, num_tokens=40,
                          num_seqs=9, **kw)
    want = slow_policy_loss(logp, old, adv, mask, ref, 0.2, 0.05, agg, num_tokens=40, num_seqs=9, **kw)
    close(loss, torch.tensor(want, dtype=torch.float64))


def test_on_policy_loss_zero_but_gradient_not():
    # 2 groups of 2 rollouts, 3 valid tokens each, zero-mean advantages, ratio 1, beta 0:
    # loss = -(1/4) sum_i (1/3) * 3 * A_i = -(1/4)(1 - 1 + 0.5 - 0.5) = 0
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0]] * 4, requires_grad=True)
    mask = torch.tensor([[True, True, True, False]] * 4)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, m = policy_loss(logp, logp.detach(), adv, mask)
    assert abs(loss.item()) < 1e-7 and m["ratio"] == pytest.approx(1.0) and m["clip_frac"] == 0.0
    loss.backward()
    # d loss / d logp_{i,t} = -A_i * ratio / (|o_i| * B) = -A_i / 12 on valid tokens, 0 on padding
    want = -adv[:, None] / 12 * mask
    close(logp.grad, want)
    assert logp.grad.abs().sum() > 0


def test_clipping_zeroes_the_gradient():
    eps = 0.2
    old = torch.zeros(1, 4)
    # ratios e^0.3 = 1.35 (> 1.2), e^0.3, e^-0.3 = 0.74 (< 0.8), e^0.1 = 1.105 (inside)
    logp = torch.tensor([[0.3, 0.3, -0.3, 0.1]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, m = policy_loss(logp, old, adv, mask, clip_eps=eps, agg="token")
    loss.backward()
    g = logp.grad[0]
    assert g[0] == 0            # ratio > 1 + eps, A > 0: clipped, no gradient
    assert g[2] == 0            # ratio < 1 - eps, A < 0: clipped, no gradient
    # ratio > 1 + eps but A < 0: min picks the unclipped ratio * A -> gradient -A * ratio / 4
    assert g[1].item() == pytest.approx(math.exp(0.3) / 4, rel=1e-6)
    assert g[3].item() == pytest.approx(-math.exp(0.1) / 4, rel=1e-6)
    assert m["clip_frac"] == pytest.approx(0.5)
    # value: min terms 1.2*1, 1.35*(-1), min(0.74*(-1), 0.8*(-1)) = -0.8, 1.105*1 (exact ratios):
    # loss = -(1.2 - 1.35 - 0.8 + 1.105) / 4
    want = -(1.2 * 1 - math.exp(0.3) - 0.8 + math.exp(0.1)) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)


def _grad(agg, parts, logp, old, adv, mask, ref, **kw):
    x = logp.clone().requires_grad_(True)
    total = 0.0
    for sl in parts:
        loss, _ = policy_loss(x[sl], old[sl], adv[sl], mask[sl], ref_logp=ref[sl], beta=0.1,
                              agg=agg, **kw)
        loss.backward()
        total += loss.item()
    return total, x.grad


@pytest.mark.parametrize("agg", ["seq-mean", "token", "constant"])
def test_micro_batches_give_the_same_gradient(agg):
    logp, old, adv, mask, ref = random_batch(4)      # lengths 7, 3, 5, 1, 6
    whole, split = [slice(0, 5)], [slice(0, 1), slice(1, 5)]
    kw = {"seq-mean": dict(num_seqs=5), "token": dict(num_tokens=int(mask.sum())),
          "constant": dict(constant=35.0)}[agg]
    l1, g1 = _grad(agg, whole, logp, old, adv, mask, ref, **kw)
    l2, g2 = _grad(agg, split, logp, old, adv, mask, ref, **kw)
    assert l1 == pytest.approx(l2, rel=1e-9)
    close(g1, g2, 1e-10)


def test_naive_per_micro_batch_token_mean_differs():
    # micro-batch A: 1 sequence of 7 tokens; B: 4 sequences with 3 + 5 + 1 + 6 = 15 tokens.
    # global token mean weights every token by 1/22; averaging the two micro-batch means weights
    # A's tokens by 1/14 and B's by 1/30, so the gradients differ
    logp, old, adv, mask, ref = random_batch(4)
    _, g_global = _grad("token", [slice(0, 1), slice(1, 5)], logp, old, adv, mask, ref, num_tokens=22)
    _, g_naive = _grad("token", [slice(0, 1), slice(1, 5)], logp, old, adv, mask, ref)
    g_naive = g_naive / 2                      # gradient accumulation averaged over 2 micro-batches
    assert not torch.allclose(g_global, g_naive, atol=1e-4)
    # the per-token weights are exactly 22/14 and 22/30 of the global ones
    close(g_naive[0], g_global[0] * 22 / 14, 1e-10)
    close(g_naive[1:], g_global[1:] * 22 / 30, 1e-10)


def test_policy_loss_errors():
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(x, x, torch.zeros(2), mask, beta=0.1)
    with pytest.raises(ValueError, match="needs constant"):
        policy_loss(x, x, torch.zeros(2), mask, agg="constant")
    with pytest.raises(ValueError, match="agg must be one of"):
        policy_loss(x, x, torch.zeros(2), mask, agg="mean")
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(x, x, torch.zeros(3), mask)
    # no valid token at all: loss 0, not NaN
    loss, _ = policy_loss(x, x, torch.ones(2), torch.zeros(2, 3, dtype=torch.bool), agg="token")
    assert loss.item() == 0.0
