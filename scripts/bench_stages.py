"""The stages' sampling against the sampler bench, alternated in one process on the same weights.

    python scripts/bench_stages.py --model runs/toy/sft/model --data data/toy/test.jsonl [--rounds 3]

For each of the stages' shapes (ursa.bench.STAGE_SHAPES: label 64 prompts x 4, GRPO 16 x 8,
best-of-N 4 x 16, greedy eval 64 x 1), one round generates
  stage: the first prompts of --data (the toy's ragged prompts, 45-83 tokens), stopping at the
         tokenizer's <|im_end|> / EOS as the stages do; rate = new tokens up to each stop / second;
  bench: the sampler bench's shape (random 44-token prompts, no stop, 96 new tokens a row);
and prints the medians and the median of the per-round ratios stage / bench, with the share of the
decoded tokens that were useful (new tokens / Generation.decoded). The tokenizer is the run
folder's (two levels above --model). No test asserts these numbers: they are measurements.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ursa.bench import STAGE_SHAPES, random_batch, sample_shape  # noqa: E402
from ursa.evaluate import load_problems, problem_pixels, prompts_for  # noqa: E402
from ursa.tokenizer import Tokenizer  # noqa: E402
from ursa.weights import load_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a toy policy folder (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="toy problem records (JSONL) whose prompts are sampled")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    tok = Tokenizer.from_file(Path(args.model).parent.parent / "tokenizer.json")
    rows = max(P for P, _, _, _ in STAGE_SHAPES.values())
    recs = load_problems(args.data)[:rows]
    if len(recs) < rows:
        raise SystemExit(f"{args.data}: {len(recs)} records, the shapes need {rows}")
    ids = prompts_for(recs, tok, model.cfg)
    px = problem_pixels(recs, Path(args.data).parent, model.cfg.vision)
    bids, bpx, _ = random_batch(model.cfg, rows, 44, torch.Generator().manual_seed(0))
    L = args.new_tokens
    print(f"{'shape':<12}{'rows':>6}{'stage tok/s':>13}{'bench tok/s':>13}{'ratio':>7}{'useful':>8}")
    for name, shape in STAGE_SHAPES.items():
        P, G = shape[:2]
        stage, bench, useful = [], [], []
        for r in range(args.rounds):
            dt, new, dec = sample_shape(model, ids, px, shape, L, r, (tok.im_end_id, tok.eos_id), tok.pad_id)
            stage.append(new / dt)
            useful.append(new / max(1, dec))
            dt, new, _ = sample_shape(model, bids.tolist(), bpx, shape, L, r)
            bench.append(new / dt)
        ratio = statistics.median(a / b for a, b in zip(stage, bench))
        print(f"{name:<12}{P * G:>6}{statistics.median(stage):>13,.0f}{statistics.median(bench):>13,.0f}"
              f"{ratio:>7.2f}{100 * statistics.median(useful):>7.0f}%", flush=True)


if __name__ == "__main__":
    main()
