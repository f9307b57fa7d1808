"""FSDP2 (ursa/dist.py) on 2 CPU processes (gloo) against one process, plus the memory plan.

Two torchrun launches of tests/fsdp_worker.py (module fixture), then the checks:
- SFT and PRM losses (and gradient norms, which exercise clip_grad_norm_ on DTensors) of every
  optimizer step equal the single-process loop on the same global batch, fp32, to 1e-5; the data
  are split over the ranks, normalised by the global token / tag count; PRM dropout is OFF (ranks
  see other rows than one process, so seeded dropout could not match);
- bf16 mixed precision (bf16 compute, fp32 shards and reduction) against the fp32 single process:
  within 2e-2 relative; one step of the tiny-hybrid preset (SAM + SigLIP blocks sharded and
  checkpointed) equals one process in fp32;
- a strict-load error found on rank 0 is raised on both ranks;
- the FSDP model's export loads in one process (ursa.weights.load_model) with the same logits and the
  same parameters as the single-process run; replicate() gives the same logits; names are native;
- a fresh process group resumes from the sharded checkpoint and its losses equal the uninterrupted
  run's (model, optimizer, step and RNG restored);
- both launches exit 0 with no abort at interpreter exit (os._exit after destroy_process_group);
- the memory plan's terms against hand-computed numbers.
The whole file takes about 30 s on 2 busy cores.
"""
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fsdp_worker as W                                # noqa: E402
from ursa.config import get_config                    # noqa: E402
from ursa.dist import rank_indices                     # noqa: E402
from ursa.memory import memory_plan                   # noqa: E402
from ursa.model import URSAModel, init_weights        # noqa: E402
from ursa.weights import load_model, save_model       # noqa: E402

TIMEOUT = 150


def _launch(out: Path, phase: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fsdp_worker.py"), "--out", str(out), "--phase", phase]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cfg = get_config("micro")                                  # the PRM starts from a policy dir
    save_model(init_weights(URSAModel(cfg), std=0.2, seed=3), out / "prm_base")
    procs, times = {}, {}
    for phase in ("main", "resume"):
        t = time.time()
        procs[phase] = _launch(out, phase)
        times[phase] = time.time() - t
        if procs[phase].returncode != 0:
            pytest.fail(f"torchrun {phase} exited {procs[phase].returncode}:\n"
                        f"{procs[phase].stdout[-3000:]}\n{procs[phase].stderr[-6000:]}")
    res = {ph: json.loads((out / f"{ph}.json").read_text()) for ph in procs}
    return {"out": out, "procs": procs, "res": res, "times": times}


@functools.lru_cache(maxsize=None)
def _reference(job: str, base_dir: Path):
    return W.reference_run(job, base_dir)


def _steps(d):
    return [d[k] for k in sorted(d, key=int)]


def test_clean_exit(runs):
    for phase, p in runs["procs"].items():
        assert p.returncode == 0
        assert "WORKER DONE" in p.stdout, phase
        assert "terminate called" not in p.stderr, phase
    assert runs["res"]["main"]["world_size"] == 2


def test_strict_load_error_reaches_every_rank(runs):
    # tiny-hybrid expects the split projector that the micro directory lacks: rank 0's strict check
    # fails, and the error is raised on both ranks (instead of rank 1 waiting in a broadcast)
    msg = runs["res"]["main"]["strict_error"]
    assert msg.startswith("rank 0: CheckpointError:"), msg
    assert "prm_base: lacks" in msg and "aligner.high_up_proj.bias" in msg
    assert runs["res"]["main"]["strict_error_ranks"] == 2


@pytest.mark.parametrize("job", ["sft", "prm"])
def test_fp32_losses_equal_one_process(runs, job):
    losses, norms, _ = _reference(job, runs["out"] / "prm_base")
    got = runs["res"]["main"][job]
    assert len(_steps(got["losses"])) == W.JOBS[job]["steps"] >= 3
    torch.testing.assert_close(torch.tensor(_steps(got["losses"])), torch.tensor(losses), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(_steps(got["norms"])), torch.tensor(norms), rtol=1e-5, atol=1e-6)
    # the steps must actually move the model (and clipping must be active at least once)
    assert abs(losses[-1] - losses[0]) > 1e-2
    assert max(norms) > W.CLIP


def test_bf16_mixed_precision_close_to_fp32(runs):
    losses, _, _ = _reference("bf16", runs["out"] / "prm_base")
    got = torch.tensor(_steps(runs["res"]["main"]["bf16"]["losses"]))
    torch.testing.assert_close(got, torch.tensor(losses), rtol=2e-2, atol=0)
    # and bf16 really ran in bf16: not bit-equal to fp32
    assert (got - torch.tensor(losses)).abs().max() > 1e-6


def test_tiny_hybrid_step_equals_one_process(runs):
    losses, norms, _ = _reference("hybrid", runs["out"] / "prm_base")
    got = runs["res"]["main"]["hybrid"]
    assert abs(_steps(got["losses"])[0] - losses[0]) < 1e-5
    assert abs(_steps(got["norms"])[0] - norms[0]) < 1e-5 * max(1.0, norms[0])


def test_export_loads_in_one_process(runs):
    r = runs["res"]["main"]["sft"]
    assert r["names_native"] is True
    assert r["logit_scale"] > 0.1
    assert r["export_max_diff"] < 1e-5
    assert r["replica_max_diff"] < 1e-5
    # the exported weights are the single-process run's weights after the same 5 steps, except
    # the KEY biases: softmax ignores them, their true gradient is 0, and AdamW turns the ~1e-9
    # float noise of that zero into +-lr steps whose signs differ between the two runs
    _, _, ref = _reference("sft", runs["out"] / "prm_base")
    exported = load_model(runs["out"] / "export")
    for (n, a), (m, b) in zip(ref.state_dict().items(), exported.state_dict().items()):
        assert n == m
        keep = torch.ones_like(a, dtype=torch.bool)
        if n.endswith("k_proj.bias"):
            keep[:] = False
        elif n.endswith("attn.qkv.bias"):                       # [q; k; v]: drop the k third
            D = a.shape[0] // 3
            keep[D:2 * D] = False
        torch.testing.assert_close(b[keep], a[keep], rtol=0, atol=2e-5, msg=n)
    meta = json.loads((runs["out"] / "export" / "config.json").read_text())
    assert meta["stage"] == "test"


def test_resume_continues_exactly(runs):
    full = runs["res"]["main"]["sft"]["losses"]
    resumed = runs["res"]["resume"]["sft"]["losses"]
    assert sorted(resumed, key=int) == ["3", "4"]
    for k in resumed:
        assert abs(resumed[k] - full[k]) < 1e-7, (k, resumed[k], full[k])
    for k in resumed:
        assert abs(runs["res"]["resume"]["sft"]["norms"][k] - runs["res"]["main"]["sft"]["norms"][k]) < 1e-6
    ck = runs["out"] / "ckpt"
    assert (ck / "state.json").exists() and not (runs["out"] / "ckpt.tmp").exists()
    assert json.loads((ck / "state.json").read_text())["state"]["step"] == 3


# ---- pure helpers (no processes) ----------------------------------------------------------------

def test_rank_indices_split_contiguously():
    assert rank_indices(list(range(8)), 0, 2) == [0, 1, 2, 3]
    assert rank_indices(list(range(8)), 1, 2) == [4, 5, 6, 7]
    assert rank_indices([9, 8, 7, 6, 5, 4], 2, 3) == [5, 4]
    with pytest.raises(ValueError, match="10 rows does not split evenly over 4 ranks"):
        rank_indices(list(range(10)), 0, 4)


def test_memory_plan_terms_by_hand():
    cfg = get_config("micro")
    P = URSAModel(cfg).num_params()                                   # 29,824
    plan = memory_plan(cfg, gpus=2, micro_batch=1, seq_len=8, logits=False, overhead_gib=0)
    st, tr = plan["static"], plan["train"]
    assert plan["params"] == P == 29_824
    assert st["sharded params (fp32)"] == 4 * P / 2
    assert st["AdamW m, v (fp32)"] == 8 * P / 2
    # micro LM: H 32, I 64, L 2; B 1, T 8: boundaries 2 x 2*8*32 = 1024; one layer 8*(26*32 + 8*64) =
    # 8 * 1344 = 10752; mask 3 * 64 = 192
    assert tr["LM activations"] == 1024 + 10752 + 192
    # one LM layer of micro: norms 2*32, q 32*32+32, k,v 2*(32*16+16), o 32*32, mlp 3*32*64 = 9,344
    assert plan["lm_block_params"] == 64 + 1056 + 2 * 528 + 1024 + 6144
    # PRM-style: only the LLM trains -> grads and AdamW states shrink, params do not
    llm = memory_plan(cfg, gpus=2, micro_batch=1, seq_len=8, trainable="llm")
    P_llm = sum(p.numel() for p in URSAModel(cfg).language_model.parameters())
    assert llm["static"]["AdamW m, v (fp32)"] == 8 * P_llm / 2
    assert llm["static"]["sharded params (fp32)"] == 4 * P / 2
    # no_sync keeps every unsharded gradient in fp32 once there is more than one micro-batch
    assert memory_plan(cfg, 2, 1, 8, grad_accum=4)["train"]["no_sync unsharded grads (fp32)"] == 4 * P
    # rollout: the KV cache of 3 rows x 8 tokens: 2 layers x (k, v) x 2 kv heads x 8 dims x 2 bytes
    roll = memory_plan(cfg, 2, 1, 8, gen_rows=3)["rollout"]
    assert roll["KV cache"] == 3 * 8 * 2 * 2 * 2 * 8 * 2 and roll["bf16 replica for generation"] == 2 * P
    big = memory_plan(get_config("ursa-8b"), gpus=8, micro_batch=1, seq_len=4096)
    assert big["params"] == 8_044_783_361
    # 16 bytes per parameter over 8 GPUs for the sharded fp32 states
    assert abs(sum(v for k, v in big["static"].items() if "fp32" in k) - 16 * 8_044_783_361 / 8) < 1
    assert memory_plan(get_config("ursa-8b"), gpus=1, micro_batch=1, seq_len=4096)["verdict"] == "does not fit"
    assert big["total"] < memory_plan(get_config("ursa-8b"), gpus=4, micro_batch=1, seq_len=4096)["total"]
    with pytest.raises(ValueError, match="trainable must be one of"):
        memory_plan(cfg, 2, 1, 8, trainable="vision")


def test_a_changed_sharded_checkpoint_is_refused(runs, tmp_path):
    """torch.distributed.checkpoint unpickles its metadata: a resume folder whose files differ from
    the checksums written at save time is refused before anything is loaded."""
    import shutil
    from ursa.dist import verify_sharded
    ck = tmp_path / "ckpt"
    shutil.copytree(runs["out"] / "ckpt", ck)
    assert verify_sharded(ck)["sha256"]                               # as written: accepted
    meta = next(f for f in ck.iterdir() if f.name.endswith(".metadata"))
    meta.write_bytes(meta.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="differ from the checksums"):
        verify_sharded(ck)
    (ck / "extra.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="extra.bin"):
        verify_sharded(ck)
