"""Evaluation: greedy, majority vote of N (self-consistency) and PRM best-of-N, on the toy test sets
or a benchmark file; rescoring of saved responses.

    python eval.py --model runs/toy/sft/model --data data/toy/test.jsonl           # greedy + maj@8
    python eval.py --model runs/toy/sft/model --data data/toy/test.jsonl --blank-images
    python eval.py --model runs/toy/sft/model --data data/toy/test.jsonl --prm runs/toy/prm/model
    python eval.py --rescore responses.jsonl --benchmark mathvista                 # no model needed

Accuracy is printed with a 95% Wilson interval. Responses are written as JSONL records
{"id", "response", "extracted", "correct", ...} (DESIGN.md's response record).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ursa.answer import extract_answer, is_equiv
from ursa.data import DataError, image_path, load_image, read_jsonl, write_jsonl_atomic
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
    ext = [[judge(r, t)[0] for t in ts] for r, ts in zip(records, texts)]
    cor = [[judge(r, t)[1] for t in ts] for r, ts in zip(records, texts)]
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

def recipe_table(run: Path, recipe, times: dict, quiet: bool = False) -> dict:
    """Evaluate each stage's model on the toy test / hard sets and print the results table."""
    data = Path(recipe.data_dir)
    tok = Tokenizer.from_file(run / "tokenizer.json")
    test = load_problems(data / "test.jsonl")
    hard = load_problems(data / "test_hard.jsonl")
    rows, res = [], {"times_s": {k: round(v, 1) for k, v in times.items()}}
    t0 = time.time()
    for stage in ("align", "sft"):
        d = run / stage / "model"
        if not d.exists():
            continue
        model = load_model(d).eval()
        r_t = evaluate(model, tok, test, data, max_new_tokens=recipe.max_new_tokens, quiet=quiet)
        r_h = evaluate(model, tok, hard, data, max_new_tokens=recipe.max_new_tokens, quiet=quiet)
        res[stage] = {"test_greedy": r_t["first"] / r_t["n"], "hard_greedy": r_h["first"] / r_h["n"]}
        rows.append((f"{stage} greedy", fmt_acc(r_t["first"], r_t["n"]), fmt_acc(r_h["first"], r_h["n"])))
        if stage == "sft":
            write_responses(run / "sft" / "test_greedy.jsonl", test, r_t)
            N = recipe.eval_samples
            m_t = evaluate(model, tok, test, data, n=N, temperature=1.0, max_new_tokens=recipe.max_new_tokens, quiet=quiet)
            m_h = evaluate(model, tok, hard, data, n=N, temperature=1.0, max_new_tokens=recipe.max_new_tokens, quiet=quiet)
            res["sft"].update({f"test_maj@{N}": m_t["maj"] / m_t["n"], f"hard_maj@{N}": m_h["maj"] / m_h["n"],
                               "test_sample_acc_T1": m_t["sample_acc"]})
            rows.append((f"sft maj@{N} (T=1.0)", fmt_acc(m_t["maj"], m_t["n"]), fmt_acc(m_h["maj"], m_h["n"])))
            rows.append(("sft single sample (T=1.0)", f"{100 * m_t['sample_acc']:5.1f}%", f"{100 * m_h['sample_acc']:5.1f}%"))
            for mode in ("blank", "shuffled"):
                b_t = evaluate(model, tok, test, data, image_mode=mode, max_new_tokens=recipe.max_new_tokens, quiet=quiet)
                res["sft"][f"test_greedy_{mode}_images"] = b_t["first"] / b_t["n"]
                rows.append((f"sft greedy, {mode} images", fmt_acc(b_t["first"], b_t["n"]), "-"))
    times["eval"] = time.time() - t0
    res["times_s"]["eval"] = round(times["eval"], 1)
    lines = [f"| {'model':<28} | {'toy test':<22} | {'hard test':<22} |", f"|{'-' * 30}|{'-' * 24}|{'-' * 24}|"]
    lines += [f"| {a:<28} | {b:<22} | {c:<22} |" for a, b, c in rows]
    lines.append("")
    lines.append("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    table = "\n".join(lines)
    print("\n" + table)
    (run / "results.md").write_text(table + "\n")
    (run / "results.json").write_text(json.dumps(res, indent=1))
    return res


# ---- command line ------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", help="a model directory (config.json + safetensors)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run directory's, two levels up)")
    p.add_argument("--data", help="problem records (JSONL)")
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
    model = load_model(args.model).eval()
    tok = Tokenizer.from_file(args.tokenizer or Path(args.model).parent.parent / "tokenizer.json")
    recs = load_problems(args.data)
    base = Path(args.data).parent
    mode = "blank" if args.blank_images else "shuffled" if args.shuffled_images else "normal"
    g = evaluate(model, tok, recs, base, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                 image_mode=mode)
    print(f"greedy      {fmt_acc(g['first'], g['n'])}   ({args.data}, {mode} images)")
    if args.out:
        write_responses(args.out, recs, g)
    if args.n > 1:
        s = evaluate(model, tok, recs, base, n=args.n, temperature=args.temperature,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                     image_mode=mode)
        print(f"maj@{args.n:<7} {fmt_acc(s['maj'], s['n'])}   single sample {100 * s['sample_acc']:.1f}%")


if __name__ == "__main__":
    main()
