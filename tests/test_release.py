"""ursa/release.py and ursa/benchmark_run.py: released-layout loading (strict, sharded, streaming, bf16,
NaN / truncation refused), inspect, tokenizer ids, prompts, <|image|> expansion, URSA-RM-8B readout
under both tag rules, best-of-N, benchmark generation (the Stage I part loaders: tests/test_parity.py).

The checkpoints here are tiny random models in the EXACT released layout: the tiny-hybrid module
tree (its names are the released names, tests/fixtures/ursa8b_weights.tsv), a Hugging Face style
config.json with the official fields, a tokenizer.json whose special tokens are
added at the END of a BPE vocabulary as in Qwen2.5 (so <|image|> is the last id, like 151665), and
safetensors shards with a model.safetensors.index.json.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from ursa import io
from ursa.benchmark_run import best_of_n_with_prm, generation_prompt, run_benchmark
from ursa.benchmarks import rescore
from ursa.config import get_config
from ursa.generate import generate
from ursa.model import URSAModel, init_weights
from ursa.prm import aggregate, insert_tags, released_user_text, response_input, score_responses
from ursa.release import inspect_released, load_released, released_config
from ursa.tokenizer import Tokenizer
from ursa.vision import preprocess
from ursa.weights import INDEX_NAME, CheckpointError, save_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>"]
CORPUS = ["Step 1: There are 3 red circles.\n\nStep 2: 3 * 5 = 15.\n\n†Answer: 15",
          "you are given a math problem image, please solve the problem step by step.",
          "You are given a problem and a step-by-step solution. You need to check the correctness.",
          "Question: What is the total value of the shapes? You are a helpful assistant."] * 20

PAPER_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|image|>"
PAPER_GEN = ("you are given a math problem image, please solve the problem step by step. When you get an "
             "answer, please return the correspond option instead of the text content.\nQuestion:")
PAPER_PRM = ("You are given a problem and a step-by-step solution. You need to check the correctness of "
             "each step.\nQuestion:")
PAPER_END = "<|im_end|>\n<|im_start|>assistant\n"


# ---- fixtures: tiny checkpoints in the released layout ------------------------------------------

def write_tokenizer(path: Path, with_image: bool = True) -> int:
    """A byte-level BPE, then ' и' and the special tokens appended (Qwen-like: specials last).
    Returns the base vocabulary size: ' и' = base, <|endoftext|> = base + 1, ... <|image|> = base + 4."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    base = tok.get_vocab_size()
    tok.add_tokens([AddedToken(" и", normalized=False, special=False)])
    tok.add_special_tokens(SPECIALS if with_image else SPECIALS[:3])
    tok.save(str(path))
    return base


def tiny_cfg(image_id: int, rm: bool):
    cfg = get_config("tiny-hybrid")
    cfg.lm.vocab_size, cfg.image_token_id, cfg.value_head = VOCAB, image_id, rm
    return cfg


def hf_config(cfg, rm: bool) -> dict:
    """The official config.json fields (URSA-MATH/URSA-MATH configs/ursa.py), at the tiny sizes."""
    sam, sig, lm = cfg.vision.sam, cfg.vision.siglip, cfg.lm
    return {
        "architectures": ["UrsaForTokenClassification" if rm else "UrsaForConditionalGeneration"],
        "model_type": "ursa", "image_token_index": cfg.image_token_id, "torch_dtype": "float32",
        "vision_config": {"cls": "HybridVisionTower", "params": {
            "concat_type": "tuple",
            "high_res_cfg": {"ckpt_path": "", "image_size": sam.image_size, "model_name": "sam_b_downsample",
                             "output_dim": sam.downsample_dims[-1], "pixel_mean": list(sam.image_mean),
                             "pixel_std": list(sam.image_std), "select_feature": "same", "select_layer": -1},
            "low_res_cfg": {"ckpt_path": "", "image_size": sig.image_size,
                            "model_name": "siglip_large_patch16_384", "output_dim": sig.hidden_size,
                            "pixel_mean": [0.5, 0.5, 0.5], "pixel_std": [0.5, 0.5, 0.5],
                            "select_feature": "same", "select_layer": -1}}},
        "aligner_config": {"cls": "MlpProjector", "params": {
            "depth": 2, "input_dim": sig.hidden_size, "n_embed": lm.hidden_size,
            "projector_type": "low_high_hybrid_split_mlp_gelu"}},
        "text_config": {"model_type": "qwen2", "hidden_size": lm.hidden_size,
                        "intermediate_size": lm.intermediate_size, "num_hidden_layers": lm.num_layers,
                        "num_attention_heads": lm.num_heads, "num_key_value_heads": lm.num_kv_heads,
                        "vocab_size": lm.vocab_size, "rms_norm_eps": lm.rms_norm_eps,
                        "rope_theta": lm.rope_theta, "max_position_embeddings": lm.max_position_embeddings,
                        "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False}}


def random_model(cfg, seed: int) -> URSAModel:
    torch.manual_seed(seed)
    m = init_weights(URSAModel(cfg), std=0.2, seed=seed).eval()
    with torch.no_grad():
        m.vision_model.vision_tower_high.vision_tower.hd_alpha_downsamples.fill_(0.7)  # HD path on
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return m


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    out = {}
    for name, rm, seed in (("policy", False, 0), ("rm", True, 1)):
        d = root / name
        d.mkdir()
        base = write_tokenizer(d / "tokenizer.json")
        cfg = tiny_cfg(base + 4, rm)
        m = random_model(cfg, seed)
        save_state_dict(m.state_dict(), d, max_shard_bytes=160_000)
        (d / "config.json").write_text(json.dumps(hf_config(cfg, rm), indent=1))
        out[name] = (d, m, base)
    return out


def image(seed: int, size=(40, 28)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def copy_model(m):
    import copy as _copy
    return _copy.deepcopy(m)


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def copy(d: Path, tmp_path: Path) -> Path:
    dst = tmp_path / d.name
    shutil.copytree(d, dst)
    return dst


# ---- config.json -> the released numbers ------------------------------------------------------------

def _tsv(path):
    rows = [l.split("\t") for l in Path(path).read_text().splitlines() if l.strip()]
    return {r[0]: tuple(int(x) for x in r[1].split("x")) for r in rows}


def test_config_fallbacks_build_exactly_the_released_tensors():
    cfg, notes, idx = released_config({}, has_score=False)
    assert idx is None and any("text_config absent" in n for n in notes)
    assert (cfg.lm.hidden_size, cfg.lm.num_layers, cfg.lm.vocab_size, cfg.vision.num_tokens) == (3584, 28, 152064, 576)
    with torch.device("meta"):
        sd = {n: tuple(t.shape) for n, t in URSAModel(cfg).state_dict().items()}
    want = _tsv(FIXTURES / "ursa8b_weights.tsv")
    assert sd == want and len(sd) == 841
    assert sum(torch.Size(s).numel() for s in sd.values()) == 8_044_783_361
    rm, _, _ = released_config({}, has_score=True)
    with torch.device("meta"):
        sd_rm = {n: tuple(t.shape) for n, t in URSAModel(rm).state_dict().items()}
    assert sd_rm == {**want, "score.weight": (1, 3584), "score.bias": (1,)}


def test_config_fields_are_read_and_checked(ckpts):
    d, m, base = ckpts["policy"]
    raw = json.loads((d / "config.json").read_text())
    raw["text_config"]["num_hidden_layers"] = 3
    raw["text_config"]["rope_theta"] = 5e5
    cfg, notes, idx = released_config(raw, False, preset="tiny-hybrid")
    assert notes == [] and idx == base + 4
    assert (cfg.lm.num_layers, cfg.lm.rope_theta, cfg.lm.vocab_size) == (3, 5e5, VOCAB)
    raw["aligner_config"]["params"]["depth"] = 3
    with pytest.raises(CheckpointError) as e:
        released_config(raw, False, preset="tiny-hybrid", where="X/config.json")
    assert "X/config.json: aligner_config.params.depth is 3" in one_line(e)
    raw["aligner_config"]["params"]["depth"] = 2
    raw["vision_config"]["params"]["low_res_cfg"]["model_name"] = "siglip_so400m_patch14_384"
    with pytest.raises(CheckpointError, match="low_res_cfg.model_name 'siglip_so400m_patch14_384' is not supported"):
        released_config(raw, False, preset="tiny-hybrid")


# ---- strict sharded loading ------------------------------------------------------------------------

def _inputs(tok, cfg, seed=0):
    ids = tok.encode_prompt("Question: What is the total value?", image=True,
                            num_image_tokens=cfg.vision.num_tokens, assistant_prefix="Step 1: There are")
    return torch.tensor([ids]), preprocess(image(seed), cfg.vision)[None]


def test_sharded_fp32_load_round_trips_and_bf16_is_close(ckpts):
    d, ref, base = ckpts["policy"]
    index = json.loads((d / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) >= 2 and len(index["weight_map"]) == len(ref.state_dict())
    m, tok = load_released(d, dtype=torch.float32, preset="tiny-hybrid")
    assert m.release_info["kind"] == "policy" and m.release_info["fallbacks"] == []
    assert not m.cfg.value_head and not hasattr(m, "score")
    for n, t in ref.state_dict().items():
        assert torch.equal(m.state_dict()[n], t), n
    ids, px = _inputs(tok, m.cfg)
    with torch.no_grad():
        want = ref(ids, px).logits
        got = m(ids, px).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        mb, _ = load_released(d, dtype=torch.bfloat16, preset="tiny-hybrid")
        assert all(p.dtype == torch.bfloat16 for p in mb.parameters())
        lb = mb(ids, px.bfloat16()).logits
        # exactly the in-memory model rounded to bf16 (the file is fp32; the cast happens while streaming)
        torch.testing.assert_close(lb, copy_model(ref).bfloat16()(ids, px.bfloat16()).logits, rtol=0, atol=0)
    # and within bf16 tolerance of fp32: 8 mantissa bits (~0.4% per rounding), compounded over the
    # random tiny model's SAM branch and LM; the text before the image sees only the LM
    err = (lb.float() - want).abs()
    assert err.max() <= 0.25 * want.abs().max() and err.mean() <= 0.05 * want.abs().mean()
    assert err[0, :5].max() <= 0.02 * want[0, :5].abs().max()


def test_rm_detected_by_score_weight(ckpts):
    d, ref, _ = ckpts["rm"]
    m, tok = load_released(d, dtype=torch.float32, preset="tiny-hybrid")
    assert m.cfg.value_head and m.release_info["kind"] == "prm"
    ids, px = _inputs(tok, m.cfg, 1)
    with torch.no_grad():
        torch.testing.assert_close(m(ids, px, values=True).values, ref(ids, px, values=True).values,
                                   rtol=0, atol=1e-6)
    policy, ptok = load_released(ckpts["policy"][0], dtype=torch.float32, preset="tiny-hybrid")
    for rule in ("strict", "released"):
        with pytest.raises(ValueError, match="no value head"):
            score_responses(policy, ptok, ["q"], ["Step 1: a.\n\n†Answer: 1"], rule=rule)


def test_added_token_ids_are_found(ckpts):
    d, m, base = ckpts["policy"]
    model, tok = load_released(d, dtype=torch.float32, preset="tiny-hybrid")
    assert (tok.tag_id, tok.pad_id, tok.im_start_id, tok.im_end_id, tok.image_id) == \
        (base, base + 1, base + 2, base + 3, base + 4)
    assert model.cfg.image_token_id == tok.image_id == base + 4


# ---- errors: one line, naming the file ------------------------------------------------------------

def test_missing_shard_is_an_error_naming_it(ckpts, tmp_path):
    d = copy(ckpts["policy"][0], tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        load_released(d, preset="tiny-hybrid")
    assert f"{shard}: missing shard" in one_line(e)


def test_index_naming_a_missing_tensor_is_an_error(ckpts, tmp_path):
    d = copy(ckpts["policy"][0], tmp_path)
    index = json.loads((d / INDEX_NAME).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["language_model.model.layers.9.mlp.up_proj.weight"] = first
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_released(d, preset="tiny-hybrid")
    msg = one_line(e)
    assert str(d / INDEX_NAME) in msg and "language_model.model.layers.9.mlp.up_proj.weight" in msg and first in msg


def test_unused_and_missing_and_misshaped_tensors_are_errors(ckpts, tmp_path):
    d = copy(ckpts["policy"][0], tmp_path)
    extra = d / "model-extra.safetensors"
    save_file({"language_model.model.bogus.weight": torch.zeros(2)}, str(extra), metadata={"format": "pt"})
    index = json.loads((d / INDEX_NAME).read_text())
    index["weight_map"]["language_model.model.bogus.weight"] = extra.name
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_released(d, preset="tiny-hybrid")
    assert f"{extra}: has 1 tensor(s) the model does not use: language_model.model.bogus.weight" in one_line(e)
    # a config that disagrees with the file's shapes
    d2 = copy(ckpts["rm"][0], tmp_path / "b")
    raw = json.loads((d2 / "config.json").read_text())
    raw["text_config"]["intermediate_size"] = 100
    (d2 / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as e:
        load_released(d2, preset="tiny-hybrid")
    msg = one_line(e)
    assert msg.startswith(f"{d2}: shape mismatch")
    assert "language_model.model.layers.0.mlp.gate_proj.weight [96, 48]" in msg
    # a file that lacks a tensor
    d3 = copy(ckpts["policy"][0], tmp_path / "c")
    index = json.loads((d3 / INDEX_NAME).read_text())
    shard = d3 / index["weight_map"]["aligner.layers.1.bias"]
    from safetensors.torch import load_file
    sd = load_file(str(shard))
    del sd["aligner.layers.1.bias"]
    save_file(sd, str(shard), metadata={"format": "pt"})
    del index["weight_map"]["aligner.layers.1.bias"]
    (d3 / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_released(d3, preset="tiny-hybrid")
    assert f"{d3}: lacks 1 tensor(s): aligner.layers.1.bias" in one_line(e)


def test_tokenizer_without_image_token_is_an_error(ckpts, tmp_path):
    d = copy(ckpts["policy"][0], tmp_path)
    write_tokenizer(d / "tokenizer.json", with_image=False)
    with pytest.raises(ValueError) as e:
        load_released(d, preset="tiny-hybrid")
    msg = one_line(e)
    assert str(d / "tokenizer.json") in msg and "<|image|>" in msg


def test_nan_or_truncated_shard_is_an_error_naming_it(ckpts, tmp_path):
    from safetensors.torch import load_file
    d = copy(ckpts["policy"][0], tmp_path)
    index = json.loads((d / INDEX_NAME).read_text())
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    shard = d / index["weight_map"][name]
    sd = load_file(str(shard))
    sd[name][0, 0] = float("nan")
    save_file(sd, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_released(d, dtype=torch.float32, preset="tiny-hybrid")
    assert one_line(e) == f"{shard}: {name} has NaN/inf values"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError) as e:
        load_released(d, preset="tiny-hybrid")
    assert one_line(e).startswith(f"{shard}: truncated or not a safetensors file (")


def test_inspect_is_one_paragraph_with_kind_count_and_fallbacks(ckpts, tmp_path):
    d, m, _ = ckpts["rm"]
    text = inspect_released(d, preset="tiny-hybrid")
    n_files = len(set(json.loads((d / INDEX_NAME).read_text())["weight_map"].values()))
    assert "\n" not in text and text.startswith(f"{d}: prm (URSA-RM-8B layout")
    assert f"{m.num_params():,} parameters in {n_files} safetensors file(s)" in text
    assert text.endswith("No field fell back to the preset.")
    d2 = copy(ckpts["policy"][0], tmp_path)
    raw = json.loads((d2 / "config.json").read_text())
    del raw["text_config"]["rope_theta"]
    (d2 / "config.json").write_text(json.dumps(raw))
    text = inspect_released(d2, preset="tiny-hybrid")
    assert text.startswith(f"{d2}: policy (URSA-8B layout)")
    assert text.endswith("Fallbacks to preset tiny-hybrid: text_config.rope_theta absent: preset tiny-hybrid "
                         "value 10000.0.")


# ---- prompts and the <|image|> expansion ------------------------------------------------------------

def test_prompts_equal_the_paper_templates():
    rec = {"question": "What is x?", "image": "a.png", "choices": None}
    assert generation_prompt("mathvista", rec) == PAPER_SYSTEM + PAPER_GEN + "What is x?" + PAPER_END
    resp = "Step 1: a = 2.\n\nStep 2: x = 4.\n\n†Answer: 4"
    tagged = "Step 1: a = 2. и\n\nStep 2: x = 4. и\n\n†Answer: 4"
    # the released scorer's user turn: PROMPT + question + "\n" + response, then its tag rule
    assert Tokenizer.chat_prompt(released_user_text("Find x.", resp)) == \
        PAPER_SYSTEM + PAPER_PRM + "Find x.\n" + tagged + PAPER_END
    assert insert_tags(resp) == tagged                           # strict agrees on this canonical one


def test_image_placeholder_expands_to_the_tower_token_count(ckpts):
    _, _, base = ckpts["policy"]
    tok = Tokenizer.from_file(ckpts["policy"][0] / "tokenizer.json")
    resp = "Step 1: a.\n\nStep 2: b.\n\n†Answer: 1"
    plain = tok.encode(Tokenizer.chat_prompt(released_user_text("Find и x", resp)))   # one <|image|>
    k = plain.index(tok.image_id)
    tags = [i for i, t in enumerate(plain) if t == tok.tag_id]
    assert len(tags) == 3 and tags[0] > k                        # one in the question, two in the solution
    for cfg, n in ((tiny_cfg(base + 4, True), 16), (get_config("ursa-rm-8b"), 576)):
        assert cfg.vision.num_tokens == n
        for rule, read in (("released", tags), ("strict", tags[1:])):   # strict skips the question's tag
            ids, pos = response_input(tok, "Find и x", resp, cfg.vision.num_tokens, rule=rule)
            assert ids == plain[:k] + [tok.image_id] * n + plain[k + 1:]
            assert pos == [t + n - 1 for t in read]


# ---- URSA-RM-8B readout --------------------------------------------------------------------------------

def _by_hand(rm, tok, img, text: str) -> list[float]:
    """Independent readout: the literal prompt, tag positions searched by id, the score head on the
    final hidden state."""
    ids = []
    for t in tok.encode(text):
        ids += [t] * 16 if t == tok.image_id else [t]
    pos = [i for i, t in enumerate(ids) if t == tok.tag_id]
    with torch.no_grad():
        h = rm(torch.tensor([ids]), preprocess(img, rm.cfg.vision)[None], logits=False).hidden[0]
        return torch.sigmoid(h[pos] @ rm.score.weight[0] + rm.score.bias[0]).tolist()


def test_prm_scores_are_read_at_the_tag_tokens(ckpts):
    rm, tok = load_released(ckpts["rm"][0], dtype=torch.float32, preset="tiny-hybrid")
    img = image(3)
    question, resp = "Find и x", "Step 1: There are 3 red circles.\n\nStep 2: 3 * 5 = 15.\n\n†Answer: 15"
    px = preprocess(img, rm.cfg.vision)
    text = (PAPER_SYSTEM + PAPER_PRM + question + "\nStep 1: There are 3 red circles. и\n\n"
            "Step 2: 3 * 5 = 15. и\n\n†Answer: 15" + PAPER_END)
    want = _by_hand(rm, tok, img, text)                          # 3 tags: the question's first
    released = score_responses(rm, tok, [question], [resp], [px], rule="released")[0]
    strict = score_responses(rm, tok, [question], [resp], [px], rule="strict")[0]
    assert len(want) == 3 and released == pytest.approx(want, abs=1e-6)
    assert strict == pytest.approx(want[1:], abs=1e-6)
    # read AT the tags: text after the last tag (the answer) cannot change any score
    other = resp.replace("†Answer: 15", "†Answer: 99")
    assert score_responses(rm, tok, [question], [other], [px], rule="released")[0] == pytest.approx(released, abs=1e-6)
    # no "Step" at all: strict tags before the answer, released after it (the answer is then read)
    plain = "It is 15.\n\n†Answer: 15"
    r0 = score_responses(rm, tok, ["Q"], [plain], [px], rule="released")[0]
    assert r0 == pytest.approx(_by_hand(rm, tok, img, PAPER_SYSTEM + PAPER_PRM + "Q\n" + plain + " и" + PAPER_END),
                               abs=1e-6)
    s0 = score_responses(rm, tok, ["Q"], [plain], [px], rule="strict")[0]
    assert s0 == pytest.approx(_by_hand(rm, tok, img, PAPER_SYSTEM + PAPER_PRM + "Q\nIt is 15. и\n\n†Answer: 15"
                                        + PAPER_END), abs=1e-6)
    assert len(r0) == len(s0) == 1 and abs(r0[0] - s0[0]) > 1e-6
    # steps but no †Answer: the last step gets no tag; one step only -> no tag -> aggregate 0
    assert score_responses(rm, tok, ["Q"], ["Step 1: There are 3 red circles."], [px], rule="released") == [[]]
    assert aggregate([], "mean") == 0.0


def test_batched_prm_equals_one_by_one(ckpts):
    rm, tok = load_released(ckpts["rm"][0], dtype=torch.float32, preset="tiny-hybrid")
    items = [(image(1), "Find x", "Step 1: 3 * 5 = 15.\n\n†Answer: 15"),
             (None, "What is the total value?", "Step 1: a.\n\nStep 2: b.\n\nStep 3: c.\n\n†Answer: 2"),
             (image(2), "Q", "Step 1: There are 3 red circles.\n\nStep 2: 3.\n\n†Answer: 3")]
    px = [None if im is None else preprocess(im, rm.cfg.vision) for im, _, _ in items]
    qs, rs = [q for _, q, _ in items], [r for _, _, r in items]
    for rule in ("released", "strict"):
        batched = score_responses(rm, tok, qs, rs, px, batch_size=3, rule=rule)
        for i in range(3):
            alone = score_responses(rm, tok, qs[i:i + 1], rs[i:i + 1], px[i:i + 1], rule=rule)[0]
            assert batched[i] == pytest.approx(alone, abs=1e-5)
        assert [len(s) for s in batched] == [1, 3, 2]


# ---- benchmarks: generation, best-of-N, rescore ---------------------------------------------------------

def _mathvista(tmp_path):
    (tmp_path / "images").mkdir()
    recs = []
    for i, q in enumerate(["What is x?", "How many circles are there?", "Find the total.", "What is y?"]):
        name = f"images/{i}.png" if i != 1 else ""
        if name:
            image(10 + i, (30 + 7 * i, 20)).save(tmp_path / name)
        recs.append({"pid": str(i), "question": q, "image": name, "choices": None, "answer": "3",
                     "question_type": "free_form", "answer_type": "integer", "precision": None,
                     "metadata": {"task": "geometry problem solving"}})
    return recs


def test_run_benchmark_prompts_images_and_batching(ckpts, tmp_path):
    model, tok = load_released(ckpts["policy"][0], dtype=torch.float32, preset="tiny-hybrid")
    recs = _mathvista(tmp_path)
    # one batch: three images (records 0, 2, 3) around a text-only record 1
    out = run_benchmark(model, tok, recs, "mathvista", tmp_path, max_new_tokens=6, batch_size=4)
    alone = run_benchmark(model, tok, recs, "mathvista", tmp_path, max_new_tokens=6, batch_size=1)
    assert [o["response"] for o in out] == [a["response"] for a in alone]
    assert len({o["response"] for o in out}) >= 3                 # the rows really differ
    assert all({**r, "response": o["response"]} == o for r, o in zip(recs, out))
    # record 0 by hand: the literal template, its own image
    ids = []
    for t in tok.encode(PAPER_SYSTEM + PAPER_GEN + "What is x?" + PAPER_END):
        ids += [t] * 16 if t == tok.image_id else [t]
    px = preprocess(Image.open(tmp_path / "images/0.png"), model.cfg.vision)[None]
    g = generate(model, [ids], px, max_new_tokens=6, stop_ids=(tok.im_end_id, tok.pad_id), pad_id=tok.pad_id)
    assert out[0]["response"] == tok.decode(g.row(0))
    sampled = run_benchmark(model, tok, recs, "mathvista", tmp_path, n=3, temperature=1.0, max_new_tokens=4)
    assert all(isinstance(o["response"], list) and len(o["response"]) == 3 for o in sampled)
    io.write_jsonl(tmp_path / "resp.jsonl", out)
    assert rescore(str(tmp_path / "resp.jsonl"), "mathvista")["n"] == 4


def test_best_of_n_picks_the_highest_mean_score(ckpts, tmp_path):
    rm, tok = load_released(ckpts["rm"][0], dtype=torch.float32, preset="tiny-hybrid")
    recs = _mathvista(tmp_path)
    cands = [["Step 1: 3 * 5 = 15.\n\n†Answer: 15", "Step 1: a.\n\nStep 2: There are 3.\n\n†Answer: 3",
              "Step 1: b. \n\n†Answer: 3", "no steps at all"] for _ in recs]
    for r, c in zip(recs, cands):
        r["response"] = c
    for rule in ("released", "strict"):
        kw = {} if rule == "released" else {"rule": rule}          # released: the default
        chosen = best_of_n_with_prm(rm, tok, recs, None, "mean", benchmark="mathvista", image_root=tmp_path, **kw)
        for r, o in zip(recs, chosen):
            px = preprocess(Image.open(tmp_path / r["image"]), rm.cfg.vision) if r["image"] else None
            steps = score_responses(rm, tok, [r["question"]] * 4, r["response"], [px] * 4, rule=rule)
            means = [sum(s) / len(s) if s else 0.0 for s in steps]
            assert [len(x) for x in o["prm_step_scores"]] == [len(x) for x in steps]
            assert sum(o["prm_step_scores"], []) == pytest.approx(sum(steps, []), abs=1e-5)
            assert o["prm_aggregate"] == pytest.approx(means, abs=1e-5)
            assert o["response"] == r["response"][max(range(4), key=lambda i: means[i])]
            assert o["candidates"] == r["response"] and o["prm_tag_rule"] == rule and o["prm_how"] == "mean"
        io.write_jsonl(tmp_path / f"bon_{rule}.jsonl", chosen)
        assert rescore(str(tmp_path / f"bon_{rule}.jsonl"), "mathvista")["n"] == 4
    with pytest.raises(ValueError, match="rule must be one of"):
        best_of_n_with_prm(rm, tok, recs, benchmark="mathvista", image_root=tmp_path, rule="paper")


def test_eval_cli_runs_a_released_model_with_prm_best_of_n(ckpts, tmp_path, capsys):
    import eval as ev
    recs = _mathvista(tmp_path)
    (tmp_path / "mv.json").write_text(json.dumps({r["pid"]: r for r in recs}))
    ev.main(["--model", str(ckpts["policy"][0]), "--prm", str(ckpts["rm"][0]), "--n", "2", "--benchmark",
             "mathvista", "--data", str(tmp_path / "mv.json"), "--out", str(tmp_path / "bon.jsonl"),
             "--dtype", "fp32", "--preset", "tiny-hybrid", "--max-new-tokens", "4", "--batch-size", "4"])
    out = [json.loads(l) for l in (tmp_path / "bon.jsonl").read_text().splitlines()]
    assert len(out) == 4 and all(len(o["candidates"]) == 2 and o["response"] in o["candidates"] for o in out)
    printed = capsys.readouterr().out
    assert "mathvista" in printed and "overall" in printed and "/4" in printed
