"""What sample.py and its --interactive session share: the range of each sampling setting, a
prompt's tokens, text streamed to the console as it is generated, and --out written the way the
shell's `>` would."""
import math
import sys
from pathlib import Path

import torch

from lmkit.errors import UserError
from lmkit.files import atomic_write_text
from lmkit.tokenizers import start_ids

# The sampling settings a user can set by flag (and change by /command in --interactive):
# name -> (is the value in range, what the range is).
SAMPLING_RANGES = {
    "max_new_tokens": (lambda v: v >= 0, "0 or more"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "a finite number, 0 or more"),
    "top_k": (lambda v: v is None or v >= 1, "at least 1"),
    "top_p": (lambda v: v is None or 0 < v <= 1, "in (0, 1]"),
    "seed": (lambda v: 0 <= v < 2 ** 63, "between 0 and 2**63 - 1"),
}


def prompt_ids(text: str, tokenizer, block_size: int) -> list:
    if not text:
        return start_ids(tokenizer)
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give some text")
    if len(ids) > block_size:
        print(f"note: the prompt is {len(ids)} tokens; keeping its last {block_size} "
              "(the model's block size)", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


class Streamer:
    """Prints the first row's text as tokens arrive. Each token is decoded once, held back only
    while it ends in half a UTF-8 character (at most 4 tokens, then shown replaced)."""

    def __init__(self, tokenizer, prompt_text: str):
        self.tokenizer = tokenizer
        self.pending = []
        print(prompt_text, end="", flush=True)

    def __call__(self, token: torch.Tensor) -> None:
        self.pending.append(int(token[0, 0]))
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return
        print(text, end="", flush=True)
        self.pending = []

    def finish(self) -> None:
        print(self.tokenizer.decode(self.pending) if self.pending else "", flush=True)


def write_like_the_shell(path: Path, text: str) -> None:
    """Write text to --out as `>` would: into a FIFO or a device as it is, through a symlink to
    its target; a regular file (or a new one) is replaced atomically."""
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_file():
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror}); choose another --out") from None
        return
    atomic_write_text(path, text)
