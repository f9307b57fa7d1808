"""Can the tiny decoder learn the toy's option step? A text-only drill on a fresh decoder.

Each example lists four options and a value that is one of them, then asks for the option step in
one of two wordings:

    letter  "Choices: (A) 4 (B) 9 (C) 7 (D) 5\\n5 is option (" -> "D"
            (the old toy wording: a lookup from a value to its letter)
    checks  "Choices: (A) 4 (B) 9 (C) 7 (D) 5\\nStep 5: 2 + 3 = 5.\\n\\nStep 6:" ->
            " (A) 4 is not 5. (B) 9 is not 5. (C) 7 is not 5. (D) 5 is 5.\\n\\n†Answer: D"
            (the toy's wording: copy each option in order, compare it with the value beside it)

A fresh decoder of the tiny preset's size (Qwen2, 160 wide, 4 layers; random init, AdamW) is trained
on freshly drawn batches, with the loss on the answer only (letter) or on the whole option step and
answer line (checks); one log line every 50 steps: the answer's loss and the accuracy of its letter
(teacher-forced, argmax) on the batch. Values are 1-39, so most take two digit tokens, as in the toy.

    python scripts/lookup_drill.py --wording letter --steps 300      # CPU, about 1.5 minutes
    python scripts/lookup_drill.py --wording checks --steps 500      # about 6 minutes
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ursa.config import LMConfig  # noqa: E402
from ursa.data import next_token_loss  # noqa: E402
from ursa.lm import Qwen2LM  # noqa: E402
from ursa.tokenizer import train_toy_tokenizer  # noqa: E402
from ursa.world import OPTION_LETTERS, option_step  # noqa: E402

LOG_EVERY = 50


def example(rng: random.Random, wording: str) -> tuple[str, str]:
    """(prompt text, target text) of one drill example."""
    vals = [str(v) for v in rng.sample(range(1, 40), 4)]
    value = vals[rng.randrange(4)]
    q = "Choices: " + " ".join(f"({c}) {v}" for c, v in zip(OPTION_LETTERS, vals)) + "\n"
    if wording == "letter":
        return q + f"{value} is option (", OPTION_LETTERS[vals.index(value)]
    text, letter = option_step(vals, value)
    return q + f"Step 5: 2 + 3 = {value}.\n\nStep 6:", f" {text}\n\n†Answer: {letter}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wording", choices=("letter", "checks"), required=True)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    corpus = ["".join(example(rng, w)) for w in ("letter", "checks") for _ in range(2000)]
    tok = train_toy_tokenizer(corpus, vocab_size=512)
    cfg = LMConfig(vocab_size=tok.tok.get_vocab_size(), hidden_size=160, intermediate_size=432)
    lm = Qwen2LM(cfg)
    for p in lm.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(lm.parameters(), lr=args.lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(args.steps + 1):
        rows, spans = [], []
        for _ in range(args.batch):
            prompt, target = example(rng, args.wording)
            p_ids = tok.tok.encode(prompt, add_special_tokens=False).ids
            ids = tok.tok.encode(prompt + target, add_special_tokens=False).ids
            rows.append(ids)
            spans.append((len(p_ids), len(ids)))
        T = max(map(len, rows))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T)                     # 1 on the target tokens
        for i, (r, (a, b)) in enumerate(zip(rows, spans)):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, a:b] = 1
        logits = lm.head(lm(lm.model.embed_tokens(ids)))     # [B, T, V]; right padding needs no mask
        loss, _ = next_token_loss(logits, ids, mask)         # mean over the target tokens
        if step % LOG_EVERY == 0:
            # the answer's letter is the last token of every row
            last = torch.tensor([b - 1 for _, b in spans])
            rows_i = torch.arange(len(rows))
            right = (logits[rows_i, last - 1].argmax(-1) == ids[rows_i, last]).float().mean()
            print(f"step {step:5d} | target loss {loss.item():.3f} | letter right {right.item():.2f} | "
                  f"{time.time() - t0:.0f} s", flush=True)
        opt.zero_grad()
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
