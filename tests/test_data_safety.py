"""Data that other processes touch: one preparation per folder at a time, bins pinned to their
meta.json by sha256, bins that change under a running job, full disks while preparing, inputs that
are not regular files, and texts prepared in bounded memory."""
import errno
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare_data
from bigram.train import main as bigram_main
from conftest import (REPO_ROOT, make_text, one_error_line, run_script, tiny_flags,
                      wait_until)
from lmkit.data import BatchSampler, eval_windows, load_meta, load_split, window_batches
from lmkit.errors import UserError
from lmkit.files import RunLock
from lmkit.tokenizers import GPT2Tokenizer

FOLDERS = ("char", "gpt2")


def prepare(*args) -> int:
    return prepare_data.main([str(a) for a in args])


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def folder_files(out: Path) -> dict:
    """Every file below out (hidden ones too) and its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def sources(out: Path, folders=FOLDERS) -> set:
    """Every prepared folder in out loads with its bins checked; returns the sha256s of the texts
    the given folders hold (a BPE folder of another size may be left from another text)."""
    found = set()
    for meta_file in out.glob("*/meta.json"):
        meta = load_meta(meta_file.parent)
        for split in ("train", "val"):
            load_split(meta_file.parent, split, meta)
        if meta_file.parent.name in folders:
            found.add(meta["source_sha256"])
    return found


def start(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def two_texts(tmp_path_factory) -> tuple:
    """Two different texts of the same length and alphabet: their char bins have equal sizes."""
    folder = tmp_path_factory.mktemp("texts")
    first = make_text(400, seed=1)
    first += "\n" * (len(first) % 2)  # even: --val-fraction 0.5 halves it exactly
    second = "".join(sorted(first[:200])) + first[200:]  # same characters, same count
    return write_text(folder / "first.txt", first), write_text(folder / "second.txt", second)


# ---------------------------------------------------------------- 4. one preparation at a time


def test_a_preparation_holding_the_folder_refuses_a_second_naming_its_process(tmp_path,
                                                                                small_text_file):
    out = tmp_path / "data"
    holder = RunLock(out, prepare_data.LOCK_NAME)
    holder.acquire("data folder")  # what a running prepare_data.py holds
    try:
        result = run_script("prepare_data.py", "--input", small_text_file, "--out-dir", out)
        line = one_error_line(result.stderr)
        assert result.returncode == 1
        assert f"in use by process {os.getpid()}" in line and "--out-dir" in line
        assert folder_files(out) == {prepare_data.LOCK_NAME: f"process {os.getpid()}".encode()}
    finally:
        holder.release()
    assert prepare("--input", small_text_file, "--out-dir", out) == 0
    assert not (out / prepare_data.LOCK_NAME).exists()  # removed once the preparation is done


@pytest.mark.slow
def test_two_real_preparations_of_one_folder(tmp_path):
    """A second prepare_data.py on a folder that a first is writing is refused, naming the
    first's process; started together, one of them wins and the folder holds one whole text."""
    texts = [write_text(tmp_path / f"text{i}.txt", make_text(40_000, seed=i)) for i in (1, 2)]
    sha256 = [hashlib.sha256(text.read_bytes()).hexdigest() for text in texts]
    out = tmp_path / "data"
    lock = out / prepare_data.LOCK_NAME
    first = start(REPO_ROOT / "prepare_data.py", "--input", texts[0], "--out-dir", out)
    try:
        wait_until(lambda: lock.is_file() and lock.read_text() == f"process {first.pid}", first)
        with pytest.raises(UserError, match=f"data folder {out} is in use by process {first.pid}"):
            prepare("--input", texts[1], "--out-dir", out)
        assert first.wait(timeout=300) == 0, first.communicate()
    finally:
        first.kill()
    assert sources(out) == {sha256[0]}

    racers = [start(REPO_ROOT / "prepare_data.py", "--input", text, "--out-dir", out)
              for text in texts]
    results = []
    for proc in racers:
        _, err = proc.communicate(timeout=300)
        results.append((proc.returncode, err))
    for code, err in results:
        assert code == 0 or (code == 1 and "in use by process" in one_error_line(err)), err
    winners = {digest for digest, (code, _) in zip(sha256, results) if code == 0}
    assert winners and sources(out) <= winners and len(sources(out)) == 1
    assert not list(out.glob(".*"))  # no lock, no temporary file


# ---------------------------------------------------------------- 4. bins pinned by sha256


def test_meta_json_pins_each_bin_by_size_and_sha256(prepared):
    for folder in FOLDERS:
        meta = json.loads((prepared / folder / "meta.json").read_text(encoding="utf-8"))
        for split in ("train", "val"):
            data = (prepared / folder / f"{split}.bin").read_bytes()
            assert len(data) == 2 * meta[f"n_{split}_tokens"]
            assert meta[f"{split}_sha256"] == hashlib.sha256(data).hexdigest()


def swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swapping")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)


def test_bins_that_are_not_their_meta_jsons_are_refused(tmp_path, two_texts):
    """Bins swapped between two folders (same size, other content), a train.bin swapped with its
    own val.bin, a bin left from an earlier preparation, a bin with two bytes swapped: each is
    refused in one sentence."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert prepare("--input", two_texts[0], "--out-dir", first, "--val-fraction", "0.5") == 0
    assert prepare("--input", two_texts[1], "--out-dir", second, "--val-fraction", "0.5") == 0
    earlier = (first / "char" / "train.bin").read_bytes()
    cases = []
    swap(first / "char" / "train.bin", second / "char" / "train.bin")
    cases += [(first / "char", "train"), (second / "char", "train")]
    swap(second / "char" / "val.bin", second / "char" / "train.bin")
    cases += [(second / "char", "val")]
    assert prepare("--input", two_texts[1], "--out-dir", first, "--val-fraction", "0.5") == 0
    assert (first / "char" / "train.bin").read_bytes() != earlier
    (first / "char" / "train.bin").write_bytes(earlier)
    cases += [(first / "char", "train")]
    val = (first / "gpt2" / "val.bin").read_bytes()
    (first / "gpt2" / "val.bin").write_bytes(val[:10] + val[11:12] + val[10:11] + val[12:])
    cases += [(first / "gpt2", "val")]
    for folder, split in cases:
        with pytest.raises(UserError, match=f"{split}.bin is not the {split} split its meta.json "
                                            "describes .*prepare_data.py` again") as refusal:
            load_split(folder, split, load_meta(folder))
        assert "\n" not in str(refusal.value)


def test_train_py_refuses_a_bin_from_another_folder(tmp_path, two_texts):
    first, second = tmp_path / "first", tmp_path / "second"
    for text, out in zip(two_texts, (first, second)):
        assert prepare("--input", text, "--out-dir", out) == 0
    shutil.copyfile(second / "char" / "train.bin", first / "char" / "train.bin")
    result = run_script("bigram/train.py", *tiny_flags(first / "char", tmp_path / "runs"))
    assert result.returncode == 1
    assert "is not the train split its meta.json describes" in one_error_line(result.stderr)
    assert not (tmp_path / "runs" / "checkpoints" / "bigram" / "last.pt").exists()


def test_a_meta_json_written_before_the_checksums_still_loads(tmp_path, small_text_file):
    out = tmp_path / "data"
    assert prepare("--input", small_text_file, "--out-dir", out) == 0
    meta_file = out / "char" / "meta.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    del meta["train_sha256"], meta["val_sha256"]
    meta_file.write_text(json.dumps(meta), encoding="utf-8")
    assert len(load_split(out / "char", "train", load_meta(out / "char"))) == meta["n_train_tokens"]
    for bad in (123, "abc", "g" * 64, None):
        meta_file.write_text(json.dumps({**meta, "train_sha256": bad}), encoding="utf-8")
        with pytest.raises(UserError, match="not a meta.json written by prepare_data.py"):
            load_meta(out / "char")


# ---------------------------------------------------------------- 5. bins that change mid-run


def fresh_copy(prepared, tmp_path, folder="char") -> Path:
    copy = tmp_path / folder
    shutil.copytree(prepared / folder, copy)
    return copy


def change(path: Path, how: str) -> None:
    data = path.read_bytes()
    time.sleep(0.02)  # past the file system's timestamp granularity
    if how == "truncated":
        os.truncate(path, len(data) // 2)
    elif how == "emptied":
        os.truncate(path, 0)
    elif how == "cut by one byte":
        os.truncate(path, len(data) - 1)
    elif how == "grown":
        with open(path, "ab") as f:
            f.write(b"\x01\x00" * 100)
    elif how == "rewritten in place":
        with open(path, "r+b") as f:
            f.write(bytes(reversed(data[:64])))
    else:
        raise ValueError(how)


CHANGES = ["truncated", "emptied", "cut by one byte", "grown", "rewritten in place"]
SAYS = {"truncated": "cut from", "emptied": "now 0 bytes", "cut by one byte": "cut from",
        "grown": "grew from", "rewritten in place": "rewritten in place"}


@pytest.mark.parametrize("how", CHANGES)
def test_a_bin_changed_under_the_sampler_is_one_sentence(how, prepared, tmp_path):
    data = fresh_copy(prepared, tmp_path)
    meta = load_meta(data)
    tokens = load_split(data, "train", meta)
    sampler = BatchSampler(tokens, block_size=16, batch_size=4, seed=0)
    sampler.next_batch(torch.device("cpu"))
    change(data / "train.bin", how)
    with pytest.raises(UserError, match=f"train.bin changed while this process was reading it "
                                        f"\\(it .*{SAYS[how]}.*\\); stopped without saving") as e:
        sampler.next_batch(torch.device("cpu"))
    assert "\n" not in str(e.value) and "--resume" in str(e.value)


@pytest.mark.parametrize("how", ["truncated", "rewritten in place"])
def test_a_val_bin_changed_under_the_evaluation_is_one_sentence(how, prepared, tmp_path):
    data = fresh_copy(prepared, tmp_path)
    tokens = load_split(data, "val", load_meta(data))
    windows = eval_windows(tokens, 16)
    change(data / "val.bin", how)
    with pytest.raises(UserError, match="val.bin changed while this process was reading it"):
        list(window_batches(tokens, windows, 4, torch.device("cpu")))


def test_a_bin_replaced_by_rename_keeps_the_file_the_run_opened(prepared, tmp_path):
    """prepare_data.py replaces bins by rename: a running job goes on reading the bin it opened
    and checked, with the same batches."""
    data = fresh_copy(prepared, tmp_path)
    meta = load_meta(data)
    sampler = BatchSampler(load_split(data, "train", meta), 16, 4, seed=0)
    twin = BatchSampler(load_split(data, "train", meta), 16, 4, seed=0)
    replacement = tmp_path / "other.bin"
    replacement.write_bytes(b"\x00\x00" * 40)
    os.replace(replacement, data / "train.bin")
    for _ in range(3):
        x, y = sampler.next_batch(torch.device("cpu"))
        x2, y2 = twin.next_batch(torch.device("cpu"))
        assert torch.equal(x, x2) and torch.equal(y, y2) and x.abs().sum() > 0


def test_batches_are_the_windows_of_the_bin(prepared):
    """The sampler reads the windows memmap indexing gave: same seed, same batches."""
    data = prepared / "char"
    meta = load_meta(data)
    sampler = BatchSampler(load_split(data, "train", meta), block_size=8, batch_size=5, seed=3)
    mapped = np.memmap(data / "train.bin", dtype="<u2", mode="r")
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = sampler.next_batch(torch.device("cpu"))
        starts = torch.randint(len(mapped) - 8, (5,), generator=generator).numpy()
        expected = torch.from_numpy(mapped[starts[:, None] + np.arange(9)].astype(np.int64))
        assert torch.equal(x, expected[:, :-1]) and torch.equal(y, expected[:, 1:])
    val = load_split(data, "val", meta)
    mapped_val = np.memmap(data / "val.bin", dtype="<u2", mode="r")
    batches = list(window_batches(val, eval_windows(val, 8), 4, torch.device("cpu")))
    targets = torch.cat([y.flatten() for _, y in batches])
    assert sorted(targets.tolist()) == sorted(mapped_val[1:].tolist())
    assert val[0] == int(mapped_val[0])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "rewritten in place"])
def test_a_bin_changed_under_a_training_run_stops_it_with_one_sentence(how, prepared, tmp_path):
    """A real run: the bin changes after the first checkpoint; the run stops with one sentence
    (no bus error), and its last checkpoint is intact and resumable."""
    data = fresh_copy(prepared, tmp_path)
    flags = tiny_flags(data, tmp_path, max_iters=100_000, eval_interval=5, eval_iters=1,
                       sample_tokens=0)
    last = tmp_path / "checkpoints" / "bigram" / "last.pt"
    proc = start(REPO_ROOT / "bigram" / "train.py", *flags)
    try:
        wait_until(last.is_file, proc)
        change(data / "train.bin", how)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, (proc.returncode, err)  # not -SIGBUS
    assert "train.bin changed while this process was reading it" in one_error_line(err)
    state = torch.load(last, weights_only=True)
    assert state["step"] >= 5 and state["step"] % 5 == 0
    shutil.copyfile(prepared / "char" / "train.bin", data / "train.bin")  # prepared again
    resumed = tiny_flags(data, tmp_path, max_iters=state["step"] + 2, eval_interval=5,
                         eval_iters=1, sample_tokens=0, resume=True)
    assert bigram_main(resumed) == 0


# ---------------------------------------------------------------- 3. a full disk while preparing


def assert_kept(out: Path, before: dict) -> None:
    assert folder_files(out) == before, "the earlier preparation changed"
    sources(out)


@pytest.fixture
def prepared_before(tmp_path, small_text_file):
    """An out-dir already holding a good preparation, and its files."""
    out = tmp_path / "data"
    assert prepare("--input", small_text_file, "--out-dir", out) == 0
    return out, folder_files(out)


def test_a_file_size_limit_while_preparing_keeps_the_old_data(prepared_before, tmp_path):
    """A real write error (EFBIG from RLIMIT_FSIZE, what a quota does) while the bins are
    written: one sentence, the old data intact, no temporary file left."""
    out, before = prepared_before
    big = write_text(tmp_path / "big.txt", make_text(20_000, seed=4))

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    result = subprocess.run([sys.executable, str(REPO_ROOT / "prepare_data.py"), "--input",
                             str(big), "--out-dir", str(out)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300, preexec_fn=limit_file_size)
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "the file grew past the largest size allowed while writing" in line
    assert "intact" in line and "ulimit -f" in line
    assert_kept(out, before)


@pytest.mark.parametrize("failing_write", [1, 4, 7, 9, 10])
def test_a_full_disk_at_any_write_keeps_the_old_data(failing_write, prepared_before, tmp_path,
                                                     monkeypatch):
    """ENOSPC at the first bin write, midway, at tokenizer.json or at a meta.json."""
    out, before = prepared_before
    other = write_text(tmp_path / "other.txt", make_text(1500, seed=8))
    original, calls = prepare_data.StagedFiles.write, []

    def write(self, file, data, dest):
        calls.append(dest)
        if len(calls) == failing_write:
            raise self.failure(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), dest)
        return original(self, file, data, dest)

    monkeypatch.setattr(prepare_data.StagedFiles, "write", write)
    with pytest.raises(UserError, match="no space left on the device while writing"):
        prepare("--input", other, "--out-dir", out)
    assert_kept(out, before)


@pytest.fixture
def tiny_file_system(tmp_path):
    """A real 1 MiB tmpfs (needs root and mount rights; skipped otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_real_full_disk_while_preparing_keeps_the_old_data(tiny_file_system, tmp_path,
                                                             small_text_file):
    out = tiny_file_system / "data"
    assert prepare("--input", small_text_file, "--out-dir", out) == 0
    before = folder_files(out)
    big = write_text(tmp_path / "big.txt", make_text(20_000, seed=4))
    result = run_script("prepare_data.py", "--input", big, "--out-dir", out)
    assert result.returncode == 1
    assert "no space left on the device while writing" in one_error_line(result.stderr)
    assert_kept(out, before)
    # A disk already full when the preparation starts: the lock still holds, nothing is left.
    with open(tiny_file_system / "filler", "wb", buffering=0) as filler:
        with pytest.raises(OSError, match="No space left"):
            while True:
                filler.write(b"\0" * 4096)
    result = run_script("prepare_data.py", "--input", small_text_file, "--out-dir", out)
    assert result.returncode == 1
    assert "no space left on the device while writing" in one_error_line(result.stderr)
    assert_kept(out, before)


# ---------------------------------------------------------------- 8. inputs that are not files


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "symlink to /dev/zero", "/dev/null"])
def test_an_input_that_is_not_a_regular_file_is_refused_at_once(kind, tmp_path):
    """A FIFO would wait for a writer and /dev/zero never ends: refused before any read."""
    if kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
    elif kind == "symlink to /dev/zero":
        path = tmp_path / "zeros.txt"
        path.symlink_to("/dev/zero")
    else:
        path = Path(kind)
    out = tmp_path / "out"
    result = run_script("prepare_data.py", "--input", path, "--out-dir", out, timeout=60)
    line = one_error_line(result.stderr)
    assert result.returncode == 1 and "not a regular file" in line and str(path) in line
    assert not out.exists()


def test_a_socket_or_folder_input_is_refused(tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(tmp_path / "sock"))
        with pytest.raises(UserError, match="is a socket, not a regular file"):
            prepare("--input", tmp_path / "sock", "--out-dir", tmp_path / "out")
    finally:
        server.close()
    with pytest.raises(UserError, match="is a folder; pass a text file"):
        prepare("--input", tmp_path, "--out-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_symlink_to_a_text_file_is_prepared(tmp_path, small_text_file):
    link = tmp_path / "link.txt"
    link.symlink_to(small_text_file)
    assert prepare("--input", link, "--out-dir", tmp_path / "via_link") == 0
    assert prepare("--input", small_text_file, "--out-dir", tmp_path / "direct") == 0
    bins = {name: data for name, data in folder_files(tmp_path / "direct").items()
            if name.endswith(".bin")}
    assert len(bins) == 6 and bins.items() <= folder_files(tmp_path / "via_link").items()


# ---------------------------------------------------------------- 8. large texts, streamed


def whole_text_chunks(text: str, chunk_chars: int) -> list:
    """How the text was cut when prepare_data.py held it whole."""
    chunks, start = [], 0
    while len(text) - start > chunk_chars:
        cut = prepare_data.SAFE_CUT.search(text, start + chunk_chars)
        if cut is None:
            break
        chunks.append(text[start:cut.start() + 2])
        start = cut.start() + 2
    return chunks + [text[start:]]


def in_pieces(text: str, seed: int) -> list:
    """The text cut at random places, as reading it in pieces does."""
    rng = np.random.default_rng(seed)
    cuts = sorted(rng.integers(0, len(text), size=len(text) // 50))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_streamed_chunks_are_where_whole_text_chunks_were(monkeypatch):
    monkeypatch.setattr(prepare_data, "CHUNK_CHARS", 60)
    text = make_text(300, seed=2) + "end without a newline"
    n_train = prepare_data.n_train_chars(len(text), 0.1)
    for seed in range(3):
        tagged = list(prepare_data.split_pieces(in_pieces(text, seed), n_train))
        for split, part in (("train", text[:n_train]), ("val", text[n_train:])):
            pieces = [piece for tag, piece in tagged if tag == split]
            streamed = list(prepare_data.text_chunks(pieces, len(part)))
            assert streamed == whole_text_chunks(part, 60)


def test_long_lines_are_cut_between_words_and_encode_the_same(monkeypatch):
    """A text without safe newlines (one long line, or Windows line ends) is cut before a word's
    space once a chunk reaches MAX_CHUNK_CHARS; the ids are those of encoding it whole."""
    monkeypatch.setattr(prepare_data, "CHUNK_CHARS", 64)
    monkeypatch.setattr(prepare_data, "MAX_CHUNK_CHARS", 256)
    gpt2 = GPT2Tokenizer()
    one_line = make_text(200, seed=3).replace("\n", " ")
    windows_lines = make_text(200, seed=4).replace("\n", "\r\n")
    for text in (one_line, windows_lines, "  'tis   42 ’twas — x.\t" * 200):
        chunks = list(prepare_data.text_chunks(in_pieces(text, 0), len(text)))
        assert len(chunks) > 10 and "".join(chunks) == text
        assert all(len(chunk) <= 256 + 64 for chunk in chunks)
        assert [i for chunk in chunks for i in gpt2.encode(chunk)] == gpt2.encode(text)


def test_a_stretch_with_no_line_break_or_space_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(prepare_data, "CHUNK_CHARS", 64)
    monkeypatch.setattr(prepare_data, "MAX_CHUNK_CHARS", 256)
    src = write_text(tmp_path / "one_word.txt", "word " * 100 + "x" * 1000 + " end\n" * 200)
    with pytest.raises(UserError, match="one_word.txt has over 256 characters in a row with no "
                                        "line break and no space between words"):
        prepare("--input", src, "--out-dir", tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


UNICODE_TEXT = "".join(f"{line} — Ünïcödé 日本語 🎭 ’tis\n"
                       for line in make_text(400).splitlines())


def test_reading_in_tiny_pieces_gives_the_same_bins(monkeypatch, tmp_path):
    """Pieces of 7 bytes split UTF-8 characters and the train/val boundary: same bins."""
    src = write_text(tmp_path / "unicode.txt", UNICODE_TEXT)
    assert prepare("--input", src, "--out-dir", tmp_path / "whole") == 0
    monkeypatch.setattr(prepare_data, "READ_BYTES", 7)
    monkeypatch.setattr(prepare_data, "CHUNK_CHARS", 100)
    assert prepare("--input", src, "--out-dir", tmp_path / "pieces") == 0
    assert folder_files(tmp_path / "pieces") == folder_files(tmp_path / "whole")


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3(", b"\xe6\x97"])  # the last one: cut short
def test_the_first_byte_that_is_not_utf8_is_named_across_pieces(bad, monkeypatch, tmp_path):
    good = UNICODE_TEXT.encode("utf-8")[:1001]
    good = good[:len(good.decode("utf-8", errors="ignore").encode("utf-8"))]
    src = tmp_path / "bad.txt"
    src.write_bytes(good + bad + (b"" if bad == b"\xe6\x97" else b"more text\n"))
    monkeypatch.setattr(prepare_data, "READ_BYTES", 5)
    offset = f"\\(bad byte at offset {len(good)}\\)"
    with pytest.raises(UserError, match=f"not valid UTF-8 text {offset}"):
        prepare("--input", src, "--out-dir", tmp_path / "out")


def test_a_text_that_changes_while_it_is_prepared_is_refused(monkeypatch, tmp_path):
    src = write_text(tmp_path / "growing.txt", make_text(300))
    check = prepare_data.TextFile.check

    def check_then_append(self):
        check(self)
        with open(src, "a", encoding="utf-8") as f:
            f.write("a line written meanwhile\n")

    monkeypatch.setattr(prepare_data.TextFile, "check", check_then_append)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="growing.txt changed while it was being prepared; nothing "
                                        "was written"):
        prepare("--input", src, "--out-dir", out)
    assert list(out.iterdir()) == []


def write_generated_text(path: Path, n_bytes: int) -> Path:
    block = make_text(25_000, seed=0)  # about a MB
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_bytes // len(block) + 1):
            f.write(f"ACT {i}\n{block}")
    return path


def peak_rss_preparing(src: Path, out: Path) -> tuple:
    """The peak resident memory of prepare_data.py on src, measured in a process of its own,
    and its stderr."""
    code = ("import resource, subprocess, sys; "
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.stderr.write(r.stderr)")
    result = subprocess.run([sys.executable, "-c", code, sys.executable,
                             str(REPO_ROOT / "prepare_data.py"), "--input", str(src),
                             "--out-dir", str(out)], capture_output=True, text=True, timeout=600)
    returncode, kib = map(int, result.stdout.split())
    assert returncode == 0, result.stderr
    return kib * 1024, result.stderr


@pytest.mark.slow
def test_memory_does_not_grow_with_the_text(tmp_path):
    """8 MB and 32 MB of text: the peak memory is the same within a fixed budget (holding the
    text whole cost about ten times its size, 240 MB more for the larger one)."""
    small, small_err = peak_rss_preparing(write_generated_text(tmp_path / "8.txt", 8 << 20),
                                          tmp_path / "out8")
    large, large_err = peak_rss_preparing(write_generated_text(tmp_path / "32.txt", 32 << 20),
                                          tmp_path / "out32")
    assert large - small < 32 << 20, (small, large)
    assert "encoding 32.txt" in large_err and "encoding" not in small_err  # a progress bar
    meta = load_meta(tmp_path / "out32" / "char")
    assert meta["n_train_chars"] + meta["n_val_chars"] > 32 << 20
    assert len(load_split(tmp_path / "out32" / "char", "train", meta)) == meta["n_train_tokens"]
