"""Batched sampling with a KV cache.

    prompts (B token lists, different lengths)
      -> left-pad to [B, Tp], positions count real tokens only (equal lengths: no mask at all)
      -> prefill once (vision tower included), then expand the cache to B * G rows (G samples per
         prompt, rows b*G .. b*G+G-1): shared-prefix sampling for every caller of num_samples
      -> decode token by token, the logits of the last position only; each row stops on its own
         at a stop id (<|im_end|>, EOS) or at max_new_tokens. A stopped row leaves the batch
         (its cache rows dropped) once the stopped rows are 1 / COMPACT_FRACTION of those still
         decoded; until then it is decoded on with its own tokens (rows never see each other),
         and everything after its stop token is replaced at the end (cut_at_stop). Leaving
         changes no row's tokens at temperature 0; sampled, the draws of the rows that remain
         come from the same seeded generator in the same order, so a seed still fixes the result.
         Per step: no mask rebuilt (a preallocated key mask is sliced, and only for ragged
         prompts), positions read from a precomputed table, no host sync except the stop test
         (every STOP_CHECK_EVERY steps on an accelerator).

Returns, per row: the new tokens (padded with pad_id after the stop token), each sampled token's
log-probability under the temperature-scaled distribution log_softmax(logits / T) (before top-p
filtering; T = 1 for greedy), the length (stop token included) and why it stopped.

The <|image|> id is never sampled (its logit is set to -inf before anything else: a sampled
placeholder would have no pixels behind it); log-probs are over the remaining vocabulary.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ursa.lm import constant_weights
from ursa.model import URSAModel


@dataclass
class Generation:
    tokens: torch.Tensor      # [B*G, L] long, pad_id after each row's end
    logprobs: torch.Tensor    # [B*G, L] float, 0 after each row's end
    lengths: torch.Tensor     # [B*G] long, new tokens incl. the stop token
    stop_reason: list         # "stop" | "length" per row
    prompt_index: torch.Tensor  # [B*G] which prompt each row continues
    decoded: int = 0            # (row, position) pairs computed: new tokens paid for, stopped rows' included

    def row(self, i: int) -> list[int]:
        return self.tokens[i, : int(self.lengths[i])].tolist()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
    """[B, Tp] ids and attention mask, padded on the left."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids, mask


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator]):
    """logits [N, V] -> (token [N], logprob [N] under log_softmax(logits / T)).

    Sampled rows invert their cumulative distribution at one uniform draw each (torch.multinomial
    draws an exponential per vocabulary entry: V times the random numbers, 8% of a 128-row decoding
    step at the toy's 512 tokens, docs/speed.md). A token of probability 0 is never chosen."""
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)                       # [N, V]
    probs = logp.exp()
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)                  # always keeps the top token
    cdf = probs.cumsum(-1)                                                    # [N, V]
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=logits.device, dtype=cdf.dtype)   # [N, 1]
    # the first entry whose cdf exceeds u * total; kept below total so that float rounding never
    # lands on the zero-probability entries after the last possible token
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    tok = torch.searchsorted(cdf, x, right=True).squeeze(-1)                 # [N]
    if order is not None:
        tok = order.gather(-1, tok[:, None]).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


# A host sync (reading "have all rows stopped?") stalls an accelerator's queue; there the check runs
# every STOP_CHECK_EVERY steps (rows that stopped in between are decoded on and their extra tokens
# dropped, so the result is the same). On a CPU the check is free and runs every step.
STOP_CHECK_EVERY = 8
# Stopped rows leave the batch (their cache rows are copied out) once they are at least
# 1 / COMPACT_FRACTION of the rows still decoded: often enough that the batch shrinks with the
# lengths (a GRPO batch's responses run 40-96 tokens), rarely enough that the copies stay cheap.
COMPACT_FRACTION = 8


def stop_check_every(device: torch.device) -> int:
    """Decoding steps between two all-stopped checks: 1 on a CPU, STOP_CHECK_EVERY elsewhere."""
    return 1 if device.type == "cpu" else STOP_CHECK_EVERY


def is_sharded(model) -> bool:
    """Whether any part of the model is FSDP-sharded (its weights exist only inside its forward).
    Nothing is sharded before torch.distributed.fsdp is imported, so that import is never paid here."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return False
    return any(isinstance(m, fsdp.FSDPModule) for m in model.modules())


def cut_at_stop(tokens: torch.Tensor, logprobs: torch.Tensor, stop: torch.Tensor, pad_id: int):
    """Cut every row after its first stop id. tokens/logprobs [N, L] (modified in place: pad_id and
    0 after the stop token) -> (lengths [N] incl. the stop token, L where none, stopped [N] bool)."""
    N, L = tokens.shape
    hit = torch.isin(tokens, stop) if stop.numel() else torch.zeros_like(tokens, dtype=torch.bool)
    stopped = hit.any(1)                                                       # [N]
    first = hit.long().argmax(1)                                               # first stop (0 if none)
    lengths = torch.where(stopped, first + 1, torch.full_like(first, L))       # [N]
    after = torch.arange(L, device=tokens.device)[None, :] >= lengths[:, None]  # [N, L]
    tokens.masked_fill_(after, pad_id)
    logprobs.masked_fill_(after, 0.0)
    return lengths, stopped


@torch.no_grad()
def generate(model: URSAModel, prompts: Sequence[Sequence[int]], pixel_values=None, *,
             num_samples: int = 1, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
             generator: Optional[torch.Generator] = None) -> Generation:
    """Sample num_samples continuations of every prompt. pixel_values: [B, 3, S, S] (one image per
    prompt, for prompts that hold <|image|> positions) or None.

    Each prompt is prefilled once (vision tower included) and its cache rows copied to its
    num_samples rows. Prompts of equal length need no mask at all. Rows that have stopped leave the
    batch in groups (see the module docstring); tokens a row decoded after its stop are replaced by
    pad_id at the end, so rows never influence each other."""
    was_training = model.training
    model.eval()
    try:
        with constant_weights():
            return _generate(model, prompts, pixel_values, num_samples, max_new_tokens, temperature,
                             top_p, stop_ids, pad_id, generator)
    finally:
        if was_training:
            model.train()


def _generate(model, prompts, pixel_values, G, max_new_tokens, temperature, top_p, stop_ids, pad_id,
              generator) -> Generation:
    B = len(prompts)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids, mask = left_pad(prompts, pad_id)
    padded = len({len(p) for p in prompts}) > 1
    lm = model.language_model
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    Tp = ids.shape[1]
    cache = model.new_cache(B, Tp + max_new_tokens)
    sharded = is_sharded(model)
    out = model(ids, pixel_values, attention_mask=mask if padded else None, cache=cache, logits=sharded)
    last = (out.logits[:, -1] if sharded else lm.head(out.hidden[:, -1])).float()   # [B, V] (prefill)
    ban = model.cfg.image_token_id
    last[:, ban] = float("-inf")
    N = B * G
    real = mask.sum(1)                                                         # [B] real prompt tokens
    if G > 1:
        cache.repeat_interleave(G)
        last = last.repeat_interleave(G, dim=0)                                # [N, V]
        mask, real = mask.repeat_interleave(G, dim=0), real.repeat_interleave(G)
    # every key a step can see: the prompt's real tokens, then every new token (a stopped row's
    # later tokens are dropped at the end, so they may stay visible to that row)
    keys = None
    if padded:
        keys = torch.ones((N, Tp + max_new_tokens), dtype=torch.bool, device=dev)
        keys[:, :Tp] = mask.bool()
    positions = real[:, None] + torch.arange(max_new_tokens, device=dev)       # [N, L] new tokens' positions
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    logprobs = torch.zeros((N, max_new_tokens), device=dev)
    rows = torch.arange(N, device=dev)          # the output row of each row still decoded
    stopped = torch.zeros(N, dtype=torch.bool, device=dev)                     # [n] of the rows decoded
    every, decoded = stop_check_every(dev), 0
    for t in range(max_new_tokens):
        tok, lp = sample_next(last, temperature, top_p, generator)             # [n]
        decoded += rows.numel()
        tokens[rows, t] = tok
        logprobs[rows, t] = lp
        if t == max_new_tokens - 1:
            break
        if stop.numel():
            stopped |= torch.isin(tok, stop)
            if (t + 1) % every == 0:
                done = int(stopped.sum())
                if done == rows.numel():
                    break
                if done >= max(1, rows.numel() // COMPACT_FRACTION):   # drop the stopped rows
                    keep = (~stopped).nonzero().squeeze(1)                       # [n'] of [n]
                    rows, tok, last, stopped = rows[keep], tok[keep], last[keep], stopped[keep]
                    positions = positions[keep]
                    keys = None if keys is None else keys[keep]
                    cache.select(keep)
        am = None if keys is None else keys[:, :Tp + t + 1]                    # [n, Tp + t + 1]
        pos = positions[:, t:t + 1]
        if sharded:                     # through the root module: its hooks gather the root weights
            last = model(tok[:, None], attention_mask=am, position_ids=pos, cache=cache).logits[:, -1].float()
        else:                           # the decoder alone: no image merge (and its host sync) per token
            h = lm(lm.model.embed_tokens(tok[:, None]), attention_mask=am, position_ids=pos, cache=cache)
            last = lm.head(h[:, -1]).float()                                   # [n, V]
        last[:, ban] = float("-inf")
    lengths, stopped = cut_at_stop(tokens, logprobs, stop, pad_id)
    reasons = ["stop" if s else "length" for s in stopped.tolist()]
    return Generation(tokens, logprobs, lengths, reasons,
                      torch.arange(B, device=dev).repeat_interleave(G), decoded)


def sample_texts(model: URSAModel, tok, prompts: Sequence[Sequence[int]], pixel_values=None, *,
                 num_samples: int = 1, batch_size: int = 64, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, generator=None, progress=None):
    """Sample num_samples responses per prompt in batches of batch_size prompts; decode them.

    Returns (texts [len(prompts)][num_samples], generations: list of Generation per batch).
    `tok` needs decode(), im_end_id, eos_id, pad_id (ursa.tokenizer.Tokenizer)."""
    texts, gens = [], []
    for s in range(0, len(prompts), batch_size):
        px = None if pixel_values is None else pixel_values[s:s + batch_size]
        g = generate(model, prompts[s:s + batch_size], px, num_samples=num_samples,
                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     stop_ids=(tok.im_end_id, tok.eos_id), pad_id=tok.pad_id, generator=generator)
        gens.append(g)
        rows = [tok.decode(g.row(i)) for i in range(g.tokens.shape[0])]
        texts.extend(rows[i:i + num_samples] for i in range(0, len(rows), num_samples))
        if progress is not None:
            progress.update(len(rows))
    return texts, gens
