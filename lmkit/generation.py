"""Batched text generation, shared by both models.

The cached path runs the model's decoder_weights() through lmkit.decoder; the plain path
calls the model's forward on the whole window for every token. When the sequence outgrows
the block size, the cached path keeps the most recent half block, re-encodes it into an
emptied cache, and carries on from there.
"""
import itertools

import torch

from lmkit.decoder import KVCacheDecoder
from lmkit.device import autocast, inference_dtype


def filter_logits(logits: torch.Tensor, top_k=None, top_p=None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of `logits` (B, V); temperature 0 is greedy."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if temperature < 1e-3:  # logits / temperature could overflow: shift the largest to 0 first
        logits = logits - logits.amax(dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    # The index of the largest probs / Exponential(1) is an exact draw from probs (the
    # "exponential race"). torch.multinomial draws one sample the same way, but first checks
    # the probabilities on the host, which costs more than the draw at this size.
    race = torch.empty_like(probs).exponential_(generator=generator)
    return torch.argmax(probs / race, dim=-1, keepdim=True)


class TokenChunks:
    """Token ids of a batch of rows, appended a (B, 1) column at a time and joined every CHUNK
    columns: a long generation holds 8 bytes a token and row, not a tensor object per token,
    and reading its last few tokens never copies the whole."""

    CHUNK = 1024

    def __init__(self, idx: torch.Tensor):
        self.pieces, self.fresh = [idx], []
        self.length, self.fresh_length = idx.size(1), 0

    def append(self, token: torch.Tensor) -> None:
        self.fresh.append(token)
        self.length += 1
        self.fresh_length += 1
        if self.fresh_length == self.CHUNK:
            self.pieces.append(torch.cat(self.fresh, dim=1))
            self.fresh, self.fresh_length = [], 0

    def last(self, n: int) -> torch.Tensor:
        """The last n columns (all of them when there are fewer)."""
        if len(self.fresh) > 1:  # join the fresh columns once, not at every call
            self.fresh = [torch.cat(self.fresh, dim=1)]
        tail, count = [], 0
        for piece in itertools.chain(reversed(self.fresh), reversed(self.pieces)):
            tail.append(piece)
            count += piece.size(1)
            if count >= n:
                break
        return torch.cat(tail[::-1], dim=1)[:, -n:]

    def all(self) -> torch.Tensor:
        return torch.cat(self.pieces + self.fresh, dim=1)


@torch.inference_mode()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             generator=None, use_cache=True, vocab_size=None, on_token=None):
    """Extend every row of idx (B, T) by max_new_tokens tokens; return the rows with them.

    A prompt longer than the block size is cut to its last block_size tokens first. It runs
    in the device's inference dtype (lmkit.device.inference_dtype). Each step's work and memory
    are bounded by the block size, however many tokens are asked for; only the returned rows
    grow with them.

    vocab_size masks padded vocabulary entries the tokenizer cannot decode. on_token, if
    given, is called with the (B, 1) tensor of each new token as soon as it exists.
    """
    block_size = model.config.block_size
    idx = idx[:, -block_size:]
    device = idx.device
    dtype = inference_dtype(device)

    def pick(logits):  # (B, vocab) -> (B, 1)
        if vocab_size is not None and vocab_size < logits.size(-1):
            logits = logits[:, :vocab_size]
        return sample_next(logits, temperature, top_k, top_p, generator)

    tokens = TokenChunks(idx)
    with autocast(device, dtype):
        if not use_cache:
            for _ in range(max_new_tokens):
                logits, _ = model(tokens.last(block_size))
                token = pick(logits[:, -1])
                tokens.append(token)
                if on_token:
                    on_token(token)
            return tokens.all()
        keep = max(1, block_size // 2)
        decoder = KVCacheDecoder(model.decoder_weights(), idx.size(0), device, dtype)
        logits = decoder.feed(idx)
        for i in range(max_new_tokens):
            token = pick(logits)
            tokens.append(token)
            if on_token:
                on_token(token)
            if i == max_new_tokens - 1:
                break
            if decoder.length == block_size:  # cache full: re-encode the most recent tokens
                decoder.reset()
                logits = decoder.feed(tokens.last(keep))
            else:
                logits = decoder.feed(token)
    return tokens.all()


def sampling_memory(config, n_rows: int, max_new_tokens: int, use_cache: bool,
                    dtype_bytes: int, chars_per_token: float) -> tuple:
    """A lower bound on the bytes that generating n_rows samples of max_new_tokens needs beyond
    the model's weights: (on the device that runs the model, on the host). On the device: the
    KV cache (keys and values of a block of tokens, per row and layer) or, without it, a
    forward's widest activations over a block; four row-by-vocabulary tensors (the logits, the
    probabilities, the exponential race and its quotient); the rows' token ids, kept twice
    (by generate and its caller) and joined twice. On the host: the ids once more and the
    text, in about four copies (decoded, framed, joined, encoded) until it is written."""
    rows_of_block = n_rows * config.block_size * config.n_embd
    if use_cache:
        working = 2 * config.n_layer * rows_of_block * dtype_bytes
    else:
        working = 4 * rows_of_block * 4  # the MLP's hidden layer, 4 x n_embd wide, in float32
    logits = 4 * n_rows * config.vocab_size * 4
    ids = 8 * n_rows * (config.block_size + max_new_tokens)
    text = 4 * n_rows * max_new_tokens * chars_per_token
    return working + logits + 4 * ids, ids + int(text)
