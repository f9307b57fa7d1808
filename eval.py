"""Evaluation, one command per job: the toy test sets, released models on benchmark files, rescoring.

Toy test sets (greedy; N samples at T = 1: maj@N, pass@N; with --prm: best-of-N per aggregation):

    python eval.py --model runs/toy/sft/model --data data/toy/test.jsonl --n 0          # greedy only
    python eval.py --model runs/toy/sft/model --data data/toy/test.jsonl --n 16 --prm runs/toy/prm/model
    python eval.py --model runs/toy/sft/model --data data/toy/test.jsonl --n 0 --oracle   # where errors start
    python eval.py --model runs/toy/sft/model --data data/toy/test.jsonl --blank-images
    python eval.py --model runs/toy/sft/model --data data/toy/test.jsonl --n 8 --prm runs/toy/prm/model --prm-diagnosis
    python eval.py --model runs/toy/sft/model --data data/toy/test.jsonl --n 16 --prm runs/toy/prm/model --oracle
        # + the PRM against the oracle's step labels, where a verifier could gain over maj@N, the PRM
        #   and the policy on clean MIE pairs, and
        #   best-of-N with the policy's own step likelihoods as the judge (docs/results.md)

Released models (Hugging Face layout folders, docs/released_models.md) on a benchmark file:

    python eval.py --inspect models/URSA-8B                     # config, tokenizer, every tensor header
    python eval.py --model models/URSA-8B --benchmark mathvista --data testmini.json --image-root DIR \\
                   --out responses.jsonl --dtype bf16 --device cuda
    python eval.py --model models/URSA-8B --prm models/URSA-RM-8B --n 8 --benchmark mathvista \\
                   --data testmini.json --image-root DIR --out bon.jsonl --device cuda     # URSA-RM best-of-8
    python eval.py --rescore outputs/infer_mathvista.csv --benchmark mathvista [--json verdicts.jsonl]

Accuracies carry 95% Wilson intervals. Bad input prints one line naming the file and exits with 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ursa import io
from ursa.benchmark_run import best_of_n_with_prm, run_benchmark as generate_on
from ursa.benchmarks import format_report, read_records, rescore, write_verdicts
from ursa.evaluate import (acc_record, best_of_n_table, by_family, format_best_of_n, load_problems,
                           option_step_accuracy, prm_diagnosis, prm_scores, problem_pixels, sample)
from ursa.release import inspect_released, load_released
from ursa.results import (diff_pct, error_breakdown, format_pair_test, headroom, mie_pair_test, oracle_verdicts,
                          pct, policy_judge, policy_pair_test, prm_quality)
from ursa.tokenizer import Tokenizer
from ursa.weights import load_model

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--model", help="a model folder (config.json + safetensors)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run folder's, two levels above --model)")
    p.add_argument("--data", help="problem records (toy JSONL) or a benchmark file (with --benchmark)")
    p.add_argument("--limit", type=int, help="only the first N records of --data")
    p.add_argument("--n", type=int, default=8, help="samples per problem (0: greedy only)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the N samples")
    p.add_argument("--max-new-tokens", type=int, help="longest response (toy 128, benchmarks 2048)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generation batch")
    p.add_argument("--blank-images", action="store_true", help="replace every image by grey")
    p.add_argument("--shuffled-images", action="store_true", help="give each problem another's image")
    p.add_argument("--out", help="responses JSONL to write")
    p.add_argument("--prm", help="PRM folder: adds PRM best-of-N (toy: N = 1, 2, 4, ..., --n)")
    p.add_argument("--prm-diagnosis", action="store_true", help="with --prm: scores of right vs wrong samples")
    p.add_argument("--oracle", action="store_true",
                   help="toy test sets: where each greedy response first goes wrong; with --prm also the PRM's "
                        "step verdicts against the world's oracle, the PRM and the policy on clean MIE pairs, "
                        "and the policy's step likelihoods as a best-of-N judge")
    p.add_argument("--how", default="mean", choices=("min", "mean", "last", "product"),
                   help="benchmark best-of-N aggregation of the step scores (Eq. 10: mean)")
    p.add_argument("--tag-rule", choices=("released", "strict"), default="released",
                   help="benchmark best-of-N: where URSA-RM-8B's step tags go (docs/released_models.md)")
    p.add_argument("--benchmark", help="mathvista, mathvision, mathverse, dynamath, wemath or geoqa")
    p.add_argument("--image-root", help="folder the benchmark records' image paths are relative to")
    p.add_argument("--rescore", help="score a file of saved responses (no model)")
    p.add_argument("--response-field", help="--rescore: the field holding the response (default: the first of "
                                            "response, model_answer, prediction the file has)")
    p.add_argument("--json", help="--rescore: write every item's extraction and verdict (.jsonl: one line each; "
                                  "otherwise one JSON object)")
    p.add_argument("--inspect", help="check a released model folder without loading its weights")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="released-model weights dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--preset", default="ursa-8b", help="architecture preset a released config.json falls back on")
    p.add_argument("--seed", type=int, default=0)
    return p


def toy_tokenizer(args) -> Tokenizer:
    path = Path(args.tokenizer) if args.tokenizer else Path(args.model).parent.parent / "tokenizer.json"
    if not path.exists():
        raise ValueError(f"{path}: no tokenizer.json beside the model's run folder; pass --tokenizer FILE")
    return Tokenizer.from_file(path)


def run_toy(args):
    model = load_model(args.model, device=args.device).eval()
    tok = toy_tokenizer(args)
    recs = load_problems(args.data)[:args.limit]
    base, mx = Path(args.data).parent, args.max_new_tokens or 128
    mode = "blank" if args.blank_images else "shuffled" if args.shuffled_images else "normal"
    px = problem_pixels(recs, base, model.cfg.vision, mode)
    g = sample(model, tok, recs, base, max_new_tokens=mx, batch_size=args.batch_size, pixels=px)
    print(f"greedy      {pct(acc_record(g.first_correct()))}   ({args.data}, {mode} images; "
          f"{g.speed['completions_s']:.0f} completions/s, {g.speed['new_tokens_s']:.0f} new tokens/s of "
          f"{g.speed['decoded_tokens_s']:.0f} decoded)")
    fams = by_family(recs, g.first_correct())
    if fams:
        print("  by family: " + ", ".join(f"{f} {pct(a)}" for f, a in fams.items()))
    if args.oracle:
        for fam, kinds in error_breakdown(recs, oracle_verdicts(recs, g)).items():
            print(f"  {fam:<8} first error: " + ", ".join(f"{k} {v}" for k, v in kinds.items() if v))
        o = option_step_accuracy(model, tok, recs, px, mx)
        if o["n"]:
            print(f"  option step from the reference solution's right value (greedy): {pct(o)} "
                  f"(1 in 4 options = 25%)")
    if args.out:
        io.write_jsonl(args.out, [{"id": r["id"], "response": t[0], "extracted": e[0], "correct": c[0]}
                                  for r, t, e, c in zip(recs, g.responses, g.extracted, g.correct)])
    if args.n < 1:
        return
    s = sample(model, tok, recs, base, n=args.n, temperature=args.temperature, max_new_tokens=mx,
               batch_size=args.batch_size, seed=args.seed, pixels=px)
    if not args.prm:
        print(f"maj@{args.n:<7} {pct(acc_record(s.maj(recs)))}   pass@{args.n} {pct(acc_record(s.pass_at()))}   "
              f"single sample {100 * s.sample_acc():.1f}%")
        return
    prm = load_model(args.prm, device=args.device).eval()
    scores = prm_scores(prm, tok, recs, s.responses, px)
    print(format_best_of_n(best_of_n_table(recs, s, scores), g.first_correct()))
    if args.prm_diagnosis:
        print(prm_diagnosis(recs, s, scores))
    if args.oracle:
        ov = oracle_verdicts(recs, s)
        q = prm_quality(ov, scores, s.correct)
        h = headroom(recs, s, ov)
        print(f"maj@{args.n} wrong but pass@{args.n} right on {h['problems']} problems: {100 * h['right_share']:.1f}% of "
              f"their samples right; their wrong samples first go wrong at: "
              + ", ".join(f"{k} {v}" for k, v in h["wrong_sample_first_errors"].items() if v))
        print(f"PRM against the oracle (ProcessBench-style): first error exact on {q['wrong']} wrong samples "
              f"{100 * q['acc_wrong']:.1f}%, no error on {q['right']} right ones {100 * q['acc_right']:.1f}%, "
              f"F1 {100 * q['f1']:.1f}, step AUC {q['step_auc']:.3f} ({q['unparsable']} unparsable); "
              f"within-problem AUC {q['within_problem_auc']:.3f} over {q['mixed_problems']} mixed problems")
        print(format_pair_test(mie_pair_test(prm, tok, recs, px)))
        print(format_pair_test(policy_pair_test(model, tok, recs, px), "policy"))
        j = policy_judge(model, tok, recs, s, px, {f"maj@{args.n}": s.maj(recs)}, args.n)
        print(f"policy likelihood as the judge (best-of-{args.n}: the sample whose least likely step is most likely): "
              f"{pct(j['best_of_n'])}, {diff_pct(j['minus_maj'])} points against maj@{args.n}")


def run_benchmark(args):
    if not args.out:
        raise ValueError("--benchmark with --model needs --out (the responses file to write)")
    model, tok = load_released(args.model, dtype=DTYPES[args.dtype], device=args.device, preset=args.preset)
    n = max(1, args.n) if args.prm else 1
    root = args.image_root or str(Path(args.data).parent)
    recs = read_records(args.data, args.benchmark)[:args.limit]
    out = generate_on(model, tok, recs, args.benchmark, root, n=n, temperature=args.temperature if n > 1 else 0.0,
                      max_new_tokens=args.max_new_tokens or 2048, batch_size=args.batch_size, seed=args.seed,
                      progress=True)
    if args.prm:
        del model
        rm, rtok = load_released(args.prm, dtype=DTYPES[args.dtype], device=args.device, preset=args.preset)
        out = best_of_n_with_prm(rm, rtok, out, None, args.how, benchmark=args.benchmark, image_root=root,
                                 batch_size=args.batch_size, progress=True, rule=args.tag_rule)
    io.write_jsonl(args.out, out)
    print(format_report(rescore(args.out, args.benchmark)))


def run_rescore(args):
    if not args.benchmark:
        raise ValueError("--rescore needs --benchmark NAME")
    report = rescore(args.rescore, args.benchmark, response_field=args.response_field)
    print(format_report(report))
    if args.json:
        write_verdicts(args.json, report)


def run_inspect(args):
    print(inspect_released(args.inspect, preset=args.preset))


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        if args.inspect:
            run_inspect(args)
        elif args.rescore:
            run_rescore(args)
        elif not (args.model and args.data):
            p.error("give --model and --data (or --rescore FILE --benchmark NAME, or --inspect DIR)")
        elif args.benchmark:
            run_benchmark(args)
        else:
            run_toy(args)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"eval.py: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:                       # `python eval.py ... | head`: end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
