"""How far can a verifier that knows exactly what the policy knows lift best-of-N above self-consistency?

The policy's own step log-likelihoods (ursa.evaluate.step_logprobs: log p(step k | image, question,
steps before k), teacher-forced) are the whole of what the policy knows about its samples. This
script fits the best readout of them that the truth allows and measures what it picks:

1. n samples per test problem (ursa.evaluate.sample: the same samples as `eval.py --n <n>`, seed 0);
2. every step judged by the oracle (ursa.oracle via ursa.results.oracle_verdicts);
3. a logistic regression per step, z_k = w . [log p(step k), k / 8, k is the last step] + b, fitted
   with the oracle's step labels on half of the problems (even or odd index) and used on the other
   half (two folds, so every problem is judged by a readout that never saw it);
4. best-of-n by the product of the predicted step probabilities (the readout's P(every step right)),
   against maj@n, paired over problems (ursa.evaluate.paired_bootstrap); beside it the unfitted
   likelihood judge of eval.py --oracle (the sample whose least likely step is most likely);
5. what each KIND of verification is worth: majority vote among the samples whose first error
   (ursa.results.error_kind) is not of the given kinds (ursa.evaluate.filtered_majority), i.e. the
   pick of a verifier that flags exactly those errors and is blind to the rest;
6. a check that needs neither the image nor the oracle: majority vote among the samples none of whose
   option checks misquotes the question's options (ursa.results.option_quote_verifier over
   ursa.oracle.misquoted_options: any step, also after the first error).

No PRM is involved: the result is the ceiling of any verifier whose knowledge is the policy's (a
readout fitted with true labels on the same distribution), so a PRM trained on DualMath labels from
the same backbone can beat it only by learning what the policy does not know.

    python scripts/verifier_ceiling.py --model runs/toy/sft/model --data data/toy/test.jsonl --n 16
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ursa.evaluate import (CEILING_FOLDS, fitted_best_of_n, fmt_acc, likelihood_best_of_n, load_problems,  # noqa: E402
                           paired_bootstrap, problem_pixels, sample, step_features, step_labels, step_logprobs)
from ursa.prm import split_steps  # noqa: E402
from ursa.results import error_kind, kind_verifiers, option_quote_verifier, oracle_verdicts  # noqa: E402
from ursa.tokenizer import Tokenizer  # noqa: E402
from ursa.weights import load_model  # noqa: E402


def main(argv=None) -> int:
    try:
        run(argv)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:   # DataError is a ValueError
        print(f"verifier_ceiling.py: {e}", file=sys.stderr)
        return 2
    return 0


def run(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the policy's model folder (its run holds tokenizer.json)")
    ap.add_argument("--data", required=True, help="a toy test file (its images beside it)")
    ap.add_argument("--n", type=int, default=16, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="only the first LIMIT problems")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = load_model(args.model).eval()
    tok = Tokenizer.from_file(Path(args.model).resolve().parent.parent / "tokenizer.json")
    records = load_problems(args.data)[:args.limit]
    if len(records) < CEILING_FOLDS:
        raise ValueError(f"{args.data}: {len(records)} problem(s); the readout is fitted on {CEILING_FOLDS} folds "
                         f"of problems, so it needs at least {CEILING_FOLDS}")
    base = Path(args.data).parent
    px = problem_pixels(records, base, model.cfg.vision)
    s = sample(model, tok, records, base, n=args.n, temperature=args.temperature,
               max_new_tokens=args.max_new_tokens, pixels=px)
    verdicts = oracle_verdicts(records, s)
    n = args.n
    with torch.no_grad():
        flat = step_logprobs(model, tok, [r["question"] for r in records for _ in range(n)],
                             [split_steps(t)[0] for ts in s.responses for t in ts], px.repeat_interleave(n, dim=0))
    lps = [flat[i * n:(i + 1) * n] for i in range(len(records))]
    feats = [[step_features(lp) for lp in row] for row in lps]
    labels = [[step_labels(v, len(lp), c) for v, lp, c in zip(vr, row, cr)]
              for vr, row, cr in zip(verdicts, lps, s.correct)]
    fitted = fitted_best_of_n(feats, labels, s.correct)
    judge = likelihood_best_of_n(s, lps)
    maj = s.maj(records)
    res = {"problems": len(records), "n": n, "maj": sum(maj) / len(maj), "pass": sum(s.pass_at()) / len(maj),
           "likelihood_judge": sum(judge) / len(maj), "fitted_readout": sum(fitted) / len(maj),
           "fitted_minus_maj": paired_bootstrap(fitted, maj), "judge_minus_maj": paired_bootstrap(judge, maj)}
    print(f"{len(records)} problems x {n} samples (T = {args.temperature})")
    print(f"  maj@{n}                                   {fmt_acc(sum(maj), len(maj))}")
    print(f"  pass@{n}                                  {fmt_acc(sum(s.pass_at()), len(maj))}")
    print(f"  likelihood judge (min step log-prob)      {fmt_acc(sum(judge), len(maj))}")
    print(f"  fitted readout ({CEILING_FOLDS} folds, oracle labels)   {fmt_acc(sum(fitted), len(maj))}")
    for name in ("fitted", "judge"):
        d = res[f"{name}_minus_maj"]
        print(f"  {name} minus maj@{n}: {100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]")
    def row(name: str, e: dict):
        d = e["minus_maj"]
        print(f"    {name:<22} {fmt_acc(e['best_of_n']['correct'], e['best_of_n']['n'])}  "
              f"({100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] vs maj@{n})")
    res["kind_verifiers"] = kind_verifiers(records, s, [[error_kind(v) for v in vr] for vr in verdicts])
    print(f"  a verifier that flags exactly some kinds of first error (maj@{n} over the samples it keeps):")
    for name, e in res["kind_verifiers"].items():
        row(name, e)
    q = res["option_quotes"] = option_quote_verifier(records, s)
    print(f"  a text check: drop the samples with an option check that misquotes the question "
          f"({q['flagged']} samples, {q['flagged_right']} of them right)")
    row("option quotes", q)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
