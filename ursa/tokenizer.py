"""Tokenizer: a thin wrapper over the `tokenizers` library, URSA's ChatML prompt and loss masks.

- Loads any tokenizer.json (the released Qwen2.5 / URSA one included) and checks that the special
  tokens URSA needs exist: <|endoftext|>, <|im_start|>, <|im_end|>, <|image|>.
- Trains a byte-level BPE for the toy world with digits split one by one (arithmetic stays digit by
  digit) and the step tag ' и' (space + U+0438, URSA Stage II) guaranteed to be ONE token.
- Builds URSA's chat prompt exactly as the released model uses it (docs/paper.md):
      <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<|image|>{prompt}
      <|im_end|>\\n<|im_start|>assistant\\n
  and encodes a conversation into input ids plus a loss mask that covers the assistant's tokens and
  its closing <|im_end|>, nothing else. One <|image|> placeholder is expanded to the number of
  positions the vision tower yields (576 for URSA-8B).

pad and eos are the SAME id here, <|endoftext|> (as in Qwen2.5); a turn ends with <|im_end|>, which
is never the pad id. Masks are built by position (lengths), never by comparing ids to pad, so a stop
token is never masked out as padding even when it equals the pad id.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from ursa import io

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>"]
STEP_TAG = " и"
SYSTEM_PROMPT = "You are a helpful assistant."


class Tokenizer:
    def __init__(self, tok: HFTokenizer, source: str = "tokenizer"):
        self.tok = tok
        self.source = source
        vocab = tok.get_vocab(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"{source}: tokenizer lacks the special token(s) {missing}; URSA needs "
                             f"{SPECIAL_TOKENS}")
        self.pad_id = vocab["<|endoftext|>"]
        self.eos_id = vocab["<|endoftext|>"]
        self.im_start_id = vocab["<|im_start|>"]
        self.im_end_id = vocab["<|im_end|>"]
        self.image_id = vocab["<|image|>"]
        tag = self.tok.encode(STEP_TAG, add_special_tokens=False).ids
        if len(tag) != 1:
            raise ValueError(f"{source}: the step tag {STEP_TAG!r} encodes to {len(tag)} tokens {tag}; "
                             f"it must be exactly one")
        self.tag_id = tag[0]

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library's message names no file
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        return cls(tok, str(path))

    def save(self, path):
        """Write tokenizer.json atomically (ursa.io)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        with io.atomic_file(path) as tmp:
            self.tok.save(str(tmp))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    # ---- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    # ---- URSA's chat format -------------------------------------------------------------------
    @staticmethod
    def chat_prompt(user_text: str, image: bool = True) -> str:
        """URSA's ChatML prompt up to and including `<|im_start|>assistant\\n`."""
        return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                f"{'<|image|>' if image else ''}{user_text}<|im_end|>\n<|im_start|>assistant\n")

    def expand_image(self, ids: list[int], num_image_tokens: int) -> list[int]:
        """Each <|image|> placeholder becomes num_image_tokens copies of itself."""
        out = []
        for i in ids:
            out.extend([i] * num_image_tokens if i == self.image_id else [i])
        return out

    def encode_prompt(self, user_text: str, image: bool = True, num_image_tokens: int = 1,
                      assistant_prefix: str = "") -> list[int]:
        """Prompt ids ending in the assistant turn (optionally with the start of a response)."""
        if "<|image|>" in user_text:
            raise ValueError("user_text must not contain <|image|>; pass image=True instead")
        ids = self.encode(self.chat_prompt(user_text, image) + assistant_prefix)
        return self.expand_image(ids, num_image_tokens)

    def encode_conversation(self, user_text: str, assistant_text: str, image: bool = True,
                            num_image_tokens: int = 1) -> tuple[list[int], list[int]]:
        """(input ids, loss mask): the mask is 1 on the assistant's tokens and its <|im_end|>."""
        prompt = self.encode_prompt(user_text, image, num_image_tokens)
        answer = self.encode(assistant_text) + [self.im_end_id]
        return prompt + answer, [0] * len(prompt) + [1] * len(answer)


def train_toy_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE for the toy world: digits split one by one, URSA's special tokens, and the
    step tag ' и' as one (non-special) added token."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(STEP_TAG, normalized=False, special=False)])
    return Tokenizer(tok, "toy tokenizer")
