"""Reliability of the training scripts (docs/reliability.md).

1. A process killed at any write point (the kill is injected: the n-th call of the write does part
   of its work, then os._exit(137), which skips every finally and atexit as SIGKILL does) is rerun
   normally and ends with the weights of the uninterrupted run, bit for bit.
2. Two fresh runs of every stage, in fresh folders and another process, give identical results.
3. A non-finite loss or update stops the stage with one line; the last good checkpoint stays.
4. Flags that would do the wrong thing are one-line errors.
5. Bad inputs are one line naming the file; every image mode preprocesses to its 8-bit values.
6. Time-based checkpoints, DualMath image paths after a move, strict JSON everywhere.
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import eval as eval_cli
import synth
import train
from test_train import _lm_setup, micro_recipe
from ursa import io, trainer, weights
from ursa.config import get_config
from ursa.data import DataError, PRMExamples, read_jsonl
from ursa.dualmath import dualmath_image_root, label_dualmath
from ursa.recipe import Recipe, quick_recipe
from ursa.tokenizer import Tokenizer
from ursa.trainer import Opt, Runtime, TrainingError, stage_done, train_loop, write_result
from ursa.vision import preprocess
from ursa.weights import load_model

ROOT, TESTS = Path(__file__).resolve().parents[1], Path(__file__).resolve().parent
RT = Runtime()
KILLED = 137                     # the exit status a SIGKILL'ed process reports (128 + 9)


def kill_recipe(tmp: Path, data: str = "data") -> Recipe:
    """The micro recipe of tests/test_train.py with a checkpoint after every SFT step, so every
    point of the checkpoint swap is reached within its 4 steps."""
    r = micro_recipe(tmp)
    r.data_dir = str(tmp / data)
    r.sft = replace(r.sft, ckpt_every=1)
    return r


# ---- the child process: a micro run that dies at one injected point --------------------------

def _cut_file(path):
    """Keep the first half of a file's bytes (a write the kill interrupted)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


def _append_half(path, text: str):
    with open(path, "a", encoding="utf-8") as f:
        f.write(text[:len(text) // 2])


def _nth(n: int, cond):
    """cond, counted: True on the n-th call where cond(*args) holds."""
    calls = [0]

    def hit(*a) -> bool:
        if not cond(*a):
            return False
        calls[0] += 1
        return calls[0] == n
    return hit


def _arm(owner, attr: str, when, partial=lambda *a: None, after: bool = False):
    """Wrap owner.attr: on a call where when(*args) holds, do `partial(*args)` (the part of the
    work done before the kill) and die; after=True runs the real call first."""
    real = getattr(owner, attr)

    def wrapper(*a, **k):
        out = real(*a, **k) if after else None
        if when(*a):
            partial(*a)
            os._exit(KILLED)                # what SIGKILL leaves: no finally, no atexit, no flush
        return out if after else real(*a, **k)
    setattr(owner, attr, wrapper)


KILLS = {   # point: arm the kill (the child is run on the SFT stage, 4 steps, a checkpoint after each)
    # the done marker <stage>/state.json: its temporary file half written
    "state-json": lambda: _arm(os, "replace", lambda src, dst, *a: Path(dst).parts[-2:] == ("sft", "state.json"),
                               lambda src, *a: _cut_file(src)),
    # the third metrics.jsonl line (step 2): half of it appended
    "metrics-line": lambda: _arm(io, "append_jsonl", _nth(3, lambda path, rec: True),
                                 lambda path, rec: _append_half(path, io.dumps(rec, None) + "\n")),
    # the second checkpoint's swap: after "resume -> resume.old", before "resume.tmp -> resume"
    "swap-between": lambda: _arm(Path, "rename", lambda self, target: self.name == "resume.tmp"
                                 and self.with_name("resume.old").exists()),
    # the swap done, deleting resume.old: one of its files already gone
    "swap-after": lambda: _arm(shutil, "rmtree", lambda path, *a: Path(path).name == "resume.old"
                               and Path(path).with_name("resume").exists(),
                               lambda path, *a: sorted(Path(path).iterdir())[0].unlink()),
    # building the second checkpoint's resume.tmp: modules.safetensors half written
    "resume-build": lambda: _arm(trainer, "save_file", _nth(2, lambda t, f, *a: Path(f).name == "modules.safetensors"),
                                 lambda t, f, *a: _cut_file(f), after=True),
    # the stage's model directory (model.tmp): its safetensors half written
    "model-dir": lambda: _arm(weights, "save_file", lambda t, f, *a: Path(f).parent.name == "model.tmp",
                              lambda t, f, *a: _cut_file(f), after=True),
    # write_world building <data>.tmp: text.jsonl half written
    "world": lambda: _arm(io, "write_jsonl", lambda path, recs: Path(path).name == "text.jsonl",
                          lambda path, recs: _append_half(path, "".join(io.dumps(r, None) + "\n" for r in recs))),
}


def child(point: str, tmp: str, run: str, stages: str, data: str, threads: str):
    """Entry point of the child process: arm the kill (point "none": no kill, but the global RNGs
    scrambled before every stage), then train.main on the kill recipe, stage by stage."""
    torch.set_num_threads(int(threads))
    if point != "none":
        KILLS[point]()
    train.quick_recipe = lambda: kill_recipe(Path(tmp), data)
    for k, stage in enumerate(stages.split(",")):
        if point == "none":                 # every global generator elsewhere than the last stage left it
            torch.manual_seed(10_007 * k + 1), random.seed(k), np.random.seed(k)
        train.main([stage, "--quick", "--run", run])


def run_child(point: str, tmp: Path, run: Path, stages: str = "sft", data: str = "data",
              env: dict | None = None) -> subprocess.CompletedProcess:
    code = f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(TESTS)!r}]; import test_reliability as T; T.child(*sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, point, str(tmp), str(run), stages, data,
                           str(torch.get_num_threads())],       # the same kernels' split as this process
                          cwd=tmp, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


# ---- shared runs ------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Every stage of the kill recipe, uninterrupted, in this process: (tmp, run folder)."""
    tmp = tmp_path_factory.mktemp("reliability")
    run = tmp / "runs" / "a"
    for s in train.STAGES:
        train.run_stage(s, run, kill_recipe(tmp), RT, quiet=True)
    return tmp, run


def run_copy(base_run: Path, dst: Path, stages=("pretrain", "align")) -> Path:
    """A run folder holding the tokenizer and the given finished stages of `base_run`."""
    dst.mkdir(parents=True)
    shutil.copy(base_run / "tokenizer.json", dst)
    for s in stages:
        shutil.copytree(base_run / s, dst / s)
    return dst


def main_quick(monkeypatch, tmp: Path, argv: list, data: str = "data"):
    """train.main in this process with --quick meaning the kill recipe."""
    monkeypatch.setattr(train, "quick_recipe", lambda: kill_recipe(tmp, data))
    train.main(argv[:1] + ["--quick"] + argv[1:])


@pytest.fixture
def bad_input(base, monkeypatch, capsys):
    """train.main(argv) on the kill recipe, expected to stop on bad input -> its one-line message
    (SystemExit(message), or the last stderr line of an exit with status 2)."""
    def run(argv: list) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main_quick(monkeypatch, base[0], argv)
        code = e.value.code
        assert isinstance(code, str) or code == 2, code
        msg = code if isinstance(code, str) else re.split(r"[\r\n]", capsys.readouterr().err.strip())[-1]
        assert "\n" not in msg and msg.startswith(f"train.py {argv[0]}: "), msg
        return msg
    return run


def assert_same_weights(a: Path, b: Path):
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    differ = [n for n in ta if not torch.equal(ta[n], tb[n])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def losses(stage_dir: Path) -> list:
    return [(m["step"], m["loss"]) for m in trainer.read_metrics(stage_dir / "metrics.jsonl")]


def swap_leftovers(folder: Path) -> list:
    return sorted(str(p) for p in folder.rglob("*") if p.is_dir() and (".tmp" in p.name or ".old" in p.name))


def same_files(a: Path, b: Path) -> bool:
    """The same relative file names with the same bytes under both folders."""
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and \
        all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


# ---- 1. kills ---------------------------------------------------------------------------------

def _cut_last_metrics_line(sd: Path) -> bool:
    lines = (sd / "metrics.jsonl").read_text().split("\n")
    try:
        json.loads(lines[-1])
        return False
    except json.JSONDecodeError:
        return len(lines) == 3 and all(json.loads(x)["step"] == i for i, x in enumerate(lines[:2]))


# what the stage folder must look like right after each kill: proof that it hit that moment
AFTER_KILL = {
    "state-json": lambda sd: (sd / "model").is_dir() and not (sd / "state.json").exists() and (sd / "resume").is_dir(),
    "metrics-line": _cut_last_metrics_line,
    "swap-between": lambda sd: not (sd / "resume").exists() and (sd / "resume.old").is_dir() and (sd / "resume.tmp").is_dir(),
    "swap-after": lambda sd: (sd / "resume").is_dir() and (sd / "resume.old").is_dir(),
    "resume-build": lambda sd: (sd / "resume").is_dir() and (sd / "resume.tmp" / "modules.safetensors").exists(),
    "model-dir": lambda sd: (sd / "model.tmp").is_dir() and not (sd / "model").exists() and not (sd / "state.json").exists(),
}


# the checkpoint the rerun continues from: one is written after steps 0, 1 and 2 (none after the last)
RESUMES_AT = {"state-json": 3, "metrics-line": 2, "swap-between": 1, "swap-after": 2, "resume-build": 1,
              "model-dir": 3}


@pytest.mark.parametrize("point", list(AFTER_KILL))
def test_kill_at_each_write_point_then_rerun_gives_the_uninterrupted_weights(base, tmp_path, monkeypatch, capsys,
                                                                            point):
    tmp, ref = base
    run = run_copy(ref, tmp_path / "run")
    p = run_child(point, tmp, run)
    assert p.returncode == KILLED, p.stderr[-3000:]
    sd = run / "sft"
    assert AFTER_KILL[point](sd), sorted(x.name for x in sd.iterdir())
    capsys.readouterr()
    main_quick(monkeypatch, tmp, ["sft", "--run", str(run)])
    assert f"[sft] resuming at step {RESUMES_AT[point]}/4" in capsys.readouterr().out
    assert stage_done(sd) and not (sd / "resume").exists()
    assert swap_leftovers(sd) == []
    assert_same_weights(sd / "model", ref / "sft" / "model")
    assert losses(sd) == losses(ref / "sft") and len(losses(sd)) == 4


def test_a_stopped_prm_resumes_with_the_same_dropout_masks(base, tmp_path, monkeypatch, capsys):
    """The PRM's value head has dropout: a resumed run matches only if the generator state is
    restored from the checkpoint."""
    tmp, ref = base
    run = run_copy(ref, tmp_path / "run", ("pretrain", "align", "sft", "label"))
    main_quick(monkeypatch, tmp, ["prm", "--run", str(run), "--stop-after", "1"])
    assert (run / "prm" / "resume").is_dir() and not (run / "prm" / "model").exists()
    torch.manual_seed(99)                                   # the rerun's generator starts elsewhere
    main_quick(monkeypatch, tmp, ["prm", "--run", str(run)])
    assert "[prm] resuming at step 1/3" in capsys.readouterr().out
    assert_same_weights(run / "prm" / "model", ref / "prm" / "model")


def test_kill_while_writing_the_world_then_rerun(base, tmp_path, monkeypatch):
    tmp, ref = base
    run = tmp_path / "run"
    data = f"world-{tmp_path.name}"              # a fresh data folder beside the reference one
    p = run_child("world", tmp, run, stages="pretrain", data=data)
    assert p.returncode == KILLED, p.stderr[-3000:]
    assert (tmp / f"{data}.tmp").is_dir() and not (tmp / data).exists()
    main_quick(monkeypatch, tmp, ["pretrain", "--run", str(run)], data=data)
    assert swap_leftovers(tmp / data) == [] and not list(tmp.glob(f"{data}.*"))
    assert same_files(tmp / "data", tmp / data)
    assert_same_weights(run / "pretrain" / "model", ref / "pretrain" / "model")


def test_a_second_swap_cut_while_clearing_old_keeps_a_complete_folder(tmp_path, monkeypatch):
    """final -> final.old done, then killed; the next commit is killed while it removes the
    leftover final.old: recover_dir must still find a complete folder."""
    final, old, tmp = (tmp_path / n for n in ("m", "m.old", "m.tmp"))
    for d, word in ((old, "old"), (tmp, "new")):
        d.mkdir()
        for name in "abc":
            (d / name).write_text(word)

    def rmtree(path, *a, **k):                       # deletes one file, then the process "dies"
        sorted(Path(path).iterdir())[0].unlink()
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", rmtree)
        with pytest.raises(KeyboardInterrupt):
            io.commit_dir(tmp, final)
    io.recover_dir(final)
    assert sorted(x.name for x in final.iterdir()) == ["a", "b", "c"]
    assert {(final / n).read_text() for n in "abc"} in ({"old"}, {"new"})
    assert not old.exists() and not tmp.exists()


# ---- 2. fresh runs reproduce ------------------------------------------------------------------

def test_fresh_runs_of_every_stage_are_bitwise_identical(base):
    tmp, ref = base
    run = tmp / "runs" / "fresh"
    p = run_child("none", tmp, run, stages=",".join(train.STAGES), data="data-fresh",
                  env={"PYTHONHASHSEED": "4321"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert same_files(tmp / "data", tmp / "data-fresh")
    assert (run / "tokenizer.json").read_bytes() == (ref / "tokenizer.json").read_bytes()
    for stage in ("pretrain", "align", "sft", "prm", "grpo"):
        assert_same_weights(run / stage / "model", ref / stage / "model")
    assert (run / "label" / "dualmath.jsonl").read_bytes() == (ref / "label" / "dualmath.jsonl").read_bytes()
    assert read_jsonl(run / "label" / "dualmath.jsonl")             # not trivially equal: records exist


# ---- 3. non-finite training -------------------------------------------------------------------

def test_huge_lr_stops_with_one_line_and_keeps_the_last_checkpoint(base, tmp_path, monkeypatch, bad_input):
    tmp, ref = base
    run = run_copy(ref, tmp_path / "run")
    sd = run / "sft"
    flags = ["--run", str(run), "--lr", "1e6", "--steps", "3"]
    main_quick(monkeypatch, tmp, ["sft", *flags, "--stop-after", "1"])
    before = {f.name: f.read_bytes() for f in (sd / "resume").iterdir()}
    msg = bad_input(["sft", *flags])
    assert "[sft] step 1: loss" in msg and "gradient norm nan: not finite" in msg and "resume" in msg, msg
    assert {f.name: f.read_bytes() for f in (sd / "resume").iterdir()} == before
    assert io.read_json(sd / "resume" / "state.json")["step"] == 1
    assert not (sd / "model").exists() and not (sd / "state.json").exists()
    assert swap_leftovers(sd) == []


def test_an_update_that_overflows_the_weights_is_never_checkpointed(tmp_path):
    """Finite loss and gradient, but weight decay times lr 1e30 multiplies the weights by -1e30
    per step: 0.5 -> about 1e30 after step 0 (finite), inf after step 1. Stop at step 1 before
    its checkpoint; the checkpoint after step 0 stays."""
    m = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.constant_(m.weight, 0.5)

    def step_fn(step):
        loss = m.weight.sum()
        loss.backward()
        return {"loss": loss.item()}
    opt = Opt(steps=5, batch_size=1, micro_batch=1, lr=1e30, weight_decay=1.0, clip=0.0, warmup_ratio=0.0,
              ckpt_every=1, bf16=False)
    with pytest.raises(TrainingError, match=r"\[aff\] step 1: the update made weight model\.weight not finite"):
        train_loop(tmp_path, "aff", {"model": m}, opt, step_fn, RT, quiet=True)
    assert io.read_json(tmp_path / "resume" / "state.json")["step"] == 1
    saved = load_file(str(tmp_path / "resume" / "modules.safetensors"))["model.weight"]
    assert torch.isfinite(saved).all() and saved.abs().min() > 1e29


def test_a_model_with_a_nan_weight_is_never_written(tmp_path):
    model, _ = _lm_setup()
    name = next(n for n, _ in model.named_parameters() if n.endswith("q_proj.weight"))
    with torch.no_grad():
        model.get_parameter(name)[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=rf"weight {name.replace('.', '[.]')} is not finite"):
        write_result(tmp_path, model, {"stage": "x"})
    assert not (tmp_path / "model").exists() and not (tmp_path / "state.json").exists()


# ---- 4. flags ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "3", "--epochs", "1"], "give --steps or --epochs, not both"),
    (["--stop-after", "0"], "--stop-after must be >= 1, got 0"),
    (["--stop-after", "-5"], "--stop-after must be >= 1, got -5"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--micro-batch", "0"], "--micro-batch must be >= 1, got 0"),
])
def test_flags_that_would_do_the_wrong_thing_are_one_line_errors(base, tmp_path, monkeypatch, bad_input, flags, message):
    tmp, ref = base
    run = run_copy(ref, tmp_path / "run")
    msg = bad_input(["sft", "--run", str(run), *flags])
    assert message in msg, msg
    assert not (run / "sft" / "model").exists() and not (run / "sft" / "state.json").exists()


def test_resume_with_other_settings_is_refused_naming_them_unless_forced(base, tmp_path, monkeypatch, bad_input):
    tmp, ref = base
    run = run_copy(ref, tmp_path / "run")
    sd = run / "sft"
    main_quick(monkeypatch, tmp, ["sft", "--run", str(run), "--stop-after", "2"])
    ckpt = (sd / "resume" / "modules.safetensors").read_bytes()
    for flags, diff in ((["--lr", "5e-4"], "lr 0.001 -> 0.0005"), (["--batch-size", "4"], "batch_size 8 -> 4"),
                        (["--steps", "6"], "steps 4 -> 6")):
        msg = bad_input(["sft", "--run", str(run), *flags])
        assert diff in msg and "--force" in msg, msg
        assert (sd / "resume" / "modules.safetensors").read_bytes() == ckpt and not (sd / "model").exists()
    main_quick(monkeypatch, tmp, ["sft", "--run", str(run), "--lr", "5e-4", "--force"])
    assert stage_done(sd) and [s for s, _ in losses(sd)] == [0, 1, 2, 3]
    assert losses(sd)[:2] == losses(ref / "sft")[:2] and losses(sd)[2:] != losses(ref / "sft")[2:]


# ---- 5. bad inputs ----------------------------------------------------------------------------

def test_bad_data_files_are_one_line_naming_the_file(base, tmp_path, monkeypatch, bad_input):
    tmp, ref = base
    run = run_copy(ref, tmp_path / "run")
    d = tmp_path / "d"
    d.mkdir()
    (d / "images").symlink_to(tmp / "data" / "images")             # the records' images resolve
    raw = (tmp / "data" / "cot_train.jsonl").read_bytes().split(b"\n")
    (d / "latin1.jsonl").write_bytes(b"\n".join(raw[:2] + [raw[2].replace(b'"id"', b'"\xe9id"')] + raw[3:]))
    (d / "empty.jsonl").write_bytes(b"\n\n")
    (d / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(raw))
    cases = [(d / "latin1.jsonl", f"{d / 'latin1.jsonl'}:3: not UTF-8 (byte 0xe9 at column 3)"),
             (d / "empty.jsonl", f"{d / 'empty.jsonl'}: no records"),
             (d, f"{d}: is a folder, expected a .jsonl file"),
             (d / "missing.jsonl", f"{d / 'missing.jsonl'}: no such file")]
    for path, message in cases:
        msg = bad_input(["sft", "--run", str(run), "--data", str(path)])
        assert message in msg, msg
    (tmp_path / "afile").write_text("x")                           # a run folder that is a file
    msg = bad_input(["sft", "--run", str(tmp_path / "afile")])
    assert f"{tmp_path / 'afile'}: exists and is not a folder" in msg and (tmp_path / "afile").read_text() == "x"
    # a BOM is accepted: the same records as the file without it
    strip = lambda rs: [{k: v for k, v in r.items() if k != "_where"} for r in rs]   # noqa: E731
    assert strip(read_jsonl(d / "bom.jsonl")) == strip(read_jsonl(tmp / "data" / "cot_train.jsonl"))
    main_quick(monkeypatch, tmp, ["sft", "--run", str(run), "--data", str(d / "bom.jsonl")])
    assert_same_weights(run / "sft" / "model", ref / "sft" / "model")


def test_a_read_only_run_folder(base, tmp_path, monkeypatch, bad_input):
    tmp, ref = base
    run = run_copy(ref, tmp_path / "ro")
    os.chmod(run, 0o555)
    try:
        if os.access(run, os.W_OK):
            pytest.skip("running as root: a read-only folder is writable")
        msg = bad_input(["sft", "--run", str(run)])
        assert "Permission denied" in msg and str(run) in msg, msg
    finally:
        os.chmod(run, 0o755)


def test_prm_labels_that_do_not_match_the_steps_are_named_at_read_time(base, tmp_path, monkeypatch, bad_input):
    tmp, ref = base
    run = run_copy(ref, tmp_path / "run", ("pretrain", "align", "sft"))
    lines = (ref / "label" / "dualmath.jsonl").read_text().splitlines()
    k, rec = next((i, json.loads(l)) for i, l in enumerate(lines) if len(json.loads(l)["steps"]) >= 2)
    rec["labels"] = rec["labels"][:-1]
    lines[k] = json.dumps(rec)
    bad = tmp_path / "lab" / "dualmath.jsonl"
    bad.parent.mkdir()
    bad.write_text("\n".join(lines) + "\n")
    shutil.copy(ref / "label" / "dualmath.meta.json", bad.parent)
    n = len(rec["steps"])
    msg = bad_input(["prm", "--run", str(run), "--data", str(bad)])
    assert f"{bad}:{k + 1}: {n - 1} labels for {n} steps" in msg, msg
    with pytest.raises(DataError, match=rf":{k + 1}: {n - 1} labels for {n} steps"):
        PRMExamples(read_jsonl(bad), Tokenizer.from_file(ref / "tokenizer.json"), load_model(ref / "sft" / "model").cfg,
                    dualmath_image_root(bad))
    assert not (run / "prm" / "model").exists()


def test_eval_and_synth_exit_2_with_one_line(base, tmp_path, capsys):
    tmp, ref = base
    lone = tmp_path / "lone" / "model"
    shutil.copytree(ref / "sft" / "model", lone)
    test = str(tmp / "data" / "test.jsonl")
    (tmp_path / "bad.jsonl").write_bytes(Path(test).read_bytes().split(b"\n")[0] + b"\n\xff\n")
    (tmp_path / "afile").write_text("x")
    cases = [(eval_cli, ["--model", str(lone), "--data", test], "pass --tokenizer"),
             (eval_cli, ["--model", str(ref / "sft" / "model"), "--data", str(tmp_path / "bad.jsonl")],
              f"{tmp_path / 'bad.jsonl'}:2: not UTF-8"),
             (eval_cli, ["--model", str(tmp_path / "nothing"), "--data", test], f"{tmp_path / 'nothing'}"),
             (synth, ["world", "--out", str(tmp_path / "afile")], f"{tmp_path / 'afile'}: exists and is not a folder"),
             (synth, ["label", "--run", str(tmp_path / "norun"), "--data", str(tmp / "data")], str(tmp_path / "norun"))]
    for mod, argv, message in cases:
        capsys.readouterr()
        assert mod.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def _halves(mode: str, left, right, size: int = 16) -> Image.Image:
    """A size x size image of `mode`: the left half one value, the right half another."""
    im = Image.new(mode, (size, size), left)
    im.paste(Image.new(mode, (size // 2, size), right), (size // 2, 0))
    return im


def _from_array(left, right, dtype, size: int = 16) -> Image.Image:
    a = np.empty((size, size), dtype)
    a[:, :size // 2], a[:, size // 2:] = left, right
    return Image.fromarray(a)


def _palette(mode: str) -> Image.Image:
    p = _halves("P", 0, 1)
    p.putpalette([12, 34, 56, 200, 100, 50])
    if mode == "PA":
        p = p.convert("PA")
        p.putalpha(_halves("L", 255, 0))
    return p


WHITE = (255, 255, 255)
IMAGES = {   # mode: (image, left RGB, right RGB), the expected values worked out by hand
    "1": (lambda: _halves("1", 0, 1), (0, 0, 0), WHITE),
    "L": (lambda: _halves("L", 10, 200), (10,) * 3, (200,) * 3),
    "LA": (lambda: _halves("LA", (10, 255), (200, 0)), (10,) * 3, WHITE),            # alpha 0 -> white
    "P": (lambda: _palette("P"), (12, 34, 56), (200, 100, 50)),
    "PA": (lambda: _palette("PA"), (12, 34, 56), WHITE),
    "RGB": (lambda: _halves("RGB", (1, 2, 3), (250, 128, 0)), (1, 2, 3), (250, 128, 0)),
    "RGBA": (lambda: _halves("RGBA", (1, 2, 3, 255), (250, 128, 0, 0)), (1, 2, 3), WHITE),
    # CMYK -> RGB: 255 * (1 - C/255) * (1 - K/255): (10, 20, 30, 40) -> 245*215/255 = 206.6 -> 207, ...
    "CMYK": (lambda: _halves("CMYK", (0, 64, 128, 0), (10, 20, 30, 40)), (255, 191, 127), (207, 198, 190)),
    # 16 bits / 257: 25700 -> 100, 1000 -> 3.89 -> 4
    "I;16": (lambda: _from_array(25700, 1000, np.uint16), (100,) * 3, (4,) * 3),
    "I": (lambda: _from_array(514, 65535, np.int32), (2,) * 3, (255,) * 3),          # above 255: / 257
    "I 8-bit": (lambda: _from_array(7, 255, np.int32), (7,) * 3, (255,) * 3),        # 0..255: kept
    "F": (lambda: _from_array(0.2, 1.0, np.float32), (51,) * 3, (255,) * 3),         # [0, 1]: * 255
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_every_image_mode_preprocesses_to_its_8_bit_values(name):
    make, left, right = IMAGES[name]
    im = make()
    assert im.mode == name.split()[0]
    px = (preprocess(im, get_config("micro").vision) * 255).round().to(torch.uint8)     # [3, 16, 16]
    assert px.shape == (3, 16, 16)
    colour = lambda rgb: torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1)          # noqa: E731  [3, 1, 1]
    assert (px[:, :, :8] == colour(left)).all(), px[:, 0, 0]
    assert (px[:, :, 8:] == colour(right)).all(), px[:, 0, 15]


@pytest.mark.parametrize("left, right, dtype, message", [
    (-0.5, 1.0, np.float32, r"F image with values in \[-0.5, 1.0\]"),
    (float("nan"), 1.0, np.float32, r"cannot map to 8 bits"),
    (70000, 1, np.int32, r"I image with values up to 70000: more than 16 bits"),
])
def test_out_of_range_images_are_refused(left, right, dtype, message):
    with pytest.raises(ValueError, match=message):
        preprocess(_from_array(left, right, dtype), get_config("micro").vision)


# ---- 6. smaller guarantees --------------------------------------------------------------------

def test_quick_runs_checkpoint_by_time(tmp_path, monkeypatch):
    q = quick_recipe()
    assert q.sft.steps < q.sft.ckpt_every and q.sft.ckpt_seconds <= 60     # never by count in a quick run
    saved = []
    real = trainer._save_resume
    monkeypatch.setattr(trainer, "_save_resume", lambda sd, mods, o, step, *a: (saved.append(step),
                                                                                 real(sd, mods, o, step, *a)))
    opt = replace(q.sft, steps=3, batch_size=8, micro_batch=8, bf16=False)
    for tick, expected in ((0.0, []), (q.sft.ckpt_seconds + 1, [1, 2])):
        clock = iter(range(10_000))
        monkeypatch.setattr(trainer, "time", types.SimpleNamespace(time=lambda: tick * next(clock)))
        saved.clear()
        model, data = _lm_setup()
        sd = tmp_path / f"tick{tick}"
        assert train_loop(sd, "q", {"model": model}, opt, train.lm_step_fn(model, data, opt, 0, RT), RT, quiet=True)
        assert saved == expected


def test_dualmath_images_resolve_after_the_run_folder_moves(base, tmp_path, monkeypatch):
    tmp, ref = base
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(tmp / "data")
    monkeypatch.chdir(work)
    model = load_model(ref / "sft" / "model").eval()
    tok = Tokenizer.from_file(ref / "tokenizer.json")
    label_dualmath(model, tok, Path("data") / "cot_train.jsonl", Path("runs") / "x" / "label", n_problems=2,
                   k_samples=2, n_probe=2, chunk=2, compare_mc=0, max_new_tokens=16, progress=False)
    moved = tmp_path / "elsewhere" / "deeper" / "x"
    moved.parent.mkdir(parents=True)
    shutil.move(str(work / "runs" / "x"), str(moved))
    monkeypatch.chdir(moved)                                      # another depth and another cwd
    path = moved / "label" / "dualmath.jsonl"
    recs = read_jsonl(path)
    root = dualmath_image_root(path)
    assert recs and all((root / r["image"]).is_file() for r in recs)
    assert len(PRMExamples(recs, tok, model.cfg, root)) == len(recs)


def test_state_json_holds_no_nan_and_run_files_are_strict_json(base, tmp_path):
    tmp, ref = base
    model, _ = _lm_setup()
    write_result(tmp_path, model, {"stage": "x", "heldout": {"auc": float("nan"), "all": [float("inf"), 0.5]}})
    text = (tmp_path / "state.json").read_text()
    assert strict_json(text) == {"done": True, "stage": "x", "heldout": {"auc": None, "all": [None, 0.5]}}
    files = [f for f in list(ref.rglob("*")) + list((tmp / "data").rglob("*")) if f.suffix in (".json", ".jsonl")]
    assert len(files) >= 12
    for f in files:
        for line in ([f.read_text()] if f.suffix == ".json" else f.read_text().splitlines()):
            strict_json(line)


def test_a_checkpoint_on_a_gpu_keeps_the_device_generator(tmp_path, monkeypatch):
    """The CUDA generator's state (GPU dropout) is saved in resume/ and restored (torch.cuda faked:
    the loop runs on the CPU, only the state's round trip is checked)."""
    states = {"now": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: states["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device=None: states.__setitem__("now", s.clone()))
    gpu = Runtime(device=torch.device("cuda"))
    monkeypatch.setattr(gpu, "to", lambda *t: list(t))
    opt = Opt(steps=3, batch_size=4, micro_batch=4, bf16=False, ckpt_every=1000)
    model, data = _lm_setup()
    assert not train_loop(tmp_path, "g", {"model": model}, opt, train.lm_step_fn(model, data, opt, 0, gpu), gpu,
                          stop_after=1, quiet=True)
    assert torch.equal(load_file(str(tmp_path / "resume" / "rng.safetensors"))[trainer.CUDA_RNG], torch.arange(16))
    states["now"] = torch.zeros(16, dtype=torch.uint8)
    model, data = _lm_setup()
    train_loop(tmp_path, "g", {"model": model}, opt, train.lm_step_fn(model, data, opt, 0, gpu), gpu,
               stop_after=1, quiet=True)
    assert torch.equal(states["now"], torch.arange(16, dtype=torch.uint8))
