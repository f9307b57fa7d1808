"""The generic training loop every stage runs: optimiser, schedule, resume, checkpoints, guards.

    rt   = Runtime(device="cpu")                      # or Runtime.from_dist(ursa.dist.setup()) under torchrun
    opt  = Opt(steps=500, batch_size=64, lr=1e-3)
    done = train_loop(stage_dir, "sft", {"model": model}, opt, step_fn, rt)

`step_fn(step)` runs forward + backward for the WHOLE optimizer step (it splits micro-batches
itself, dividing every micro-batch's summed loss by the step's target count, counted before the
micro-batch loop and across ranks, so micro-batching never changes the gradient) and returns its
metrics: "loss" (the step's loss), "tokens" (real, non-padding tokens of the step) and any floats.

What the loop guarantees
- Resume is exact: a stage killed at any moment and rerun continues from its last checkpoint in
  <stage>/resume/ (modules, AdamW state, RNG, step) and ends with the weights the uninterrupted run
  would have had. Checkpoints are written every `ckpt_every` steps and at least every
  `ckpt_seconds`, swapped in atomically (ursa.io.atomic_dir: a complete checkpoint exists at every
  moment; `recover_dir` finishes a swap a kill interrupted).
- Resuming with other settings (steps, batch size, learning rate, ...) is refused, naming each
  difference, unless `force=True`.
- A non-finite loss or gradient norm stops the stage with one line naming the stage and step,
  before the optimizer step: the last checkpoint stays as it was and no weights are written
  (torchtitan's choice too; skipping the step would hide a diverging run). Weights an update made
  non-finite (a huge learning rate times finite gradients) are never checkpointed either.
- The checkpoint holds the CPU generator's state and, on a GPU, the device generator's (dropout),
  so a resumed run draws the masks the uninterrupted one drew.
- metrics.jsonl gets one JSON line per logged step; a line cut by a kill is ignored on resume, and
  lines logged after the checkpoint are dropped, so the file always matches the weights.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ursa import dist, io
from ursa.weights import load_model, read_config, save_model

ADAMW_BETAS = (0.9, 0.95)       # the common LLM choice (beta2 0.95 instead of 0.999: steadier at short runs)
ADAMW_EPS = 1e-8
CKPT_SECONDS = 60.0             # a checkpoint at least this often, so a quick run can be resumed too
# Opt fields that may differ on resume: how often to log or checkpoint, and how a step is cut into
# micro-batches (the sums are the same), change nothing about the trained weights.
RESUMABLE_CHANGES = ("log_every", "ckpt_every", "ckpt_seconds", "micro_batch")
CUDA_RNG = "cuda_rng"           # the device generator's state in a one-process checkpoint on a GPU


class TrainingError(ValueError):
    """A stage that cannot go on (non-finite loss, a resume with other settings): one line."""


@dataclass
class Opt:
    """One stage's optimisation settings."""
    steps: int = 100
    batch_size: int = 64          # rows per optimizer step, all ranks together
    micro_batch: int = 64         # rows per forward/backward on one rank
    lr: float = 1e-3
    warmup_ratio: float = 0.02
    min_lr_ratio: float = 0.1     # cosine decay ends at min_lr_ratio * lr
    weight_decay: float = 0.01
    clip: float = 1.0             # gradient-norm clip (0: none)
    bf16: bool = True             # bf16 autocast (one process) or bf16 mixed precision (FSDP)
    log_every: int = 10
    ckpt_every: int = 50
    ckpt_seconds: float = CKPT_SECONDS
    seed: int = 0
    epochs: Optional[float] = None  # if set (and steps is not), steps = ceil(epochs * rows / rows per step)

    def check(self, where: str) -> "Opt":
        """Refuse settings that would fail deep inside the loop, naming the flag."""
        for name in ("batch_size", "micro_batch", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{where}: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps < 1:
            raise TrainingError(f"{where}: --steps must be >= 1, got {self.steps} (a stage with no step "
                                f"would save its starting weights as trained)")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise TrainingError(f"{where}: --lr must be a positive number, got {self.lr}")
        if self.epochs is not None and self.epochs <= 0:
            raise TrainingError(f"{where}: --epochs must be > 0, got {self.epochs}")
        return self


def with_epochs(opt: Opt, rows: int, rows_per_step: int) -> Opt:
    """Resolve opt.epochs into a step count for a dataset of `rows` (a no-op without epochs)."""
    if opt.epochs is None:
        return opt
    if rows < 1:
        raise TrainingError("--epochs over an empty dataset")
    return replace(opt, steps=max(1, math.ceil(opt.epochs * rows / rows_per_step)), epochs=None)


def lr_at(step: int, opt: Opt) -> float:
    """Linear warmup over warmup_ratio * steps, then cosine decay to min_lr_ratio * lr."""
    warm = max(1, int(round(opt.warmup_ratio * opt.steps)))
    if step < warm:
        return opt.lr * (step + 1) / warm
    p = (step - warm) / max(1, opt.steps - warm)
    return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(params: Iterable[torch.nn.Parameter], opt: Opt) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms, scalars)."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": opt.weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=opt.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS)


def order(n: int, step: int, batch: int, seed: int) -> list[int]:
    """Row indices of optimizer step `step`: epoch permutations (seeded per epoch) laid end to end,
    so step k's rows depend on (n, k, batch, seed) only and a resumed run sees the same rows."""
    if n < 1:
        raise TrainingError("no training rows")
    start, out = step * batch, []
    while len(out) < batch:
        epoch, off = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[off:off + batch - len(out)].tolist())
    return out


def set_trainable(model: torch.nn.Module, parts: tuple) -> None:
    """Freeze everything except the named top-level parts ("vision_model", "aligner", ...)."""
    for n, p in model.named_parameters():
        p.requires_grad = n.split(".")[0] in parts


# ---- where a stage runs: one process (CPU or one GPU) or FSDP2 under torchrun ------------------

_FP32_NOTED = False     # the fp32 fallback's note is printed once per process


@functools.lru_cache(maxsize=None)
def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on `device`: on a GPU yes; on a CPU only with AVX512-BF16 or
    AMX. Elsewhere (AVX2-only CPUs, most laptops) oneDNN emulates bf16 and a bf16-autocast step runs
    about 10x slower than fp32 (docs/speed.md, "CPUs without native bf16"). Cached: asked per micro-batch."""
    if device.type != "cpu":
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@dataclass
class Runtime:
    """The device and, under --fsdp, the process group a stage runs in."""
    device: torch.device = torch.device("cpu")
    dist: Optional[dist.DistInfo] = None
    activation_checkpointing: bool = True
    no_sync: bool = True

    @classmethod
    def from_dist(cls, info: dist.DistInfo, activation_checkpointing: bool = True,
                  no_sync: bool = True) -> "Runtime":
        return cls(info.device, info, activation_checkpointing, no_sync)

    @property
    def rank(self) -> int:
        return self.dist.rank if self.dist else 0

    @property
    def world(self) -> int:
        return self.dist.world_size if self.dist else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self, bf16: bool):
        """bf16 autocast in one process; under FSDP the MixedPrecisionPolicy already computes in bf16.
        On a CPU without native bf16 (`native_bf16`) the stage computes in fp32 and says so once."""
        if self.dist is not None or not bf16:
            return contextlib.nullcontext()
        if not native_bf16(self.device):
            global _FP32_NOTED
            if not _FP32_NOTED:
                print("[runtime] this CPU has no native bf16 (AVX512-BF16 or AMX): computing in fp32, "
                      "since bf16 autocast would emulate bf16 at about a tenth of fp32's speed", file=sys.stderr)
                _FP32_NOTED = True
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def to(self, *tensors):
        return [None if t is None else t.to(self.device, non_blocking=True) for t in tensors]

    def rows(self, idx: list) -> list:
        """This rank's contiguous share of the step's global rows."""
        return dist.rank_indices(idx, self.rank, self.world)

    def load(self, model_dir, value_head: Optional[bool] = None, bf16: bool = True):
        """A stage's model: load_model on the device, or sharded with FSDP2 (bf16 mixed precision)."""
        if self.dist is None:
            return load_model(model_dir, device=self.device, value_head=value_head)
        cfg = read_config(model_dir)
        if value_head is not None:
            cfg.value_head = value_head
        return dist.build_fsdp_model(cfg, model_dir, mixed_precision=bf16,
                                     activation_checkpointing=self.activation_checkpointing)

    def main_first(self, fn: Callable, *args, **kwargs):
        """fn on rank 0, then on the other ranks (for steps that write shared files)."""
        if not self.is_main:
            dist.barrier()
        out = fn(*args, **kwargs)
        if self.is_main and self.dist is not None:
            dist.barrier()
        return out


# ---- state files ----------------------------------------------------------------------------

def stage_done(stage_dir) -> bool:
    f = Path(stage_dir) / "state.json"
    return f.exists() and bool(io.read_json(f, "stage state").get("done", False))


def read_metrics(path) -> list[dict]:
    """The lines of a metrics.jsonl; a last line cut by a kill (not valid JSON) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise TrainingError(f"{path}:{i + 1}: not valid JSON (only a cut last line is tolerated)") from None
    return out


def _opt_record(opt: Opt) -> dict:
    return {k: v for k, v in asdict(opt).items() if k not in RESUMABLE_CHANGES}


def _save_resume(stage_dir: Path, modules: dict, optim, step: int, opt: Opt, extra: dict, rt: Runtime):
    final = stage_dir / "resume"
    state = {"step": step, "opt": _opt_record(opt)}
    if rt.dist is not None:
        dist.save_sharded(final, modules["model"], optim, {**state, **extra})
        return
    with io.atomic_dir(final) as tmp:
        sd = {f"{k}.{n}": t.detach().cpu().contiguous() for k, m in modules.items() for n, t in m.state_dict().items()}
        save_file(sd, str(tmp / "modules.safetensors"))
        torch.save(optim.state_dict(), tmp / "optimizer.pt")
        tensors = {"torch_rng": torch.get_rng_state(), **{k: v.cpu() for k, v in extra.items() if torch.is_tensor(v)}}
        if rt.device.type == "cuda":       # dropout on the GPU draws from the device's generator
            tensors[CUDA_RNG] = torch.cuda.get_rng_state(rt.device)
        save_file(tensors, str(tmp / "rng.safetensors"))
        io.write_json(tmp / "state.json", state)


def _load_resume(stage_dir: Path, modules: dict, optim, rt: Runtime) -> tuple[dict, dict]:
    d = stage_dir / "resume"
    if rt.dist is not None:
        st = dist.load_sharded(d, modules["model"], optim)
        return {"step": st.pop("step"), "opt": st.pop("opt", {})}, {k: v for k, v in st.items() if torch.is_tensor(v)}
    sd = load_file(str(d / "modules.safetensors"))
    for k, m in modules.items():
        m.load_state_dict({n[len(k) + 1:]: t for n, t in sd.items() if n.startswith(k + ".")}, strict=True)
    optim.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
    rng = load_file(str(d / "rng.safetensors"))
    torch.set_rng_state(rng.pop("torch_rng"))
    cuda_rng = rng.pop(CUDA_RNG, None)
    if cuda_rng is not None and rt.device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rng, rt.device)
    return io.read_json(d / "state.json", "resume state"), rng


def _check_same_settings(name: str, saved: dict, opt: Opt, force: bool):
    now = _opt_record(opt)
    diff = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
    if diff and not force:
        raise TrainingError(f"[{name}] the checkpoint in resume/ was made with other settings "
                            f"({'; '.join(diff)}): rerun with the same flags, or pass --force to "
                            f"continue with the new ones")


def isolated_tokens_per_s(run_batch: Callable[[], None], tokens: int, params, repeats: int = 3) -> float:
    """Real tokens/s of the stage's forward + backward alone on one already-built batch (no data
    preparation, no optimizer step, no logging): the reference the loop's throughput is printed
    against. The RNG is forked (dropout draws leave no trace) and the gradients are cleared."""
    with torch.random.fork_rng(devices=[]):
        run_batch()                                           # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            run_batch()
        dt = time.perf_counter() - t0
    for p in params:
        p.grad = None
    return tokens * repeats / max(dt, 1e-9)


def _finite(x) -> bool:
    return math.isfinite(float(x))


def assert_finite_weights(model: torch.nn.Module, where: str):
    """Refuse to write a model with a NaN / inf weight (names the first such tensor)."""
    for n, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise TrainingError(f"{where}: weight {n} is not finite; the model is not written")


def _first_nonfinite(modules: dict) -> Optional[str]:
    """The name of the first parameter holding a NaN / inf (this rank's shard under FSDP), or None."""
    for k, m in modules.items():
        for n, p in m.named_parameters():
            t = p.to_local() if hasattr(p, "to_local") else p     # a DTensor's shard
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"{k}.{n}"
    return None


def _check_finite_update(modules: dict, name: str, step: int, stage_dir: Path, rt: Runtime):
    """Before a checkpoint: refuse weights an update made non-finite (finite gradients times a huge
    learning rate can overflow), so the last checkpoint in resume/ stays a good one. All ranks agree."""
    bad = _first_nonfinite(modules)
    if rt.dist is not None:
        if dist.global_sum([float(bad is not None)])[0] == 0:
            return
    elif bad is None:
        return
    raise TrainingError(f"[{name}] step {step}: the update made weight {bad or '(on another rank)'} not "
                        f"finite; stopped before the checkpoint (the last checkpoint in "
                        f"{stage_dir / 'resume'} is kept; try a smaller --lr)")


# ---- the loop -------------------------------------------------------------------------------

def train_loop(stage_dir, name: str, modules: dict, opt: Opt, step_fn: Callable[[int], dict],
               rt: Optional[Runtime] = None, extra_state: Optional[Callable[[], dict]] = None,
               restore_extra: Optional[Callable[[dict], None]] = None, stop_after: Optional[int] = None,
               quiet: bool = False, force: bool = False,
               resumable_at: Optional[Callable[[int], bool]] = None,
               isolated_tok_s: Optional[float] = None) -> bool:
    """Run optimizer steps 0 .. opt.steps-1, resuming from stage_dir/resume if present.

    modules: every module whose state must survive a resume (the model, auxiliary heads).
    stop_after: stop (with a checkpoint) after this many steps of this call; rerun to resume.
    resumable_at(k): whether a checkpoint may hold "k steps done" (default: any k); a stage whose
    steps share state that is not checkpointed (GRPO's rollout batch over several PPO epochs)
    restricts checkpoints, and early stops, to its boundaries.
    isolated_tok_s: the stage's isolated-step throughput (isolated_tokens_per_s): each log line
    then says how close the loop's real tokens/s comes to it ("loop_pct").
    Returns True when the stage finished, False when it stopped early."""
    rt = rt or Runtime()
    opt.check(f"[{name}]")
    if stop_after is not None and stop_after < 1:
        raise TrainingError(f"[{name}] --stop-after must be >= 1, got {stop_after}")
    stage_dir = Path(stage_dir)
    if stage_dir.exists() and not stage_dir.is_dir():
        raise TrainingError(f"{stage_dir}: exists and is not a folder")
    stage_dir.mkdir(parents=True, exist_ok=True)
    if rt.dist is not None and list(modules) != ["model"]:
        raise TrainingError(f"--fsdp trains one sharded model per stage, got modules {list(modules)}")
    quiet = quiet or not rt.is_main
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optim = make_optimizer(params, opt)
    metrics_path = stage_dir / "metrics.jsonl"
    if rt.is_main:
        io.recover_dir(stage_dir / "resume")
    start = 0
    if (stage_dir / "resume").exists():
        state, rng = _load_resume(stage_dir, modules, optim, rt)
        _check_same_settings(name, state.get("opt", {}), opt, force)
        start = int(state["step"])
        if restore_extra:
            restore_extra(rng)
        if rt.is_main:                     # keep the log lines of the steps the checkpoint holds
            io.write_jsonl(metrics_path, [m for m in read_metrics(metrics_path) if m["step"] < start])
        if not quiet:
            print(f"[{name}] resuming at step {start}/{opt.steps}")
    elif metrics_path.exists() and rt.is_main:
        metrics_path.unlink()
    for m in modules.values():
        m.train()
    clip = dist.clip_grad_norm_ if rt.dist is not None else torch.nn.utils.clip_grad_norm_
    bar = tqdm(range(start, opt.steps), desc=name, disable=quiet, dynamic_ncols=True, leave=False)
    t_log, t_ckpt, toks, done_now = time.time(), time.time(), 0, 0
    for step in bar:
        for g in optim.param_groups:
            g["lr"] = lr_at(step, opt)
        optim.zero_grad(set_to_none=True)
        m = step_fn(step)
        if rt.dist is not None:            # each rank holds its share of the global sums
            m["loss"], m["tokens"] = dist.global_sum([m["loss"], m.get("tokens", 0)])
            m["tokens"] = int(m["tokens"])
        gnorm = clip(params, opt.clip) if opt.clip > 0 else torch.tensor(0.0)
        if not (_finite(m["loss"]) and _finite(gnorm)):
            raise TrainingError(f"[{name}] step {step}: loss {float(m['loss'])}, gradient norm {float(gnorm)}: "
                                f"not finite; stopped before the update (the last checkpoint in "
                                f"{stage_dir / 'resume'} is kept; try a smaller --lr)")
        optim.step()
        toks += m.get("tokens", 0)
        done_now += 1
        last = step == opt.steps - 1
        if step % opt.log_every == 0 or last:
            dt = time.time() - t_log
            rec = {"step": step, "lr": round(lr_at(step, opt), 8), "grad_norm": round(float(gnorm), 4),
                   "tok_s": round(toks / max(dt, 1e-9), 1),
                   **({"loop_pct": round(100 * toks / max(dt, 1e-9) / isolated_tok_s, 1)} if isolated_tok_s else {}),
                   **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()}}
            if rt.is_main:
                io.append_jsonl(metrics_path, rec)
            if not quiet:
                tqdm.write(f"[{name}] step {step:5d} | loss {m['loss']:.4f} | lr {rec['lr']:.2e} | "
                           f"{rec['tok_s']:.0f} tok/s" + (f" ({rec['loop_pct']:.0f}% of the isolated step)"
                                                          if "loop_pct" in rec else "") + "".join(
                               f" | {k} {v:.3f}" for k, v in m.items()
                               if k not in ("loss", "tokens") and isinstance(v, float)))
            t_log, toks = time.time(), 0
        boundary = resumable_at is None or resumable_at(step + 1)
        stopping = stop_after is not None and done_now >= stop_after and boundary
        timed = time.time() - t_ckpt >= opt.ckpt_seconds
        if rt.dist is not None:            # clocks differ by rank: all must take the same (collective) checkpoint
            timed = dist.global_sum([float(timed)])[0] > 0
        due = ((step + 1) % opt.ckpt_every == 0 or timed) and boundary
        if not last and (due or stopping):
            _check_finite_update(modules, name, step, stage_dir, rt)
            _save_resume(stage_dir, modules, optim, step + 1, opt, extra_state() if extra_state else {}, rt)
            t_ckpt = time.time()
        if stopping and not last:
            bar.close()
            return False
    bar.close()
    return True


def write_result(stage_dir, model: torch.nn.Module, info: dict, rt: Optional[Runtime] = None):
    """The stage's result: a model directory in stage_dir/model, then state.json {done: true}, then
    the resume checkpoint is removed. A model with a non-finite weight is never written."""
    rt = rt or Runtime()
    stage_dir = Path(stage_dir)
    if rt.dist is not None:
        dist.export_model_dir(model, stage_dir / "model", extra={"stage": info})   # rank 0 writes
    else:
        assert_finite_weights(model, str(stage_dir))
        save_model(model, stage_dir / "model", extra={"stage": info})
    if rt.is_main:
        io.write_json(stage_dir / "state.json", {"done": True, **info})
        io.recover_dir(stage_dir / "resume")
        if (stage_dir / "resume").exists():
            shutil.rmtree(stage_dir / "resume")
    dist.barrier()


def opt_fields() -> tuple:
    """The names of Opt's fields (for command-line overrides)."""
    return tuple(f.name for f in fields(Opt))
