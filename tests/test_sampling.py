"""Sampling: KV-cached generation, top-k/top-p filtering, prompts, and both sample.py commands."""
import re
import shutil

import pytest
import torch

from bigram.model import BigramConfig, BigramLanguageModel
from bigram.family import FAMILY as BIGRAM_FAMILY
from conftest import assert_decoder_matches_forward, one_error_line, run_script
from gpt.model import GPT, GPTConfig
from gpt.family import FAMILY as GPT_FAMILY
from lmkit import sample_cli
from lmkit.checkpoint import load_checkpoint
from lmkit.generation import filter_logits, generate, sample_next
from lmkit.tokenizers import GPT2Tokenizer, tokenizer_from_meta

FAMILIES = {"bigram": BIGRAM_FAMILY, "gpt": GPT_FAMILY}
SEPARATOR = re.compile(r"-+ sample \d+/\d+ -+\n")
CPU = torch.device("cpu")


# ---- helpers ---------------------------------------------------------------------------------
def tiny_model(kind: str, block_size: int = 16, vocab_size: int = 50, seed: int = 0,
               bias: bool = True):
    """A randomly initialised two-layer model of either kind, in eval mode (bias: gpt only)."""
    torch.manual_seed(seed)
    if kind == "bigram":
        model = BigramLanguageModel(BigramConfig(vocab_size=vocab_size, block_size=block_size,
                                                 n_embd=16, n_head=2, n_layer=2, dropout=0.0))
    else:
        model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2,
                              n_embd=16, dropout=0.0, bias=bias))
    return model.eval()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def trained_model(trained, kind: str):
    """The model, tokenizer and checkpoint state of a run trained by the `trained` fixture."""
    state = load_checkpoint(trained / "checkpoints" / kind / "best.pt")
    model = sample_cli.load_model(state, FAMILIES[kind], CPU)
    return model, tokenizer_from_meta(state["meta"]), state


def split_samples(text: str):
    """(header, [sample texts]) of a samples file or of sample.py's stdout."""
    header, *samples = SEPARATOR.split(text)
    return header, [s.rstrip("\n") for s in samples]


def new_sample_files(out_dir, run: str):
    """Sample files sample.py wrote in samples/<run>/ (the trainer's own sample excluded)."""
    folder = out_dir / "samples" / run
    return sorted(p for p in folder.glob("*") if p.is_file() and p.name != "train_sample.txt")


# ---- top-k / top-p / temperature --------------------------------------------------------------
# Ten distinct logits in a scrambled order, so sorting and scattering back are both exercised.
LOGITS = torch.tensor([[0.3, 1.9, -0.4, 1.2, 0.8, 2.0, 0.0, 1.6, -1.0, 0.5]])


def test_filter_logits_top_k_keeps_exactly_the_k_largest():
    """top_k=3 leaves the three largest logits untouched and sets every other one to -inf."""
    out = filter_logits(LOGITS, top_k=3)
    kept = set(torch.isfinite(out[0]).nonzero().flatten().tolist())
    assert kept == {5, 1, 7}
    assert torch.equal(out[0, [5, 1, 7]], LOGITS[0, [5, 1, 7]])


def test_sample_next_top_k_never_emits_a_token_outside_the_top_k():
    """Over 20,000 draws with top_k=3 only the three largest indices appear (and all of them)."""
    logits = LOGITS.repeat(20000, 1)
    unfiltered = set(sample_next(logits, generator=gen(0)).flatten().tolist())
    assert len(unfiltered) > 3  # without top-k the other tokens do get drawn
    drawn = set(sample_next(logits, top_k=3, generator=gen(0)).flatten().tolist())
    assert drawn == {5, 1, 7}


def nucleus_logits():
    """Logits of a known distribution over 6 tokens, placed in scrambled order."""
    probs = torch.tensor([0.06, 0.40, 0.10, 0.15, 0.04, 0.25])  # ranks: 1, 5, 3, 2, 0, 4
    return probs.log().unsqueeze(0)


@pytest.mark.parametrize("top_p, nucleus", [
    (0.3, {1}),              # the top token alone already holds 0.40
    (0.6, {1, 5}),           # 0.40 + 0.25 = 0.65 >= 0.6
    (0.7, {1, 5, 3}),        # 0.40 + 0.25 + 0.15 = 0.80 >= 0.7
    (0.85, {1, 5, 3, 2}),    # ... + 0.10 = 0.90 >= 0.85
    (1.0, {0, 1, 2, 3, 4, 5}),
])
def test_top_p_samples_only_from_the_nucleus(top_p, nucleus):
    """filter_logits keeps exactly the smallest top-probability set holding top_p of the mass,
    and 20,000 draws with sample_next never leave it."""
    logits = nucleus_logits()
    kept = set(torch.isfinite(filter_logits(logits, top_p=top_p)[0]).nonzero().flatten().tolist())
    assert kept == nucleus
    drawn = set(sample_next(logits.repeat(20000, 1), top_p=top_p, generator=gen(1)).flatten().tolist())
    assert drawn == nucleus


def test_top_k_and_top_p_filter_each_row_separately():
    """Rows with different orderings get their own top-k and nucleus sets; with both filters
    no token outside either set is ever kept or drawn."""
    row0 = nucleus_logits()[0]
    row1 = row0.flip(0)  # same distribution, reversed positions
    logits = torch.stack([row0, row1])
    out = filter_logits(logits, top_p=0.7)
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == {1, 5, 3}
    assert set(torch.isfinite(out[1]).nonzero().flatten().tolist()) == {4, 0, 2}
    both = filter_logits(logits, top_k=2, top_p=0.85)
    assert set(torch.isfinite(both[0]).nonzero().flatten().tolist()) == {1, 5}
    assert set(torch.isfinite(both[1]).nonzero().flatten().tolist()) == {4, 0}
    drawn = sample_next(logits.repeat(5000, 1), top_k=4, top_p=0.6, generator=gen(2)).view(-1, 2)
    assert set(drawn[:, 0].tolist()) == {1, 5}
    assert set(drawn[:, 1].tolist()) == {4, 0}


def test_temperature_zero_is_argmax_whatever_the_generator():
    """Temperature 0 picks the largest logit in every row and ignores the random generator."""
    logits = torch.stack([LOGITS[0], LOGITS[0].flip(0)])
    for seed in (0, 1, 2):
        assert sample_next(logits, temperature=0, generator=gen(seed)).flatten().tolist() == [5, 4]


# ---- generate(): KV cache, batches, block size ------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prompt_len", [1, 6], ids=["no-prompt", "prompt"])
@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_cached_generation_equals_uncached_within_block(kind, prompt_len, batch):
    """With the same seed, use_cache=True yields exactly the tokens of use_cache=False while
    prompt + new tokens fit in the block size (a lone start token stands for no prompt)."""
    model = tiny_model(kind, block_size=16)
    prompt = torch.randint(0, 50, (1, prompt_len), generator=gen(5)).repeat(batch, 1)
    n_new = 16 - prompt_len
    cached = generate(model, prompt, n_new, generator=gen(7), use_cache=True)
    uncached = generate(model, prompt, n_new, generator=gen(7), use_cache=False)
    assert cached.shape == (batch, 16)
    assert torch.equal(cached[:, :prompt_len], prompt)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_cached_equals_uncached_with_top_k_top_p_and_greedy(kind):
    """The cache changes nothing with top-k/top-p filtering or greedy decoding either."""
    model = tiny_model(kind, block_size=16)
    prompt = torch.zeros(2, 3, dtype=torch.long)
    for kw in (dict(top_k=5, top_p=0.9, temperature=0.8), dict(temperature=0)):
        cached = generate(model, prompt, 13, generator=gen(3), use_cache=True, **kw)
        uncached = generate(model, prompt, 13, generator=gen(3), use_cache=False, **kw)
        assert torch.equal(cached, uncached), kw


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_cached_equals_uncached_for_trained_checkpoints(kind, trained):
    """The trained tiny checkpoints give identical cached and uncached samples (batch of 2,
    from the same start token sample.py uses, gpt's padded vocabulary masked)."""
    model, tokenizer, state = trained_model(trained, kind)
    meta, block = state["meta"], model.config.block_size
    start = sample_cli.prompt_ids("", tokenizer, block)
    idx = torch.tensor([start] * 2)
    kw = dict(vocab_size=meta["vocab_size"], top_k=50 if kind == "gpt" else None)
    cached = generate(model, idx, block - 1, use_cache=True, generator=gen(11), **kw)
    uncached = generate(model, idx, block - 1, use_cache=False, generator=gen(11), **kw)
    assert torch.equal(cached, uncached)
    assert int(cached.max()) < meta["vocab_size"]


@pytest.mark.parametrize("prompt_len", [1, 3, 8])
@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_cached_generation_runs_well_past_the_block_size(kind, prompt_len):
    """Generating 3x the block size with the cache works: right shape, every id inside the
    (unpadded) vocabulary, and the first block-size tokens equal the uncached run."""
    block, batch = 8, 2
    model = tiny_model(kind, block_size=block, vocab_size=64)
    prompt = torch.randint(0, 50, (batch, prompt_len), generator=gen(9))
    n_new = 3 * block
    cached = generate(model, prompt, n_new, generator=gen(4), use_cache=True, vocab_size=50)
    uncached = generate(model, prompt, n_new, generator=gen(4), use_cache=False, vocab_size=50)
    assert cached.shape == uncached.shape == (batch, prompt_len + n_new)
    assert int(cached.min()) >= 0 and int(cached.max()) < 50
    assert torch.equal(cached[:, :block], uncached[:, :block])


def windowed_reference(model, prompt, n_new, generator, keep):
    """What the cached path promises past the block size, computed with the plain forward:
    the context grows token by token; when it would exceed the block size it restarts from
    the most recent `keep` tokens."""
    block, seq, start = model.config.block_size, prompt, 0
    with torch.inference_mode():
        for _ in range(n_new):
            logits, _ = model(seq[:, start:])
            seq = torch.cat([seq, sample_next(logits[:, -1], generator=generator)], dim=1)
            if seq.size(1) - 1 - start == block:
                start = seq.size(1) - keep
    return seq


@pytest.mark.parametrize("prompt_len", [1, 8])
@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_past_the_block_the_cache_equals_the_documented_window(kind, prompt_len):
    """Well past the block size, every cached token equals a plain forward over the window
    the docs describe (restart from the most recent half block when the block is full)."""
    block = 8
    model = tiny_model(kind, block_size=block)
    prompt = torch.randint(0, 50, (2, prompt_len), generator=gen(2))
    cached = generate(model, prompt, 4 * block, generator=gen(6))
    expected = windowed_reference(model, prompt, 4 * block, gen(6), keep=block // 2)
    assert torch.equal(cached, expected)


@pytest.mark.parametrize("kind, bias", [("bigram", True), ("gpt", True), ("gpt", False)])
def test_decoder_logits_equal_the_model_forward(kind, bias):
    """KVCacheDecoder fed a prompt, then one token at a time, gives the logits of the model's
    own forward over the same tokens at every position (gpt also without biases). Every
    weight is drawn large, LayerNorms included, so a misplaced or missing one shows."""
    model, weights = tiny_model(kind, bias=bias), gen(12)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5, generator=weights)
    assert assert_decoder_matches_forward(model).length == 16


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_zero_new_tokens_returns_the_prompt(kind):
    """max_new_tokens=0 returns the prompt unchanged, with or without the cache."""
    model = tiny_model(kind)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    for use_cache in (True, False):
        assert torch.equal(generate(model, prompt, 0, generator=gen(0), use_cache=use_cache), prompt)


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_a_batch_of_n_samples_holds_n_different_sequences(kind):
    """Rows that start from the same prompt are sampled independently: 4 rows, 4 sequences."""
    model = tiny_model(kind)
    out = generate(model, torch.zeros(4, 1, dtype=torch.long), 12, generator=gen(0))
    rows = {tuple(r) for r in out.tolist()}
    assert len(rows) == 4


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_greedy_is_deterministic_and_ignores_the_seed(kind):
    """Temperature 0 gives the same tokens for two different seeds, in every row of a batch."""
    model = tiny_model(kind)
    prompt = torch.zeros(3, 2, dtype=torch.long)
    a = generate(model, prompt, 20, temperature=0, generator=gen(1))
    b = generate(model, prompt, 20, temperature=0, generator=gen(2))
    assert torch.equal(a, b)
    assert all(torch.equal(row, a[0]) for row in a)


# ---- prompts ----------------------------------------------------------------------------------
def test_empty_prompt_starts_from_newline_or_endoftext(trained):
    """An empty prompt starts the char model from "\\n" and the gpt model from <|endoftext|>."""
    _, char_tok, char_state = trained_model(trained, "bigram")
    assert sample_cli.prompt_ids("", char_tok, 16) == [char_tok.stoi["\n"]]
    _, gpt_tok, gpt_state = trained_model(trained, "gpt")
    ids = sample_cli.prompt_ids("", gpt_tok, 32)
    assert ids == [gpt_tok.eot]
    assert gpt_tok.decode(ids) == "<|endoftext|>"


# ---- sample.py: the happy paths ---------------------------------------------------------------
def test_gpt_sample_writes_n_samples_with_a_full_header(trained):
    """gpt/sample.py --num-samples 4 loads best.pt, prints 4 separated, different samples and
    writes them to samples/gpt/ under a header with checkpoint, step, val loss and settings."""
    before = set(new_sample_files(trained, "gpt"))
    r = run_script("gpt/sample.py", "--out-dir", trained, "--device", "cpu", "--num-samples", 4,
                   "--max-new-tokens", 12, "--temperature", 0.8, "--top-p", 0.9, "--seed", 7)
    assert r.returncode == 0, r.stderr
    _, printed = split_samples(r.stdout)
    assert len(printed) == 4 and len(set(printed)) == 4

    files = [p for p in new_sample_files(trained, "gpt") if p not in before]
    assert len(files) == 1, files
    header, saved = split_samples(files[0].read_text(encoding="utf-8"))
    assert saved == printed
    best = trained / "checkpoints" / "gpt" / "best.pt"
    state = load_checkpoint(best)
    assert str(best) in header
    assert f"step {state['step']}" in header
    assert f"{state['metrics'][-1]['val_loss']:.4f}" in header
    for name, value in [("num.?samples", "4"), ("max.?new.?tokens", "12"), ("temperature", "0.8"),
                        ("top.?k", "50"), ("top.?p", "0.9"), ("seed", "7"), ("kv.?cache", "True"),
                        ("prompt", "''")]:
        assert re.search(rf"{name}\W+{re.escape(value)}", header, re.I), (name, header)


def test_bigram_sample_with_prompt_and_out_file(trained, tmp_path):
    """bigram/sample.py continues --prompt in every sample and writes to the --out file."""
    out = tmp_path / "nested" / "mine.txt"
    r = run_script("bigram/sample.py", "--out-dir", trained, "--device", "cpu", "--num-samples", 3,
                   "--max-new-tokens", 25, "--prompt", "ROMEO:", "--out", out)
    assert r.returncode == 0, r.stderr
    header, saved = split_samples(out.read_text(encoding="utf-8"))
    assert str(trained / "checkpoints" / "bigram" / "best.pt") in header
    assert "ROMEO:" in header
    assert len(saved) == 3 and len(set(saved)) == 3
    assert all(s.startswith("ROMEO:") and len(s) >= len("ROMEO:") + 20 for s in saved)
    assert split_samples(r.stdout)[1] == saved


@pytest.mark.slow
def test_run_falls_back_to_last_pt(trained, tmp_path):
    """--run NAME with only last.pt in checkpoints/NAME/ loads last.pt and saves to samples/NAME/."""
    folder = tmp_path / "checkpoints" / "mine"
    folder.mkdir(parents=True)
    shutil.copy(trained / "checkpoints" / "bigram" / "last.pt", folder / "last.pt")
    r = run_script("bigram/sample.py", "--out-dir", tmp_path, "--run", "mine", "--device", "cpu",
                   "--max-new-tokens", 10)
    assert r.returncode == 0, r.stderr
    files = new_sample_files(tmp_path, "mine")
    assert len(files) == 1
    header, saved = split_samples(files[0].read_text(encoding="utf-8"))
    assert str(folder / "last.pt") in header and len(saved) == 1


@pytest.mark.slow
def test_checkpoint_flag_loads_that_file(trained, tmp_path):
    """--checkpoint PATH samples from that file even when --out-dir holds no checkpoints."""
    ckpt = trained / "checkpoints" / "gpt" / "last.pt"
    out = tmp_path / "s.txt"
    r = run_script("gpt/sample.py", "--checkpoint", ckpt, "--out-dir", tmp_path, "--device", "cpu",
                   "--max-new-tokens", 5, "--out", out)
    assert r.returncode == 0, r.stderr
    header, saved = split_samples(out.read_text(encoding="utf-8"))
    assert str(ckpt) in header and len(saved) == 1


@pytest.mark.slow
def test_cli_greedy_matches_generate_from_newline_across_seeds(trained, tmp_path):
    """bigram/sample.py --temperature 0 gives the same text for two seeds, in every sample, and
    that text is the greedy continuation of "\\n" with the start token left out."""
    texts = []
    for seed in (1, 2):
        out = tmp_path / f"{seed}.txt"
        r = run_script("bigram/sample.py", "--out-dir", trained, "--device", "cpu", "--temperature", 0,
                       "--seed", seed, "--num-samples", 2, "--max-new-tokens", 30, "--out", out)
        assert r.returncode == 0, r.stderr
        texts.append(split_samples(out.read_text(encoding="utf-8"))[1])
    assert texts[0] == texts[1]
    assert texts[0][0] == texts[0][1]

    model, tok, state = trained_model(trained, "bigram")
    ids = generate(model, torch.tensor([[tok.stoi["\n"]]]), 30, temperature=0,
                   vocab_size=state["meta"]["vocab_size"])
    assert texts[0][0] == tok.decode(ids[0, 1:].tolist()).rstrip("\n")


@pytest.mark.slow
def test_gpt_cli_empty_prompt_starts_from_endoftext(trained, tmp_path):
    """gpt/sample.py with no prompt continues <|endoftext|>, and leaves that token out of the text."""
    out = tmp_path / "g.txt"
    r = run_script("gpt/sample.py", "--out-dir", trained, "--device", "cpu", "--temperature", 0,
                   "--max-new-tokens", 8, "--out", out)
    assert r.returncode == 0, r.stderr
    [text] = split_samples(out.read_text(encoding="utf-8"))[1]
    model, tok, state = trained_model(trained, "gpt")
    ids = generate(model, torch.tensor([[tok.eot]]), 8, temperature=0,
                   vocab_size=state["meta"]["vocab_size"])
    assert "<|endoftext|>" not in text
    assert text == tok.decode(ids[0, 1:].tolist()).rstrip("\n")


@pytest.mark.slow
def test_cli_no_kv_cache_gives_the_same_samples(trained, tmp_path):
    """bigram/sample.py --no-kv-cache prints the same samples as the cached default (same seed,
    within the block size) and records kv_cache=False in the header."""
    results = []
    for flags in ([], ["--no-kv-cache"]):
        out = tmp_path / f"{len(flags)}.txt"
        r = run_script("bigram/sample.py", "--out-dir", trained, "--device", "cpu", "--num-samples", 3,
                       "--max-new-tokens", 15, "--seed", 3, "--out", out, *flags)
        assert r.returncode == 0, r.stderr
        results.append(split_samples(out.read_text(encoding="utf-8")))
    assert results[0][1] == results[1][1]
    assert re.search(r"kv.?cache\W+False", results[1][0], re.I)


@pytest.mark.slow
def test_prompt_file_is_continued(trained, tmp_path):
    """--prompt-file reads the prompt from a UTF-8 file; every sample continues it."""
    prompt = tmp_path / "p.txt"
    prompt.write_text("JULIET:\nGood", encoding="utf-8")
    out = tmp_path / "s.txt"
    r = run_script("bigram/sample.py", "--out-dir", trained, "--device", "cpu", "--prompt-file", prompt,
                   "--num-samples", 2, "--max-new-tokens", 5, "--out", out)
    assert r.returncode == 0, r.stderr
    _, saved = split_samples(out.read_text(encoding="utf-8"))
    assert len(saved) == 2 and all(s.startswith("JULIET:\nGood") for s in saved)


@pytest.mark.slow
def test_stream_prints_the_text(trained, tmp_path):
    """--stream prints the first sample's text (after its prompt) as it is made, then the rest;
    the file still holds every sample."""
    out = tmp_path / "s.txt"
    r = run_script("bigram/sample.py", "--out-dir", trained, "--device", "cpu", "--stream",
                   "--prompt", "ROMEO:", "--num-samples", 2, "--max-new-tokens", 30, "--out", out)
    assert r.returncode == 0, r.stderr
    _, saved = split_samples(out.read_text(encoding="utf-8"))
    assert len(saved) == 2 and saved[0] != saved[1]
    assert r.stdout.startswith(saved[0])
    assert saved[1] in r.stdout


def test_same_second_runs_keep_both_sample_files(trained, tmp_path, monkeypatch, capsys):
    """Two sample.py runs of one run name never overwrite each other's samples file, even when
    they finish within the same second (the clock is pinned to show that case)."""
    shutil.copytree(trained / "checkpoints" / "bigram", tmp_path / "checkpoints" / "bigram")
    monkeypatch.setattr(sample_cli.time, "strftime", lambda *a, **k: "20250101-120000")
    for seed in (1, 2):
        assert sample_cli.main(BIGRAM_FAMILY, "", ["--out-dir", str(tmp_path), "--device", "cpu",
                                                     "--seed", str(seed), "--max-new-tokens", "20"]) == 0
    capsys.readouterr()
    assert len(new_sample_files(tmp_path, "bigram")) == 2


# ---- sample.py: prompts it must refuse or shorten ---------------------------------------------
@pytest.mark.slow
def test_char_prompt_outside_vocabulary_is_refused(trained, tmp_path):
    """A char prompt with characters the model never saw exits 1 with one sentence naming them."""
    out = tmp_path / "s.txt"
    r = run_script("bigram/sample.py", "--out-dir", trained, "--device", "cpu",
                   "--prompt", "ROMEO: hello @ you#", "--out", out)
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "@" in line and "#" in line and "vocabulary" in line
    assert not out.exists()


@pytest.mark.slow
def test_long_char_prompt_keeps_its_last_block(trained, tmp_path):
    """A char prompt longer than the block size (16) is cut to its last 16 characters, with a
    note on stderr, and sampling still succeeds."""
    prompt = "ROMEO:\nThou art the sun and moon my love."
    out = tmp_path / "s.txt"
    r = run_script("bigram/sample.py", "--out-dir", trained, "--device", "cpu", "--prompt", prompt,
                   "--num-samples", 2, "--max-new-tokens", 5, "--out", out)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"{len(prompt)}\b.*\b16\b", r.stderr), r.stderr
    _, saved = split_samples(out.read_text(encoding="utf-8"))
    assert all(s.startswith(prompt[-16:]) for s in saved)


@pytest.mark.slow
def test_long_gpt_prompt_keeps_its_last_block(trained, tmp_path):
    """A gpt prompt longer than the block size (32 tokens) keeps its last 32 tokens and says so."""
    prompt = " ".join(f"thou art the sun number {i}." for i in range(12))
    ids = GPT2Tokenizer().encode(prompt)
    assert len(ids) > 32
    out = tmp_path / "s.txt"
    r = run_script("gpt/sample.py", "--out-dir", trained, "--device", "cpu", "--prompt", prompt,
                   "--max-new-tokens", 4, "--out", out)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"{len(ids)}\b.*\b32\b", r.stderr), r.stderr
    [text] = split_samples(out.read_text(encoding="utf-8"))[1]
    assert text.startswith(GPT2Tokenizer().decode(ids[-32:]))


# ---- sample.py: bad flags and bad checkpoints -------------------------------------------------
@pytest.mark.parametrize("flags, named", [
    (["--num-samples", "0"], "--num-samples"),
    pytest.param(["--max-new-tokens", "-1"], "--max-new-tokens", marks=pytest.mark.slow),
    pytest.param(["--temperature", "-1"], "--temperature", marks=pytest.mark.slow),
    pytest.param(["--top-k", "0"], "--top-k", marks=pytest.mark.slow),
    pytest.param(["--top-p", "0"], "--top-p", marks=pytest.mark.slow),
    (["--top-p", "1.5"], "--top-p"),
    pytest.param(["--prompt", "a", "--prompt-file", "p.txt"], "--prompt-file",
                 marks=pytest.mark.slow),
])
def test_bad_flags_exit_2_with_one_error_line(trained, flags, named):
    """Out-of-range sampling flags exit 2 with a single "error: ..." line naming the flag."""
    r = run_script("gpt/sample.py", "--out-dir", trained, "--device", "cpu", *flags)
    assert r.returncode == 2
    assert named in one_error_line(r.stderr)
    assert r.stdout == ""


@pytest.mark.parametrize("kind, extra, expected", [
    ("gpt", [], "python gpt/train.py"),
    ("bigram", ["--run", "foo"], "python bigram/train.py --run foo"),
])
def test_missing_checkpoint_names_the_train_command(tmp_path, kind, extra, expected):
    """With no best.pt or last.pt, sample.py exits 1 and tells the user how to train one."""
    r = run_script(f"{kind}/sample.py", "--out-dir", tmp_path, "--device", "cpu", *extra)
    assert r.returncode == 1
    assert expected in one_error_line(r.stderr)


@pytest.mark.slow
def test_missing_checkpoint_file_exits_1(tmp_path):
    """--checkpoint pointing at no file exits 1 with one error line naming the path."""
    missing = tmp_path / "nope.pt"
    r = run_script("gpt/sample.py", "--checkpoint", missing, "--device", "cpu")
    assert r.returncode == 1
    assert str(missing) in one_error_line(r.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("script, other", [("gpt", "bigram"), ("bigram", "gpt")])
def test_checkpoint_of_the_other_model_names_the_right_script(trained, tmp_path, script, other):
    """A checkpoint of the other model kind exits 1 and points at the sample.py that fits it."""
    r = run_script(f"{script}/sample.py", "--checkpoint", trained / "checkpoints" / other / "best.pt",
                   "--out-dir", tmp_path, "--device", "cpu", "--max-new-tokens", 3)
    assert r.returncode == 1
    assert f"{other}/sample.py" in one_error_line(r.stderr)
    assert not (tmp_path / "samples").exists()


def test_checkpoint_with_nan_weights_is_refused(trained, tmp_path):
    """A checkpoint whose weights hold a NaN exits 1 naming it, and writes no sample file."""
    state = torch.load(trained / "checkpoints" / "bigram" / "best.pt", weights_only=True)
    next(iter(state["model"].values()))[0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    r = run_script("bigram/sample.py", "--checkpoint", bad, "--out-dir", tmp_path,
                   "--device", "cpu", "--max-new-tokens", 3)
    assert r.returncode == 1
    assert str(bad) in one_error_line(r.stderr)
    assert not (tmp_path / "samples").exists()


@pytest.mark.slow
@pytest.mark.parametrize("content", [None, b"\xff\xfe bad bytes"])
def test_prompt_file_missing_or_not_utf8(content, trained, tmp_path):
    path = tmp_path / "prompt.txt"
    if content is not None:
        path.write_bytes(content)
    result = run_script("bigram/sample.py", "--out-dir", trained, "--prompt-file", path,
                        "--max-new-tokens", 5)
    assert result.returncode == 1 and str(path) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_out_that_is_a_folder_is_a_bad_flag(trained, tmp_path):
    result = run_script("bigram/sample.py", "--out-dir", trained, "--out", tmp_path,
                        "--max-new-tokens", 5)
    assert result.returncode == 2 and "is a folder" in result.stderr
