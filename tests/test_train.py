"""The training scripts end to end on a micro recipe, exact resume, and bad input."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import train
from ursa.config import get_config
from ursa.data import DataError, ExampleSet, encode_conversations, read_jsonl
from ursa.dualmath import label_dualmath
from ursa.io import jsonable
from ursa.model import URSAModel, init_weights
from ursa.prm import STEP_TAG, tag_steps
from ursa.recipe import GRPOSettings, LabelSettings, Recipe
from ursa.tokenizer import Tokenizer
from ursa.trainer import Opt, Runtime, stage_done, train_loop, with_epochs
from ursa.weights import load_model
from safetensors.torch import load_file

RT = Runtime()


def micro_recipe(tmp: Path) -> Recipe:
    small = dict(batch_size=8, micro_batch=4, log_every=1, ckpt_every=1000, bf16=False)
    return Recipe(
        name="micro", preset="micro", data_dir=str(tmp / "data"), n_train=48, n_rl=12, n_test=12, n_hard=12,
        vocab_size=300, pretrain=Opt(steps=4, lr=2e-3, **small), align=Opt(steps=3, lr=1e-3, **small),
        sft=Opt(steps=4, lr=1e-3, **small), label=LabelSettings(8, 2, 2, 3, pairs=4),
        prm=Opt(steps=3, lr=5e-4, **small), bon_samples=2,
        grpo=Opt(steps=2, lr=5e-5, micro_batch=4, log_every=1, ckpt_every=1000, bf16=False),
        rl=GRPOSettings(prompts=2, group=2, filter=False), max_new_tokens=24)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        recipe = micro_recipe(tmp)
        res = train.run_all(recipe, Path("runs") / "micro", RT, quiet=True)
    finally:
        os.chdir(cwd)
    return tmp, tmp / "runs" / "micro", res


def test_recipe_runs_every_stage_and_writes_results(micro_run):
    tmp, run, res = micro_run
    for stage in train.STAGES:
        assert json.loads((run / stage / "state.json").read_text())["done"], stage
    for stage in ("pretrain", "align", "sft", "prm", "grpo"):
        assert (run / stage / "model" / "model.safetensors").exists(), stage
        assert not (run / stage / "resume").exists()
    assert {"align", "sft", "grpo"} <= set(res["policies"]) and "prm_heldout" in res
    assert set(res["policies"]["sft"]["best_of_n"]["2"]) == {"maj", "pass", "weighted", "min", "mean", "last", "product"}
    assert "best_of_n" not in res["policies"]["align"] and "greedy" in res["policies"]["align"]["sampling"]
    assert set(res["policies"]["grpo"]["best_of_n"]) == set(res["policies"]["sft"]["best_of_n"])
    assert json.loads((run / "results.json").read_text()) == jsonable(res)          # NaN written as null
    assert "PS-GRPO" in (run / "results.md").read_text()
    # the PRM's within-problem ranking and its clean-pair test are measured and rendered
    q = res["prm_quality"]
    assert 0 <= q["mixed_problems"] <= res["settings"]["n_test"]
    assert q["mixed_problems"] == 0 or 0.0 <= q["within_problem_auc"] <= 1.0
    assert res["prm_pairs"] and all(e["n"] > 0 and 0.0 <= e["step_lower"] <= 1.0 for e in res["prm_pairs"].values())
    assert set(res["policy_pairs"]) == set(res["prm_pairs"])          # the same pairs, judged by the SFT policy
    kv, maj_n = res["kind_verifiers"], res["policies"]["sft"]["best_of_n"][str(res["settings"]["bon_samples"])]["maj"]
    assert set(kv) == {"perception", "arithmetic", "option", "arithmetic + option", "all but perception"}
    for e in kv.values():         # each against the SFT policy's own maj@N on the same samples
        assert abs(e["minus_maj"]["diff"] - (e["best_of_n"]["acc"] - maj_n["acc"])) < 1e-9
    j = res["policy_judge"]
    assert j["n"] == res["settings"]["bon_samples"] and j["best_of_n"]["n"] == res["settings"]["n_test"]
    assert abs(j["minus_maj"]["diff"] - (j["best_of_n"]["acc"] - res["policies"]["sft"]["best_of_n"][str(j["n"])]["maj"]["acc"])) < 1e-9
    md = (run / "results.md").read_text()
    assert "PRM on clean pairs" in md and "policy on clean pairs" in md and "step likelihoods as the judge" in md
    # the SFT policy's option step from a right value: every multiple-choice test problem, rendered
    o = res["policies"]["sft"]["option_step"]
    from ursa.evaluate import load_problems
    n_mc = sum(1 for r in load_problems(Path(micro_recipe(tmp).data_dir) / "test.jsonl") if r.get("choices"))
    assert o["n"] == n_mc and 0 <= o["correct"] <= o["n"]
    assert (o["n"] == 0) == ("option step continued from the reference" not in md)
    assert json.loads((run / "label" / "state.json").read_text())["pairs"] == micro_recipe(tmp).label.pairs == 4
    speed = json.loads((run / "label" / "state.json").read_text())["speed"]
    assert speed["decoded_tokens_s"] >= speed["new_tokens_s"] > 0      # decoded includes stopped rows' tokens
    # the PRM's class balance comes from its training split only (not the held-out records)
    from ursa.prm import balance_weight
    from ursa.results import split_by_problem
    recs = [json.loads(x) for x in (run / "label" / "dualmath.jsonl").read_text().splitlines() if x.strip()]
    train_recs, _ = split_by_problem(recs, micro_recipe(tmp).prm_heldout)
    want = balance_weight([r["labels"] for r in train_recs])
    assert json.loads((run / "prm" / "state.json").read_text())["pos_weight"] == pytest.approx(want)
    # one log line per logged step, with the GRPO statistics the issue asks for
    lines = [json.loads(l) for l in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1]
    assert {"reward", "acc", "resp_len", "n_steps", "drop_rate", "mixed", "kl", "clip_frac", "tok_s"} <= set(lines[0])
    # the rollout phase's seconds split into sampling, judging + PRM scoring, reference log-probs
    for l in lines:
        assert min(l["sample_s"], l["score_s"], l["logprob_s"]) >= 0
        assert l["sample_s"] + l["score_s"] + l["logprob_s"] == pytest.approx(l["rollout_s"], abs=3e-5)   # logged to 5 decimals
        assert l["decoded_tok_s"] >= l["rollout_tok_s"] > 0        # decoded counts stopped rows' tokens too


def test_rerun_reports_each_stages_recorded_seconds(micro_run, tmp_path):
    """A finished stage is skipped on a rerun, and results.json keeps the seconds it took when it ran."""
    tmp, run, res = micro_run
    secs = json.loads((run / "stage_seconds.json").read_text())
    assert set(secs) == set(train.STAGES) and all(v > 0 for v in secs.values())
    assert {s: res["times_s"][s] for s in train.STAGES} == pytest.approx(secs, abs=0.06)
    for s in train.STAGES:              # skipped: the recorded seconds, not the ~0 s of the skip
        assert train.run_stage(s, run, micro_recipe(tmp), RT, quiet=True) == secs[s]
    # another reward from the flags (recipe.rl.reward) is its own stage folder: trained, not skipped
    r2, r = tmp_path / "run", micro_recipe(tmp)
    shutil.copytree(run, r2)
    r.rl.reward = "outcome"
    train.run_stage("grpo", r2, r, RT, quiet=True)
    assert stage_done(r2 / "grpo-outcome")
    assert set(json.loads((r2 / "stage_seconds.json").read_text())) == set(train.STAGES) | {"grpo-outcome"}


def test_align_trains_only_the_projector(micro_run):
    _, run, _ = micro_run
    a = load_file(str(run / "pretrain" / "model" / "model.safetensors"))
    b = load_file(str(run / "align" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    changed = {n for n in a if not torch.equal(a[n], b[n])}
    assert changed and all(n.startswith("aligner.") for n in changed)
    assert changed == {n for n in a if n.startswith("aligner.")}


def test_sft_trains_projector_lm_and_vision(micro_run):
    _, run, _ = micro_run
    a = load_file(str(run / "align" / "model" / "model.safetensors"))
    b = load_file(str(run / "sft" / "model" / "model.safetensors"))
    for part in ("aligner.", "language_model.", "vision_model."):
        assert any(not torch.equal(a[n], b[n]) for n in a if n.startswith(part)), part


def test_prm_trains_lm_and_head_not_vision(micro_run):
    _, run, _ = micro_run
    a = load_file(str(run / "sft" / "model" / "model.safetensors"))
    b = load_file(str(run / "prm" / "model" / "model.safetensors"))
    assert "score.weight" in b and "score.weight" not in a
    for n in a:
        same = torch.equal(a[n], b[n])
        # frozen: vision tower and projector; lm_head is unused by the value head, so it gets no gradient
        assert same == (n.startswith(("vision_model.", "aligner.")) or n == "language_model.lm_head.weight"), n


def test_prm_with_train_vision_in_prm_trains_the_tower_too(micro_run, tmp_path):
    tmp, run, _ = micro_run
    r2, recipe = tmp_path / "run", micro_recipe(tmp)
    shutil.copytree(run, r2)
    shutil.rmtree(r2 / "prm")
    recipe.train_vision_in_prm = True
    train.stage_prm(r2, recipe, Tokenizer.from_file(r2 / "tokenizer.json"), RT, quiet=True)
    a = load_file(str(r2 / "sft" / "model" / "model.safetensors"))
    b = load_file(str(r2 / "prm" / "model" / "model.safetensors"))
    for part in ("vision_model.", "aligner.", "language_model.model."):
        assert any(not torch.equal(a[n], b[n]) for n in a if n.startswith(part)), part


def test_dualmath_records_are_well_formed(micro_run):
    tmp, run, _ = micro_run
    recs = read_jsonl(run / "label" / "dualmath.jsonl")
    assert recs and {r["source"] for r in recs} <= {"bel", "mie", "correct"}
    tok = Tokenizer.from_file(run / "tokenizer.json")
    for r in recs:
        assert len(r["labels"]) == len(r["steps"])
        text = tag_steps(r["steps"], r["answer"])
        assert text.count(STEP_TAG) == len(r["steps"])
        assert tok.encode(text).count(tok.tag_id) == len(r["steps"])     # the tag is one token
        assert (tmp / "data" / r["image"]).exists()                 # relative to the data root


def _lm_setup(seed=0):
    cfg = get_config("micro")
    torch.manual_seed(seed)
    model = init_weights(URSAModel(cfg), seed=seed)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(4, 64, (int(n),), generator=g).tolist() for n in torch.randint(5, 12, (20,), generator=g)]
    masks = [[0] * 3 + [1] * (len(i) - 3) for i in ids]
    return model, ExampleSet(ids, masks, None)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    opt = Opt(steps=6, batch_size=8, micro_batch=3, lr=1e-2, log_every=1, ckpt_every=1000, bf16=False)
    m1, data = _lm_setup()
    assert train_loop(tmp_path / "a", "a", {"model": m1}, opt, train.lm_step_fn(m1, data, opt, 0, RT), RT, quiet=True)
    m2, data = _lm_setup()
    assert not train_loop(tmp_path / "b", "b", {"model": m2}, opt, train.lm_step_fn(m2, data, opt, 0, RT), RT,
                          stop_after=2, quiet=True)
    assert (tmp_path / "b" / "resume" / "optimizer.pt").exists()
    m3, data = _lm_setup(seed=5)                      # other weights: all state must come from the checkpoint
    assert train_loop(tmp_path / "b", "b", {"model": m3}, opt, train.lm_step_fn(m3, data, opt, 0, RT), RT, quiet=True)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m3.state_dict().items()):
        assert torch.equal(a, b), n
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["loss"] for l in la] == [json.loads(l)["loss"] for l in lb]


def test_bf16_autocast_only_where_the_cpu_has_native_bf16(monkeypatch, capsys):
    import ursa.trainer as trainer
    monkeypatch.setattr(trainer, "_FP32_NOTED", False)
    for native in (True, False, False):
        monkeypatch.setattr(trainer, "native_bf16", lambda device: native)
        with Runtime().autocast(True):
            assert torch.is_autocast_enabled("cpu") == native
        with Runtime().autocast(False):
            assert not torch.is_autocast_enabled("cpu")
    assert capsys.readouterr().err.count("computing in fp32") == 1        # said once, not per call


def test_bench_skips_bf16_rows_where_bf16_is_emulated(monkeypatch):
    import ursa.bench as bench
    monkeypatch.setattr(bench, "native_bf16", lambda device: False)
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype: 1e9)
    res = bench.run(steps=1, warmup=0, batch=2, seq_len=24, parts=("train",))
    assert res["train"]["bf16"] is None and res["train"]["fp32"]["tokens_per_s"] > 0
    assert "bf16 autocast skipped: this CPU has no native bf16" in bench.format_table(res)


def test_micro_batches_give_the_same_gradient_as_one_batch():
    m, data = _lm_setup()
    grads = []
    for micro in (8, 3):
        m.zero_grad()
        opt = Opt(batch_size=8, micro_batch=micro, bf16=False)
        train.lm_step_fn(m, data, opt, 0, RT)(0)
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_label_resume_neither_loses_nor_duplicates(micro_run, tmp_path):
    tmp, run, _ = micro_run
    model = load_model(run / "sft" / "model").eval()
    tok = Tokenizer.from_file(run / "tokenizer.json")
    src = tmp / "data" / "cot_train.jsonl"
    kw = dict(n_problems=6, k_samples=2, n_probe=2, chunk=2, compare_mc=0, max_new_tokens=24, progress=False)
    label_dualmath(model, tok, src, tmp_path / "a", **kw)
    full = (tmp_path / "a" / "dualmath.jsonl").read_text()
    # a run killed in its second chunk: progress says 1 chunk, the file holds more and half a line
    b = tmp_path / "b"
    label_dualmath(model, tok, src, b, **{**kw, "n_problems": 2})
    with open(b / "dualmath.jsonl", "a") as f:
        f.write('{"id": "half a li')
    label_dualmath(model, tok, src, b, **kw)
    assert (b / "dualmath.jsonl").read_text() == full


def test_label_pairs_are_reference_and_mie_of_the_same_solution(micro_run, tmp_path):
    from ursa import world
    tmp, run, _ = micro_run
    model = load_model(run / "sft" / "model").eval()
    tok = Tokenizer.from_file(run / "tokenizer.json")
    src = tmp / "data" / "cot_train.jsonl"
    stats = label_dualmath(model, tok, src, tmp_path, n_problems=2, k_samples=1, n_probe=2, chunk=1, compare_mc=0,
                           mie_per_problem=0.0, pairs=3, max_new_tokens=8, progress=False)
    recs = read_jsonl(tmp_path / "dualmath.jsonl")
    ids = [r["id"] for r in read_jsonl(src)]
    refs = [r for r in recs if r["id"].endswith("-ref")]
    mies = {r["problem_id"]: r for r in recs if r["id"].endswith("-pair")}
    assert stats["pairs"] == 3 and [r["problem_id"] for r in refs] == ids[2:5]   # the problems after the sampled ones
    for ref in refs:
        p = world.problem_from_id(ref["problem_id"])
        assert ref["source"] == "correct" and ref["steps"] == p.steps and ref["answer"] == p.answer
        assert set(ref["labels"]) == {1}
        mie = mies[ref["problem_id"]]
        k = mie["labels"].index(0)
        assert mie["source"] == "mie" and mie["steps"][:k] == p.steps[:k] and mie["steps"][k] != p.steps[k]
        assert mie["answer"] != p.answer and mie["image"] == ref["image"] and mie["question"] == ref["question"]


def test_malformed_line_and_missing_image_are_named(micro_run, tmp_path):
    tmp, _, _ = micro_run
    d = tmp_path / "data"
    shutil.copytree(tmp / "data", d)
    lines = (d / "cot_train.jsonl").read_text().splitlines()
    (d / "cot_train.jsonl").write_text("\n".join(lines[:2] + ['{"id": 1,'] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=r"cot_train.jsonl:3: not valid JSON"):
        read_jsonl(d / "cot_train.jsonl")
    rec = json.loads(lines[0])
    os.remove(d / rec["image"])
    (d / "cot_train.jsonl").write_text("\n".join(lines) + "\n")
    tok = Tokenizer.from_file(tmp / "runs" / "micro" / "tokenizer.json")
    with pytest.raises(DataError, match=r"cot_train.jsonl:1: image .* not found"):
        encode_conversations(d / "cot_train.jsonl", tok, get_config("micro"))


def test_failed_stage_leaves_no_result(micro_run, tmp_path):
    tmp, run, _ = micro_run
    r2 = tmp_path / "run"
    shutil.copytree(run, r2)
    shutil.rmtree(r2 / "sft")
    recipe = micro_recipe(tmp)
    bad = tmp_path / "data"
    shutil.copytree(tmp / "data", bad)
    (bad / "cot_train.jsonl").write_text('{"id": "x", "conversations": []}\n')
    recipe.data_dir = str(bad)
    tok = Tokenizer.from_file(r2 / "tokenizer.json")
    with pytest.raises(DataError, match="cot_train.jsonl:1"):
        train.stage_sft(r2, recipe, tok, RT, quiet=True)
    assert not (r2 / "sft" / "model").exists() and not stage_done(r2 / "sft")


def test_stage_flags_override_one_stage_and_epochs_set_steps():
    r = Recipe()
    args = train.build_parser().parse_args(["sft", "--init", "m", "--data", "d.jsonl", "--max-len", "4096",
                                            "--lr", "1e-5", "--epochs", "2", "--batch-size", "128",
                                            "--micro-batch", "1", "--warmup-ratio", "0.02", "--weight-decay",
                                            "0.01", "--fp32"])
    train.apply_overrides(r, args)
    assert (r.init, r.stage_data, r.max_len) == ("m", "d.jsonl", 4096)
    assert (r.sft.lr, r.sft.batch_size, r.sft.micro_batch, r.sft.bf16, r.sft.epochs) == (1e-5, 128, 1, False, 2.0)
    assert r.align.lr == Recipe().align.lr                       # other stages untouched
    # 2 epochs over 1000 rows at 128 rows per step: ceil(2000 / 128) = 16 steps
    assert with_epochs(r.sft, 1000, 128).steps == 16
    with pytest.raises(ValueError, match="name the stage"):
        train.apply_overrides(Recipe(), train.build_parser().parse_args(["--lr", "1e-5"]))
    with pytest.raises(ValueError, match="--steps or --epochs, not both"):
        train.apply_overrides(Recipe(), train.build_parser().parse_args(["sft", "--steps", "3", "--epochs", "1"]))
    g = train.apply_overrides(Recipe(), train.build_parser().parse_args(
        ["grpo", "--reward", "v2", "--group", "4", "--ppo-epochs", "2", "--kl-coef", "0.01", "--no-rl-filter"]))
    assert (g.rl.reward, g.rl.group, g.rl.ppo_epochs, g.rl.kl_coef, g.rl.filter) == ("v2", 4, 2, 0.01, False)
    lp = train.apply_overrides(Recipe(), train.build_parser().parse_args(["label", "--label-problems", "3000"]))
    assert (lp.label.n_problems, lp.label.k_samples, lp.train_vision_in_prm) == (3000, Recipe().label.k_samples, False)
    assert train.apply_overrides(Recipe(), train.build_parser().parse_args(["prm", "--prm-train-vision"])).train_vision_in_prm
    with pytest.raises(ValueError, match="--label-problems must be >= 1"):
        train.apply_overrides(Recipe(), train.build_parser().parse_args(["label", "--label-problems", "0"]))


def test_eval_cli_prm_table_and_diagnosis(micro_run, capsys):
    import eval as ev
    tmp, run, _ = micro_run
    args = ["--model", str(run / "sft" / "model"), "--data", str(tmp / "data" / "test.jsonl"),
            "--prm", str(run / "prm" / "model"), "--n", "2", "--max-new-tokens", "16"]
    assert ev.main(args) == 0
    out = capsys.readouterr().out
    assert "| N | greedy | maj@N | PRM min | PRM mean" in out and "\n| 2 |" in out
    assert ev.main(args + ["--prm-diagnosis"]) == 0
    out = capsys.readouterr().out
    assert "wrong samples" in out and "drop-moment >= 0.3" in out


def test_rl_filter_keeps_exactly_the_mixed_prompts(micro_run, tmp_path, monkeypatch):
    from ursa.evaluate import Samples
    tmp, run, _ = micro_run
    r2 = tmp_path / "run"
    shutil.copytree(run, r2)
    recipe = micro_recipe(tmp)
    recipe.rl.filter, recipe.rl.filter_samples = True, 2
    patterns = [[True, True], [False, False], [True, False], [False, True]]

    def fake_sample(model, tok, recs, base, n=1, **kw):               # prompt i gets pattern i % 4
        assert n == 2 and kw["temperature"] == 1.0
        c = [patterns[i % 4] for i in range(len(recs))]
        return Samples([["x"] * n for _ in recs], [[None] * n for _ in recs], c)

    monkeypatch.setattr(train, "sample", fake_sample)
    tok = Tokenizer.from_file(r2 / "tokenizer.json")
    kept = train.rl_prompts(r2, recipe, tok, RT, quiet=True)
    all_ids = [r["id"] for r in read_jsonl(tmp / "data" / "rl.jsonl")]
    assert [r["id"] for r in kept] == [p for i, p in enumerate(all_ids) if i % 4 in (2, 3)]
    info = json.loads((r2 / "rl_prompts.json").read_text())
    assert info["right"] == {p: sum(patterns[i % 4]) for i, p in enumerate(all_ids)}


def test_grpo_kl_is_zero_at_step_0_and_grows_with_updates(micro_run, tmp_path, monkeypatch):
    """The reference log-probs reach the KL: policy == reference (SFT) before the first update, so
    step 0's KL is exactly 0; after updates driven by a non-zero advantage it is positive."""
    tmp, run, _ = micro_run
    r2 = tmp_path / "run"
    shutil.copytree(run, r2)
    shutil.rmtree(r2 / "grpo")
    recipe = micro_recipe(tmp)
    recipe.grpo = Opt(steps=3, lr=3e-2, warmup_ratio=0.0, micro_batch=4, log_every=1, bf16=False)
    recipe.rl.group, recipe.rl.prompts = 4, 2
    monkeypatch.setattr(train, "judge", lambda text, *a: (None, len(text) % 2 == 0))   # mixed groups
    tok = Tokenizer.from_file(r2 / "tokenizer.json")
    train.stage_grpo(r2, recipe, tok, RT, quiet=True, reward="outcome")
    lines = [json.loads(l) for l in (r2 / "grpo-outcome" / "metrics.jsonl").read_text().splitlines()]
    assert abs(lines[0]["kl"]) < 1e-7 and lines[0]["mixed"] > 0
    assert lines[2]["kl"] > 1e-6


def test_grpo_variant2_runs_with_its_token_map(micro_run, tmp_path, monkeypatch):
    from ursa import grpo
    tmp, run, _ = micro_run
    r2 = tmp_path / "run"
    shutil.copytree(run, r2)
    recipe = micro_recipe(tmp)
    recipe.grpo = Opt(steps=1, lr=1e-3, micro_batch=4, log_every=1, bf16=False)
    seen = []
    real = grpo.token_step_index

    def spy(text, starts, n):
        assert len(starts) == 0 or (starts[0] == 0 and all(a <= b for a, b in zip(starts, starts[1:])))
        seen.append((text, starts, n))
        return real(text, starts, n)

    monkeypatch.setattr(train, "token_step_index", spy)
    monkeypatch.setattr(train, "judge", lambda text, *a: (None, len(text) % 2 == 0))
    train.stage_grpo(r2, recipe, Tokenizer.from_file(r2 / "tokenizer.json"), RT, quiet=True, reward="v2")
    assert len(seen) == recipe.rl.prompts * recipe.rl.group
    assert (r2 / "grpo-v2" / "model" / "model.safetensors").exists()


def test_outdated_world_is_an_error_naming_force_and_force_rewrites_it(tmp_path):
    """train.py's --force reaches the world: without it an outdated world folder stops the stage
    with the reason; with it the folder is rewritten with the recipe's counts."""
    r = Recipe(data_dir=str(tmp_path / "w"), n_train=6, n_rl=2, n_test=2, n_hard=2)
    train.ensure_world(r, quiet=True)
    r.n_test = 3
    with pytest.raises(ValueError, match=r"n_test 2 -> 3.*pass --force"):
        train.ensure_world(r, quiet=True)
    train.ensure_world(r, quiet=True, force=True)
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["args"]["n_test"] == 3
    assert len((tmp_path / "w" / "test.jsonl").read_text().splitlines()) == 3
    train.ensure_world(r, quiet=True)               # up to date now: reused, no error
