"""Released models on benchmark files: generation (URSA-8B, URSA-8B-PS-GRPO) and URSA-RM-8B best-of-N.

References: URSA-MATH/URSA-MATH (official code): inference/vllm_infer.py (evaluation prompt and
ChatML template, max_tokens 2048, image fields per benchmark), inference/prm_infer_score.py (the
released scorer: its tag rule is ursa.prm's rule "released"); best-of-N is Eq. 10 of the URSA paper
(ursa.prm.best_of_n). eval.py runs these (docs/released_models.md):

    model, tok = ursa.release.load_released(dir, dtype, device)
    out = run_benchmark(model, tok, ursa.benchmarks.read_records(path), "mathvista", image_root, n=8,
                        temperature=1.0)
    rm, rtok = ursa.release.load_released(rm_dir, dtype, device)
    out = best_of_n_with_prm(rm, rtok, out, benchmark="mathvista", image_root=image_root, rule="released")
    ursa.io.write_jsonl(path_out, out); ursa.benchmarks.rescore(path_out, "mathvista")
"""
from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from ursa.bench_files import benchmark_name, record_image_bytes
from ursa.benchmarks import build_prompt, question_text
from ursa.config import ModelConfig
from ursa.data import load_image
from ursa.generate import generate
from ursa.model import URSAModel
from ursa.prm import AGGREGATIONS, TAG_RULES, aggregate, best_of_n, score_responses
from ursa.tokenizer import Tokenizer
from ursa.vision import preprocess

RELEASED_RM_RULE = "released"        # URSA-RM-8B was trained and evaluated with its authors' tag rule
OFFICIAL_MAX_NEW_TOKENS = 2048       # vllm_infer.py's max_tokens

ImageLike = Union[None, str, Path, Image.Image, torch.Tensor]


def generation_prompt(benchmark: str, rec: dict, image: bool = True) -> str:
    """The full ChatML text URSA-8B is evaluated with (official vllm_infer.py template + prompt)."""
    return Tokenizer.chat_prompt(build_prompt(benchmark, rec), image)


def pixels_of(image: ImageLike, cfg: ModelConfig, where: str = "") -> Optional[torch.Tensor]:
    """None -> None; a path or PIL image -> preprocess (ursa.vision) -> [3, S, S] in [0, 1]; a
    [3, S, S] tensor as is (its shape checked)."""
    if image is None:
        return None
    if isinstance(image, torch.Tensor):
        S = cfg.vision.image_size
        if tuple(image.shape) != (3, S, S):
            raise ValueError(f"{where}: image tensor must be [3, {S}, {S}] in [0, 1], got {tuple(image.shape)}")
        return image
    if isinstance(image, (str, Path)):
        image = load_image(image, where)
    return preprocess(image, cfg.vision)


def record_image(benchmark: str, rec: dict, image_root, where: str = ""):
    """A benchmark record's image: the picture embedded in a VLMEvalKit TSV row (a PIL image), else
    its path (official vllm_infer.py): WE-MATH `image_path`, DynaMath `image_dir`/`image`, the others
    `image`; empty -> None (a text-only item: no <|image|>)."""
    embedded = record_image_bytes(rec, where)
    if embedded is not None:
        return load_image(BytesIO(embedded), where)
    if benchmark == "wemath":
        name = rec.get("image_path", rec.get("image"))
    else:
        name = rec.get("image", rec.get("image_path"))
    if name is None:
        raise ValueError(f'{where}: missing field "{"image_path" if benchmark == "wemath" else "image"}"')
    if not name:
        return None
    if benchmark == "dynamath" and rec.get("image_dir"):
        name = str(Path(rec["image_dir"]) / name)
    return Path(image_root) / name


def as_pairs(records) -> list[tuple[str, dict]]:
    """Dicts, or (where, dict) pairs as ursa.benchmarks.read_records gives -> (where, dict) pairs."""
    return [r if isinstance(r, tuple) else (r.get("_where", f"record {i}"), r) for i, r in enumerate(records)]


def _stack(px: Sequence[Optional[torch.Tensor]], model) -> Optional[torch.Tensor]:
    """The non-None [3, S, S] images as [n, 3, S, S] on the model's device and dtype (None if none)."""
    px = [p for p in px if p is not None]
    if not px:
        return None
    p0 = next(model.parameters())
    return torch.stack(px).to(device=p0.device, dtype=p0.dtype)


@torch.no_grad()
def run_benchmark(model: URSAModel, tok: Tokenizer, records, benchmark: str, image_root, n: int = 1,
                  temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = OFFICIAL_MAX_NEW_TOKENS,
                  batch_size: int = 8, seed: int = 0, progress: bool = False) -> list[dict]:
    """Sample n responses per benchmark record with URSA's evaluation prompt (ursa.benchmarks.build_prompt,
    ChatML, one <|image|> expanded to the tower's positions) and the record's preprocessed image.

    records: the benchmark's own records (dicts or read_records pairs). Returns them with "response":
    the text (n == 1) or the list of n texts (n > 1; rescore scores the first, best_of_n_with_prm
    chooses). temperature 0 is greedy; otherwise a generator seeded with `seed` draws the samples.
    Generation stops at <|im_end|> / <|endoftext|> or max_new_tokens."""
    benchmark = benchmark_name(benchmark)
    from tqdm import tqdm
    recs = as_pairs(records)
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
    texts: list = []
    bar = tqdm(total=len(recs), desc=f"{benchmark} x{n}", disable=not progress)
    for s in range(0, len(recs), batch_size):
        chunk = recs[s:s + batch_size]
        px = [pixels_of(record_image(benchmark, r, image_root, w), model.cfg, w) for w, r in chunk]
        prompts = [tok.encode_prompt(build_prompt(benchmark, r), image=p is not None,
                                     num_image_tokens=model.cfg.vision.num_tokens)
                   for p, (_, r) in zip(px, chunk)]
        g = generate(model, prompts, _stack(px, model), num_samples=n, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, stop_ids=(tok.im_end_id, tok.eos_id),
                     pad_id=tok.pad_id, generator=gen)
        rows = [tok.decode(g.row(i)) for i in range(g.tokens.shape[0])]
        texts.extend(rows[i:i + n] for i in range(0, len(rows), n))
        bar.update(len(chunk))
    bar.close()
    return [{**r, "response": t[0] if n == 1 else t} for (_, r), t in zip(recs, texts)]


def best_of_n_with_prm(rm: URSAModel, tok: Tokenizer, records, responses=None, how: str = "mean", *,
                       benchmark: str, image_root, batch_size: int = 8, progress: bool = False,
                       rule: str = RELEASED_RM_RULE) -> list[dict]:
    """Eq. 10: per record, the candidate with the largest aggregated step score (`how`: min | mean |
    last | product; ties -> the first), scored by ursa.prm.score_responses with tag rule `rule`
    ("released": the URSA-RM-8B authors' rule, the default; "strict": ours, see ursa.prm). The PRM's
    question is the benchmark's question text (ursa.benchmarks.question_text). responses: per
    record a list of candidate texts (None: each record's own "response" list, as run_benchmark
    writes it with n > 1).

    Returns the records with "response" = the chosen text, plus "candidates", "prm_step_scores",
    "prm_aggregate" (per candidate), "prm_choice" (index), "prm_how" and "prm_tag_rule": ready for
    ursa.benchmarks.rescore, and enough to recompute smaller N, another aggregation or a vote."""
    benchmark = benchmark_name(benchmark)
    if how not in AGGREGATIONS:
        raise ValueError(f"best_of_n_with_prm: how must be one of {AGGREGATIONS}, got {how!r}")
    if rule not in TAG_RULES:
        raise ValueError(f"best_of_n_with_prm: rule must be one of {TAG_RULES}, got {rule!r}")
    recs = as_pairs(records)
    if responses is not None and len(responses) != len(recs):
        raise ValueError(f"best_of_n_with_prm: {len(recs)} records but {len(responses)} response lists")
    from tqdm import tqdm
    out = []
    for i, (where, rec) in enumerate(tqdm(recs, desc="PRM best-of-N", disable=not progress)):
        cands = responses[i] if responses is not None else rec.get("response")
        if isinstance(cands, str):
            cands = [cands]
        if not cands or not all(isinstance(c, str) for c in cands):
            raise ValueError(f"{where}: no candidate responses (a list of texts) to choose from")
        px = pixels_of(record_image(benchmark, rec, image_root, where), rm.cfg, where)
        q = question_text(benchmark, rec)
        steps = score_responses(rm, tok, [q] * len(cands), list(cands), [px] * len(cands), batch_size, rule=rule)
        k = best_of_n(steps, how)
        out.append({**rec, "response": cands[k], "candidates": list(cands), "prm_step_scores": steps,
                    "prm_aggregate": [aggregate(s, how) for s in steps], "prm_choice": k, "prm_how": how,
                    "prm_tag_rule": rule})
    return out
