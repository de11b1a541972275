"""Batched text generation with a per-layer key/value cache, shared by both models.

Models provide forward(idx, kv_cache=..., pos=...) and allocate_kv_cache(batch, device, dtype).
When the sequence outgrows the block size, the cached path keeps the most recent three
quarters of a block, re-encodes them into a fresh cache, and carries on from there.
"""
import torch

from lmkit.device import autocast


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
    logits = filter_logits(logits / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@torch.inference_mode()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             generator=None, use_cache=True, vocab_size=None, dtype=torch.float32, on_token=None):
    """Extend every row of idx (B, T) by max_new_tokens tokens; return the rows with them.

    A prompt longer than the block size is cut to its last block_size tokens first.

    vocab_size masks padded vocabulary entries the tokenizer cannot decode. on_token, if
    given, is called with the (B, 1) tensor of each new token as soon as it exists.
    """
    block_size = model.config.block_size
    idx = idx[:, -block_size:]
    device = idx.device

    def pick(logits):
        logits = logits[:, -1, :]
        if vocab_size is not None and vocab_size < logits.size(-1):
            logits = logits[:, :vocab_size]
        return sample_next(logits, temperature, top_k, top_p, generator)

    new_tokens = []
    with autocast(device, dtype):
        if not use_cache:
            for _ in range(max_new_tokens):
                logits, _ = model(idx[:, -block_size:])
                token = pick(logits)
                idx = torch.cat([idx, token], dim=1)
                if on_token:
                    on_token(token)
            return idx
        keep = max(1, block_size * 3 // 4)
        cache = model.allocate_kv_cache(idx.size(0), device, dtype)
        logits, _ = model(idx, kv_cache=cache, pos=0)
        pos = idx.size(1)
        for i in range(max_new_tokens):
            token = pick(logits)
            new_tokens.append(token)
            if on_token:
                on_token(token)
            if i == max_new_tokens - 1:
                break
            if pos == block_size:  # cache full: re-encode the most recent tokens
                recent = torch.cat([idx, *new_tokens], dim=1)[:, -keep:]
                logits, _ = model(recent, kv_cache=cache, pos=0)
                pos = recent.size(1)
            else:
                logits, _ = model(token, kv_cache=cache, pos=pos)
                pos += 1
    return torch.cat([idx, *new_tokens], dim=1)
