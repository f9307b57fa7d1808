"""Batched sampling with a KV cache.

    prompts (B token lists, different lengths)
      -> left-pad to [B, Tp], positions count real tokens only
      -> prefill once, then expand the cache to B * G rows (G samples per prompt, rows b*G .. b*G+G-1)
      -> decode token by token; each row stops on its own at a stop id (<|im_end|>, EOS) or at
         max_new_tokens; finished rows are fed padding and masked, and the loop ends when all rows
         have stopped.

Returns, per row: the new tokens (padded with pad_id after the stop token), each sampled token's
log-probability under the temperature-scaled distribution log_softmax(logits / T) (before top-p
filtering; T = 1 for greedy), the length (stop token included) and why it stopped.

The <|image|> id is never sampled (its logit is set to -inf before anything else: a sampled
placeholder would have no pixels behind it); log-probs are over the remaining vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ursa.model import URSAModel


@dataclass
class Generation:
    tokens: torch.Tensor      # [B*G, L] long, pad_id after each row's end
    logprobs: torch.Tensor    # [B*G, L] float, 0 after each row's end
    lengths: torch.Tensor     # [B*G] long, new tokens incl. the stop token
    stop_reason: list         # "stop" | "length" per row
    prompt_index: torch.Tensor  # [B*G] which prompt each row continues

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
    """logits [N, V] -> (token [N], logprob [N] under log_softmax(logits / T))."""
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)                       # [N, V]
    probs = logp.exp()
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = (sp.cumsum(-1) - sp) < top_p                                   # always keeps the top token
        sp = sp * keep
        choice = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=generator)
        tok = si.gather(-1, choice).squeeze(-1)
    else:
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


@torch.no_grad()
def generate(model: URSAModel, prompts: Sequence[Sequence[int]], pixel_values=None, *,
             num_samples: int = 1, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
             generator: Optional[torch.Generator] = None) -> Generation:
    """Sample num_samples continuations of every prompt. pixel_values: [B, 3, S, S] (one image per
    prompt, for prompts that hold <|image|> positions) or None."""
    was_training = model.training
    model.eval()
    B, G = len(prompts), num_samples
    ids, mask = left_pad(prompts, pad_id)
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    cache = model.new_cache(B, ids.shape[1] + max_new_tokens)
    out = model(ids, pixel_values, attention_mask=mask, cache=cache)           # prefill
    ban = model.cfg.image_token_id
    last = out.logits[:, -1].float()                                           # [B, V]
    last[:, ban] = float("-inf")
    if G > 1:
        cache.repeat_interleave(G)
        mask = mask.repeat_interleave(G, dim=0)                                # [B*G, Tp]
        last = last.repeat_interleave(G, dim=0)                                # [B*G, V]
    N = B * G
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    logprobs = torch.zeros((N, max_new_tokens), device=dev)
    lengths = torch.full((N,), max_new_tokens, dtype=torch.long, device=dev)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    stopped = torch.zeros(N, dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        tok, lp = sample_next(last, temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens[:, t] = tok
        logprobs[:, t] = torch.where(done, torch.zeros_like(lp), lp)
        hit = (~done) & torch.isin(tok, stop)
        lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)
        stopped |= hit
        done |= hit
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)               # [N, Tp + t + 1]
        out = model(tok[:, None], attention_mask=mask, cache=cache)
        last = out.logits[:, -1].float()
        last[:, ban] = float("-inf")
    if was_training:
        model.train()
    reasons = ["stop" if s else "length" for s in stopped.tolist()]
    return Generation(tokens, logprobs, lengths, reasons,
                      torch.arange(B, device=dev).repeat_interleave(G))


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
