# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # From text to GPT: a walkthrough of this repository
#
# This notebook follows the order of Andrej Karpathy's lecture "Let's build GPT: from scratch,
# in code, spelled out": the data, turning text into numbers, batches of training examples, a
# character-level transformer, and then a GPT on a larger vocabulary. Every step calls the
# repository's own modules, so what you run here is what `prepare_data.py`, `bigram/train.py`
# and `gpt/train.py` run from the command line.
#
# Each model trains for about a minute on a laptop CPU. Everything the notebook writes (the
# prepared data, checkpoints, plots, samples) goes to `OUT_DIR` (`notebooks/runs/`, which git
# ignores); delete that folder when you are done.

# %% [markdown]
# ## Parameters
#
# The defaults give about a minute of training per model. `TINY` swaps in tiny models and a
# short text (the tests run the notebook that way, in seconds).

# %% tags=["parameters"]
MAX_ITERS_CHAR = 500  # optimizer steps of the char model (about a minute on a 2-core CPU)
MAX_ITERS_GPT = 200   # optimizer steps of the GPT (under a minute)
BPE_VOCAB = 1024      # tokens in the byte-level BPE trained on the text
DEVICE = "cpu"        # "auto" picks a GPU when there is one
TINY = False          # tiny models on the notebook's own short text
OUT_DIR = "runs"      # relative to this notebook's folder

# %% [markdown]
# ## Setup
#
# The notebook runs from `notebooks/`; the repository root goes on the import path so that
# `lmkit`, `bigram`, `gpt` and `prepare_data` import as they do in the scripts.

# %%
# %matplotlib inline
import random
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch

REPO_ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "prepare_data.py").is_file())
sys.path.insert(0, str(REPO_ROOT))
out_dir = Path(OUT_DIR).resolve()
out_dir.mkdir(parents=True, exist_ok=True)
print(f"repository: {REPO_ROOT}\nwriting to: {out_dir}")

# %% [markdown]
# The parts of the repository this notebook uses:

# %%
import prepare_data
from bigram.family import FAMILY as CHAR_FAMILY
from gpt.family import FAMILY as GPT_FAMILY
from lmkit.config import parse_flags
from lmkit.data import BatchSampler, data_folder_name, load_meta, load_split
from lmkit.generation import generate
from lmkit.sample_cli import prompt_ids
from lmkit.tokenizers import BPETokenizer, CharTokenizer, GPT2Tokenizer, tokenizer_from_meta
from lmkit.trainer import Trainer

# %% [markdown]
# ## 1. The data
#
# The lecture trains on Tiny Shakespeare, about a million characters of plays.
# `python prepare_data.py` downloads it once into `data/input.txt`. Without that file (or with
# `TINY`), the notebook writes a small play of its own from a few dozen words, so it runs
# anywhere, offline: the models then learn that play instead.


# %%
def own_text(n_speeches: int, seed: int = 0) -> str:
    """A made-up play: speakers' names, each followed by one to three random lines."""
    rng = random.Random(seed)
    speakers = ["HELENA", "OBERON", "PUCK", "TITANIA", "LYSANDER"]
    words = ("the moon is up and all the wood is still come sleep my lord what dream was this "
             "we walked by night and lost our way under a silver sky").split()
    speeches = []
    for _ in range(n_speeches):
        lines = [" ".join(rng.choices(words, k=rng.randint(4, 9))).capitalize() + rng.choice(".,!?")
                 for _ in range(rng.randint(1, 3))]
        speeches.append(f"{rng.choice(speakers)}:\n" + "\n".join(lines))
    return "\n\n".join(speeches) + "\n"


shakespeare = REPO_ROOT / "data" / "input.txt"
if shakespeare.is_file() and not TINY:
    text_file = shakespeare
else:
    text_file = out_dir / "own_text.txt"
    text_file.write_text(own_text(300 if TINY else 3000), encoding="utf-8")
text = text_file.read_text(encoding="utf-8")
print(f"{text_file}: {len(text):,} characters, {len(set(text))} distinct\n")
print(text[:300])

# %% [markdown]
# The last 10% of the text is held out for validation: the models never train on it, and we
# score them on it. `prepare_data.split_text` is the split the repository uses.

# %%
train_text, val_text = prepare_data.split_text(text, 0.1)
print(f"train {len(train_text):,} characters, val {len(val_text):,} characters")

# %% [markdown]
# ## 2. Tokenizers: text to numbers
#
# A model reads integers, so text is cut into tokens and each token gets an id. Three ways:
#
# - **characters** (the lecture's choice): one token per distinct character; a tiny vocabulary,
#   but many tokens per sentence;
# - **GPT-2's BPE**: 50,257 tokens learned from web text, mostly whole words and word pieces;
# - **a byte-level BPE trained on this text**: it starts from the 256 bytes and repeatedly
#   merges the most frequent pair of neighbouring tokens into a new token, until it has
#   `BPE_VOCAB` tokens (or no pair is left to merge).
#
# Here is the same sentence in each (`|` separates tokens).

# %%
char_tok = CharTokenizer.from_text(text)
gpt2_tok = GPT2Tokenizer()
bpe_tok = BPETokenizer.train([train_text], BPE_VOCAB)  # trained on the train split only

sentence = "\n".join(text.split("\n")[:2])
pieces = {
    "characters": [char_tok.decode([i]) for i in char_tok.encode(sentence)],
    "GPT-2 BPE": [gpt2_tok.decode([i]) for i in gpt2_tok.encode(sentence)],
    f"own BPE ({bpe_tok.vocab_size:,})": [bpe_tok.token_bytes[i].decode("utf-8", "replace")
                                          for i in bpe_tok.encode(sentence)],
}
print(repr(sentence), "\n")
for name, tokens in pieces.items():
    print(f"{name}: {len(tokens)} tokens\n  " + "|".join(t.replace("\n", "\\n") for t in tokens))

# %% [markdown]
# A longer token means fewer tokens for the same text: the model sees more text in the same
# context window, but must choose among more tokens at each step. Characters per token over the
# whole validation text:

# %%
for name, tokenizer in [("characters", char_tok), ("GPT-2 BPE", gpt2_tok), ("own BPE", bpe_tok)]:
    n_tokens = len(tokenizer.encode(val_text))
    print(f"{name:10s} vocabulary {tokenizer.vocab_size:>6,}  "
          f"{len(val_text) / n_tokens:.2f} characters per token")
print("\nthe last tokens the BPE learned:", [t.decode("utf-8", "replace")
                                              for t in bpe_tok.token_bytes[-12:]])

# %% [markdown]
# ## 3. Preparing the data
#
# `prepare_data.py` encodes the train and val text with all three tokenizers and writes each
# as a file of 16-bit ids, with a `meta.json` describing the tokenizer: folders `char/`,
# `gpt2/` and `bpe<N>/` (which also holds the BPE's `tokenizer.json`). It trains the same BPE
# as above, on the same train split. The command line equivalent is
# `python prepare_data.py --input FILE --out-dir DIR --bpe-vocab N`.

# %%
data_dir = out_dir / "data"
prepare_data.main(["--input", str(text_file), "--out-dir", str(data_dir),
                   "--bpe-vocab", str(bpe_tok.vocab_size)])
char_data = data_dir / "char"
bpe_data = data_dir / data_folder_name("bpe", bpe_tok.vocab_size)

# %% [markdown]
# ## 4. Batches
#
# Training examples are random windows of the token stream. In a window of `block_size + 1`
# tokens, the input `x` is the first `block_size` tokens and the target `y` is the same window
# moved one token on: at every position, the model learns to predict the next token. One
# window of `block_size` tokens holds `block_size` examples, each with a longer context than
# the one before. Here is a batch of 4 windows of 8 characters.

# %%
meta = load_meta(char_data)
sampler = BatchSampler(load_split(char_data, "train", meta), block_size=8, batch_size=4, seed=0)
x, y = sampler.next_batch(torch.device("cpu"))
print("x =", x, "\ny =", y)
for t in range(4):
    context, target = x[0, :t + 1].tolist(), y[0, t].item()
    print(f"after {char_tok.decode(context)!r} comes {char_tok.decode([target])!r}")

# %% [markdown]
# ## 5. The char model
#
# `bigram/model.py` holds the lecture's model. The lecture starts from a bigram model (each
# character predicts the next from itself alone) and grows it into a transformer: token and
# position embeddings, blocks of masked multi-head self-attention and a feed-forward layer,
# each with a residual connection and LayerNorm, and a linear head that scores every next
# character. The folder kept the first model's name.
#
# `lmkit.trainer.Trainer` is the training loop both models share; `bigram/train.py` calls it
# with command-line flags, and we give it the same flags. `--preset cpu` is the repository's
# recipe tuned for a laptop CPU: a 2-layer model that swaps the position table for rotary
# positions, normalises queries and keys (QK-norm) and trains with the Muon optimizer
# (`python bigram/train.py --help` lists every flag and value). The
# trainer prints a line every 50 steps and evaluates on the whole validation split a few times,
# saving a checkpoint each time. To stop early, interrupt the kernel: the run stops after the
# current step and saves.

# %%
TINY_MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
              "--batch-size", "4", "--eval-iters", "2", "--warmup-iters", "2"]


def train(family, run: str, data: Path, max_iters: int) -> Trainer:
    """Train one model in this process with the trainer the scripts use; return the trainer,
    which holds the model, its data's tokenizer (meta) and its history of losses."""
    flags = ["--preset", "cpu", "--data-dir", str(data), "--out-dir", str(out_dir), "--run", run,
             "--device", DEVICE, "--max-iters", str(max_iters),
             "--eval-interval", str(max(1, max_iters // 5)), "--overwrite"]
    trainer = Trainer(family, parse_flags(family, "", flags + (TINY_MODEL if TINY else [])))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


char_run = train(CHAR_FAMILY, "char", char_data, MAX_ITERS_CHAR)

# %% [markdown]
# The loss is the cross-entropy of the next token, in nats: `ln(vocabulary size)` for a model
# that guesses uniformly, lower as it learns. The faint line is the training loss between log
# steps, the points are the evaluations. The val loss tracks the train loss while the model
# still generalises; a gap that opens up means it starts to memorise the training text.

# %%
history = char_run.history
fig, ax = plt.subplots(figsize=(8, 4))
ax.plot(*zip(*history.loss_curve), alpha=0.4, label="train loss (running)")
ax.plot([m["step"] for m in history.metrics], [m["train_loss"] for m in history.metrics], "o-",
        label="train loss (eval)")
ax.plot([m["step"] for m in history.metrics], [m["val_loss"] for m in history.metrics], "s-",
        label="val loss")
ax.set(xlabel="step", ylabel="loss (nats per character)", title="char model")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## 6. Sampling
#
# To generate, the model scores every possible next token, we draw one from those
# probabilities, append it, and repeat. `lmkit.generation.generate` does that (with a cache of
# the attention keys and values, so each new token costs one position's work);
# `python bigram/sample.py` is the command line equivalent. We start from the first line of
# the text.


# %%
def sample(run: Trainer, prompt: str, n_tokens: int, seed: int = 0) -> str:
    """n_tokens the run's model generates after prompt, decoded to text."""
    tokenizer = tokenizer_from_meta(run.meta)
    idx = torch.tensor([prompt_ids(prompt, tokenizer, run.model_config.block_size)],
                       device=run.device)
    generator = torch.Generator(device=run.device).manual_seed(seed)
    out = generate(run.model.eval(), idx, n_tokens, top_k=run.family.default_top_k,
                   generator=generator, vocab_size=run.meta["vocab_size"])
    return tokenizer.decode(out[0].tolist())


prompt = text.split("\n")[0]
print("char model sample:\n" + sample(char_run, prompt, 80 if TINY else 500))

# %% [markdown]
# ## 7. A GPT on the BPE
#
# `gpt/model.py` is a GPT-2-style model (nanoGPT's): the same kind of transformer, with
# GELU, weight tying between the embedding and the head, and GPT-2's initialisation (its
# `--preset cpu` switches on rotary positions, QK-norm and Muon as well). It reads the BPE's
# tokens, so each position holds several characters. Trained the same way:

# %%
gpt_run = train(GPT_FAMILY, "gpt", bpe_data, MAX_ITERS_GPT)

# %% [markdown]
# ## 8. Comparing the two: bits per character
#
# The two losses do not compare: the char model's is per character, the GPT's per BPE token,
# which holds several characters and is harder to guess. Dividing the whole validation
# split's total loss by its number of characters (and by ln 2) gives **bits per character**,
# the same unit for any tokenizer: every evaluation row has it as `val_bpc`. Lower is better.

# %%
runs = {"char model": char_run, f"GPT on {bpe_data.name}": gpt_run}
fig, ax = plt.subplots(figsize=(8, 4))
for name, run in runs.items():
    rows = run.history.metrics
    ax.plot([m["elapsed_s"] for m in rows], [m["val_bpc"] for m in rows], "o-", label=name)
    best = run.history.best()
    print(f"{name}: {run.model.num_params():,} parameters, val {best['val_bpc']:.4f} bits per "
          f"character at step {best['step']} ({rows[-1]['elapsed_s']:.0f} s of training)")
ax.set(xlabel="seconds of training", ylabel="val bits per character",
       title="lower is better, at the same seconds")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# Read the curves at equal seconds: each point is an evaluation, and the lower curve is the
# model that learned more from the same time. A minute is a short, noisy race; train longer
# (raise `MAX_ITERS_CHAR` and `MAX_ITERS_GPT`) to see where each one levels off.
#
# And a sample from the GPT, from the same first line: it writes a BPE token, several
# characters, at a time.

# %%
print("GPT sample:\n" + sample(gpt_run, prompt, 30 if TINY else 150))

# %% [markdown]
# ## Where to go next
#
# The same runs from the command line, for as long as you like (`--help` lists every flag):
#
# ```bash
# python prepare_data.py                    # Tiny Shakespeare into data/
# python bigram/train.py --preset cpu       # about two minutes on a laptop CPU
# python bigram/sample.py --prompt "ROMEO:"
# python gpt/train.py --preset cpu          # a few minutes
# python gpt/sample.py
# ```
#
# Try a bigger `MAX_ITERS_*` here, another `BPE_VOCAB`, or the GPT on GPT-2's own tokens
# (`data_dir / "gpt2"`), and watch the bits per character.
