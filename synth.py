"""Data for the toy recipe: the visual-math world's datasets, and DualMath labelling (Stage II).

    python synth.py world --out data/toy                       # CPU, seconds: 8000 / 1000 / 500 / 500 problems
    python synth.py world --out data/toy --n-train 200 --n-rl 50 --n-test 50 --n-hard 50
    python synth.py world --out data/toy --n-train 16000 --force   # replace a folder made with other arguments
    python synth.py label --run runs/toy --data data/toy       # DualMath from runs/toy/sft (BEL + MIE), resumable
    python synth.py label --run runs/toy --device cuda         # the same on one GPU

`world` writes the files ursa/toydata.py describes (JSONL records + PNG images + manifest.json).
`label` writes runs/<name>/label/dualmath.jsonl (ursa/dualmath.py). Bad input prints one line
naming the file and exits with 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ursa import io, world
from ursa.dualmath import format_label_stats, label_dualmath
from ursa.tokenizer import Tokenizer
from ursa.toydata import SEED_STRIDE, write_world
from ursa.weights import load_model


def cmd_world(args):
    out = write_world(args.out, n_train=args.n_train, n_rl=args.n_rl, n_test=args.n_test, n_hard=args.n_hard,
                      image_size=args.image_size, seed=args.seed, force=args.force)
    m = io.read_json(out / "manifest.json", "dataset manifest")
    print(f"{out}: " + ", ".join(f"{k} {v}" for k, v in m["counts"].items()))


def cmd_label(args):
    run = Path(args.run)
    model = load_model(run / "sft" / "model", device=args.device).eval()
    tok = Tokenizer.from_file(run / "tokenizer.json")
    stats = label_dualmath(model, tok, Path(args.data) / "cot_train.jsonl", run / "label",
                           n_problems=args.n_problems, k_samples=args.k_samples, n_probe=args.n_probe,
                           compare_mc=args.compare_mc, mie_kind=args.mie_kind, seed=args.seed)
    print(format_label_stats(stats))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("world", help="write the toy visual-math world's datasets")
    w.add_argument("--out", default="data/toy", help="output folder (default data/toy)")
    w.add_argument("--n-train", type=int, default=8000, help="SFT problems (also captions and text)")
    w.add_argument("--n-rl", type=int, default=1000, help="RL prompts (train stream, after the SFT seeds)")
    w.add_argument("--n-test", type=int, default=500, help="test problems (in distribution)")
    w.add_argument("--n-hard", type=int, default=500, help="hard-split test problems")
    w.add_argument("--image-size", type=int, default=world.IMAGE_SIZE, help="image side in pixels")
    w.add_argument("--seed", type=int, default=0, help=f"world seed: problem seeds start at seed * {SEED_STRIDE}")
    w.add_argument("--force", action="store_true", help="overwrite an existing folder made with other arguments")
    w.set_defaults(func=cmd_world)
    lb = sub.add_parser("label", help="DualMath: sample with the SFT policy, BEL on wrong solutions, MIE, correct")
    lb.add_argument("--run", default="runs/toy", help="run folder with sft/model and tokenizer.json")
    lb.add_argument("--data", default="data/toy", help="world folder (reads cot_train.jsonl)")
    lb.add_argument("--n-problems", type=int, default=300, help="training problems to sample")
    lb.add_argument("--k-samples", type=int, default=4, help="solutions sampled per problem (T=1.0, top-p 0.95)")
    lb.add_argument("--n-probe", type=int, default=8, help="completions per BEL probe (T=0.3)")
    lb.add_argument("--compare-mc", type=int, default=60, help="wrong solutions also labelled by per-step MC")
    lb.add_argument("--mie-kind", default="perception", choices=("perception", "arithmetic", "option", "any"),
                    help="what MIE corrupts (perception: a misread image fact)")
    lb.add_argument("--device", default="cpu", help="cpu or cuda")
    lb.add_argument("--seed", type=int, default=0)
    lb.set_defaults(func=cmd_label)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"synth.py {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
