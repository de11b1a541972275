"""Prepare the train/val splits for the three tokenizers.

    python prepare_data.py                   # Tiny Shakespeare (downloaded once, checksum-verified)
    python prepare_data.py --input my.txt    # any UTF-8 text of your own
    python prepare_data.py --bpe-vocab 4096  # a BPE of another size

The text is split 90/10 by characters first, then each split is encoded with three tokenizers,
so every model is scored on the same validation text: characters, GPT-2's BPE, and a byte-level
BPE of --bpe-vocab tokens trained here on the train split alone (the validation text never
shapes its merges). Writes <out-dir>/char/, <out-dir>/gpt2/ and <out-dir>/bpe<N>/, each with
train.bin, val.bin (little-endian uint16 ids) and meta.json; bpe<N>/ also holds tokenizer.json.
"""
import argparse
import hashlib
import http.client
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmkit.data import BPE_FILE, DEFAULT_BPE_VOCAB, data_folder_name
from lmkit.errors import UserError, run_main
from lmkit.files import (TEMP_NAME_EXTRA, atomic_write_bytes, atomic_write_text, check_path_fits,
                         ensure_writable_dirs, read_user_file)
from lmkit.process import protect_console
from lmkit.tokenizers import BYTE_TOKENS, MAX_TOKEN_ID, BPETokenizer, CharTokenizer, GPT2Tokenizer

TINY_SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/"
                        "data/tinyshakespeare/input.txt")
TINY_SHAKESPEARE_BYTES = 1_115_394
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPUS_NAME = "input.txt"
CHUNK_CHARS = 1 << 20  # encode in pieces of about this size, with a progress bar past one piece
# Chunks end after "\n" between two non-space characters: GPT-2's pre-tokenizer never joins
# across such a newline, so encoding piece by piece gives the same ids as encoding at once.
SAFE_CUT = re.compile(r"\S\n(?=\S)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, help="a UTF-8 text file to use instead of Tiny Shakespeare")
    p.add_argument("--url", default=TINY_SHAKESPEARE_URL,
                   help="where to download Tiny Shakespeare from (a mirror, say); default: %(default)s")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "data",
                   help="folder for the corpus cache and the char/ and gpt2/ splits (default: data/)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the text (by characters, taken from the end) used for validation, "
                        "in (0, 0.5] (default: %(default)s)")
    p.add_argument("--bpe-vocab", type=int, default=None,
                   help="tokens in the byte-level BPE trained on the train split, from "
                        f"{BYTE_TOKENS} (the bytes alone) to {MAX_TOKEN_ID + 1}; written to "
                        f"<out-dir>/bpe<N>/ (default: {DEFAULT_BPE_VOCAB}, or as many as a short "
                        "text fills)")
    return p.parse_args(argv)


def download_corpus(url: str, dest: Path) -> bytes:
    """Fetch Tiny Shakespeare, check its size and sha256, and cache it atomically at dest."""
    print(f"downloading Tiny Shakespeare from {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"could not download Tiny Shakespeare from {url} ({reason}). On a machine without "
            f"network access, copy the file (1,115,394 bytes, from {TINY_SHAKESPEARE_URL}) to "
            f"{dest}, or pass any UTF-8 text with --input FILE, or point --url at a mirror.") from e
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != TINY_SHAKESPEARE_BYTES or digest != TINY_SHAKESPEARE_SHA256:
        raise UserError(f"the file from {url} is not Tiny Shakespeare ({len(data):,} bytes, sha256 "
                        f"{digest[:12]}..., expected {TINY_SHAKESPEARE_BYTES:,} bytes, sha256 "
                        f"{TINY_SHAKESPEARE_SHA256[:12]}...); nothing was saved: try again or "
                        "use another --url")
    atomic_write_bytes(dest, data)
    return data


def read_source(args) -> tuple:
    """Return (raw bytes, display name) of the text to prepare."""
    if args.input is not None:
        return read_user_file(args.input, "input file"), args.input.name
    cached = args.out_dir / CORPUS_NAME
    if cached.is_file():
        return cached.read_bytes(), CORPUS_NAME
    return download_corpus(args.url, cached), CORPUS_NAME


def decode_text(raw: bytes, name: str) -> str:
    if not raw:
        raise UserError(f"{name} is empty; give a text file with some content")
    if b"\x00" in raw:
        raise UserError(f"{name} looks like a binary file (it holds NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not valid UTF-8 text (bad byte at offset {e.start}); "
                        "convert it to UTF-8 first") from None


def text_chunks(text: str):
    """Split text into pieces of about CHUNK_CHARS at newlines GPT-2's BPE never merges across."""
    start = 0
    while len(text) - start > CHUNK_CHARS:
        cut = SAFE_CUT.search(text, start + CHUNK_CHARS)
        if cut is None:
            break
        yield text[start:cut.start() + 2]
        start = cut.start() + 2
    yield text[start:]


def encode(text: str, encode_piece, label: str) -> np.ndarray:
    chunks = list(text_chunks(text))
    parts = [np.asarray(encode_piece(c), dtype=np.uint16)
             for c in tqdm(chunks, desc=label, unit="chunk", disable=len(chunks) < 2, leave=False)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def split_text(text: str, val_fraction: float) -> tuple:
    n_train = int(len(text) * (1 - val_fraction))
    return text[:n_train], text[n_train:]


def check_bpe_vocab(vocab_size: int) -> None:
    if not BYTE_TOKENS <= vocab_size <= MAX_TOKEN_ID + 1:
        raise UserError(f"--bpe-vocab must be between {BYTE_TOKENS} (a byte-level BPE has one token "
                        f"per byte before any merge) and {MAX_TOKEN_ID + 1} (the splits store "
                        f"uint16 ids), got {vocab_size}", exit_code=2)


def bpe_vocab_wanted(args) -> int:
    """--bpe-vocab, or the default size when it is not given."""
    return args.bpe_vocab or DEFAULT_BPE_VOCAB


def train_bpe(train_text: str, args, name: str) -> BPETokenizer:
    """A byte-level BPE learned from the train split: of exactly --bpe-vocab tokens when given
    (refused if the text cannot fill it), else of the default size or as many as the text fills."""
    vocab_size = bpe_vocab_wanted(args)
    tokenizer = BPETokenizer.train(text_chunks(train_text), vocab_size)
    filled = tokenizer.vocab_size
    if filled < vocab_size and args.bpe_vocab:
        raise UserError(f"the train split of {name} fills a BPE of only {filled} tokens (no pair "
                        f"of tokens is left to merge); use --bpe-vocab {filled} or less, or a "
                        "longer text", exit_code=2)
    return tokenizer


def write_split(folder: Path, train_ids: np.ndarray, val_ids: np.ndarray, meta: dict,
                extra_files: dict) -> None:
    for name, data in extra_files.items():
        atomic_write_bytes(folder / name, data)
    atomic_write_bytes(folder / "train.bin", train_ids.astype("<u2").tobytes())
    atomic_write_bytes(folder / "val.bin", val_ids.astype("<u2").tobytes())
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1) + "\n")


def prepare(args) -> dict:
    """Encode and write the three tokenizations; return {folder name: meta}."""
    if not 0 < args.val_fraction <= 0.5:
        raise UserError(f"--val-fraction must be in (0, 0.5], got {args.val_fraction}")
    if args.bpe_vocab is not None:
        check_bpe_vocab(args.bpe_vocab)
    ensure_writable_dirs(args.out_dir)
    for folder in (args.out_dir / "char", args.out_dir / "gpt2",
                   args.out_dir / data_folder_name("bpe", bpe_vocab_wanted(args))):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} is a file, but the splits go in a folder of that name; "
                            "move it away or choose another --out-dir")
    raw, name = read_source(args)
    text = decode_text(raw, name)
    train_text, val_text = split_text(text, args.val_fraction)
    source = {"source": name, "source_sha256": hashlib.sha256(raw).hexdigest(),
              "val_fraction": args.val_fraction,
              "n_train_chars": len(train_text), "n_val_chars": len(val_text)}

    char_tok = CharTokenizer.from_text(text)
    if char_tok.vocab_size > 65535:
        raise UserError(f"{name} has {char_tok.vocab_size} distinct characters, more than "
                        "uint16 ids can hold; use a smaller alphabet")
    gpt2_tok = GPT2Tokenizer()
    bpe_tok = train_bpe(train_text, args, name)
    bpe_name = data_folder_name("bpe", bpe_tok.vocab_size)
    bpe_file = bpe_tok.to_hf_json().encode("utf-8")
    # name -> (the folder's tokenizer name, encode, its meta, files beside the bins)
    tokenizers = {
        "char": ("char", char_tok.encode_array,
                 {"vocab_size": char_tok.vocab_size, "chars": char_tok.chars}, {}),
        "gpt2": ("gpt2", gpt2_tok.encode, {"vocab_size": gpt2_tok.vocab_size}, {}),
        bpe_name: ("bpe", bpe_tok.encode,
                   {"vocab_size": bpe_tok.vocab_size, "tokenizer_file": BPE_FILE,
                    "tokenizer_sha256": hashlib.sha256(bpe_file).hexdigest()},
                   {BPE_FILE: bpe_file}),
    }
    encoded = {}
    for folder_name, (tok_name, encode_piece, tok_meta, files) in tokenizers.items():
        train_ids = encode(train_text, encode_piece, f"{tok_name} train")
        val_ids = encode(val_text, encode_piece, f"{tok_name} val")
        if min(len(train_ids), len(val_ids)) < 2:
            raise UserError(f"{name} is too short: with --val-fraction {args.val_fraction} the "
                            f"{folder_name} split has {len(train_ids)} train and {len(val_ids)} "
                            "val tokens, and each needs at least 2; use a longer text")
        meta = {"tokenizer": tok_name, **tok_meta, "n_train_tokens": len(train_ids),
                "n_val_tokens": len(val_ids), **source}
        encoded[folder_name] = (train_ids, val_ids, meta, files)
    # Write only once every split is known to be good, so bad input leaves nothing behind.
    for folder_name, (train_ids, val_ids, meta, files) in encoded.items():
        write_split(args.out_dir / folder_name, train_ids, val_ids, meta, files)
    return {folder_name: meta for folder_name, (_, _, meta, _) in encoded.items()}


def main(argv=None) -> int:
    protect_console()  # a closed pipe must not stop the preparation; the files hold the result
    args = parse_args(argv)
    if args.input is not None:
        check_path_fits(args.input, "no file has such a name: check --input")
    # the longest name written in it: a BPE's tokenizer file, under its temp name
    check_path_fits(args.out_dir, "choose a shorter --out-dir",
                    room=len(f"bpe{MAX_TOKEN_ID + 1}/{BPE_FILE}") + TEMP_NAME_EXTRA)
    t0 = time.time()
    metas = prepare(args)
    first = next(iter(metas.values()))
    print(f"{first['source']}: {first['n_train_chars']:,} train / {first['n_val_chars']:,} val characters")
    for folder_name, meta in metas.items():
        print(f"  {folder_name:7s} vocab {meta['vocab_size']:>6,}  train {meta['n_train_tokens']:>9,} "
              f"tokens  val {meta['n_val_tokens']:>8,} tokens "
              f"({meta['n_val_chars'] / meta['n_val_tokens']:.2f} characters/token)  "
              f"-> {args.out_dir / folder_name}")
    bpe = next(meta for meta in metas.values() if meta["tokenizer"] == "bpe")
    for other in sorted(args.out_dir.glob("bpe*/meta.json")):
        try:
            stale = json.loads(other.read_text(encoding="utf-8")).get("source_sha256")
        except (OSError, ValueError, AttributeError):
            continue
        if stale != bpe["source_sha256"]:
            print(f"note: {other.parent} holds another text's BPE; prepare that size again "
                  f"(--bpe-vocab) or move it away before training on it")
    if bpe["vocab_size"] < bpe_vocab_wanted(args):
        print(f"note: the train split fills a BPE of only {bpe['vocab_size']:,} tokens, not "
              f"{DEFAULT_BPE_VOCAB:,}; train the GPT on it with --data-dir "
              f"{args.out_dir / data_folder_name('bpe', bpe['vocab_size'])}")
    print(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
