"""Length-bucketed micro-batches: the same loss and gradient as the unpadded computation, less padding."""
import pytest
import torch

from ursa.config import get_config
from ursa.data import Batch, DataError, ExampleSet, PRMExamples, length_groups, next_token_loss
from ursa.model import URSAModel, init_weights

IMG, N_IMG = 3, 4          # the micro preset's <|image|> id and positions per image


def _model(seed=0):
    torch.manual_seed(seed)
    return init_weights(URSAModel(get_config("micro")), std=0.2, seed=seed)


def _examples(lengths, seed=0) -> ExampleSet:
    """One image (4 positions after 2 text tokens) per example, random text, loss on the second half."""
    g = torch.Generator().manual_seed(seed)
    ids, masks = [], []
    for n in lengths:
        row = torch.randint(4, 64, (n,), generator=g)
        row[2:2 + N_IMG] = IMG
        m = torch.zeros(n, dtype=torch.long)
        m[n // 2:] = 1
        ids.append(row)
        masks.append(m)
    imgs = (torch.rand(len(lengths), 3, 16, 16, generator=g) * 255).round().to(torch.uint8)
    return ExampleSet(ids, masks, imgs)


def _loss_and_grads(model, micro_batches, n_targets):
    """Accumulate next_token_loss over the micro-batches, normalised by the step's n_targets."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for mb in micro_batches:
        out = model(mb.input_ids, mb.pixel_values, attention_mask=mb.attention_mask)
        loss, _ = next_token_loss(out.logits, mb.input_ids, mb.loss_mask, num_targets=n_targets)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_length_groups_by_hand():
    lengths = [5, 9, 3, 9, 7]
    # longest first, ties by index: 1, 3, 4, 0, 2
    assert length_groups(lengths, 2) == [([1, 3], 9), ([4, 0], 7), ([2], 3)]
    # 16 positions: 2 x 9 > 16 splits the nines; 2 x 7 = 14 fits; the row cap (2) closes [4, 0]
    assert length_groups(lengths, 2, max_tokens=16) == [([1], 9), ([3], 9), ([4, 0], 7), ([2], 3)]
    # a row longer than the budget still gets a group of its own
    assert length_groups([30, 2, 2], 8, max_tokens=10) == [([0], 30), ([1, 2], 2)]
    with pytest.raises(DataError, match="max_rows must be >= 1"):
        length_groups(lengths, 0)


def test_buckets_give_the_unpadded_loss_and_gradient():
    lengths = [9, 21, 12, 30, 10, 25, 14, 8]
    data, model = _examples(lengths), _model(1)
    idx = list(range(len(lengths)))
    full = data.batch(idx, pad_id=0)
    n = full.num_targets()
    # the reference: every example alone, without any padding
    alone = [data.batch([i], pad_id=0) for i in idx]
    assert all(b.input_ids.shape[1] == lengths[i] for i, b in enumerate(alone))
    ref_loss, ref_grads = _loss_and_grads(model, alone, n)
    for micro in (full.split(3), data.buckets(idx, 0, 3), full.buckets(8, max_tokens=60), full.buckets(1)):
        loss, grads = _loss_and_grads(model, micro, n)
        assert abs(loss - ref_loss) < 1e-6
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=1e-6, msg=k)


def test_buckets_pad_only_to_their_own_longest_row_and_keep_rows_whole():
    lengths = [9, 21, 12, 30, 10, 25, 14, 8]
    full = _examples(lengths).batch(list(range(8)), pad_id=0)
    mbs = full.buckets(3)
    assert [mb.input_ids.shape for mb in mbs] == [(3, 30), (3, 14), (2, 9)]
    assert sum(mb.num_positions() for mb in mbs) == 3 * 30 + 3 * 14 + 2 * 9 < sum(
        mb.num_positions() for mb in full.split(3))
    assert sum(mb.num_tokens() for mb in mbs) == full.num_tokens() == sum(lengths)
    assert sum(mb.num_targets() for mb in mbs) == full.num_targets()
    # row 3 (30 tokens) leads the first bucket, with its own image and loss mask
    torch.testing.assert_close(mbs[0].input_ids[0], full.input_ids[3])
    torch.testing.assert_close(mbs[0].pixel_values[0], full.pixel_values[3])
    torch.testing.assert_close(mbs[0].loss_mask[0], full.loss_mask[3])
    # a budget of 60 positions over 30 25 21 14 12 10 9 8: 30 + 25 (2 x 30 = 60), 21 + 14 (a third
    # row would make 3 x 21 = 63), then 12 10 9 8 (4 x 12 = 48)
    assert [mb.input_ids.shape for mb in full.buckets(8, max_tokens=60)] == [(2, 30), (2, 21), (4, 12)]


def test_left_padded_batch_is_refused():
    b = Batch(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 1]]))
    with pytest.raises(DataError, match="not right-padded"):
        b.buckets(4)


def test_prm_buckets_keep_every_tag_with_its_label():
    ex = PRMExamples.__new__(PRMExamples)                    # the encoded fields, without files
    lengths = [12, 7, 15, 9]
    ex.ids = [torch.full((n,), 10 + r) for r, n in enumerate(lengths)]   # row r holds only 10 + r
    ex.pos = [[3, 11], [6], [2, 8, 14], [4, 8]]
    ex.labels = [[1, 0], [1], [0, 1, 1], [1, 1]]
    ex.images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    ex.images[:, 0, 0, 0] = torch.tensor([10, 20, 30, 40], dtype=torch.uint8)   # tell the rows apart
    triples = ex.buckets([0, 1, 2, 3], pad_id=0, max_rows=2)
    got = set()
    for b, lab, mask in triples:
        assert lab.shape == mask.shape == b.input_ids.shape
        assert b.input_ids.shape[1] == int(b.attention_mask.sum(1).max())
        for r in range(b.input_ids.shape[0]):
            row = int(b.input_ids[r, 0]) - 10
            assert int(b.attention_mask[r].sum()) == lengths[row]
            assert round(float(b.pixel_values[r, 0, 0, 0]) * 255) == 10 * (row + 1)     # its own image
            for p in mask[r].nonzero().flatten().tolist():
                got.add((row, p, int(lab[r, p])))
    want = {(r, p, y) for r in range(4) for p, y in zip(ex.pos[r], ex.labels[r])}
    assert got == want
