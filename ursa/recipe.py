"""The toy recipe's sizes: one dataclass per stage group, the default run and the smoke-size run.

    from ursa.recipe import Recipe, quick_recipe
    r = Recipe()                 # what `python train.py` runs (train.py's flags override single fields)
    q = quick_recipe()           # `python train.py --quick`: every stage at smoke size

The optimiser settings of each stage are ursa.trainer.Opt; the defaults below are the toy's, chosen
for a 2-core CPU (the paper's 8B settings are in docs/paper.md and docs/scale_out.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from ursa.trainer import Opt, TrainingError

TRAINING_STAGES = ("pretrain", "align", "sft", "prm", "grpo")   # the stages with an optimiser
MICRO = 16      # rows per micro-batch: length-bucketed micro-batches of 16 pad least at the toy's lengths


@dataclass
class LabelSettings:
    """DualMath labelling (ursa/dualmath.py)."""
    n_problems: int = 600
    k_samples: int = 4          # solutions sampled per problem
    n_probe: int = 8            # completions per BEL probe (paper: 16)
    compare_mc: int = 60        # wrong solutions also labelled by per-step Monte Carlo
    mie_kind: str = "any"       # perception, arithmetic or option step, drawn per record
    mie_per_problem: float = 1.0  # MIE records per labelled problem (the toy's MIE is free)
    correct_ratio: float = 3.0    # "correct" records per BEL record, up to every right sample (paper: about 1/3)
    pairs: int = 0               # further problems, each a (reference solution, MIE of it) pair (dualmath.py, 6.;
                                 # 2,000 lowered best-of-16 to 7.8 points below maj@16: docs/results.md)


@dataclass
class GRPOSettings:
    """Stage III settings beside the optimiser (paper, Table 15; the toy's sizes)."""
    reward: str = "ps"          # outcome | ps | v1 | v2
    group: int = 8              # G rollouts per prompt
    prompts: int = 16           # prompts per rollout batch
    temperature: float = 1.0
    clip_eps: float = 0.2       # not published; the common value
    kl_coef: float = 0.003
    loss_agg: str = "seq-mean"  # Eq. 8's 1/|o_i| per sequence
    scale_std: bool = True
    ppo_epochs: int = 1
    gamma: float = 0.5          # Eq. 6
    rho: float = 0.3            # Eq. 5 threshold
    filter: bool = True         # drop prompts the SFT policy always / never solves
    filter_samples: int = 8
    gen_batch: Optional[int] = None       # rollouts decoded at once (default: the whole batch)
    max_prompt_len: Optional[int] = None  # drop longer RL prompts


@dataclass
class Recipe:
    name: str = "toy"
    preset: str = "tiny"
    data_dir: str = "data/toy"
    n_train: int = 8000
    n_rl: int = 1000
    n_test: int = 500
    n_hard: int = 500
    vocab_size: int = 512
    pretrain: Opt = field(default_factory=lambda: Opt(steps=250, lr=2e-3, micro_batch=MICRO))
    align: Opt = field(default_factory=lambda: Opt(steps=80, lr=1e-3, ckpt_every=40, micro_batch=MICRO))
    sft: Opt = field(default_factory=lambda: Opt(steps=1500, lr=1e-3, micro_batch=MICRO))
    train_vision_in_sft: bool = True
    caption_pretraining: bool = False  # pretrain: captions through the whole model (False: caption text to the LM only)
    label: LabelSettings = field(default_factory=LabelSettings)
    prm: Opt = field(default_factory=lambda: Opt(steps=400, lr=5e-4, weight_decay=0.02, micro_batch=MICRO))
    prm_heldout: float = 0.1
    prm_balance: bool = True          # weigh label-1 and label-0 steps equally (prm.balance_weight)
    train_vision_in_prm: bool = False  # the paper freezes the vision tower and projector in Stage II
    grpo: Opt = field(default_factory=lambda: Opt(steps=60, lr=2e-5, weight_decay=0.0, warmup_ratio=0.05,
                                                  min_lr_ratio=1.0, log_every=1, ckpt_every=10))
    rl: GRPOSettings = field(default_factory=GRPOSettings)
    bon_samples: int = 16
    max_new_tokens: int = 128   # longest toy solutions: 99% of test solutions fit (option checks add ~20 tokens)
    init: Optional[str] = None        # a stage's starting model directory (default: the previous stage's)
    stage_data: Optional[str] = None  # a stage's data file (default: the toy world's / the run's)
    prm_dir: Optional[str] = None     # grpo: the PRM model directory (default <run>/prm/model)
    max_len: Optional[int] = None     # truncate training sequences to this many tokens


def quick_recipe() -> Recipe:
    """Every stage at smoke size (about a minute on 2 cores), GRPO included."""
    small = dict(batch_size=16, micro_batch=16, log_every=5)
    return Recipe(name="quick", data_dir="data/toy-quick", n_train=400, n_rl=64, n_test=48, n_hard=48,
                  vocab_size=400, pretrain=Opt(steps=30, lr=2e-3, **small), align=Opt(steps=10, lr=1e-3, **small),
                  sft=Opt(steps=30, lr=1e-3, **small), label=LabelSettings(32, 4, 4, 8),
                  prm=Opt(steps=10, lr=5e-4, **small), bon_samples=4,
                  grpo=Opt(steps=4, lr=5e-5, batch_size=1, micro_batch=16, log_every=1),
                  rl=GRPOSettings(group=4, prompts=2, filter=False))


OVERRIDES = {"init": "init", "data": "stage_data", "prm": "prm_dir", "max_len": "max_len"}
RL_OVERRIDES = {"prompts_per_step": "prompts", "group": "group", "temperature": "temperature",
                "max_prompt_len": "max_prompt_len", "kl_coef": "kl_coef", "clip_eps": "clip_eps",
                "ps_gamma": "gamma", "ps_rho": "rho", "gen_batch": "gen_batch", "ppo_epochs": "ppo_epochs",
                "reward": "reward"}
OPT_FLAGS = ("lr", "steps", "epochs", "batch_size", "micro_batch", "warmup_ratio", "weight_decay")


def apply_overrides(recipe: Recipe, args) -> Recipe:
    """train.py's command-line settings (an argparse namespace) onto the recipe: flags left unset change
    nothing; the one-stage flags (--lr, --steps, --init, ...) need the stage named."""
    for flag, attr in OVERRIDES.items():
        if getattr(args, flag, None) is not None:
            setattr(recipe, attr, getattr(args, flag))
    rl = {a: getattr(args, f) for f, a in RL_OVERRIDES.items() if getattr(args, f, None) is not None}
    if getattr(args, "no_rl_filter", False):
        rl["filter"] = False
    recipe.rl = replace(recipe.rl, **rl)
    if getattr(args, "label_problems", None) is not None:
        if args.label_problems < 1:
            raise TrainingError(f"--label-problems must be >= 1, got {args.label_problems}")
        recipe.label = replace(recipe.label, n_problems=args.label_problems)
    if getattr(args, "prm_train_vision", False):
        recipe.train_vision_in_prm = True
    if getattr(args, "grpo_steps", None) is not None:
        recipe.grpo = replace(recipe.grpo, steps=args.grpo_steps)
    given = {f: getattr(args, f) for f in OPT_FLAGS if getattr(args, f, None) is not None}
    if "steps" in given and "epochs" in given:
        raise TrainingError("give --steps or --epochs, not both")
    if "epochs" in given:
        given["steps"] = 1                 # resolved from the data size by with_epochs
    if getattr(args, "fp32", False):
        given["bf16"] = False
    stage = args.stage if args.stage in TRAINING_STAGES else None
    if (args.init or args.data) and args.stage not in TRAINING_STAGES + ("label",):
        raise TrainingError("--init / --data set one stage's settings: name the stage "
                            "(pretrain, align, sft, label, prm or grpo)")
    if given and stage is None:
        raise TrainingError("--lr / --steps / ... set one training stage's settings: name the stage "
                            "(pretrain, align, sft, prm or grpo)")
    if given:
        setattr(recipe, stage, replace(getattr(recipe, stage), **given).check(f"[{stage}]"))
    return recipe
