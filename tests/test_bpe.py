"""The GPT on a byte-level BPE trained on the user's own text (prepare_data.py --bpe-vocab):
round trips, refusals, a checkpoint that carries its tokenizer, and the Hugging Face export."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import make_text, one_error_line, read_metrics, run_script, tiny_flags
from lmkit.checkpoint import load_checkpoint
from lmkit.data import load_meta
from lmkit.errors import UserError
from lmkit.tokenizers import BPETokenizer, byte_to_unicode, merges_from_token_bytes

VOCAB = 320  # the small text fills about 380 tokens
AWKWARD = ["héllo wörld, naïve café", "emoji 🙂🎭👩‍👩‍👧 and flags 🇫🇷", "日本語のテキスト、中文，한국어",
           "tabs\tand\r\nCRLF\rlines\n\n\n", "  leading and trailing spaces  ", "I'll've they're 1234567",
           "\x00\x01 control \x7f bytes", "", "a"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text, prepared with a BPE of VOCAB tokens."""
    folder = tmp_path_factory.mktemp("bpe")
    text = make_text(1500, seed=5) + "".join(AWKWARD[:3]) + "\n"
    (folder / "play.txt").write_text(text, encoding="utf-8")
    result = run_script("prepare_data.py", "--input", folder / "play.txt", "--out-dir",
                        folder / "data", "--bpe-vocab", VOCAB)
    assert result.returncode == 0, result.stderr
    return folder, text


@pytest.fixture(scope="module")
def trained_bpe(corpus, tmp_path_factory):
    """A tiny GPT trained on the BPE data, with its data folder then moved away."""
    folder, _ = corpus
    out = tmp_path_factory.mktemp("runs")
    data = folder / "data" / f"bpe{VOCAB}"
    result = run_script("gpt/train.py", *tiny_flags(data, out, block_size=32))
    assert result.returncode == 0, result.stderr
    return out


def trained_tokenizer(text: str, vocab: int = VOCAB) -> BPETokenizer:
    return BPETokenizer.train([text], vocab)


# ---------------------------------------------------------------- the tokenizer


@pytest.mark.parametrize("text", AWKWARD)
def test_any_text_round_trips_exactly(text):
    tokenizer = trained_tokenizer(make_text(300))
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_merges_rebuild_the_same_tokenizer_through_every_form():
    """rustbpe's ranks -> merges -> tiktoken; the checkpoint form and tokenizer.json give back
    the same merges, and GPT-2's byte stand-ins are a bijection."""
    tokenizer = trained_tokenizer(make_text(300))
    assert tokenizer.vocab_size == VOCAB
    assert sorted(byte_to_unicode()) == list(range(256))
    assert len(set(byte_to_unicode().values())) == 256
    assert merges_from_token_bytes(tokenizer.token_bytes) == tokenizer.merges
    assert BPETokenizer.from_meta(tokenizer.to_meta()).merges == tokenizer.merges
    assert BPETokenizer.from_hf_json(tokenizer.to_hf_json()).merges == tokenizer.merges


def test_the_tokenizers_library_encodes_the_same_ids():
    """tokenizer.json read by Hugging Face's tokenizers gives tiktoken's ids, whole-piece tokens
    included (ignore_merges)."""
    tokenizers = pytest.importorskip("tokenizers")
    text = make_text(300)
    ours = trained_tokenizer(text)
    theirs = tokenizers.Tokenizer.from_str(ours.to_hf_json())
    for sample in [text[:2000], *AWKWARD]:
        ids = ours.encode(sample)
        assert theirs.encode(sample).ids == ids
        assert theirs.decode(ids) == sample


def test_real_corpus_bpe_matches_the_tokenizers_library_and_beats_characters(real_corpus):
    tokenizers = pytest.importorskip("tokenizers")
    text = real_corpus.read_text(encoding="utf-8")
    n_train = int(len(text) * 0.9)
    ours = BPETokenizer.train([text[:n_train]], 2048)
    val = text[n_train:]
    ids = ours.encode(val)
    assert ours.decode(ids) == val
    assert tokenizers.Tokenizer.from_str(ours.to_hf_json()).encode(val).ids == ids
    assert len(val) / len(ids) > 2.4  # 2.56 characters per token at 2048


def test_a_merged_token_that_is_not_two_earlier_ones_is_refused():
    with pytest.raises(ValueError):
        merges_from_token_bytes([bytes([b]) for b in range(256)] + [b"abc"])
    with pytest.raises(ValueError):
        BPETokenizer([(300, 1)])


def test_undecodable_command_line_text_is_refused():
    tokenizer = trained_tokenizer(make_text(300))
    with pytest.raises(UserError, match="no UTF-8 form"):
        tokenizer.encode("bad \udcff byte")


# ---------------------------------------------------------------- prepare_data.py


def test_prepare_writes_the_bpe_folder_trained_on_the_train_split_only(corpus):
    folder, text = corpus
    data = folder / "data" / f"bpe{VOCAB}"
    meta = json.loads((data / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["tokenizer_file"]) == ("bpe", VOCAB,
                                                                               "tokenizer.json")
    tokenizer = load_meta(data)  # checks the tokenizer file against the sha256 meta.json pins
    tokenizer = BPETokenizer.from_meta(tokenizer["bpe"])
    n_train = int(len(text) * 0.9)
    assert tokenizer.merges == trained_tokenizer(text[:n_train]).merges  # val never seen
    for split, part in (("train", text[:n_train]), ("val", text[n_train:])):
        ids = np.fromfile(data / f"{split}.bin", dtype="<u2").tolist()
        assert ids == tokenizer.encode(part) and tokenizer.decode(ids) == part


@pytest.mark.slow
def test_val_text_never_shapes_the_merges(tmp_path):
    """A word repeated only in the validation part never becomes a token."""
    text = make_text(400) + "\nquuxwibble " * 200
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    result = run_script("prepare_data.py", "--input", tmp_path / "t.txt", "--out-dir",
                        tmp_path / "d", "--bpe-vocab", 300, "--val-fraction", "0.3")
    assert result.returncode == 0, result.stderr
    assert "quuxwibble" in text[int(len(text) * 0.7):] and "quux" not in text[:int(len(text) * 0.7)]
    tokenizer = BPETokenizer.from_meta(load_meta(tmp_path / "d" / "bpe300")["bpe"])
    assert not any(b"qu" in token for token in tokenizer.token_bytes)


@pytest.mark.parametrize("vocab, says", [
    pytest.param(255, "between 256", marks=pytest.mark.slow), (70000, "uint16"),
    pytest.param(5000, "fills a BPE of only", marks=pytest.mark.slow)])
def test_a_vocabulary_bpe_cannot_have_is_refused_and_nothing_is_written(tmp_path, vocab, says):
    (tmp_path / "t.txt").write_text(make_text(200), encoding="utf-8")
    out = tmp_path / "d"
    result = run_script("prepare_data.py", "--input", tmp_path / "t.txt", "--out-dir", out,
                        "--bpe-vocab", vocab)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert any(s in line for s in says.split("|")), line
    assert not out.exists() or not any(p.name != ".gitkeep" for p in out.rglob("*") if p.is_file())


# ---------------------------------------------------------------- training and sampling


def test_training_reports_bits_per_character_over_the_val_characters(corpus, trained_bpe):
    folder, _ = corpus
    meta = json.loads((folder / "data" / f"bpe{VOCAB}" / "meta.json").read_text())
    row = read_metrics(trained_bpe, "gpt")[-1]
    val_ids = np.fromfile(folder / "data" / f"bpe{VOCAB}" / "val.bin", dtype="<u2")
    tokenizer = BPETokenizer.from_meta(load_checkpoint(trained_bpe / "checkpoints/gpt/last.pt")
                                       ["meta"]["bpe"])
    chars = meta["n_val_chars"] - len(tokenizer.decode([int(val_ids[0])]))
    expected = float(row["val_loss"]) * (meta["n_val_tokens"] - 1) / chars / math.log(2)
    assert float(row["val_bpc"]) == pytest.approx(expected, rel=1e-4)


def test_the_checkpoint_carries_its_tokenizer_so_sampling_needs_no_data(corpus, trained_bpe,
                                                                         tmp_path):
    folder, _ = corpus
    data = folder / "data"
    moved = tmp_path / "elsewhere"
    shutil.move(data, moved)
    try:
        prompt = "ROMEO: 🙂 naïve 日本"
        result = run_script("gpt/sample.py", "--out-dir", trained_bpe, "--prompt", prompt,
                            "--max-new-tokens", 20, "--out", tmp_path / "s.txt")
        assert result.returncode == 0, result.stderr
        assert prompt in (tmp_path / "s.txt").read_text(encoding="utf-8")
        assert prompt in result.stdout
    finally:
        shutil.move(moved, data)


def test_a_prompt_that_is_not_utf8_is_one_sentence(trained_bpe):
    result = run_script("gpt/sample.py", "--out-dir", trained_bpe, "--prompt",
                        os.fsdecode(b"caf\xe9"), "--max-new-tokens", 5)
    assert result.returncode == 1 and "no UTF-8 form" in one_error_line(result.stderr)


@pytest.mark.slow
def test_resuming_on_another_tokenizer_is_refused(corpus, trained_bpe, tmp_path):
    folder, text = corpus
    other = tmp_path / "other"
    (tmp_path / "t.txt").write_text(make_text(1500, seed=9)[::-1], encoding="utf-8")
    for vocab in (VOCAB, 300):
        prepared = run_script("prepare_data.py", "--input", tmp_path / "t.txt", "--out-dir",
                              other, "--bpe-vocab", vocab)
        assert prepared.returncode == 0, prepared.stderr
    for data, says in ((other / f"bpe{VOCAB}", "other merges"), (other / "bpe300", "bpe320 -> bpe300"),
                       (folder / "data" / "gpt2", "bpe320 -> gpt2")):
        result = run_script("gpt/train.py", "--resume", "--out-dir", trained_bpe,
                            "--max-iters", 20, "--data-dir", data, "--new-data")
        assert result.returncode == 1
        assert says in one_error_line(result.stderr)


@pytest.mark.slow
def test_a_data_folder_without_its_tokenizer_or_with_another_is_refused(corpus, tmp_path):
    folder, _ = corpus
    data = tmp_path / "bpe"
    shutil.copytree(folder / "data" / f"bpe{VOCAB}", data)
    (data / "tokenizer.json").unlink()
    result = run_script("gpt/train.py", *tiny_flags(data, tmp_path / "a"))
    assert result.returncode == 1 and "no tokenizer.json" in one_error_line(result.stderr)
    other = trained_tokenizer(make_text(1500, seed=11))
    (data / "tokenizer.json").write_text(other.to_hf_json(), encoding="utf-8")
    result = run_script("gpt/train.py", *tiny_flags(data, tmp_path / "b"))
    assert result.returncode == 1
    assert "is not the tokenizer" in one_error_line(result.stderr)
    assert not (tmp_path / "a" / "checkpoints" / "gpt" / "last.pt").exists()


@pytest.mark.slow
def test_init_from_gpt2_weights_on_bpe_tokens_is_refused(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    folder, _ = corpus
    result = run_script("gpt/train.py", *tiny_flags(folder / "data" / f"bpe{VOCAB}", tmp_path),
                        "--init-from", tmp_path / "gpt2")
    assert result.returncode == 1
    assert "--data-dir data/gpt2" in one_error_line(result.stderr)



def test_init_from_on_bpe_tokens_is_refused_before_any_weight_is_read(corpus, tmp_path):
    """The tokens are checked first: the folder --init-from names holds no weights at all, and
    the sentence is still about the tokens."""
    folder, _ = corpus
    result = run_script("gpt/train.py", *tiny_flags(folder / "data" / f"bpe{VOCAB}", tmp_path),
                        "--init-from", tmp_path / "no-weights-here")
    assert result.returncode == 1
    assert "--data-dir data/gpt2" in one_error_line(result.stderr)
    assert not (tmp_path / "checkpoints").exists()

# ---------------------------------------------------------------- Hugging Face export


@pytest.mark.slow
def test_export_loads_in_transformers_and_continues_greedily_like_sample(trained_bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    result = run_script("gpt/export.py", "--out-dir", trained_bpe, "--out", out)
    assert result.returncode == 0, result.stderr
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    state = load_checkpoint(trained_bpe / "checkpoints/gpt/best.pt")
    ours = BPETokenizer.from_meta(state["meta"]["bpe"])
    for prompt in AWKWARD[:-2] + ["ROMEO:\nThou art"]:
        ids = hf_tokenizer(prompt)["input_ids"]
        assert ids == ours.encode(prompt)
        assert hf_tokenizer.decode(ids) == prompt

    prompt, n_new = "JULIET:\nGood night", 12
    sampled = run_script("gpt/sample.py", "--out-dir", trained_bpe, "--prompt", prompt,
                         "--temperature", 0, "--max-new-tokens", n_new, "--out", tmp_path / "s.txt")
    assert sampled.returncode == 0, sampled.stderr
    ids = torch.tensor([hf_tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=n_new, pad_token_id=0)
    continuation = hf_tokenizer.decode(greedy[0])
    assert continuation in (tmp_path / "s.txt").read_text(encoding="utf-8")


def test_a_bpe_folder_of_another_text_is_pointed_out(tmp_path, capsys):
    import prepare_data
    for name, text, vocab in (("a.txt", make_text(400), "300"), ("b.txt", make_text(400)[::-1], "280")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert prepare_data.main(["--input", str(tmp_path / name), "--out-dir", str(tmp_path / "d"),
                                  "--bpe-vocab", vocab]) == 0
    out = capsys.readouterr().out
    assert f"note: {tmp_path / 'd' / 'bpe300'} holds another text's BPE" in out
    assert "bpe280 holds" not in out
