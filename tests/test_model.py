"""The VLM: image merge, generation (batched == alone, log-probs, per-row stop), checkpoints (strict,
streamed, NaN / truncation / pickle refused, config.json checked, kill-safe), the seeded value head,
loss mask."""
import json
import pickle

import pytest
import torch

from ursa.config import ModelConfig, get_config
from ursa.data import next_token_loss
from ursa.generate import generate
from ursa.model import VALUE_HEAD_STD, URSAModel, init_value_head, init_weights, value_head_tensors
from ursa.tokenizer import Tokenizer, train_toy_tokenizer
from ursa.weights import CheckpointError, load_model, read_config, save_model, save_state_dict


def _model(seed=0, value_head=False):
    cfg = get_config("micro")
    cfg.value_head = value_head
    torch.manual_seed(seed)
    m = init_weights(URSAModel(cfg), std=0.2, seed=seed).eval()
    return m


IMG = 3  # micro preset image_token_id; 4 positions per image


def _prompt(n_text_before, n_text_after, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(4, 64, (n_text_before,), generator=g).tolist()
    b = torch.randint(4, 64, (n_text_after,), generator=g).tolist()
    return a + [IMG] * 4 + b


def test_image_rows_land_on_placeholder_positions():
    m = _model()
    ids = torch.tensor([_prompt(3, 5, 0)])
    px = torch.rand(1, 3, 16, 16)
    emb = m.embed(ids, px)
    feats = m.image_features(px)[0]                                            # [4, H]
    torch.testing.assert_close(emb[0, 3:7], feats)
    torch.testing.assert_close(emb[0, :3], m.language_model.model.embed_tokens(ids[0, :3]))
    torch.testing.assert_close(emb[0, 7:], m.language_model.model.embed_tokens(ids[0, 7:]))
    # other pixels change the image rows and later text, never the text before the image
    out1 = m(ids, px).logits
    out2 = m(ids, torch.rand(1, 3, 16, 16)).logits
    torch.testing.assert_close(out1[0, :3], out2[0, :3], atol=0, rtol=0)
    assert (out1[0, 3:] - out2[0, 3:]).abs().max() > 1e-4


def test_image_count_mismatch_is_an_error():
    m = _model()
    ids = torch.tensor([_prompt(2, 2, 0)])
    with pytest.raises(ValueError, match="4 <|image|> positions but 2 image"):
        m(ids, torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"pixel_values must be \[n_images, 3, 16, 16\]"):
        m(ids, torch.rand(1, 3, 20, 20))


def test_batched_left_padded_greedy_equals_alone():
    m = _model(1)
    prompts = [_prompt(2, 3, 1), _prompt(5, 6, 2), _prompt(1, 1, 3)]
    px = torch.rand(3, 3, 16, 16)
    batched = generate(m, prompts, px, max_new_tokens=8, temperature=0, stop_ids=[], pad_id=0)
    for i, p in enumerate(prompts):
        alone = generate(m, [p], px[i:i + 1], max_new_tokens=8, temperature=0, stop_ids=[], pad_id=0)
        assert batched.row(i) == alone.row(0)
        torch.testing.assert_close(batched.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=1e-5)


def test_logprobs_equal_fresh_forward_at_temperature():
    m = _model(2)
    prompts = [_prompt(2, 3, 4), _prompt(4, 2, 5)]
    px = torch.rand(2, 3, 16, 16)
    T = 0.7
    g = torch.Generator().manual_seed(0)
    out = generate(m, prompts, px, num_samples=3, max_new_tokens=6, temperature=T, stop_ids=[],
                   pad_id=0, generator=g)
    for r in range(6):
        b = int(out.prompt_index[r])
        full = torch.tensor([prompts[b] + out.row(r)])
        logits = m(full, px[b:b + 1]).logits[0]                                # [L, V]
        logits[:, IMG] = float("-inf")                                         # never sampled
        P = len(prompts[b])
        # logits at position P-1+t predict new token t (the off-by-one this test guards)
        want = torch.log_softmax(logits[P - 1:P - 1 + 6] / T, -1).gather(-1, torch.tensor(out.row(r))[:, None])[:, 0]
        torch.testing.assert_close(out.logprobs[r], want, atol=1e-5, rtol=1e-5)


def test_rows_stop_on_their_own():
    m = _model(3)
    prompts = [_prompt(2, 3, 6), _prompt(4, 2, 7)]
    px = torch.rand(2, 3, 16, 16)
    free = generate(m, prompts, px, max_new_tokens=10, temperature=0, stop_ids=[], pad_id=0)
    # choose as stop id the 3rd token of row 0: row 0 must stop there, row 1 must run on unless it
    # produces that token too
    r0 = free.row(0)
    k = next(i for i in range(1, 10) if r0[i] not in r0[:i])
    stop = r0[k]
    out = generate(m, prompts, px, max_new_tokens=10, temperature=0, stop_ids=[stop], pad_id=0)
    assert out.row(0) == r0[:k + 1] and out.stop_reason[0] == "stop"
    assert out.tokens[0, k + 1:].eq(0).all() and out.logprobs[0, k + 1:].eq(0).all()
    r1 = free.row(1)
    cut = r1.index(stop) + 1 if stop in r1 else 10
    assert out.row(1) == r1[:cut]
    assert out.stop_reason[1] == ("stop" if stop in r1 else "length")


def test_save_load_identical_logits(tmp_path):
    m = _model(4, value_head=True)
    save_model(m, tmp_path / "ck")
    m2 = load_model(tmp_path / "ck").eval()
    ids = torch.tensor([_prompt(2, 3, 8)])
    px = torch.rand(1, 3, 16, 16)
    a, b = m(ids, px, values=True), m2(ids, px, values=True)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=0, rtol=0)
    assert not (tmp_path / "ck.tmp").exists()


def test_sharded_save_roundtrip(tmp_path):
    m = _model(5)
    save_model(m, tmp_path / "ck", max_shard_bytes=20_000)
    assert (tmp_path / "ck" / "model.safetensors.index.json").exists()
    m2 = load_model(tmp_path / "ck")
    for (n, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n


def _write_with(tmp_path, mutate):
    m = _model(6)
    save_model(m, tmp_path / "ck")
    sd = dict(m.state_dict())
    mutate(sd)
    (tmp_path / "ck" / "model.safetensors").unlink()
    save_state_dict(sd, tmp_path / "ck")
    return tmp_path / "ck"


def test_missing_extra_misshaped_tensors_are_named(tmp_path):
    d = _write_with(tmp_path / "a", lambda sd: sd.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\): language_model.model.layers.1.mlp.up_proj.weight"):
        load_model(d)
    d = _write_with(tmp_path / "b", lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: has 1 tensor\(s\) the model does not use: extra.weight"):
        load_model(d)
    # both at once: one line names the missing and the unused tensors
    d = _write_with(tmp_path / "m", lambda sd: sd.__setitem__("extra.weight", sd.pop("aligner.layers.0.bias")))
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert str(e.value) == (f"{d}: lacks 1 tensor(s): aligner.layers.0.bias; {d / 'model.safetensors'}: "
                            f"has 1 tensor(s) the model does not use: extra.weight")
    d = _write_with(tmp_path / "c", lambda sd: sd.__setitem__("aligner.layers.0.bias", torch.zeros(5)))
    with pytest.raises(CheckpointError, match=r"shape mismatch: aligner.layers.0.bias \[5\] \(model: \[32\]\)"):
        load_model(d)


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    m = _model(7)
    save_model(m, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["ursa_config"]["lm"]["num_layers"] = 3
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lacks .*language_model.model.layers.2"):
        load_model(tmp_path / "ck")


def test_non_finite_tensor_is_refused_naming_tensor_and_file(tmp_path):
    name = "language_model.model.layers.1.mlp.up_proj.weight"

    def poison(value):
        def f(sd):
            sd[name] = sd[name].clone()
            sd[name][3, 5] = value
        return f

    for i, bad in enumerate((float("nan"), float("inf"))):
        d = _write_with(tmp_path / str(i), poison(bad))
        with pytest.raises(CheckpointError) as e:
            load_model(d)
        assert str(e.value) == f"{d / 'model.safetensors'}: {name} has NaN/inf values"
    # finite in the file but not in the requested dtype: float16 tops out at 65504
    d = _write_with(tmp_path / "big", poison(1e6))
    assert load_model(d).state_dict()[name][3, 5].item() == 1e6
    with pytest.raises(CheckpointError, match=f"{name} overflows torch.float16"):
        load_model(d, dtype=torch.float16)


class _Marker:
    """Unpickling this object would create a folder: the test checks that nothing unpickles."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os
        return (os.mkdir, (self.path,))


def test_truncated_corrupt_or_pickled_file_is_one_line_naming_it(tmp_path):
    d = _write_with(tmp_path / "cut", lambda sd: None)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])                        # killed while copying
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert str(e.value).startswith(f"{f}: truncated or not a safetensors file (") and "\n" not in str(e.value)
    f.write_bytes(b"")                                            # empty
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_model(d)
    marker = tmp_path / "unpickled"
    f.write_bytes(pickle.dumps({"w": _Marker(marker)}))          # a pickle named .safetensors
    with pytest.raises(CheckpointError, match=f"{f}: truncated or not a safetensors file"):
        load_model(d)
    assert not marker.exists()
    # a truncated shard of a sharded directory is named too
    m = _model(6)
    save_model(m, tmp_path / "sh", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "sh").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=f"{shard}: truncated or not a safetensors file"):
        load_model(tmp_path / "sh")


def _edit_config(tmp_path, edit):
    m = _model(7)
    d = tmp_path / "ck"
    save_model(m, d)
    raw = json.loads((d / "config.json").read_text())
    edit(raw["ursa_config"])
    (d / "config.json").write_text(json.dumps(raw))
    return d, d / "config.json"


def test_inconsistent_config_json_names_file_and_field(tmp_path):
    d, p = _edit_config(tmp_path / "a", lambda c: c["lm"].__setitem__("hiden_size", 3))
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert str(e.value) == f"{p}: ursa_config.lm: unknown field(s) ['hiden_size'] for LMConfig"
    d, p = _edit_config(tmp_path / "b", lambda c: c["lm"].__setitem__("num_layers", "2"))
    with pytest.raises(CheckpointError) as e:
        read_config(d)
    assert str(e.value) == f"{p}: ursa_config.lm.num_layers must be an integer, got '2'"
    d, p = _edit_config(tmp_path / "c", lambda c: c.__setitem__("value_head", "yes"))
    with pytest.raises(CheckpointError, match=r"ursa_config.value_head must be true or false, got 'yes'"):
        read_config(d)
    d, p = _edit_config(tmp_path / "d", lambda c: c["vision"]["siglip"].__setitem__("image_mean", [0.5, "x", 0.5]))
    with pytest.raises(CheckpointError, match=r"ursa_config.vision.siglip.image_mean must be a list of numbers"):
        read_config(d)
    d, p = _edit_config(tmp_path / "e", lambda c: c["lm"].__setitem__("hidden_size", 30))
    with pytest.raises(CheckpointError) as e:
        read_config(d)
    assert str(e.value).startswith(f"{p}: ursa_config.lm: hidden_size 30 / num_heads 4")
    # an integer where a float is expected is the same number
    d, p = _edit_config(tmp_path / "f", lambda c: c["lm"].__setitem__("rope_theta", 10000))
    cfg = read_config(d)
    assert isinstance(cfg.lm.rope_theta, float) and cfg.lm.rope_theta == 10000.0


def test_a_kill_during_the_folder_swap_is_recovered_on_load(tmp_path):
    m = _model(8)
    d = tmp_path / "ck"
    save_model(m, d)
    d.rename(tmp_path / "ck.old")                  # killed between "final -> old" and "tmp -> final"
    (tmp_path / "ck.tmp").mkdir()
    (tmp_path / "ck.tmp" / "config.json").write_text("{")                   # half-written new one
    m2 = load_model(d)
    assert d.is_dir() and not (tmp_path / "ck.old").exists() and not (tmp_path / "ck.tmp").exists()
    for n, t in m.state_dict().items():
        assert torch.equal(m2.state_dict()[n], t), n


def test_fresh_value_head_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    policy = _model(9)
    save_model(policy, tmp_path / "sft")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = load_model(tmp_path / "sft", value_head=True)
    b = load_model(tmp_path / "sft", value_head=True)
    assert torch.equal(torch.get_rng_state(), state)          # the load drew nothing from it
    H = policy.cfg.lm.hidden_size
    # by hand: Normal(0, 0.02) from a generator seeded with 0, bias 0
    want = torch.randn((1, H), generator=torch.Generator().manual_seed(0)) * 0.02
    assert VALUE_HEAD_STD == 0.02
    for m in (a, b):
        assert torch.equal(m.score.weight, want) and torch.equal(m.score.bias, torch.zeros(1))
    w1, b1 = value_head_tensors(H, seed=1)
    c = load_model(tmp_path / "sft", value_head=True, head_seed=1)
    assert torch.equal(c.score.weight, w1) and not torch.equal(w1, want) and torch.equal(b1, torch.zeros(1))
    for n, t in policy.state_dict().items():                  # the rest is the policy's
        assert torch.equal(a.state_dict()[n], t), n
    bf = load_model(tmp_path / "sft", dtype=torch.bfloat16, value_head=True)
    assert torch.equal(bf.score.weight, want.bfloat16())
    with pytest.raises(ValueError, match="no value head"):
        init_value_head(policy)
    with pytest.raises(CheckpointError, match="has a value head; load it with value_head=True"):
        save_model(a, tmp_path / "prm")
        load_model(tmp_path / "prm", value_head=False)


def test_unknown_preset_and_config_field():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_config("nope")
    d = get_config("micro").to_dict()
    d["lm"]["hiden_size"] = 3
    with pytest.raises(ValueError, match=r"config.lm: unknown field\(s\) \['hiden_size'\]"):
        ModelConfig.from_dict(d)


def test_loss_mask_covers_exactly_assistant_tokens():
    tok = train_toy_tokenizer(["Step 1: 2 + 3 = 5.\n\n†Answer: 5", "How many?"] * 50, vocab_size=280)
    ids, mask = tok.encode_conversation("How many?", "Step 1: 2 + 3 = 5.\n\n†Answer: 5", num_image_tokens=4)
    prompt = tok.encode(tok.chat_prompt("How many?"))
    answer = tok.encode("Step 1: 2 + 3 = 5.\n\n†Answer: 5")
    n_prompt = len(prompt) + 3            # the one <|image|> became 4
    assert mask == [0] * n_prompt + [1] * (len(answer) + 1)
    assert ids[len(mask) - 1] == tok.im_end_id and ids.count(tok.image_id) == 4
    assert tok.decode([i for i, k in zip(ids, mask) if k], skip_special=False) == \
        "Step 1: 2 + 3 = 5.\n\n†Answer: 5<|im_end|>"
    # the step tag is one token, and the pad id differs from the turn's end id
    assert len(tok.encode(" и")) == 1 and tok.pad_id != tok.im_end_id


def test_tokenizer_without_special_tokens_is_rejected(tmp_path):
    from tokenizers import Tokenizer as HF, models
    t = HF(models.BPE())
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="lacks the special token"):
        Tokenizer.from_file(tmp_path)


def test_next_token_loss_hand_computed():
    # vocab 2, one row: ids [0, 1, 1], targets are positions 1 and 2; logits uniform -> log 2 each
    logits = torch.zeros(1, 3, 2)
    logits[0, 1] = torch.tensor([0.0, 1.0])      # predicts token 2 (= 1): -log(e/(1+e))
    loss, m = next_token_loss(logits, torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 1]]))
    import math
    want = (math.log(2) + math.log(1 + math.e) - 1) / 2
    assert abs(loss.item() - want) < 1e-6 and m["tokens"] == 2
    # a global count of 4 halves it
    loss4, _ = next_token_loss(logits, torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 1]]), num_targets=4)
    assert abs(loss4.item() - want / 2) < 1e-6
