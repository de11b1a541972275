"""Prepare the train/val splits for the three tokenizers.

    python prepare_data.py                   # Tiny Shakespeare (downloaded once, checksum-verified)
    python prepare_data.py --input my.txt    # any UTF-8 text of your own, of any size
    python prepare_data.py --bpe-vocab 4096  # a BPE of another size

The text is split 90/10 by characters first, then each split is encoded with three tokenizers,
so every model is scored on the same validation text: characters, GPT-2's BPE, and a byte-level
BPE of --bpe-vocab tokens trained here on the train split alone (the validation text never
shapes its merges). Writes <out-dir>/char/, <out-dir>/gpt2/ and <out-dir>/bpe<N>/, each with
train.bin, val.bin (little-endian uint16 ids) and meta.json, which pins both bins by size and
sha256; bpe<N>/ also holds tokenizer.json.

The text is never held whole: it is read three times in pieces (to check it and count its
characters, to train the BPE, to encode it), so memory stays the same for any size of text, and
the bins are written to temporary files renamed into place once all are complete. One
preparation at a time writes an --out-dir (a second is refused, naming the first's process).
"""
import argparse
import codecs
import errno
import hashlib
import http.client
import json
import os
import re
import stat
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from itertools import groupby
from operator import itemgetter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmkit.data import (BPE_FILE, DEFAULT_BPE_VOCAB, SPLIT_DTYPE, SPLITS, data_folder_name,
                        split_sha256_key)
from lmkit.errors import UserError, run_main
from lmkit.files import (FULL_DISK, TEMP_NAME_EXTRA, RunLock, atomic_write_bytes, check_path_fits,
                         current_umask, ensure_writable_dirs, fsync_dir)
from lmkit.process import protect_console
from lmkit.tokenizers import BYTE_TOKENS, MAX_TOKEN_ID, BPETokenizer, CharTokenizer, GPT2Tokenizer

TINY_SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/"
                        "data/tinyshakespeare/input.txt")
TINY_SHAKESPEARE_BYTES = 1_115_394
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPUS_NAME = "input.txt"
READ_BYTES = 1 << 20  # the text is read in pieces of this size
PROGRESS_BYTES = 1 << 24  # texts larger than this get a progress bar for each pass
CHUNK_CHARS = 1 << 20  # encode in pieces of about this size
MAX_CHUNK_CHARS = 4 * CHUNK_CHARS  # a piece that finds no safe newline by now is cut between words
# Chunks end after "\n" between two non-space characters: GPT-2's pre-tokenizer never joins
# across such a newline, so encoding piece by piece gives the same ids as encoding at once.
SAFE_CUT = re.compile(r"\S\n(?=\S)")
# Nor does it join a non-space character to a space before the next word (the space starts the
# word's piece): the cut for text without such newlines.
WORD_CUT = re.compile(r"\S(?= \S)")
LOCK_NAME = ".prepare.lock"  # held in --out-dir while a preparation writes there
TEMP_PREFIX = ".prepare-"  # the temporary files in --out-dir that become the bins


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


# ---------------------------------------------------------------- the source text


def download_corpus(url: str, dest: Path) -> None:
    """Fetch Tiny Shakespeare, check its size and sha256, and cache it atomically at dest."""
    print(f"downloading Tiny Shakespeare from {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read(TINY_SHAKESPEARE_BYTES + 1)  # a longer answer is not the file
            promised = getattr(response, "length", None)  # what an HTTP server has yet to send
            if promised and len(data) <= TINY_SHAKESPEARE_BYTES:  # it hung up early
                raise http.client.IncompleteRead(data, promised)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"could not download Tiny Shakespeare from {url} ({reason}). On a machine without "
            f"network access, copy the file (1,115,394 bytes, from {TINY_SHAKESPEARE_URL}) to "
            f"{dest}, or pass any UTF-8 text with --input FILE, or point --url at a mirror.") from e
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != TINY_SHAKESPEARE_BYTES or digest != TINY_SHAKESPEARE_SHA256:
        shown = f"{len(data):,}" if len(data) <= TINY_SHAKESPEARE_BYTES else "more"
        raise UserError(f"the file from {url} is not Tiny Shakespeare ({shown} bytes, sha256 "
                        f"{digest[:12]}..., expected {TINY_SHAKESPEARE_BYTES:,} bytes, sha256 "
                        f"{TINY_SHAKESPEARE_SHA256[:12]}...); nothing was saved: try again or "
                        "use another --url")
    atomic_write_bytes(dest, data)


def open_text_file(path: Path, what: str):
    """The file opened for reading, if it is a regular file (a symlink to one is fine): a FIFO, a
    device such as /dev/zero or a socket may never end and cannot be read twice, so it is refused
    before anything is read (and the open never waits, as a FIFO's would for a writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{what} {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder; pass a text file") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket
            raise UserError(f"{what} {path} is a socket, not a regular file; save the text to "
                            "a file and pass that") from None
        raise UserError(f"cannot read {what} {path} ({e.strerror}); check its "
                        "permissions") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise UserError(f"{what} {path} is a folder; pass a text file")
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device")
        raise UserError(f"{what} {path} is {kind}, not a regular file; save the text to a file "
                        "and pass that")
    return os.fdopen(fd, "rb", buffering=0)


class TextFile:
    """The text to prepare, read from its open file in pieces, as often as needed. check() reads
    it first: its sha256, its characters; every later pass checks it reads the same bytes."""

    def __init__(self, file, name: str):
        self.file = file
        self.name = name
        self.size = os.fstat(file.fileno()).st_size  # for the progress bars only
        self.sha256 = None
        self.n_chars = 0
        self.chars = []

    def _blocks(self, label: str):
        self.file.seek(0)
        with tqdm(total=self.size, desc=label, unit="B", unit_scale=True, leave=False,
                  disable=self.size < PROGRESS_BYTES) as bar:
            while block := self.file.read(READ_BYTES):
                bar.update(len(block))
                yield block

    def check(self) -> None:
        """Read the whole text once: refuse it if it is empty, binary or not UTF-8, and count its
        characters and the distinct ones."""
        digest, decoder, n_bytes = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")(), 0
        bad_byte = None  # offset of the first byte that is not UTF-8
        present = np.zeros(0x110000, dtype=bool)  # which code points occur
        for block in self._blocks(f"reading {self.name}"):
            if b"\x00" in block:
                raise UserError(f"{self.name} looks like a binary file (it holds NUL bytes); "
                                "give a UTF-8 text file")
            digest.update(block)
            if bad_byte is None:
                pending = len(decoder.getstate()[0])
                try:
                    piece = decoder.decode(block)
                except UnicodeDecodeError as e:
                    bad_byte = n_bytes - pending + e.start
                else:
                    self.n_chars += len(piece)
                    present[np.frombuffer(piece.encode("utf-32-le"), dtype="<u4")] = True
            n_bytes += len(block)
        if not n_bytes:
            raise UserError(f"{self.name} is empty; give a text file with some content")
        if bad_byte is None:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                bad_byte = n_bytes - len(decoder.getstate()[0])
        if bad_byte is not None:
            raise UserError(f"{self.name} is not valid UTF-8 text (bad byte at offset {bad_byte}); "
                            "convert it to UTF-8 first")
        self.sha256 = digest.hexdigest()
        self.chars = [chr(c) for c in np.flatnonzero(present)]  # sorted, as sorted(set(text))

    def pieces(self, label: str):
        """The text again, in pieces, after check(); refused at the end if it changed since."""
        digest, decoder = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")()
        for block in self._blocks(label):
            digest.update(block)
            try:
                yield decoder.decode(block)
            except UnicodeDecodeError:
                break  # changed: the digest says so below
        if digest.hexdigest() != self.sha256:
            raise UserError(f"{self.name} changed while it was being prepared; nothing was "
                            "written: run again once the file is complete")


# ---------------------------------------------------------------- splits and chunks


def n_train_chars(n_chars: int, val_fraction: float) -> int:
    return int(n_chars * (1 - val_fraction))


def split_text(text: str, val_fraction: float) -> tuple:
    n_train = n_train_chars(len(text), val_fraction)
    return text[:n_train], text[n_train:]


def split_pieces(pieces, n_train: int):
    """Tag each piece of a text "train" or "val" (the first n_train characters are train),
    cutting the piece that holds the boundary in two."""
    seen = 0
    for piece in pieces:
        cut = min(max(n_train - seen, 0), len(piece))
        if cut:
            yield "train", piece[:cut]
        if cut < len(piece):
            yield "val", piece[cut:]
        seen += len(piece)


def text_chunks(pieces, length: int, name: str = "the text"):
    """The text that `pieces` make up (`length` characters in all), cut again into chunks of about
    CHUNK_CHARS that end at a SAFE_CUT newline: each chunk holds the first such newline past
    CHUNK_CHARS, the last chunk the rest. A text with no safe newline for MAX_CHUNK_CHARS is cut
    before a word's space (WORD_CUT) instead, and one with neither is refused."""
    buffer, done, search_from = "", 0, CHUNK_CHARS
    for piece in pieces:
        buffer += piece
        while length - done > CHUNK_CHARS and len(buffer) > CHUNK_CHARS:
            cut = SAFE_CUT.search(buffer, search_from)
            if cut is not None:
                end = cut.start() + 2
            elif len(buffer) > MAX_CHUNK_CHARS:
                cut = WORD_CUT.search(buffer, CHUNK_CHARS)
                if cut is None:
                    raise UserError(f"{name} has over {MAX_CHUNK_CHARS:,} characters in a row "
                                    "with no line break and no space between words, too many to "
                                    "encode in pieces; break it into lines")
                end = cut.start() + 1
            else:  # a safe newline may still come: no match ends in the last two characters
                search_from = max(CHUNK_CHARS, len(buffer) - 2)
                break
            yield buffer[:end]
            buffer, done, search_from = buffer[end:], done + end, CHUNK_CHARS
    yield buffer


def split_chunks(text: TextFile, n_train: int, label: str):
    """("train" or "val", chunk) pairs: the text_chunks of each split, from one pass over text."""
    lengths = {"train": n_train, "val": text.n_chars - n_train}
    for split, tagged in groupby(split_pieces(text.pieces(label), n_train), key=itemgetter(0)):
        for chunk in text_chunks((piece for _, piece in tagged), lengths[split], text.name):
            yield split, chunk


# ---------------------------------------------------------------- tokenizers


def check_bpe_vocab(vocab_size: int) -> None:
    if not BYTE_TOKENS <= vocab_size <= MAX_TOKEN_ID + 1:
        raise UserError(f"--bpe-vocab must be between {BYTE_TOKENS} (a byte-level BPE has one token "
                        f"per byte before any merge) and {MAX_TOKEN_ID + 1} (the splits store "
                        f"uint16 ids), got {vocab_size}", exit_code=2)


def bpe_vocab_wanted(args) -> int:
    """--bpe-vocab, or the default size when it is not given."""
    return args.bpe_vocab or DEFAULT_BPE_VOCAB


def train_bpe(text: TextFile, n_train: int, args) -> BPETokenizer:
    """A byte-level BPE learned from the train split: of exactly --bpe-vocab tokens when given
    (refused if the text cannot fill it), else of the default size or as many as the text fills."""
    vocab_size = bpe_vocab_wanted(args)
    train_chunks = (chunk for split, chunk in split_chunks(text, n_train, "training the BPE")
                    if split == "train")
    tokenizer = BPETokenizer.train(train_chunks, vocab_size)
    filled = tokenizer.vocab_size
    if filled < vocab_size and args.bpe_vocab:
        raise UserError(f"the train split of {text.name} fills a BPE of only {filled} tokens (no "
                        f"pair of tokens is left to merge); use --bpe-vocab {filled} or less, or a "
                        "longer text", exit_code=2)
    return tokenizer


# ---------------------------------------------------------------- writing


class StagedFiles:
    """Files written to temporary files in one folder and renamed into place together by
    commit(), once all are complete. On any failure (a full disk, bad input found late, Ctrl-C)
    every temporary file goes and the files already in place stay as they were."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.staged = []  # (temporary path, open file, destination)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for tmp, file, _ in self.staged:
            try:
                file.close()
            except OSError:  # what a full disk kept in the file's buffer: going anyway
                pass
            tmp.unlink(missing_ok=True)
        self.staged = []

    def open(self, dest: Path):
        """A new temporary file that commit() renames to dest."""
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=TEMP_PREFIX, suffix=".tmp")
        except OSError as e:
            raise self.failure(e, dest) from e
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual file mode
        file = os.fdopen(fd, "wb")
        self.staged.append((Path(tmp), file, dest))
        return file

    def write(self, file, data: bytes, dest: Path) -> None:
        """Append data to the open temporary file of dest."""
        try:
            file.write(data)
        except OSError as e:
            raise self.failure(e, dest) from e

    def write_file(self, dest: Path, data: bytes) -> None:
        self.write(self.open(dest), data, dest)

    def commit(self) -> None:
        """Flush every file to the disk, then rename each into place, creating its folder."""
        for _, file, dest in self.staged:
            try:
                file.flush()
                os.fsync(file.fileno())
                file.close()
                dest.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise self.failure(e, dest) from e
        for _, _, dest in self.staged:  # a folder in the way: refused before any rename
            if dest.is_dir():
                raise self.failure(OSError(errno.EISDIR, "it is a folder"), dest)
        for tmp, _, dest in self.staged:
            try:
                os.replace(tmp, dest)
            except OSError as e:
                raise self.failure(e, dest) from e
        for folder in {dest.parent for _, _, dest in self.staged}:
            fsync_dir(folder)
        self.staged = []

    def failure(self, e: OSError, dest: Path) -> UserError:
        kept = "the data already there is intact and nothing new was kept"
        if e.errno in FULL_DISK:  # the same causes and fixes as every other write's
            reason, fix = FULL_DISK[e.errno]
            return UserError(f"{reason} while writing {dest}; {kept}: "
                             f"{fix.format(folder=dest.parent)}, and run again")
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.EEXIST, errno.ENOTDIR,
                       errno.EISDIR):
            return UserError(f"cannot write {dest} ({e.strerror}); choose a writable --out-dir "
                             "or fix its permissions")
        return UserError(f"cannot write {dest} ({e.strerror or e}); {kept}: fix the cause and run "
                         "again")


class BinWriter:
    """A split's ids, appended to a staged file and counted and hashed on the way."""

    def __init__(self, staged: StagedFiles, dest: Path):
        self.staged = staged
        self.dest = dest
        self.file = staged.open(dest)
        self.digest = hashlib.sha256()
        self.n_tokens = 0

    def write(self, ids) -> None:
        data = np.asarray(ids, dtype=SPLIT_DTYPE).tobytes()
        self.staged.write(self.file, data, self.dest)
        self.digest.update(data)
        self.n_tokens += len(data) // SPLIT_DTYPE.itemsize


# ---------------------------------------------------------------- the preparation


def check_folders(args) -> None:
    """Refuse a file where a split's folder goes, before any work."""
    for folder in (args.out_dir / "char", args.out_dir / "gpt2",
                   args.out_dir / data_folder_name("bpe", bpe_vocab_wanted(args))):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} is a file, but the splits go in a folder of that name; "
                            "move it away or choose another --out-dir")


def open_corpus(args):
    """Tiny Shakespeare from its cache in --out-dir, downloaded first if it is not there."""
    cached = args.out_dir / CORPUS_NAME
    if not cached.is_file():
        download_corpus(args.url, cached)
    return open_text_file(cached, "cached corpus")


def claim_out_dir(out_dir: Path, stack: ExitStack) -> None:
    """Become the only preparation writing out_dir until the stack closes, and remove the
    temporary files a killed one left there."""
    lock = RunLock(out_dir, LOCK_NAME)
    lock.acquire(f"data folder {out_dir}", "choose another --out-dir")
    stack.callback(lock.release, remove=True)
    # a killed preparation's staged splits, and a killed download's partial corpus
    for pattern in (f"{TEMP_PREFIX}*.tmp", f".{CORPUS_NAME}.*.tmp"):
        for leftover in out_dir.glob(pattern):
            leftover.unlink(missing_ok=True)


def prepare(args) -> dict:
    """Encode and write the three tokenizations; return {folder name: meta}."""
    if not 0 < args.val_fraction <= 0.5:
        raise UserError(f"--val-fraction must be in (0, 0.5], got {args.val_fraction}")
    if args.bpe_vocab is not None:
        check_bpe_vocab(args.bpe_vocab)
    with ExitStack() as stack:
        source = None
        if args.input is not None:  # a bad --input is refused before anything is made
            source = stack.enter_context(open_text_file(args.input, "input file"))
        ensure_writable_dirs(args.out_dir)
        check_folders(args)
        claim_out_dir(args.out_dir, stack)
        if source is None:
            source = stack.enter_context(open_corpus(args))
        text = TextFile(source, args.input.name if args.input is not None else CORPUS_NAME)
        return prepare_text(text, args)


def prepare_text(text: TextFile, args) -> dict:
    """Check the text, train the BPE on its train split, encode both splits with the three
    tokenizers and write them; returns {folder name: meta}."""
    text.check()
    if len(text.chars) > MAX_TOKEN_ID:
        raise UserError(f"{text.name} has {len(text.chars)} distinct characters, more than "
                        "uint16 ids can hold; use a smaller alphabet")
    n_train = n_train_chars(text.n_chars, args.val_fraction)
    source = {"source": text.name, "source_sha256": text.sha256,
              "val_fraction": args.val_fraction,
              "n_train_chars": n_train, "n_val_chars": text.n_chars - n_train}
    char_tok = CharTokenizer(text.chars)
    gpt2_tok = GPT2Tokenizer()
    bpe_tok = train_bpe(text, n_train, args)
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
    metas = {}
    with StagedFiles(args.out_dir) as staged:
        bins = {(folder_name, split): BinWriter(staged, args.out_dir / folder_name / f"{split}.bin")
                for folder_name in tokenizers for split in SPLITS}
        for split, chunk in split_chunks(text, n_train, f"encoding {text.name}"):
            for folder_name, (_, encode_chunk, _, _) in tokenizers.items():
                bins[folder_name, split].write(encode_chunk(chunk))
        for folder_name, (tok_name, _, tok_meta, files) in tokenizers.items():
            train, val = bins[folder_name, "train"], bins[folder_name, "val"]
            if min(train.n_tokens, val.n_tokens) < 2:
                raise UserError(f"{text.name} is too short: with --val-fraction "
                                f"{args.val_fraction} the {folder_name} split has {train.n_tokens} "
                                f"train and {val.n_tokens} val tokens, and each needs at least 2; "
                                "use a longer text")
            meta = {"tokenizer": tok_name, **tok_meta, "n_train_tokens": train.n_tokens,
                    "n_val_tokens": val.n_tokens,
                    split_sha256_key("train"): train.digest.hexdigest(),
                    split_sha256_key("val"): val.digest.hexdigest(), **source}
            meta_file = (json.dumps(meta, indent=1) + "\n").encode("utf-8")
            for name, data in {**files, "meta.json": meta_file}.items():
                staged.write_file(args.out_dir / folder_name / name, data)
            metas[folder_name] = meta
        # Only now, with every split known to be good and on disk, does anything replace the
        # old files: bad input or a full disk leaves the folders as they were.
        staged.commit()
    return metas


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
