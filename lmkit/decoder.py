"""Incremental decoding with a per-layer key/value cache, written once for both models.

Both models are the same kind of transformer: token plus learned position embeddings,
pre-LayerNorm blocks (x + attention(ln_1(x)), then x + mlp(ln_2(x))), a final LayerNorm and
a linear head; their options swap in rotary position embeddings (no position table) and
QK-norm. Each model lists its weights in a DecoderWeights; KVCacheDecoder runs them
with plain torch functions. It skips the nn.Module layers on purpose: a sampling step feeds
a few rows through ~70 small operations, and the modules' call and attribute overhead cost
about as much as the arithmetic itself. The models' own forward stays the reference, and
the tests check that both give the same logits and the same tokens.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

Linear = tuple[Tensor, Optional[Tensor]]  # weight, bias
Norm = tuple[Tensor, Optional[Tensor], float]  # a LayerNorm's weight, bias, eps


def linear_weights(module) -> Linear:
    return module.weight, module.bias


def norm_weights(module) -> Norm:
    return module.weight, module.bias, module.eps


def rotate(x, cos, sin):
    """Rotary position embedding, as the models' own rotate: turn each pair (x[i],
    x[i + head_size/2]) of x (..., T, head_size) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


@dataclass
class LayerWeights:
    ln_1: Norm
    attn_qkv: Linear  # output columns: queries, keys, values of every head
    attn_proj: Linear
    ln_2: Norm
    mlp_fc: Linear
    mlp_proj: Linear


@dataclass
class DecoderWeights:
    token_embedding: Tensor
    position_embedding: Optional[Tensor]  # None with rotary
    layers: list[LayerWeights]
    ln_f: Norm
    head: Linear
    n_head: int
    activation: Callable[[Tensor], Tensor]
    block_size: int
    qk_norm: bool = False  # queries and keys are normalised per head (RMS, no gains)
    rotary: Optional[tuple[Tensor, Tensor]] = None  # cos, sin: (block_size, head_size / 2)


class KVCacheDecoder:
    """Feeds tokens to a model a few at a time, keeping every layer's keys and values.

    Call feed(idx) with the prompt (B, T) first, then with each new token (B, 1); it returns
    the logits (B, vocab) of the last position fed. reset() empties the cache.
    """

    def __init__(self, weights: DecoderWeights, batch_size: int, device, dtype=torch.float32):
        self.w = weights
        self.block_size, n_embd = weights.block_size, weights.token_embedding.size(1)
        # Chosen once here, so the default models' steps pay nothing for the options.
        self.transform_qk = weights.qk_norm or weights.rotary is not None
        shape = (batch_size, weights.n_head, self.block_size, n_embd // weights.n_head)
        # per layer: keys and values in one tensor, so one copy writes both
        self.caches = [torch.zeros((2, *shape), device=device, dtype=dtype) for _ in weights.layers]
        self.length = 0  # positions held in the cache

    def reset(self):
        self.length = 0

    def feed(self, idx: Tensor) -> Tensor:
        w, pos = self.w, self.length
        B, T = idx.shape
        C = w.token_embedding.size(1)
        H = w.n_head
        # Several tokens at once only into an empty cache, so the causal mask stays aligned.
        assert T == 1 or pos == 0, "feed a prompt only after reset()"
        assert pos + T <= self.block_size, "the cache is full: reset() and feed recent tokens"
        end = pos + T
        x = F.embedding(idx, w.token_embedding)
        if w.position_embedding is not None:
            x = x + w.position_embedding[pos:end]
        x = x.view(B * T, C)
        for layer, cache in zip(w.layers, self.caches):
            qkv = F.linear(F.layer_norm(x, (C,), *layer.ln_1), *layer.attn_qkv)
            qkv = qkv.view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
            if self.transform_qk:
                q, k = self._queries_and_keys(qkv[:2], pos, end).unbind(0)
                cache[0].narrow(2, pos, T).copy_(k)
                cache[1].narrow(2, pos, T).copy_(qkv[2])
            else:
                q = qkv[0]
                cache.narrow(3, pos, T).copy_(qkv[1:])
            keys, values = cache.narrow(3, 0, end).unbind(0)
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1)
            x = x + F.linear(y.transpose(1, 2).reshape(B * T, C), *layer.attn_proj)
            hidden = w.activation(F.linear(F.layer_norm(x, (C,), *layer.ln_2), *layer.mlp_fc))
            x = x + F.linear(hidden, *layer.mlp_proj)
        self.length = end
        last = x.view(B, T, C)[:, -1]
        return F.linear(F.layer_norm(last, (C,), *w.ln_f), *w.head)

    def _queries_and_keys(self, qk, pos: int, end: int):
        """QK-norm, then the rotary turn of positions pos..end-1, as the models' attention
        does, on queries and keys stacked (2, B, n_head, T, head_size): one call for both."""
        if self.w.qk_norm:
            qk = F.rms_norm(qk, (qk.size(-1),))
        if self.w.rotary is not None:
            cos, sin = self.w.rotary
            qk = rotate(qk, cos[pos:end], sin[pos:end])
        return qk
