"""Token data for training: checked splits read by offset, seeded random batches, whole-split val
windows."""
import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import torch

from lmkit.device import to_device
from lmkit.errors import UserError
from lmkit.tokenizers import BYTE_TOKENS, GPT2_VOCAB_SIZE, MAX_TOKEN_ID, BPETokenizer

BPE_FILE = "tokenizer.json"  # a BPE data folder's tokenizer, beside its bins
# The BPE size a plain `python prepare_data.py` trains, and so the GPT's default data: the best
# val bits per character at a fixed training time on a 2-core CPU (docs/tokenizer.md).
DEFAULT_BPE_VOCAB = 1024
SPLITS = ("train", "val")
SPLIT_DTYPE = np.dtype("<u2")  # the bins hold little-endian uint16 ids
SCAN_BYTES = 1 << 23  # a bin is checked in pieces of this size


def split_sha256_key(split: str) -> str:
    """The meta.json field that pins a bin's content (folders prepared before it lack it)."""
    return f"{split}_sha256"


def data_folder_name(tokenizer: str, vocab_size: int) -> str:
    """The folder prepare_data.py writes a tokenizer's splits to: char, gpt2 or bpe<N>."""
    return f"bpe{vocab_size}" if tokenizer == "bpe" else tokenizer


def tokenizer_name(meta: dict) -> str:
    """How messages name a meta's tokenizer: char, gpt2 or bpe<N>."""
    return data_folder_name(meta.get("tokenizer"), meta.get("vocab_size"))


def same_tokenizer(meta_a: dict, meta_b: dict) -> bool:
    """Whether two metas (a dataset's, a checkpoint's) map text to the same ids."""
    fields = {"char": ("chars",), "gpt2": (), "bpe": ("vocab_size", "bpe")}
    kind = meta_a.get("tokenizer")
    return kind == meta_b.get("tokenizer") and all(
        meta_a.get(f) == meta_b.get(f) for f in fields.get(kind, ()))


def load_meta(data_dir) -> dict:
    """A data folder's meta.json, checked; a BPE folder's meta also gets the tokenizer's merges
    (under "bpe"), so that a checkpoint that keeps the meta keeps its tokenizer too."""
    path = Path(data_dir) / "meta.json"
    hint = ""
    prepared = sorted(p.parent.name for p in Path(data_dir).glob("*/meta.json"))
    if prepared:
        hint = f" (did you mean {' or '.join(str(Path(data_dir) / name) for name in prepared)}?)"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"no prepared data in {data_dir}{hint}; run `python prepare_data.py` "
                        "first, or fix --data-dir") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is damaged; run `python prepare_data.py` again") from None
    if not _meta_is_sound(meta):
        raise UserError(f"{path} is not a meta.json written by prepare_data.py; "
                        "run `python prepare_data.py` again or fix --data-dir")
    if meta["tokenizer"] == "bpe":
        meta["bpe"] = load_bpe(Path(data_dir), meta).to_meta()
    return meta


def load_bpe(data_dir: Path, meta: dict) -> BPETokenizer:
    """The BPE the folder's bins were encoded with: its tokenizer.json, which meta.json pins by
    sha256 (a tokenizer file from another preparation would turn the bins into other text)."""
    path = data_dir / BPE_FILE
    again = f"run `python prepare_data.py --bpe-vocab {meta['vocab_size']}` again"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{data_dir} has no {BPE_FILE}, the tokenizer its bins were encoded "
                        f"with; {again}") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); {again}") from None
    if hashlib.sha256(raw).hexdigest() != meta["tokenizer_sha256"]:
        raise UserError(f"{path} is not the tokenizer {data_dir}'s bins were encoded with (its "
                        f"sha256 differs from the one meta.json pins); {again}")
    try:
        tokenizer = BPETokenizer.from_hf_json(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}); {again}") from None
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise UserError(f"{path} has {tokenizer.vocab_size} tokens but meta.json says "
                        f"{meta['vocab_size']}; {again}")
    return tokenizer


def _is_sha256(value) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def _meta_is_sound(meta) -> bool:
    counts = ("vocab_size", "n_train_tokens", "n_val_tokens", "n_train_chars", "n_val_chars")
    if not isinstance(meta, dict) or meta.get("tokenizer") not in ("char", "gpt2", "bpe"):
        return False
    if not all(isinstance(meta.get(k), int) and meta[k] >= 1 for k in counts):
        return False
    pins = [split_sha256_key(split) for split in SPLITS]
    if not all(_is_sha256(meta[pin]) for pin in pins if pin in meta):
        return False
    if meta["tokenizer"] == "gpt2":
        return meta["vocab_size"] == GPT2_VOCAB_SIZE
    if meta["tokenizer"] == "bpe":
        return (BYTE_TOKENS <= meta["vocab_size"] <= MAX_TOKEN_ID + 1
                and isinstance(meta.get("tokenizer_sha256"), str))
    chars = meta.get("chars")
    return (isinstance(chars, list) and len(chars) == meta["vocab_size"]
            and all(isinstance(c, str) and len(c) == 1 for c in chars))


def load_split(data_dir, split: str, meta: dict) -> "TokenFile":
    """A split's bin, opened and checked against meta.json: its size, its sha256 (when meta.json
    pins one) and its largest id. The run then reads it through the file kept open here."""
    path = Path(data_dir) / f"{split}.bin"
    again = "run `python prepare_data.py` again"
    file = _open_bin(path)
    try:
        expected, size = meta[f"n_{split}_tokens"], os.fstat(file.fileno()).st_size
        if size % 2:
            raise UserError(f"{path} is {size} bytes, not a whole number of 2-byte tokens "
                            f"(damaged or not written by prepare_data.py); {again}")
        if size != 2 * expected:  # load_meta already checked expected >= 1
            raise UserError(f"{path} holds {size // 2} tokens but meta.json says "
                            f"{expected}; {again}")
        tokens = TokenFile(path, file, expected)
        digest, largest = tokens.scan()
        pinned = meta.get(split_sha256_key(split))
        if pinned is not None and digest != pinned:
            raise UserError(f"{path} is not the {split} split its meta.json describes (same "
                            "size, other content: a bin from another preparation or another "
                            f"folder); {again}")
        if largest >= meta["vocab_size"]:
            raise UserError(f"{path} holds token ids beyond meta.json's vocabulary of "
                            f"{meta['vocab_size']}; {again}")
    except BaseException:
        file.close()
        raise
    return tokens


def _open_bin(path: Path):
    """The bin opened for reading; a missing file, a folder, a FIFO or a device is refused
    (opened without waiting, as a FIFO's open would wait for a writer)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{path} is missing; run `python prepare_data.py` first") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); run `python prepare_data.py` "
                        "again") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a regular file; run `python prepare_data.py` again")
    return os.fdopen(fd, "rb", buffering=0)


def _read_at(file, n_bytes: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(file.fileno(), n_bytes, offset)
    file.seek(offset)  # Windows: no pread, and one thread reads
    return file.read(n_bytes)


class TokenFile:
    """A split's tokens, read on demand from a file kept open, by offset. Not memmapped: a mapped
    file that shrinks under a process kills it with a bus error. Every read checks that the file
    still has the size and modification time it had when opened, so a bin truncated, grown or
    rewritten in place during a run stops it with one sentence. A bin replaced by rename (as
    prepare_data.py writes) goes unnoticed: the run keeps reading the file it opened and checked."""

    def __init__(self, path: Path, file, n_tokens: int):
        self.path = path
        self.file = file
        self.n_tokens = n_tokens
        self.stamp = self._stamp()

    def __len__(self) -> int:
        return self.n_tokens

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.n_tokens:
            raise IndexError(f"token {index} is outside {self.path}'s {self.n_tokens:,} tokens")
        return int(self.windows(np.array([index]), 1)[0, 0])

    def close(self) -> None:
        self.file.close()

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """A len(starts) x length array: the `length` tokens from each start offset."""
        n_bytes = length * SPLIT_DTYPE.itemsize
        rows = [_read_at(self.file, n_bytes, int(start) * SPLIT_DTYPE.itemsize) for start in starts]
        if self._stamp() != self.stamp or any(len(row) != n_bytes for row in rows):
            raise self._changed()
        return np.frombuffer(b"".join(rows), dtype=SPLIT_DTYPE).reshape(len(starts), length)

    def scan(self) -> tuple:
        """The sha256 of the whole file and its largest id, read in pieces."""
        digest, largest, offset = hashlib.sha256(), 0, 0
        while offset < self.n_tokens * SPLIT_DTYPE.itemsize:
            piece = _read_at(self.file, SCAN_BYTES, offset)
            if not piece or len(piece) % SPLIT_DTYPE.itemsize:
                raise self._changed(running=False)
            digest.update(piece)
            largest = max(largest, int(np.frombuffer(piece, dtype=SPLIT_DTYPE).max()))
            offset += len(piece)
        if self._stamp() != self.stamp:
            raise self._changed(running=False)
        return digest.hexdigest(), largest

    def _stamp(self) -> tuple:
        info = os.fstat(self.file.fileno())
        return info.st_size, info.st_mtime_ns

    def _changed(self, running: bool = True) -> UserError:
        size, was = self._stamp()[0], self.stamp[0]
        if size < was:
            how = f"it is now {size:,} bytes, cut from {was:,}"
        elif size > was:
            how = f"it grew from {was:,} to {size:,} bytes"
        else:
            how = "it was rewritten in place"
        if not running:  # checked at the start: there is nothing to resume yet
            return UserError(f"{self.path} changed while this process was checking it ({how}); "
                             "wait for whatever writes it to finish, or run `python "
                             "prepare_data.py` again")
        return UserError(f"{self.path} changed while this process was reading it ({how}); "
                         "stopped without saving (the last checkpoint saved is kept): run "
                         "`python prepare_data.py` again, then continue with --resume")


class BatchSampler:
    """Random (input, target) windows drawn by a seeded generator whose state can be saved.

    Under torchrun every rank holds an identically seeded generator and draws the start
    offsets of all micro-batches of a step, keeping only its own share. The data order is
    then the same for any number of processes, and resuming with another count stays exact.
    """

    def __init__(self, tokens: TokenFile, block_size: int, batch_size: int, seed: int):
        if len(tokens) < block_size + 1:
            raise UserError(f"the training split has {len(tokens)} tokens, fewer than "
                            f"--block-size {block_size} + 1; use a smaller --block-size or more text")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def _draw_starts(self) -> np.ndarray:
        return torch.randint(len(self.tokens) - self.block_size, (self.batch_size,),
                             generator=self.generator).numpy()

    def _batch(self, starts: np.ndarray, device) -> tuple:
        batch = to_device(self.tokens.windows(starts, self.block_size + 1), device)
        return batch[:, :-1], batch[:, 1:]

    def next_batch(self, device) -> tuple:
        return self._batch(self._draw_starts(), device)

    def step_batches(self, n_micro: int, rank: int, world_size: int, device) -> list:
        """This rank's share of the n_micro micro-batches of one optimizer step."""
        per_rank = n_micro // world_size
        starts = [self._draw_starts() for _ in range(n_micro)]
        return [self._batch(s, device) for s in starts[rank * per_rank:(rank + 1) * per_rank]]

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def eval_windows(tokens: TokenFile, block_size: int) -> list:
    """Start offsets and lengths of consecutive non-overlapping windows covering every target."""
    n_targets = len(tokens) - 1
    return [(start, min(block_size, n_targets - start)) for start in range(0, n_targets, block_size)]


def window_batches(tokens: TokenFile, windows: list, batch_size: int, device: torch.device):
    """Yield (x, y) batches of equal-length windows, in order."""
    by_length = {}
    for start, length in windows:
        by_length.setdefault(length, []).append(start)
    for length, starts in by_length.items():
        for i in range(0, len(starts), batch_size):
            batch = to_device(tokens.windows(starts[i:i + batch_size], length + 1), device)
            yield batch[:, :-1], batch[:, 1:]
