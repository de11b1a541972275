"""Incremental decoding with a per-layer key/value cache, written once for both models.

Both models are the same kind of transformer: token plus learned position embeddings,
pre-LayerNorm blocks (x + attention(ln_1(x)), then x + mlp(ln_2(x))), a final LayerNorm and
a linear head. Each model lists its weights in a DecoderWeights; KVCacheDecoder runs them
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
Norm = tuple[Optional[Tensor], Optional[Tensor], float]  # weight, bias, eps


def linear_weights(module) -> Linear:
    return module.weight, module.bias


def norm_weights(module) -> Norm:
    return module.weight, module.bias, module.eps


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
    position_embedding: Tensor
    layers: list[LayerWeights]
    ln_f: Norm
    head: Linear
    n_head: int
    activation: Callable[[Tensor], Tensor]


class KVCacheDecoder:
    """Feeds tokens to a model a few at a time, keeping every layer's keys and values.

    Call feed(idx) with the prompt (B, T) first, then with each new token (B, 1); it returns
    the logits (B, vocab) of the last position fed. reset() empties the cache.
    """

    def __init__(self, weights: DecoderWeights, batch_size: int, device, dtype=torch.float32):
        self.w = weights
        self.block_size, n_embd = weights.position_embedding.shape
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
        x = (F.embedding(idx, w.token_embedding) + w.position_embedding[pos:end]).view(B * T, C)
        for layer, cache in zip(w.layers, self.caches):
            qkv = F.linear(F.layer_norm(x, (C,), *layer.ln_1), *layer.attn_qkv)
            qkv = qkv.view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
            cache.narrow(3, pos, T).copy_(qkv[1:])
            keys, values = cache.narrow(3, 0, end).unbind(0)
            y = F.scaled_dot_product_attention(qkv[0], keys, values, is_causal=T > 1)
            x = x + F.linear(y.transpose(1, 2).reshape(B * T, C), *layer.attn_proj)
            hidden = w.activation(F.linear(F.layer_norm(x, (C,), *layer.ln_2), *layer.mlp_fc))
            x = x + F.linear(hidden, *layer.mlp_proj)
        self.length = end
        last = x.view(B, T, C)[:, -1]
        return F.linear(F.layer_norm(last, (C,), *w.ln_f), *w.head)
