"""FSDP2 scale-out: process group, sharded model, accumulation, clipping, checkpoints.

References: PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`, per-parameter DTensor sharding) and
Distributed Checkpoint (`torch.distributed.checkpoint`); torchtitan for the order of operations
(meta-device build -> activation checkpointing -> fully_shard per block, then the root -> to_empty ->
load); URSA Stage I ("AdamW, FSDP, bf16"; docs/paper.md). Only PyTorch's own engine is used.

    torchrun --standalone --nproc_per_node=8 train.py sft --fsdp ...     (docs/scale_out.md)

    info  = setup()                                   # RANK / WORLD_SIZE / LOCAL_RANK from torchrun
    model = build_fsdp_model(cfg, model_dir)          # sharded over all ranks; native state-dict names
    rows  = rank_indices(global_rows, info.rank, info.world_size)
    n     = global_count(local_targets)               # loss denominator of the WHOLE optimizer step
    for mb in accumulate(model, micro_batches):       # reduce-scatter only after the last micro-batch
        loss(mb, num_targets=n).backward()
    clip_grad_norm_(params, 1.0); optim.step()
    save_sharded(dir, model, optim, {"step": s}); export_model_dir(model, out_dir)
    teardown(0)                                       # destroy_process_group(), then os._exit

Why the sums line up: every rank divides its summed per-token loss by the GLOBAL count of the
optimizer step, and build_fsdp_model sets the gradient divide factor to 1, so the reduce-scatter
SUMS the ranks' gradients (FSDP2's default would average them, i.e. divide by the world size). The
reduced gradient is then exactly that of sum(all tokens) / global count, as one process computes it
(tests/test_fsdp.py checks the losses of several optimizer steps against one process).

Mixed precision (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)): the sharded parameters
stay fp32 (they ARE the master weights), so are their gradients and AdamW's m and v; each block is
all-gathered in bf16 just before it runs and freed after; gradients are reduce-scattered in fp32.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ursa import io
from ursa.config import ModelConfig
from ursa.io import commit_dir, new_tmp_dir, recover_dir
from ursa.model import URSAModel, init_weights, value_head_tensors
from ursa.weights import check_plan, identity_plan, read_config, read_plan, save_model, weight_files


# =============================================================================================
# Process group
# =============================================================================================

@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT; single node or multi-node rendezvous alike). Without torchrun it
    starts a 1-process group, so `python train.py sft --fsdp` runs too.

    backend: "nccl" on CUDA, "gloo" on CPU (default: nccl when CUDA is available)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend nccl needs CUDA; use backend gloo on CPU")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) "
                               f"visible: --nproc_per_node must not exceed the GPUs of a node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif backend == "gloo":
        device = torch.device("cpu")
    else:
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if not dist.is_initialized():
        from datetime import timedelta
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kw)
    return DistInfo(rank, world, local_rank, device, backend)


def teardown(code: int = 0):
    """destroy_process_group(), flush, then os._exit(code).

    os._exit skips the interpreter's shutdown: measured here, about 1 run in 12 otherwise aborted at
    exit ("terminate called without an active exception") after destroy_process_group(). A barrier
    first (only on success: after an error another rank may never reach it)."""
    try:
        if dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_and_exit(fn, *args, **kwargs):
    """Call fn(*args, **kwargs); print any exception; teardown() with 0 or 1. Never returns."""
    code = 0
    try:
        fn(*args, **kwargs)
    except SystemExit as e:        # argparse errors, sys.exit(n)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:          # noqa: BLE001 - report, then leave without hanging the others
        import traceback
        traceback.print_exc()
        code = 1
    teardown(code)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier():
    if dist.is_initialized():
        dist.barrier()


# =============================================================================================
# Global counts and the rank's share of a batch
# =============================================================================================

def global_count(n: int) -> int:
    """Sum of n over all ranks (targets or tags of one optimizer step; the project's rule: normalise by the
    count of the whole step, counted before the micro-batch loop and across ranks)."""
    if not dist.is_initialized():
        return int(n)
    t = torch.tensor([int(n)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def global_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a few floats (for logging: loss, correct counts)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def rank_indices(global_indices: Sequence[int], rank: int, world: int) -> list:
    """This rank's contiguous slice of a global batch: rows [rank * B/world, (rank+1) * B/world).

    The batch must split evenly: every rank must run the same number of forward/backward calls
    (each one is a collective under FSDP), or they deadlock."""
    B = len(global_indices)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    if B % world:
        raise ValueError(f"a global batch of {B} rows does not split evenly over {world} ranks; "
                         f"choose a batch size divisible by the number of processes")
    per = B // world
    return list(global_indices[rank * per:(rank + 1) * per])


def accumulate(model: nn.Module, micro_batches: Sequence, no_sync: bool = True) -> Iterator:
    """Yield the micro-batches; with no_sync, gradients are reduce-scattered only after the LAST one
    (set_requires_gradient_sync(False) before the others). Costs memory: the unsharded gradients
    of every block are kept (in fp32 under mixed precision) until the last backward (memory_plan).
    A plain (non-FSDP) model passes through, so a loop can use it either way."""
    from torch.distributed.fsdp import FSDPModule
    micro_batches = list(micro_batches)
    fsdp = no_sync and isinstance(model, FSDPModule)
    try:
        for i, mb in enumerate(micro_batches):
            if fsdp:
                model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            yield mb
    finally:
        if fsdp:
            model.set_requires_gradient_sync(True)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    foreach: Optional[bool] = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for sharded (DTensor) gradients: the norm of the FULL gradient
    (the local norms are combined across ranks by DTensor), then every shard scaled by
    min(1, max_norm / (norm + 1e-6)). Returns the total norm as a plain 0-dim tensor."""
    from torch.distributed.tensor import DTensor
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite=False, foreach=foreach)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total


# =============================================================================================
# The sharded model
# =============================================================================================

def checkpoint_block(block: nn.Module) -> nn.Module:
    """Activation checkpointing of one block WITHOUT a wrapper module: its forward is replaced (on
    this instance only) by torch.utils.checkpoint of the original forward, so the module tree and
    every state-dict name stay the native ones (checkpoint_wrapper would insert
    `_checkpoint_wrapped_module.`). Under no_grad (generation, eval) the block runs plainly.

    Under FSDP the block's own hooks still run around the call (all-gather before, free after);
    the recomputation in backward happens after FSDP's pre-backward all-gather of this block."""
    from torch.utils.checkpoint import checkpoint
    inner = block.forward

    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    block.forward = forward
    return block


def sharded_blocks(model: URSAModel) -> list[nn.Module]:
    """The units FSDP shards one by one (and checkpointing recomputes): every vision transformer
    block (SAM and SigLIP) and every LM decoder layer. Everything else (embeddings, lm_head, final
    norm, the vision stems/necks, the projector, the value head) belongs to the root group."""
    return list(model.vision_model.blocks()) + list(model.language_model.model.layers)


def _init_state_dict(cfg: ModelConfig, seed: int, std: float) -> dict:
    """Exactly the values of init_weights(URSAModel(cfg), std, seed) in one process (global RNG
    untouched)."""
    with torch.random.fork_rng(devices=[]):
        m = init_weights(URSAModel(cfg), std=std, seed=seed)
    return m.state_dict()


def _dir_state_dict(cfg: ModelConfig, model_dir, expected: dict, seed: int) -> dict:
    """A model directory's tensors (strictly checked against `expected`: name -> shape; a NaN / inf
    tensor refused by name). A config with value_head=True over a directory without `score.*` gets
    the fresh head of ursa.model.init_value_head with `seed` (the PRM built on the SFT policy: the
    same values as ursa.weights.load_model(value_head=True, head_seed=seed) in one process)."""
    files = weight_files(model_dir)
    fresh_head = cfg.value_head and "score.weight" not in files
    want = {n: s for n, s in expected.items() if not (fresh_head and n.startswith("score."))}
    plan = identity_plan(files)
    check_plan(want, files, plan, set(), str(model_dir))
    sd = read_plan(files, plan)
    if fresh_head:
        sd["score.weight"], sd["score.bias"] = value_head_tensors(cfg.lm.hidden_size, seed)
    return sd


def _on_rank0(fn):
    """Run fn() on rank 0 only; an exception there is raised on EVERY rank (with rank 0's message),
    so the others never wait forever in the next collective."""
    result, err = None, ""
    if _rank() == 0:
        try:
            result = fn()
        except Exception as e:            # noqa: BLE001 - re-raised below on all ranks
            err = f"{type(e).__name__}: {e}"
    if dist.is_initialized():
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise RuntimeError(f"rank 0: {err}")
    return result


def build_fsdp_model(cfg: Optional[ModelConfig] = None, model_dir=None, mixed_precision: bool = True,
                     activation_checkpointing: bool = True, seed: int = 0, init_std: float = 0.02,
                     device: Optional[torch.device] = None) -> URSAModel:
    """URSAModel sharded with FSDP2 over all ranks, in torchtitan's order:

      1. build on the meta device (no memory);
      2. activation checkpointing per block (`checkpoint_block`, native names kept);
      3. fully_shard every vision block and every LM layer, then the root, with
         MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) when mixed_precision; gradient
         divide factor 1 (gradients are summed over ranks: the loss carries the global count);
      4. to_empty(device): allocate this rank's shards;
      5. fill them: rank 0 reads `model_dir` (config.json + safetensors, strictly checked) or computes
         init_weights(URSAModel(cfg), init_std, seed) (the same values as one process with that
         seed), and set_model_state_dict(full_state_dict, broadcast_from_rank0) sends each tensor to
         every rank, which keeps its own shard.

    cfg: the architecture (default: model_dir's config.json). Given together with model_dir it may
    differ in value_head / value_head_dropout (cfg.value_head on a directory without a head adds a
    fresh one, like ursa.weights.load_model(value_head=True)). The result keeps `.cfg`, so
    save_model / export_model_dir work on it. Rank 0 holds the full state dict in CPU memory once
    (32 GB for 8B in fp32; a bf16 released checkpoint 16 GB)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("build_fsdp_model: call ursa.dist.setup() first (torchrun or 1 process)")
    if cfg is None and model_dir is None:
        raise ValueError("build_fsdp_model: give a config, a model directory, or both")
    if model_dir is not None:                  # finish an interrupted folder swap, once, on rank 0
        _on_rank0(lambda: recover_dir(model_dir))
    if cfg is None:
        cfg = read_config(model_dir, recover=False)
    cfg.validate()
    device = device or _comm_device()
    with torch.device("meta"):
        model = URSAModel(cfg)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    blocks = sharded_blocks(model)
    if activation_checkpointing:
        for b in blocks:
            checkpoint_block(b)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if mixed_precision else MixedPrecisionPolicy())
    mesh = init_device_mesh(device.type, (_world(),))
    for b in blocks:
        fully_shard(b, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in [*blocks, model]:          # sum, not average, over ranks: losses use the global count
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)   # plain SUM (gloo has no PREMUL_SUM; 1.0 = no div)
    model.to_empty(device=device)
    full = _on_rank0(lambda: _dir_state_dict(cfg, model_dir, expected, seed) if model_dir is not None
                     else _init_state_dict(cfg, seed, init_std))
    set_model_state_dict(model, full if _rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    return model


def full_state_dict(model: nn.Module, cpu_offload: bool = True) -> dict:
    """The full (unsharded) state dict with the native names. Every rank must call it (all-gathers);
    with cpu_offload only rank 0 receives the tensors (on CPU), the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=cpu_offload))


def export_model_dir(model: nn.Module, out_dir, extra: Optional[dict] = None,
                     dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 2**30):
    """Rank 0 writes a single-process model directory (config.json + safetensors, sharded with an
    index above max_shard_bytes) from the full state dict, via ursa.weights.save_model (atomic).
    Every rank must call it. dtype: cast floating tensors (e.g. torch.bfloat16 as released)."""
    sd = full_state_dict(model, cpu_offload=True)
    if _rank() == 0:
        if dtype is not None:
            sd = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in sd.items()}
        save_model(model, out_dir, extra=extra, max_shard_bytes=max_shard_bytes, state_dict=sd)
    del sd
    barrier()


def replicate(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
              device: Optional[torch.device] = None) -> URSAModel:
    """A plain, unsharded copy of the sharded model on every rank (eval mode, `dtype`), for
    generation: a decode step through the FSDP model all-gathers every block for one token, this
    copy does not, and ranks may then decode different numbers of steps. Every rank must call it.
    Gathered one tensor at a time and cast on arrival: peak = the copy (2 bytes/parameter in bf16,
    16 GB for 8B) + one full fp32 tensor. Free it (del) before the training forward."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    for m in model.modules():          # the root may still hold its unsharded (bf16) params
        if isinstance(m, FSDPModule):
            m.reshard()
    device = device or _comm_device()
    with torch.device("meta"):
        rep = URSAModel(model.cfg).to(dtype)
    rep.to_empty(device=device)
    dst = rep.state_dict()
    with torch.no_grad():
        for name, t in model.state_dict().items():          # the same order on every rank
            dst[name].copy_(t.full_tensor() if isinstance(t, DTensor) else t)
    return rep.eval()


# =============================================================================================
# Sharded checkpoints (exact resume)
# =============================================================================================

STATE_NAME = "state.json"


def _rank_file(d: Path, rank: int) -> Path:
    return d / f"rank{rank:05d}.safetensors"


def save_sharded(ckpt_dir, model: nn.Module, optim: torch.optim.Optimizer, state: dict):
    """Write a resumable checkpoint with torch.distributed.checkpoint: model and optimizer shards
    (every rank writes its own), `state` (JSON values from rank 0: step, data position, ...; tensor
    values per rank), and each rank's RNG states. Atomic: all ranks write `<dir>.tmp`, barrier, rank 0
    renames it to `<dir>` (replacing an older one). Multi-node runs need a shared filesystem."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    ckpt_dir = Path(ckpt_dir)
    tmp = _on_rank0(lambda: new_tmp_dir(ckpt_dir))
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp") if tmp is None else tmp
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(_rank_file(tmp, _rank())))
    plain = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    barrier()                                    # every rank's files are complete
    if _rank() == 0:
        io.write_json(tmp / STATE_NAME, {"world_size": _world(), "state": plain, "sha256": _file_hashes(tmp)})
    barrier()
    _on_rank0(lambda: commit_dir(tmp, ckpt_dir))


def _file_hashes(folder: Path) -> dict:
    """{file name: sha256 hex} of every file in a checkpoint folder but its state file."""
    import hashlib
    out = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != STATE_NAME:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[f.name] = h.hexdigest()
    return out


def verify_sharded(ckpt_dir) -> dict:
    """The checkpoint's state, after checking that its files are exactly those save_sharded wrote
    (sha256 of each). torch.distributed.checkpoint unpickles its metadata, so a resume folder is
    trusted like code: one that was changed, or was not written by save_sharded, is refused."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / STATE_NAME
    if not meta_path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: no {STATE_NAME} (not a finished sharded checkpoint)")
    meta = io.read_json(meta_path, "sharded checkpoint state")
    want = meta.get("sha256")
    if not isinstance(want, dict):
        raise ValueError(f"{meta_path}: no file checksums; refusing to unpickle a checkpoint save_sharded did not write")
    got = _file_hashes(ckpt_dir)
    bad = sorted(set(want) ^ set(got) | {n for n in set(want) & set(got) if want[n] != got[n]})
    if bad:
        raise ValueError(f"{ckpt_dir}: files differ from the checksums written at save time ({', '.join(bad[:5])}); "
                         f"refusing to load it (torch unpickles its metadata)")
    return meta


def load_sharded(ckpt_dir, model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    """Load a save_sharded checkpoint into an already built model and optimizer (same parameters,
    same param groups); restore this rank's RNG; return the saved `state` (JSON values + this rank's
    tensors). The model/optimizer may be resharded to another world size (DCP handles it); the RNG
    is restored only when the world size is the one saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    ckpt_dir = Path(ckpt_dir)
    meta = _on_rank0(lambda: verify_sharded(ckpt_dir)) or io.read_json(ckpt_dir / STATE_NAME, "sharded checkpoint state")
    msd, osd = get_state_dict(model, optim)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(ckpt_dir))
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    state = dict(meta["state"])
    rf = _rank_file(ckpt_dir, _rank())
    if meta["world_size"] == _world() and rf.exists():
        tensors = load_file(str(rf))
        torch.set_rng_state(tensors.pop("rng.torch"))
        cuda_rng = tensors.pop("rng.cuda", None)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rng)
        state.update(tensors)
    elif _rank() == 0:
        print(f"[dist] {ckpt_dir}: saved with {meta['world_size']} ranks, running {_world()}: "
              f"model and optimizer resharded, RNG states not restored", flush=True)
    return state
