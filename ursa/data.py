"""Records (JSONL), images, and the encoded training sets with their batches and loss masks.

Record formats:
    conversation  {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
                   {"from": "gpt", "value": "..."}], "answer"?}       (alignment, SFT; LLaVA's format)
    problem       {"id", "image", "question", "answer", "choices"?}    (RL prompts, test sets)
    step-labelled {"id", "image", "question", "steps", "labels", "answer", "source"}   (DualMath)
"image" is a path relative to the JSONL file's folder. A malformed line stops with `file:line: why`.

A stage encodes its data ONCE (`ExampleSet`, `PRMExamples`): token ids as tensors, images
preprocessed to uint8 [N, 3, S, S]; a step's batch is then an index, a pad and a cast. Batches are
right-padded; `loss_mask[b, t] = 1` where token t is a target (an assistant token or its closing
<|im_end|>). The next-token loss pairs logits[:, t] with input_ids[:, t + 1] where
loss_mask[:, t + 1] = 1 (`next_token_loss`), normalised by a count the caller passes in: the
count over the whole optimizer step, not per micro-batch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ursa import io


class DataError(ValueError):
    pass


def read_jsonl(path, required: Sequence[str] = (), allow_empty: bool = False) -> list[dict]:
    """All records of a JSONL file (UTF-8, a BOM accepted); a malformed line, a missing field, a
    folder, non-UTF-8 bytes or (unless allow_empty) a file without records raise `file:line: why`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a .jsonl file")
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{i}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
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
    if not out and not allow_empty:
        raise DataError(f"{path}: no records")
    return out


def write_jsonl_atomic(path, records: Sequence[dict]):
    """JSONL written atomically (ursa.io.write_jsonl)."""
    io.write_jsonl(path, records)


def where(rec: dict) -> str:
    """A record's location for error messages: `file:line`, else its id."""
    return rec.get("_where", str(rec.get("id", "record")))


def image_path(rec: dict, base: Path) -> Path:
    if not isinstance(rec.get("image"), str) or not rec["image"]:
        raise DataError(f'{where(rec)}: field "image" must be a path string')
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


def record_pixels(rec: dict, base: Path, vision_cfg) -> torch.Tensor:
    """A record's image, preprocessed: [3, S, S] float in [0, 1]."""
    from ursa.vision import preprocess
    try:
        return preprocess(load_image(image_path(rec, base), where(rec)), vision_cfg)
    except (ValueError, TypeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where(rec)}: image {image_path(rec, base)}: {e}") from None


def load_images_u8(records, base: Path, vision_cfg) -> torch.Tensor:
    """Every record's image, preprocessed once: uint8 [N, 3, S, S] (a quarter of float32's memory)."""
    S = vision_cfg.image_size
    out = torch.empty((len(records), 3, S, S), dtype=torch.uint8)
    for i, r in enumerate(tqdm(records, desc="images", leave=False, disable=len(records) < 2000)):
        out[i] = (record_pixels(r, base, vision_cfg) * 255).round().to(torch.uint8)
    return out


def conversation_turns(rec: dict) -> tuple[str, str, bool]:
    """(user text without <image>, assistant text, has image) of a conversation record."""
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, dict) for t in conv[:2]):
        raise DataError(f'{where(rec)}: "conversations" must hold a human and a gpt turn')
    h, g = conv[0], conv[1]
    if h.get("from") != "human" or g.get("from") != "gpt":
        raise DataError(f'{where(rec)}: expected turns from "human" then "gpt"')
    user, answer = h.get("value", ""), g.get("value", "")
    if not isinstance(user, str) or not isinstance(answer, str):
        raise DataError(f'{where(rec)}: turn "value"s must be strings')
    has_image = "<image>" in user
    return user.replace("<image>\n", "").replace("<image>", ""), answer, has_image


# ---- batching --------------------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor       # [B, T] 1 where the token is a target
    pixel_values: Optional[torch.Tensor] = None  # [B, 3, S, S] (one image per row) or None

    def num_targets(self) -> int:
        return int(self.loss_mask[:, 1:].sum())

    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    def num_positions(self) -> int:
        """Every position, padding included (B * T): what a forward computes."""
        return self.input_ids.numel()

    def split(self, n: int) -> list["Batch"]:
        """Micro-batches of at most n rows (each row's image follows it)."""
        return [Batch(self.input_ids[s:s + n], self.attention_mask[s:s + n], self.loss_mask[s:s + n],
                      None if self.pixel_values is None else self.pixel_values[s:s + n])
                for s in range(0, self.input_ids.shape[0], n)]

    def take(self, rows: torch.Tensor, length: int) -> "Batch":
        """Rows `rows` (a long tensor of row indices, in that order), cut to the first `length`
        positions (right padding only: pass at least the longest chosen row's length)."""
        return Batch(self.input_ids[rows, :length], self.attention_mask[rows, :length],
                     self.loss_mask[rows, :length],
                     None if self.pixel_values is None else self.pixel_values[rows])

    def groups(self, max_rows: int, max_tokens: Optional[int] = None) -> list[tuple[torch.Tensor, int]]:
        """Micro-batches of similar length, as (row indices [b] long, length) pairs: length_groups
        of the rows' real lengths. The batch must be right-padded (as ExampleSet builds it)."""
        am = self.attention_mask
        lengths = am.sum(1)                                                    # [B]
        if not torch.equal(am.bool(), torch.arange(am.shape[1], device=am.device)[None, :] < lengths[:, None]):
            raise DataError("Batch.groups: the batch is not right-padded (a real token after a pad)")
        return [(torch.tensor(rows, dtype=torch.long), n)
                for rows, n in length_groups(lengths.tolist(), max_rows, max_tokens)]

    def buckets(self, max_rows: int, max_tokens: Optional[int] = None) -> list["Batch"]:
        """The rows sorted longest first and cut into micro-batches of at most max_rows rows and (when
        given) at most max_tokens positions (rows x longest), each padded only to its own longest
        row. Every real token's loss and gradient equal those of `split` (right padding is never
        seen by a real token; the loss is normalised by the step's count, taken before): only the
        summation order changes. With max_tokens the number of micro-batches depends on the
        lengths: under FSDP, where every rank must run as many forwards, leave it None (then there
        are ceil(B / max_rows) micro-batches, as with split)."""
        return [self.take(rows, n) for rows, n in self.groups(max_rows, max_tokens)]


def length_groups(lengths: Sequence[int], max_rows: int,
                  max_tokens: Optional[int] = None) -> list[tuple[list[int], int]]:
    """Cut rows into micro-batches of similar length: (row indices, longest length) per group.

    Rows are sorted longest first (ties by index, so the result is deterministic). Without
    max_tokens: consecutive groups of max_rows rows (the last may be smaller). With max_tokens: a
    group grows while it has fewer than max_rows rows and (rows + 1) x its longest row <= max_tokens
    (a row longer than max_tokens forms a group alone). Every row appears in exactly one group."""
    if max_rows < 1:
        raise DataError(f"length_groups: max_rows must be >= 1, got {max_rows}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"length_groups: max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups, cur = [], []
    for i in order:
        full = len(cur) >= max_rows or (max_tokens is not None and cur
                                         and (len(cur) + 1) * lengths[cur[0]] > max_tokens)
        if full:
            groups.append((cur, lengths[cur[0]]))
            cur = []
        cur.append(i)
    if cur:
        groups.append((cur, lengths[cur[0]]))
    return groups


def pad_right(rows: Sequence[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B 1-D long tensors -> ([B, T] padded with `value`, [B, T] attention mask), T the longest."""
    if not rows:
        raise DataError("an empty batch")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), value, dtype=torch.long)
    am = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        am[i, :len(r)] = 1
    return ids, am


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


# ---- encoded training sets (built once per stage) --------------------------------------------------

class ExampleSet:
    """Encoded examples: token ids and loss masks (1-D long tensors) and, optionally, their images
    as uint8 [N, 3, S, S]. `batch(idx, pad_id)` builds a right-padded Batch."""

    def __init__(self, ids: Sequence, masks: Sequence, images_u8: Optional[torch.Tensor]):
        if len(ids) != len(masks) or (images_u8 is not None and len(images_u8) != len(ids)):
            raise DataError(f"ExampleSet: {len(ids)} ids, {len(masks)} masks, "
                            f"{None if images_u8 is None else len(images_u8)} images")
        self.ids = [torch.as_tensor(i, dtype=torch.long) for i in ids]
        self.masks = [torch.as_tensor(m, dtype=torch.long) for m in masks]
        self.images = images_u8

    def __len__(self):
        return len(self.ids)

    def batch(self, idx: Sequence[int], pad_id: int) -> Batch:
        ids, am = pad_right([self.ids[i] for i in idx], pad_id)
        lm, _ = pad_right([self.masks[i] for i in idx], 0)
        px = None if self.images is None else self.images[list(idx)].float().div_(255.0)
        return Batch(ids, am, lm, px)

    def buckets(self, idx: Sequence[int], pad_id: int, max_rows: int,
                max_tokens: Optional[int] = None) -> list[Batch]:
        """`batch(idx)` cut into micro-batches of similar length, each padded only to its own
        longest row (Batch.buckets: the same loss and gradient as batch(idx).split(max_rows))."""
        return self.batch(idx, pad_id).buckets(max_rows, max_tokens)


def encode_conversations(path, tok, cfg, limit: Optional[int] = None, with_images: bool = True,
                         max_len: Optional[int] = None) -> ExampleSet:
    """Conversation records -> ExampleSet (loss on the assistant turn and its <|im_end|>).
    max_len truncates on the right, but never through an image's positions."""
    recs = read_jsonl(path, required=("id", "conversations"))[:limit]
    ids, masks = [], []
    for r in recs:
        user, answer, has_img = conversation_turns(r)
        if with_images and not has_img:
            raise DataError(f"{where(r)}: expected an <image> in the human turn")
        i, m = tok.encode_conversation(user, answer, image=with_images, num_image_tokens=cfg.vision.num_tokens)
        if max_len is not None and len(i) > max_len:
            if with_images and sum(t == cfg.image_token_id for t in i[:max_len]) < cfg.vision.num_tokens:
                raise DataError(f"{where(r)}: --max-len {max_len} would cut the image's positions")
            i, m = i[:max_len], m[:max_len]
        ids.append(i)
        masks.append(m)
    imgs = load_images_u8(recs, Path(path).parent, cfg.vision) if with_images else None
    return ExampleSet(ids, masks, imgs)


class PRMExamples:
    """DualMath records encoded for the PRM (Eq. 4): the user turn is <|image|> + the PRM
    instruction + the question + the solution with a tag after EVERY step (prm.tag_steps); the
    labels sit at the solution's tags (prm.prm_input: the readout's own positions). The number of
    tags must equal the number of labels: checked here, naming the record. max_len truncates on the
    right (a truncated tag loses its label)."""

    def __init__(self, records, tok, cfg, base: Path, max_len: Optional[int] = None):
        from ursa.prm import prm_input, tag_steps
        self.labels, self.ids, self.pos = [], [], []
        for r in records:
            steps, labels = r.get("steps"), r.get("labels")
            if not isinstance(steps, list) or not isinstance(labels, list) or len(steps) != len(labels):
                raise DataError(f"{where(r)}: {len(labels) if isinstance(labels, list) else 'no'} labels for "
                                f"{len(steps) if isinstance(steps, list) else 'no'} steps")
            try:
                ids, pos = prm_input(tok, r["question"], tag_steps(steps, r["answer"]), cfg.vision.num_tokens)
            except ValueError as e:
                raise DataError(f"{where(r)}: {e}") from None
            if len(pos) != len(labels):
                raise DataError(f"{where(r)}: the tagged solution has {len(pos)} step tags for {len(labels)} "
                                f"labels (a step holds the tag text?)")
            self.ids.append(torch.tensor(ids[:max_len] if max_len else ids, dtype=torch.long))
            self.pos.append(pos)
            self.labels.append(labels)
        self.images = load_images_u8(records, base, cfg.vision)

    def __len__(self):
        return len(self.ids)

    def batch(self, idx: Sequence[int], pad_id: int) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """(Batch, label tensor [B, T] float, tag mask [B, T] bool)."""
        from ursa.prm import labels_at
        ids, am = pad_right([self.ids[i] for i in idx], pad_id)
        px = self.images[list(idx)].float().div_(255.0)
        lab, mask = labels_at([self.pos[i] for i in idx], [self.labels[i] for i in idx], ids.shape[1])
        return Batch(ids, am, torch.zeros_like(ids), px), lab, mask

    def buckets(self, idx: Sequence[int], pad_id: int, max_rows: int,
                max_tokens: Optional[int] = None) -> list[tuple[Batch, torch.Tensor, torch.Tensor]]:
        """`batch(idx)` cut into micro-batches of similar length (Batch.buckets): a list of
        (Batch, labels [b, t], tag mask [b, t]), each padded only to its own longest row."""
        b, lab, mask = self.batch(idx, pad_id)
        return [(b.take(rows, n), lab[rows, :n], mask[rows, :n]) for rows, n in b.groups(max_rows, max_tokens)]
