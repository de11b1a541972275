"""Batched text generation, shared by both models.

The cached path runs the model's decoder_weights() through lmkit.decoder; the plain path
calls the model's forward on the whole window for every token. When the sequence outgrows
the block size, the cached path keeps the most recent half block, re-encodes it into an
emptied cache, and carries on from there.
"""
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


@torch.inference_mode()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             generator=None, use_cache=True, vocab_size=None, on_token=None):
    """Extend every row of idx (B, T) by max_new_tokens tokens; return the rows with them.

    A prompt longer than the block size is cut to its last block_size tokens first. It runs
    in the device's inference dtype (lmkit.device.inference_dtype).

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

    new_tokens = []
    with autocast(device, dtype):
        if not use_cache:
            for _ in range(max_new_tokens):
                logits, _ = model(idx[:, -block_size:])
                token = pick(logits[:, -1])
                idx = torch.cat([idx, token], dim=1)
                if on_token:
                    on_token(token)
            return idx
        keep = max(1, block_size // 2)
        decoder = KVCacheDecoder(model.decoder_weights(), idx.size(0), device, dtype)
        logits = decoder.feed(idx)
        for i in range(max_new_tokens):
            token = pick(logits)
            new_tokens.append(token)
            if on_token:
                on_token(token)
            if i == max_new_tokens - 1:
                break
            if decoder.length == block_size:  # cache full: re-encode the most recent tokens
                decoder.reset()
                logits = decoder.feed(torch.cat([idx, *new_tokens], dim=1)[:, -keep:])
            else:
                logits = decoder.feed(token)
    return torch.cat([idx, *new_tokens], dim=1)
