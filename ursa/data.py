"""Records (JSONL), images, and batches with loss masks.

Record formats (DESIGN.md):
    conversation  {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
                   {"from": "gpt", "value": "..."}], "answer"?}       (alignment, SFT; LLaVA's format)
    problem       {"id", "image", "question", "answer", "choices"?}    (RL prompts, test sets)
"image" is a path relative to the JSONL file's folder. A malformed line stops with `file:line: why`.

Batches are right-padded; `loss_mask[b, t] = 1` where token t is a target (an assistant token or
its closing <|im_end|>). The next-token loss pairs logits[:, t] with input_ids[:, t + 1] where
loss_mask[:, t + 1] = 1 (see `next_token_loss`), normalised by a token count the caller passes in:
the count over the whole optimizer step, not per micro-batch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image


class DataError(ValueError):
    pass


def read_jsonl(path, required: Sequence[str] = ()) -> list[dict]:
    """All records of a JSONL file; a malformed line or a missing field raises `file:line: why`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{i}: expected a JSON object")
            for k in required:
                if k not in rec:
                    raise DataError(f'{path}:{i}: missing field "{k}"')
            rec["_where"] = f"{path}:{i}"
            out.append(rec)
    return out


def write_jsonl_atomic(path, records: Sequence[dict]):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")},
                               ensure_ascii=False) + "\n")
    tmp.replace(path)


def image_path(rec: dict, base: Path) -> Path:
    return Path(base) / rec["image"]


def load_image(path, where: str = "") -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise DataError(f"{where}: image {path} not found") from None
    except Exception as e:
        raise DataError(f"{where}: image {path} is unreadable ({e})") from None


def image_tensor(path, vision_cfg, where: str = "") -> torch.Tensor:
    """[3, S, S] float in [0, 1] by the tower's documented preprocessing."""
    from ursa.vision import preprocess
    return preprocess(load_image(path, where), vision_cfg)


def conversation_turns(rec: dict) -> tuple[str, str, bool]:
    """(user text without <image>, assistant text, has image) of a conversation record."""
    where = rec.get("_where", rec.get("id", "record"))
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise DataError(f'{where}: "conversations" must hold a human and a gpt turn')
    h, g = conv[0], conv[1]
    if h.get("from") != "human" or g.get("from") != "gpt":
        raise DataError(f'{where}: expected turns from "human" then "gpt"')
    user = h.get("value", "")
    has_image = "<image>" in user
    user = user.replace("<image>\n", "").replace("<image>", "")
    return user, g.get("value", ""), has_image


# ---- batching --------------------------------------------------------------------------------------

@dataclass
class Example:
    ids: list
    loss_mask: list
    pixels: Optional[torch.Tensor] = None   # [3, S, S]


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor       # [B, T] 1 where the token is a target
    pixel_values: Optional[torch.Tensor] = None  # [n_img, 3, S, S]

    def num_targets(self) -> int:
        return int(self.loss_mask[:, 1:].sum())

    def split(self, n: int) -> list["Batch"]:
        """Micro-batches of at most n rows (images follow their rows; one image per row or none)."""
        out = []
        for s in range(0, self.input_ids.shape[0], n):
            px = None
            if self.pixel_values is not None:
                px = self.pixel_values[s:s + n]
            out.append(Batch(self.input_ids[s:s + n], self.attention_mask[s:s + n],
                             self.loss_mask[s:s + n], px))
        return out


def collate(examples: Sequence[Example], pad_id: int, max_len: Optional[int] = None) -> Batch:
    T = max(len(e.ids) for e in examples)
    if max_len is not None and T > max_len:
        raise DataError(f"an example has {T} tokens, more than max_len {max_len}")
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    am = torch.zeros((B, T), dtype=torch.long)
    lm = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e.ids)
        ids[i, :L] = torch.tensor(e.ids)
        am[i, :L] = 1
        lm[i, :L] = torch.tensor(e.loss_mask)
    with_px = [e.pixels is not None for e in examples]
    if any(with_px) and not all(with_px):
        raise DataError("a batch mixes examples with and without images")
    px = torch.stack([e.pixels for e in examples]) if all(with_px) else None
    return Batch(ids, am, lm, px)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                    num_targets: Optional[int] = None):
    """Eq. 1: sum of -log p(token t+1 | <= t) over target tokens / num_targets.

    logits [B, T, V] (position t predicts t + 1), input_ids/loss_mask [B, T]. num_targets defaults
    to this batch's count; pass the optimizer step's global count when accumulating."""
    tgt = input_ids[:, 1:]                                                     # [B, T-1]
    m = loss_mask[:, 1:].bool()                                                # [B, T-1]
    lp = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                         reduction="none").view_as(tgt)                        # [B, T-1]
    n = int(m.sum()) if num_targets is None else num_targets
    loss = (lp * m).sum() / max(n, 1)
    return loss, {"tokens": int(m.sum())}
