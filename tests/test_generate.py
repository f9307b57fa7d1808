"""ursa.generate: shared-prefix sampling == unshared, batched == one by one, rows stop on their own,
no mask for equal lengths, one prefill per prompt, the stop bookkeeping by hand."""
import pytest
import torch

from ursa import generate as gen_mod
from ursa import lm as lm_mod
from ursa.config import get_config
from ursa.generate import cut_at_stop, generate
from ursa.model import URSAModel, init_weights

IMG = 3                  # the micro preset's <|image|> id; 4 positions per image


def _model(seed=0):
    torch.manual_seed(seed)
    return init_weights(URSAModel(get_config("micro")), std=0.2, seed=seed).eval()


def _prompt(before, after, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(4, 64, (before,), generator=g).tolist() + [IMG] * 4
            + torch.randint(4, 64, (after,), generator=g).tolist())


PROMPTS = [_prompt(2, 3, 1), _prompt(5, 6, 2), _prompt(1, 1, 3)]          # ragged: 9, 15, 6 tokens
PIXELS = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(9))


def _repeat(G):
    """The unshared form of num_samples=G: every prompt (and image) written out G times."""
    return [p for p in PROMPTS for _ in range(G)], PIXELS.repeat_interleave(G, dim=0)


def test_shared_prefix_equals_unshared_greedy():
    m, G = _model(1), 3
    shared = generate(m, PROMPTS, PIXELS, num_samples=G, max_new_tokens=8, stop_ids=[], pad_id=0)
    unshared = generate(m, *_repeat(G), max_new_tokens=8, stop_ids=[], pad_id=0)
    assert torch.equal(shared.tokens, unshared.tokens)
    torch.testing.assert_close(shared.logprobs, unshared.logprobs, atol=1e-5, rtol=1e-5)
    assert shared.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_shared_prefix_equals_unshared_for_the_same_generator_state(top_p):
    m, G = _model(2), 4
    a = generate(m, PROMPTS, PIXELS, num_samples=G, max_new_tokens=10, temperature=1.0, top_p=top_p,
                 stop_ids=[], pad_id=0, generator=torch.Generator().manual_seed(5))
    b = generate(m, *_repeat(G), max_new_tokens=10, temperature=1.0, top_p=top_p, stop_ids=[], pad_id=0,
                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    # and the samples differ between the rows of one prompt (the draws are not shared)
    assert len({tuple(a.row(i)) for i in range(G)}) > 1


def test_batched_greedy_equals_one_by_one():
    m = _model(3)
    batched = generate(m, PROMPTS, PIXELS, max_new_tokens=8, stop_ids=[], pad_id=0)
    for i, p in enumerate(PROMPTS):
        alone = generate(m, [p], PIXELS[i:i + 1], max_new_tokens=8, stop_ids=[], pad_id=0)
        assert batched.row(i) == alone.row(0)
        torch.testing.assert_close(batched.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=1e-5)


def _first_new(row):
    """The first token of a row that has not occurred before it (a stop id that cuts it there)."""
    k = next(i for i in range(1, len(row)) if row[i] not in row[:i])
    return k, row[k]


@pytest.mark.parametrize("check_every", [1, 3])
def test_each_row_stops_on_its_own(monkeypatch, check_every):
    monkeypatch.setattr(gen_mod, "stop_check_every", lambda device: check_every)
    m = _model(4)
    free = generate(m, PROMPTS, PIXELS, max_new_tokens=12, stop_ids=[], pad_id=0)
    k, stop = _first_new(free.row(0))
    out = generate(m, PROMPTS, PIXELS, max_new_tokens=12, stop_ids=[stop], pad_id=0)
    for r in range(3):
        row = free.row(r)
        cut = row.index(stop) + 1 if stop in row else 12
        assert out.row(r) == row[:cut] and int(out.lengths[r]) == cut
        assert out.stop_reason[r] == ("stop" if stop in row else "length")
        assert out.tokens[r, cut:].eq(0).all() and out.logprobs[r, cut:].eq(0).all()
        torch.testing.assert_close(out.logprobs[r, :cut], free.logprobs[r, :cut], atol=1e-5, rtol=1e-5)
    assert out.row(0) == free.row(0)[:k + 1]


def test_decoding_ends_once_every_row_has_stopped(monkeypatch):
    m = _model(5)
    free = generate(m, PROMPTS[:1], PIXELS[:1], max_new_tokens=12, stop_ids=[], pad_id=0)
    k, stop = _first_new(free.row(0))
    calls = []
    inner = m.language_model.forward
    monkeypatch.setattr(m.language_model, "forward", lambda *a, **kw: calls.append(1) or inner(*a, **kw))
    out = generate(m, PROMPTS[:1], PIXELS[:1], max_new_tokens=12, stop_ids=[stop], pad_id=7)
    assert out.row(0) == free.row(0)[:k + 1] and out.tokens[0, k + 1:].eq(7).all()
    assert len(calls) == 1 + k                   # the prefill, then one step per token before the stop


def test_one_prefill_per_prompt_and_no_mask_for_equal_lengths(monkeypatch):
    m = _model(6)
    images, masks = [], []
    inner_v = m.vision_model.forward
    monkeypatch.setattr(m.vision_model, "forward", lambda px: images.append(px.shape[0]) or inner_v(px))
    inner_p = lm_mod.attention_pattern
    monkeypatch.setattr(lm_mod, "attention_pattern",
                        lambda am, *a: masks.append(am is None) or inner_p(am, *a))
    same_len = [_prompt(2, 3, 10), _prompt(2, 3, 11)]
    generate(m, same_len, PIXELS[:2], num_samples=4, max_new_tokens=5, temperature=1.0, stop_ids=[],
             generator=torch.Generator().manual_seed(0))
    assert images == [2]                          # 2 prompts prefilled once, not 8 rows
    assert masks == [True] * 5                    # the prefill and 4 steps, none with a mask
    masks.clear()
    generate(m, PROMPTS, PIXELS, max_new_tokens=3, stop_ids=[])
    assert masks == [False] * 3                   # ragged prompts: every call masks the padding


def test_cut_at_stop_by_hand():
    tokens = torch.tensor([[5, 9, 2, 9], [1, 1, 1, 1], [2, 4, 4, 4]])
    logprobs = -torch.arange(1.0, 13.0).view(3, 4)
    lengths, stopped = cut_at_stop(tokens, logprobs, torch.tensor([2, 3]), pad_id=0)
    assert lengths.tolist() == [3, 4, 1] and stopped.tolist() == [True, False, True]
    assert tokens.tolist() == [[5, 9, 2, 0], [1, 1, 1, 1], [2, 0, 0, 0]]
    assert logprobs.tolist() == [[-1, -2, -3, 0], [-5, -6, -7, -8], [-9, 0, 0, 0]]
    lengths, stopped = cut_at_stop(tokens.clone(), logprobs.clone(), torch.tensor([], dtype=torch.long), 0)
    assert lengths.tolist() == [4, 4, 4] and not stopped.any()


def test_stop_check_interval_rule():
    assert gen_mod.stop_check_every(torch.device("cpu")) == 1
    assert gen_mod.stop_check_every(torch.device("cuda")) == gen_mod.STOP_CHECK_EVERY > 1


def test_zero_new_tokens_is_refused():
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(_model(), PROMPTS[:1], PIXELS[:1], max_new_tokens=0)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_sampled_tokens_follow_the_tempered_nucleus_distribution(temperature, top_p):
    logits = torch.tensor([2.0, 1.0, float("-inf"), 0.0, -1.0, float("-inf")])
    p = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:                       # by hand: sorted 0, 1, 3, 4; keep while the mass before is < top_p
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[order[before < top_p]] = True
        p = torch.where(keep, p, torch.zeros_like(p)) / p[keep].sum()
    n = 200_000
    tok, lp = gen_mod.sample_next(logits.repeat(n, 1), temperature, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=6).double() / n
    assert (freq - p.double()).abs().max() < 4e-3        # 4e-3 is over 3 standard errors at n = 200k
    assert freq[2] == 0 and freq[5] == 0                  # -inf logits are never drawn
    torch.testing.assert_close(lp, torch.log_softmax(logits / temperature, -1)[tok])


def test_a_draw_at_the_top_of_the_unit_interval_never_picks_a_zero_probability_token(monkeypatch):
    logits = torch.tensor([[0.0, 1.0, 3.0, float("-inf"), float("-inf")]])
    monkeypatch.setattr(gen_mod.torch, "rand", lambda *a, **kw: torch.full((1, 1), 1.0))
    tok, _ = gen_mod.sample_next(logits, 1.0, 1.0, None)
    assert tok.tolist() == [2]                            # the last token with mass, not index 3 or 4


def test_stopped_rows_leave_the_batch(monkeypatch):
    m = _model(4)
    free = generate(m, PROMPTS, PIXELS, max_new_tokens=12, stop_ids=[], pad_id=0)
    k, stop = _first_new(free.row(0))
    rows = []
    inner = m.language_model.forward
    monkeypatch.setattr(m.language_model, "forward", lambda x, *a, **kw: rows.append(x.shape[0]) or inner(x, *a, **kw))
    out = generate(m, PROMPTS, PIXELS, max_new_tokens=12, stop_ids=[stop], pad_id=0)
    assert out.row(0) == free.row(0)[:k + 1]
    stops_at = [r.index(stop) if stop in r else None for r in map(free.row, range(3))]
    # after the prefill, the forward that feeds token t decodes only the rows whose stop token
    # comes later (the check runs every step on a CPU; one stopped row of three is enough to compact)
    expect = [sum(1 for s in stops_at if s is None or s > t) for t in range(len(rows) - 1)]
    assert rows[0] == 3 and rows[1:] == expect
    assert min(rows) < 3
    # decoded counts the (row, position) pairs sampled: 3 from the prefill, then one per row of each step
    assert out.decoded == 3 + sum(expect) and free.decoded == 3 * 12
