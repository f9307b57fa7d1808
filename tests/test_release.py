"""ursa/release.py: released-layout loading (strict, sharded, streaming, bf16), tokenizer ids, prompts,
<|image|> expansion, URSA-RM-8B readout, best-of-N, benchmark generation, Qwen2 / SigLIP part loaders.

Nothing can be downloaded, so the checkpoints here are tiny random models in the EXACT released
layout: the tiny-hybrid module tree (its names are the released names, PAPER.md / ursa8b_weights.tsv),
a Hugging Face style config.json with the official fields, a tokenizer.json whose special tokens are
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

from ursa.benchmarks import rescore
from ursa.config import get_config
from ursa.data import write_jsonl_atomic
from ursa.generate import generate
from ursa.model import URSAModel, init_weights
from ursa.release import (best_of_n_with_prm, generation_prompt, load_qwen2_lm_into, load_released,
                          load_siglip_into, prm_inputs, prm_prompt, prm_score, prm_score_batch,
                          released_config, run_benchmark)
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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: two threads on a shared 2-core machine spin far more than they compute."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    with pytest.raises(ValueError, match="no value head"):
        prm_score(policy, ptok, None, "q", "Step 1: a.\n\n†Answer: 1")


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


# ---- prompts and the <|image|> expansion ------------------------------------------------------------

def test_prompts_equal_the_paper_templates():
    rec = {"question": "What is x?", "image": "a.png", "choices": None}
    assert generation_prompt("mathvista", rec) == PAPER_SYSTEM + PAPER_GEN + "What is x?" + PAPER_END
    text, start = prm_prompt("Find x.", "Step 1: a = 2.\n\nStep 2: x = 4.\n\n†Answer: 4")
    tagged = "Step 1: a = 2. и\n\nStep 2: x = 4. и\n\n†Answer: 4"
    assert text == PAPER_SYSTEM + PAPER_PRM + "Find x.\n" + tagged + PAPER_END
    assert text[start:].startswith(tagged)


def test_image_placeholder_expands_to_the_tower_token_count(ckpts):
    _, _, base = ckpts["policy"]
    tok = Tokenizer.from_file(ckpts["policy"][0] / "tokenizer.json")
    resp = "Step 1: a.\n\nStep 2: b.\n\n†Answer: 1"
    plain = tok.encode(prm_prompt("Find и x", resp)[0])          # one <|image|>, unexpanded
    k = plain.index(tok.image_id)
    tags = [i for i, t in enumerate(plain) if t == tok.tag_id]
    assert len(tags) == 3 and tags[0] > k                        # one in the question, two in the solution
    for cfg, n in ((tiny_cfg(base + 4, True), 16), (get_config("ursa-rm-8b"), 576)):
        assert cfg.vision.num_tokens == n
        ids, pos = prm_inputs(tok, cfg, "Find и x", resp)
        assert ids == plain[:k] + [tok.image_id] * n + plain[k + 1:]
        assert pos == [t + n - 1 for t in tags[1:]]              # the question's tag is not read


# ---- URSA-RM-8B readout --------------------------------------------------------------------------------

def test_prm_scores_are_read_at_the_tag_tokens(ckpts):
    rm, tok = load_released(ckpts["rm"][0], dtype=torch.float32, preset="tiny-hybrid")
    img = image(3)
    question, resp = "Find и x", "Step 1: There are 3 red circles.\n\nStep 2: 3 * 5 = 15.\n\n†Answer: 15"
    scores, mn, mean = prm_score(rm, tok, img, question, resp)
    # independent: the literal template, positions searched by id, score head on the final hidden state
    text = (PAPER_SYSTEM + PAPER_PRM + question + "\nStep 1: There are 3 red circles. и\n\n"
            "Step 2: 3 * 5 = 15. и\n\n†Answer: 15" + PAPER_END)
    ids = []
    for t in tok.encode(text):
        ids += [t] * 16 if t == tok.image_id else [t]
    pos = [i for i, t in enumerate(ids) if t == tok.tag_id][1:]
    with torch.no_grad():
        h = rm(torch.tensor([ids]), preprocess(img, rm.cfg.vision)[None], logits=False).hidden[0]
        want = torch.sigmoid(h[pos] @ rm.score.weight[0] + rm.score.bias[0]).tolist()
    assert len(scores) == 2
    assert scores == pytest.approx(want, abs=1e-6)
    assert mn == pytest.approx(min(want)) and mean == pytest.approx(sum(want) / 2)
    # read AT the tags: text after the last tag (the answer) cannot change any score
    assert prm_score(rm, tok, img, question, resp.replace("15\n\n†Answer: 15", "15\n\n†Answer: 99"))[0] == \
        pytest.approx(scores, abs=1e-6)
    # no tag (no †Answer, so the last step gets none) -> score 0
    assert prm_score(rm, tok, img, question, "Step 1: There are 3 red circles.") == ([], 0.0, 0.0)


def test_batched_prm_equals_one_by_one(ckpts):
    rm, tok = load_released(ckpts["rm"][0], dtype=torch.float32, preset="tiny-hybrid")
    items = [(image(1), "Find x", "Step 1: 3 * 5 = 15.\n\n†Answer: 15"),
             (None, "What is the total value?", "Step 1: a.\n\nStep 2: b.\n\nStep 3: c.\n\n†Answer: 2"),
             (image(2), "Q", "Step 1: There are 3 red circles.\n\nStep 2: 3.\n\n†Answer: 3")]
    batched = prm_score_batch(rm, tok, items, batch_size=3)
    for (s, mn, mean), (img, q, r) in zip(batched, items):
        s1, mn1, mean1 = prm_score(rm, tok, img, q, r)
        assert s == pytest.approx(s1, abs=1e-5) and mn == pytest.approx(mn1, abs=1e-5)
    assert [len(s) for s, _, _ in batched] == [1, 3, 2]


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
    write_jsonl_atomic(tmp_path / "resp.jsonl", out)
    assert rescore(str(tmp_path / "resp.jsonl"), "mathvista")["n"] == 4


def test_best_of_n_picks_the_highest_mean_score(ckpts, tmp_path):
    rm, tok = load_released(ckpts["rm"][0], dtype=torch.float32, preset="tiny-hybrid")
    recs = _mathvista(tmp_path)
    cands = [["Step 1: 3 * 5 = 15.\n\n†Answer: 15", "Step 1: a.\n\nStep 2: There are 3.\n\n†Answer: 3",
              "Step 1: b. \n\n†Answer: 3", "no steps at all"] for _ in recs]
    for r, c in zip(recs, cands):
        r["response"] = c
    chosen = best_of_n_with_prm(rm, tok, recs, None, "mean", benchmark="mathvista", image_root=tmp_path)
    for r, o in zip(recs, chosen):
        img = tmp_path / r["image"] if r["image"] else None
        q = r["question"]
        means = [prm_score(rm, tok, img, q, c)[2] for c in r["response"]]
        assert o["prm_aggregate"] == pytest.approx(means, abs=1e-5)
        assert o["response"] == r["response"][max(range(4), key=lambda i: means[i])]
        assert o["candidates"] == r["response"]
    write_jsonl_atomic(tmp_path / "bon.jsonl", chosen)
    assert rescore(str(tmp_path / "bon.jsonl"), "mathvista")["n"] == 4


# ---- Stage I from public parts: Qwen2.5 (HF Qwen2ForCausalLM) and SigLIP (HF / timm) ------------------

def test_load_qwen2_lm_into_is_strict_for_the_lm(ckpts, tmp_path):
    src = ckpts["policy"][1]
    hf = {n[len("language_model."):]: t.clone() for n, t in src.state_dict().items() if n.startswith("language_model.")}
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)     # stale buffer: skipped
    d = tmp_path / "qwen"
    d.mkdir()
    save_state_dict(hf, d, max_shard_bytes=40_000)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "rope_theta": 10000.0, "rms_norm_eps": 1e-6}))
    dst = random_model(src.cfg, 5)
    vision_before = {n: t.clone() for n, t in dst.state_dict().items() if not n.startswith("language_model.")}
    load_qwen2_lm_into(dst, d)
    for n, t in dst.state_dict().items():
        want = src.state_dict()[n] if n.startswith("language_model.") else vision_before[n]
        assert torch.equal(t, want), n
    (d / "config.json").write_text(json.dumps({"rope_theta": 1000000.0}))
    with pytest.raises(CheckpointError, match=r"config.json: rope_theta 1000000.0 differs"):
        load_qwen2_lm_into(dst, d)


def _hf_siglip(tower) -> dict:
    """A Hugging Face SiglipModel state dict built by hand from a timm-layout tower."""
    sd, D, v = tower.state_dict(), tower.cfg.hidden_size, "vision_model."
    hf = {v + "embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"],
          v + "embeddings.patch_embedding.bias": sd["patch_embed.proj.bias"],
          v + "embeddings.position_embedding.weight": sd["pos_embed"][0],
          v + "post_layernorm.weight": sd["norm.weight"], v + "post_layernorm.bias": sd["norm.bias"],
          v + "head.probe": sd["attn_pool.latent"],
          v + "head.attention.in_proj_weight": torch.cat([sd["attn_pool.q.weight"], sd["attn_pool.kv.weight"]]),
          v + "head.attention.in_proj_bias": torch.cat([sd["attn_pool.q.bias"], sd["attn_pool.kv.bias"]]),
          "text_model.embeddings.token_embedding.weight": torch.zeros(5, D), "logit_scale": torch.zeros(1),
          "logit_bias": torch.zeros(1)}
    for a, b in (("head.attention.out_proj", "attn_pool.proj"), ("head.layernorm", "attn_pool.norm"),
                 ("head.mlp.fc1", "attn_pool.mlp.fc1"), ("head.mlp.fc2", "attn_pool.mlp.fc2")):
        for w in ("weight", "bias"):
            hf[f"{v}{a}.{w}"] = sd[f"{b}.{w}"]
    for i in range(tower.cfg.num_layers):
        s, b = f"{v}encoder.layers.{i}.", f"blocks.{i}."
        for w in ("weight", "bias"):
            q, k, vv = sd[b + f"attn.qkv.{w}"].chunk(3, dim=0)
            hf[s + f"self_attn.q_proj.{w}"], hf[s + f"self_attn.k_proj.{w}"], hf[s + f"self_attn.v_proj.{w}"] = q, k, vv
            for x, y in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                         ("mlp.fc2", "mlp.fc2"), ("self_attn.out_proj", "attn.proj")):
                hf[s + f"{x}.{w}"] = sd[b + f"{y}.{w}"]
    return {n: t.clone().contiguous() for n, t in hf.items()}


def test_load_siglip_into_from_hf_and_timm_layouts(ckpts, tmp_path):
    src = ckpts["policy"][1]
    tower = src.vision_model.vision_tower_low.vision_tower
    P = "vision_model.vision_tower_low.vision_tower."
    x = torch.rand(1, 3, 16, 16)
    for layout in ("hf", "timm"):
        d = tmp_path / layout
        d.mkdir()
        if layout == "hf":
            sd = _hf_siglip(tower)
        else:
            sd = {"visual.trunk." + n: t.clone() for n, t in tower.state_dict().items()}
            sd["text.token_embedding.weight"], sd["logit_scale"] = torch.zeros(5, 4), torch.zeros(1)
        save_state_dict(sd, d, max_shard_bytes=30_000)
        dst = random_model(src.cfg, 7)
        lm_before = dst.language_model.model.embed_tokens.weight.clone()
        load_siglip_into(dst, d)
        for n, t in dst.state_dict().items():
            if n.startswith(P):
                assert torch.equal(t, src.state_dict()[n]), (layout, n)
        assert torch.equal(dst.language_model.model.embed_tokens.weight, lm_before)
        with torch.no_grad():
            torch.testing.assert_close(dst.vision_model.vision_tower_low.vision_tower(x), tower(x), rtol=0, atol=0)
    # strict: a vision tensor the tower lacks (and nothing else) is named
    d = tmp_path / "bad"
    d.mkdir()
    sd = _hf_siglip(tower)
    del sd["vision_model.head.probe"]
    save_state_dict(sd, d)
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\): " + P + "attn_pool.latent"):
        load_siglip_into(random_model(src.cfg, 8), d)


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
