"""Evaluation: greedy, majority vote of N (self-consistency) and PRM best-of-N, on the toy test sets
or a benchmark file; rescoring of saved responses.

    python eval.py --model runs/toy/sft/model --data data/toy/test.jsonl           # greedy + maj@8
    python eval.py --model runs/toy/sft/model --data data/toy/test.jsonl --blank-images
    python eval.py --model runs/toy/sft/model --data data/toy/test.jsonl --prm runs/toy/prm/model
    python eval.py --rescore responses.jsonl --benchmark mathvista                 # no model needed

Released models on a benchmark file (Hugging Face layout directories, see docs/released_models.md):

    python eval.py --model URSA-8B --benchmark mathvista --data testmini.json --image-root DIR \
                   --out responses.jsonl --dtype bf16 --device cuda
    python eval.py --model URSA-8B --prm URSA-RM-8B --n 8 --temperature 1.0 --benchmark mathvista \
                   --data testmini.json --image-root DIR --out bon.jsonl --dtype bf16 --device cuda

Accuracy is printed with a 95% Wilson interval. Responses are written as JSONL records
{"id", "response", "extracted", "correct", ...} (DESIGN.md's response record).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ursa.answer import extract_answer, is_equiv
from ursa.data import image_path, load_image, read_jsonl, write_jsonl_atomic
from ursa.generate import sample_texts
from ursa.prm import majority_vote
from ursa.tokenizer import Tokenizer
from ursa.weights import load_model


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def fmt_acc(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / max(n, 1):5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def load_problems(path) -> list[dict]:
    return read_jsonl(path, required=("id", "image", "question", "answer"))


def problem_pixels(records, base: Path, vcfg, mode: str = "normal") -> torch.Tensor:
    """[n, 3, S, S] in [0, 1]; mode "blank" (all grey) or "shuffled" (another problem's image)."""
    from ursa.vision import preprocess
    px = torch.stack([preprocess(load_image(image_path(r, base), r.get("_where", r["id"])), vcfg)
                      for r in records])
    if mode == "blank":
        px = torch.full_like(px, 0.5)
    elif mode == "shuffled":
        px = px.roll(1, dims=0)
    return px


def prompts_for(records, tok: Tokenizer, cfg, prefixes: Optional[list] = None) -> list:
    return [tok.encode_prompt(r["question"], image=True, num_image_tokens=cfg.vision.num_tokens,
                              assistant_prefix=(prefixes[i] if prefixes else ""))
            for i, r in enumerate(records)]


def judge(rec: dict, response: str) -> tuple[Optional[str], bool]:
    ext = extract_answer(response)
    return ext, is_equiv(ext, str(rec["answer"]), rec.get("choices"))


@torch.no_grad()
def evaluate(model, tok, records, base: Path, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 96, batch_size: int = 64, seed: int = 0, image_mode: str = "normal",
             quiet: bool = False) -> dict:
    """Sample n responses per record. Returns {"responses": [[...]], "extracted", "correct",
    "greedy"/"first" accuracy of sample 0, "maj": accuracy of the majority vote}."""
    px = problem_pixels(records, base, model.cfg.vision, image_mode)
    prompts = prompts_for(records, tok, model.cfg)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=len(records) * n, desc=f"sample x{n}", disable=quiet, leave=False)
    texts, _ = sample_texts(model, tok, prompts, px, num_samples=n, batch_size=max(1, batch_size // n),
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            generator=g, progress=bar)
    bar.close()
    verdicts = [[judge(r, t) for t in ts] for r, ts in zip(records, texts)]      # (extracted, correct)
    ext = [[v[0] for v in vs] for vs in verdicts]
    cor = [[v[1] for v in vs] for vs in verdicts]
    maj = [is_equiv(majority_vote(e), str(r["answer"]), r.get("choices")) for r, e in zip(records, ext)]
    return {"responses": texts, "extracted": ext, "correct": cor,
            "first": sum(c[0] for c in cor), "maj": sum(maj), "n": len(records),
            "sample_acc": sum(map(sum, cor)) / max(1, n * len(records))}


def write_responses(path, records, result, extra: Optional[list] = None):
    out = []
    for i, r in enumerate(records):
        for j, t in enumerate(result["responses"][i]):
            rec = {"id": r["id"], "sample": j, "response": t, "extracted": result["extracted"][i][j],
                   "correct": bool(result["correct"][i][j])}
            if extra:
                rec.update(extra[i][j])
            out.append(rec)
    write_jsonl_atomic(path, out)


# ---- the results table of `python train.py` ---------------------------------------------------------

def _table(rows) -> str:
    w = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = ["| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(rows[0])) + " |",
           "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    out += ["| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |" for r in rows[1:]]
    return "\n".join(out)


def recipe_table(run: Path, recipe, times: dict, quiet: bool = False) -> dict:
    """Evaluate each stage's policy on the toy test / hard sets and print the results table.

    Per policy: greedy on test and hard; N = recipe.bon_samples samples per test problem at T = 1.0,
    which give maj@N, the single-sample accuracy and (with the PRM) best-of-N for N = 1, 2, 4, ...;
    the SFT policy also with blank and shuffled images (does the image matter?)."""
    data = Path(recipe.data_dir)
    tok = Tokenizer.from_file(run / "tokenizer.json")
    test = load_problems(data / "test.jsonl")
    hard = load_problems(data / "test_hard.jsonl")
    mx, N = recipe.max_new_tokens, recipe.bon_samples
    rows, res = [("policy", "toy test", "hard test")], {"times_s": {k: round(v, 1) for k, v in times.items()}}
    t0 = time.time()
    prm = load_model(run / "prm" / "model").eval() if (run / "prm" / "model").exists() else None
    extra = []
    for stage, label in (("align", "align"), ("sft", "SFT"), ("grpo", "PS-GRPO")):
        d = run / stage / "model"
        if not d.exists():
            continue
        model = load_model(d).eval()
        r_t = evaluate(model, tok, test, data, max_new_tokens=mx, quiet=quiet)
        r_h = evaluate(model, tok, hard, data, max_new_tokens=mx, quiet=quiet)
        res[stage] = {"test_greedy": r_t["first"] / r_t["n"], "hard_greedy": r_h["first"] / r_h["n"]}
        rows.append((f"{label} greedy", fmt_acc(r_t["first"], r_t["n"]), fmt_acc(r_h["first"], r_h["n"])))
        write_responses(run / stage / "test_greedy.jsonl", test, r_t)
        if stage == "align":
            continue
        if prm is not None:
            table, bon, s, _ = prm_eval(model, prm, tok, test, data, n=N, max_new_tokens=mx, quiet=quiet, greedy=r_t)
            res[f"{stage}_best_of_n"] = bon
            extra.append(f"{label} policy + PRM on the toy test (N samples at T=1.0; accuracy %):\n{table}")
        else:
            s = evaluate(model, tok, test, data, n=N, temperature=1.0, max_new_tokens=mx, quiet=quiet)
        res[stage].update({f"test_maj@{N}": s["maj"] / s["n"], "test_sample_acc_T1": s["sample_acc"]})
        rows.append((f"{label} maj@{N} (T=1.0)", fmt_acc(s["maj"], s["n"]), "-"))
        rows.append((f"{label} one sample (T=1.0)", f"{100 * s['sample_acc']:.1f}%", "-"))
        if prm is not None:
            b = bon[max(bon)]
            rows.append((f"{label} + PRM best-of-{max(bon)} (mean)", f"{100 * b['mean']:.1f}%", "-"))
        if stage == "sft":
            for mode in ("blank", "shuffled"):
                b_t = evaluate(model, tok, test, data, image_mode=mode, max_new_tokens=mx, quiet=quiet)
                res["sft"][f"test_greedy_{mode}_images"] = b_t["first"] / b_t["n"]
                rows.append((f"SFT greedy, {mode} images", fmt_acc(b_t["first"], b_t["n"]), "-"))
    out = [_table(rows)]
    if (run / "label" / "stats.txt").exists():
        out.append("DualMath labelling (synth.py label):\n" + (run / "label" / "stats.txt").read_text().strip())
    if (run / "prm" / "state.json").exists():
        h = json.loads((run / "prm" / "state.json").read_text())["heldout"]
        res["prm_heldout"] = h
        out.append(f"PRM held-out: step accuracy {100 * h['step_acc']:.1f}%, AUC {h['auc']:.3f}, first-error "
                   f"accuracy {100 * h['first_error_acc']:.1f}% (lowest-scoring step {100 * h['first_error_acc_min']:.1f}%) "
                   f"on {h['steps']} steps / {h['solutions']} solutions")
    out += extra
    times["eval"] = time.time() - t0
    res["times_s"]["eval"] = round(times["eval"], 1)
    out.append("wall time (s, this run): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    text = "\n\n".join(out)
    print("\n" + text)
    (run / "results.md").write_text(text + "\n")
    (run / "results.json").write_text(json.dumps(res, indent=1))
    return res


def _trend(metrics_path: Path, key: str, k: int = 5) -> tuple:
    vals = [json.loads(l)[key] for l in metrics_path.read_text().splitlines() if key in json.loads(l)]
    if not vals:
        return (float("nan"), float("nan"))
    return (sum(vals[:k]) / len(vals[:k]), sum(vals[-k:]) / len(vals[-k:]))


def ablation_table(run: Path, recipe, rewards: dict, times: dict, quiet: bool = False) -> dict:
    """SFT vs each GRPO reward (rewards: reward -> its run folder name): greedy accuracy (95% intervals) and response length / step trends."""
    data = Path(recipe.data_dir)
    tok = Tokenizer.from_file(run / "tokenizer.json")
    test, hard = load_problems(data / "test.jsonl"), load_problems(data / "test_hard.jsonl")
    names = {"outcome": "GRPO (outcome reward)", "ps": "PS-GRPO", "v1": "Variant 1 (outcome + mean step)",
             "v2": "Variant 2 (step-level advantage)"}
    rows = [("policy", "toy test greedy", "hard test greedy", "resp. tokens first->last", "steps first->last",
             "train acc first->last", "wall s")]
    res = {}
    for key, d in [("sft", run / "sft")] + [(r, run / name) for r, name in rewards.items()]:
        model = load_model(d / "model").eval()
        a = evaluate(model, tok, test, data, max_new_tokens=recipe.max_new_tokens, quiet=quiet)
        b = evaluate(model, tok, hard, data, max_new_tokens=recipe.max_new_tokens, quiet=quiet)
        res[key] = {"test": a["first"] / a["n"], "hard": b["first"] / b["n"]}
        if key == "sft":
            rows.append(("SFT", fmt_acc(a["first"], a["n"]), fmt_acc(b["first"], b["n"]), "-", "-", "-", "-"))
            continue
        m = d / "metrics.jsonl"
        L, S, A = _trend(m, "resp_len"), _trend(m, "n_steps"), _trend(m, "acc")
        res[key].update({"resp_len": L, "n_steps": S, "train_acc": A})
        rows.append((names[key], fmt_acc(a["first"], a["n"]), fmt_acc(b["first"], b["n"]),
                     f"{L[0]:.1f} -> {L[1]:.1f}", f"{S[0]:.2f} -> {S[1]:.2f}",
                     f"{100 * A[0]:.1f} -> {100 * A[1]:.1f}", f"{times.get(key, 0):.0f}"))
    text = _table(rows) + ("\n\n(first/last = mean over the first / last 5 logged GRPO steps; "
                           f"{recipe.grpo.steps} steps x {recipe.grpo_prompts} prompts x {recipe.grpo_group} rollouts each)")
    print("\n" + text)
    (run / "ablation.md").write_text(text + "\n")
    (run / "ablation.json").write_text(json.dumps(res, indent=1))
    return res


# ---- command line ------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", help="a model directory (config.json + safetensors)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run directory's, two levels up)")
    p.add_argument("--data", help="problem records (JSONL)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records of --data")
    p.add_argument("--n", type=int, default=8, help="samples per problem for maj@N (0: greedy only)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for maj@N")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generation batch")
    p.add_argument("--blank-images", action="store_true", help="replace every image by grey")
    p.add_argument("--shuffled-images", action="store_true", help="give each problem another's image")
    p.add_argument("--out", help="responses JSONL to write")
    p.add_argument("--rescore", help="score an existing responses file without a model")
    p.add_argument("--benchmark", help="benchmark of the rescored file (mathvista, mathverse, mathvision, "
                                       "dynamath, wemath, geoqa)")
    p.add_argument("--prm", help="PRM model directory: adds PRM best-of-N (toy: N = 1, 2, 4, ..., --n)")
    p.add_argument("--prm-diagnosis", action="store_true",
                   help="with --prm: PRM scores of right vs wrong samples, drop-moment rates, length bias")
    p.add_argument("--how", default="mean", choices=("min", "mean", "last", "product"),
                   help="best-of-N aggregation of the step scores (benchmark mode)")
    p.add_argument("--image-root", help="folder the benchmark records' image paths are relative to")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="released-model weights dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--preset", default="ursa-8b", help="architecture preset a released config.json falls back on")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rescore:
        from ursa.benchmarks import format_report, rescore
        if not args.benchmark:
            p.error("--rescore needs --benchmark")
        print(format_report(rescore(args.rescore, args.benchmark)))
        return
    if not (args.model and args.data):
        p.error("give --model and --data (or --rescore FILE --benchmark NAME)")
    if args.benchmark:
        return run_released_benchmark(args, p)
    model = load_model(args.model).eval()
    tok = Tokenizer.from_file(args.tokenizer or Path(args.model).parent.parent / "tokenizer.json")
    recs = load_problems(args.data)[:args.limit]
    base = Path(args.data).parent
    mode = "blank" if args.blank_images else "shuffled" if args.shuffled_images else "normal"
    g = evaluate(model, tok, recs, base, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                 image_mode=mode)
    print(f"greedy      {fmt_acc(g['first'], g['n'])}   ({args.data}, {mode} images)")
    fams = sorted({r["family"] for r in recs if "family" in r})
    if fams:
        print("  by family: " + ", ".join(
            f"{f} {fmt_acc(sum(c[0] for r, c in zip(recs, g['correct']) if r.get('family') == f), sum(r.get('family') == f for r in recs)).strip()}"
            for f in fams))
    if args.out:
        write_responses(args.out, recs, g)
    if args.prm and args.prm_diagnosis:
        print(prm_diagnosis(model, load_model(args.prm).eval(), tok, recs, base, n=max(1, args.n),
                            max_new_tokens=args.max_new_tokens, seed=args.seed))
    elif args.prm:
        prm = load_model(args.prm).eval()
        table, _, _, _ = prm_eval(model, prm, tok, recs, base, n=max(1, args.n), max_new_tokens=args.max_new_tokens,
                                  seed=args.seed, greedy=g)
        print(table)
    elif args.n > 1:
        s = evaluate(model, tok, recs, base, n=args.n, temperature=args.temperature,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                     image_mode=mode)
        print(f"maj@{args.n:<7} {fmt_acc(s['maj'], s['n'])}   single sample {100 * s['sample_acc']:.1f}%")


def prm_diagnosis(policy, prm, tok, records, base: Path, n: int = 8, max_new_tokens: int = 96,
                  seed: int = 0) -> str:
    """Why does best-of-N pick what it picks? Mean / min step scores and drop-moment rates of right vs
    wrong samples, and samples with fewer steps than the reference solution (the length bias of
    Appendix B.1)."""
    from statistics import mean
    from ursa.grpo import drop_moment
    from ursa.prm import aggregate, split_steps
    s = evaluate(policy, tok, records, base, n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    px = problem_pixels(records, base, policy.cfg.vision)
    sc = PRMScorer(prm, tok, base).score_responses(records, s["responses"], px)
    rows = [(c, len(split_steps(t)[0]) < len(r.get("steps", [])), aggregate(x, "mean"), aggregate(x, "min"),
             drop_moment(x) if x else 0.0)
            for i, r in enumerate(records) for t, c, x in zip(s["responses"][i], s["correct"][i], sc[i])]
    out = []
    for name, R in (("right samples", [r for r in rows if r[0]]), ("wrong samples", [r for r in rows if not r[0]]),
                    ("fewer steps than the reference", [r for r in rows if r[1]]),
                    ("as many steps or more", [r for r in rows if not r[1]])):
        if R:
            out.append(f"{name:<32} {len(R):5d}  accuracy {100 * mean(r[0] for r in R):5.1f}%  PRM mean "
                       f"{mean(r[2] for r in R):.3f}  min {mean(r[3] for r in R):.3f}  drop-moment >= 0.3: "
                       f"{100 * mean(r[4] >= 0.3 for r in R):.0f}%")
    return "\n".join(out)


def run_released_benchmark(args, p):
    """A released URSA model (Hugging Face layout) on a benchmark file, optionally with URSA-RM-8B
    best-of-N; writes the responses and prints the rule-based score."""
    from ursa.benchmarks import format_report, read_records, rescore
    from ursa.release import DTYPES, best_of_n_with_prm, load_released, run_benchmark
    if not args.out:
        p.error("--benchmark needs --out (the responses file to write)")
    model, tok = load_released(args.model, dtype=DTYPES[args.dtype], device=args.device, preset=args.preset)
    n = max(1, args.n) if args.prm else 1
    recs = run_benchmark(model, tok, read_records(args.data), args.benchmark, args.image_root or Path(args.data).parent,
                         n=n, temperature=args.temperature if n > 1 else 0.0, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, seed=args.seed, progress=True)
    if args.prm:
        del model
        rm, rtok = load_released(args.prm, dtype=DTYPES[args.dtype], device=args.device, preset=args.preset)
        recs = best_of_n_with_prm(rm, rtok, recs, None, args.how, benchmark=args.benchmark,
                                  image_root=args.image_root or Path(args.data).parent, batch_size=args.batch_size)
    write_jsonl_atomic(args.out, recs)
    print(format_report(rescore(args.out, args.benchmark)))



# ---- PRM scoring and best-of-N (Stage II, test time) -------------------------------------------------

class PRMScorer:
    """Step scores of solutions with a PRM (URSA-RM's readout): the user turn is
    `<|image|>` + prm_user_text(question, tagged solution); the score of step k is the sigmoid of
    the value head AT its tag token; a solution with no tag scores [] (aggregate -> 0)."""

    def __init__(self, model, tok, base: Path, batch_size: int = 64):
        self.model, self.tok, self.base, self.batch_size = model.eval(), tok, Path(base), batch_size

    def score_responses(self, records, responses: list, pixels: torch.Tensor) -> list:
        """responses[i]: list of response texts of record i -> scores[i][j] (list of step scores)."""
        from ursa.prm import score_responses
        qs, tx, px = [], [], []
        for i, (r, rs) in enumerate(zip(records, responses)):
            for t in rs:
                qs.append(r["question"]), tx.append(t), px.append(i)
        flat = score_responses(self.model, self.tok, qs, tx, pixels[torch.tensor(px)], self.batch_size)
        out, k = [], 0
        for rs in responses:
            out.append(flat[k:k + len(rs)])
            k += len(rs)
        return out


def best_of_n_table(records, result: dict, scores: list, greedy_correct: list, ns=(1, 2, 4, 8, 16)) -> tuple:
    """The shape of the paper's Table 2: for each N, accuracy of maj@N, PRM best-of-N under each
    aggregation and the PRM-weighted vote, all on the first N samples of each problem."""
    from ursa.prm import AGGREGATIONS, aggregate, best_of_n, prm_weighted_vote
    res = {}
    n_max = len(result["responses"][0])
    ns = [n for n in ns if n <= n_max]
    greedy = sum(greedy_correct) / len(records)
    for n in ns:
        acc = {"maj": 0, "weighted": 0, **{a: 0 for a in AGGREGATIONS}}
        for i, r in enumerate(records):
            ext, cor, sc = result["extracted"][i][:n], result["correct"][i][:n], scores[i][:n]
            acc["maj"] += is_equiv(majority_vote(ext), str(r["answer"]), r.get("choices"))
            for a in AGGREGATIONS:
                acc[a] += cor[best_of_n(sc, a)]
            w = prm_weighted_vote(ext, [aggregate(s, "mean") for s in sc])
            acc["weighted"] += is_equiv(w, str(r["answer"]), r.get("choices"))
        res[n] = {k: v / len(records) for k, v in acc.items()}
    head = ["N", "greedy", "maj@N"] + [f"PRM {a}" for a in AGGREGATIONS] + ["PRM-weighted vote"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in ns:
        v = res[n]
        lines.append("| " + " | ".join([str(n), f"{100 * greedy:.1f}", f"{100 * v['maj']:.1f}"] +
                                        [f"{100 * v[a]:.1f}" for a in AGGREGATIONS] +
                                        [f"{100 * v['weighted']:.1f}"]) + " |")
    return "\n".join(lines), res


def prm_eval(policy, prm, tok, records, base: Path, n: int = 16, max_new_tokens: int = 96,
             seed: int = 0, quiet: bool = False, greedy: Optional[dict] = None) -> tuple:
    """Sample n solutions per problem with the policy, score them with the PRM, build the table."""
    g = greedy or evaluate(policy, tok, records, base, max_new_tokens=max_new_tokens, quiet=quiet)
    s = evaluate(policy, tok, records, base, n=n, temperature=1.0, max_new_tokens=max_new_tokens,
                 seed=seed, quiet=quiet)
    px = problem_pixels(records, base, policy.cfg.vision)
    scores = PRMScorer(prm, tok, base).score_responses(records, s["responses"], px)
    table, res = best_of_n_table(records, s, scores, [c[0] for c in g["correct"]])
    return table, res, s, scores


if __name__ == "__main__":
    main()
