"""The character-level transformer of the "Zero to Hero" lectures.

The folder is called bigram for history; the model is a decoder-only transformer:
token + learned position embeddings, n_layer pre-LayerNorm blocks of multi-head causal
self-attention and a 4x ReLU feed-forward, a final LayerNorm, and a linear head.

BigramConfig's last two fields are options from the modded-nanogpt speedrun, each off by
default (the lectures' model): rotary position embeddings and QK-norm.

The file reads alone, top to bottom. lmkit appears only in decoder_weights, the model's last
method, which lists its weights for the shared fast sampler and the Hugging Face export; the
ReLU written for --compile's speed closes the file.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from lmkit.decoder import DecoderWeights, LayerWeights, linear_weights, norm_weights


@dataclass
class BigramConfig:
    vocab_size: int = 65
    block_size: int = 256
    n_embd: int = 384
    n_head: int = 6
    n_layer: int = 6
    dropout: float = 0.2
    rotary: bool = False   # rotate queries and keys by position instead of a position table
    qk_norm: bool = False  # normalise every head's queries and keys (RMS) before attention


def rotate(x, cos, sin):
    """Turn each pair (x[i], x[i + head_size/2]) of x (..., T, head_size) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Rotary(nn.Module):
    """Rotary position embedding: position t turns channel pair i by t * base^(-2i/head_size),
    so a query-key product depends on how far apart the two tokens are."""

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0):
        super().__init__()
        assert head_size % 2 == 0, "rotary needs an even head size (n_embd / n_head)"
        freqs = base ** -(torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), freqs)
        # not saved in checkpoints: they follow from the config
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x):  # (B, n_head, T, head_size)
        T = x.size(2)
        return rotate(x, self.cos[:T], self.sin[:T])


class MultiHeadAttention(nn.Module):
    """n_head causal self-attention heads side by side, then a projection back to n_embd."""

    def __init__(self, config: BigramConfig):
        super().__init__()
        self.n_head = config.n_head
        head_size = config.n_embd // config.n_head
        # query, key and value of every head in one product (the lectures' three per head)
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        self.rotary = Rotary(head_size, config.block_size) if config.rotary else None

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))
        if self.qk_norm:  # each head's queries and keys to RMS 1, without gains
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, config: BigramConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            ReLU(),  # nn.ReLU's values; its backward is written for --compile (end of the file)
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.dropout),
        )

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    def __init__(self, config: BigramConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.sa = MultiHeadAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.ffwd = FeedForward(config)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class BigramLanguageModel(nn.Module):
    def __init__(self, config: BigramConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        if not config.rotary:
            self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        """Both models' one contract. Without targets (generation): the last position's logits
        (B, 1, vocab_size) and None. With targets (training and evaluation, train or eval
        mode alike): None and the mean cross-entropy loss."""
        B, T = idx.shape
        x = self.token_embedding_table(idx)
        if not self.config.rotary:
            x = x + self.position_embedding_table(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        return None, F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))

    def decoder_weights(self) -> DecoderWeights:
        """The weights in the layout lmkit.decoder runs for fast cached sampling."""
        c = self.config
        layers = [LayerWeights(ln_1=norm_weights(b.ln1),
                               attn_qkv=linear_weights(b.sa.qkv),
                               attn_proj=linear_weights(b.sa.proj),
                               ln_2=norm_weights(b.ln2),
                               mlp_fc=linear_weights(b.ffwd.net[0]),
                               mlp_proj=linear_weights(b.ffwd.net[2]))
                  for b in self.blocks]
        rotary = self.blocks[0].sa.rotary  # every block holds the same tables
        return DecoderWeights(token_embedding=self.token_embedding_table.weight,
                              position_embedding=None if c.rotary
                              else self.position_embedding_table.weight,
                              layers=layers, ln_f=norm_weights(self.ln_f),
                              head=linear_weights(self.lm_head), n_head=c.n_head,
                              activation=F.relu, block_size=c.block_size, qk_norm=c.qk_norm,
                              rotary=(rotary.cos, rotary.sin) if c.rotary else None)


# ---- speed: the ReLU's backward under --compile (docs/speedrun.md) -----------------------

class ReLU(nn.Module):
    """max(x, 0), as nn.ReLU, with a backward that torch.compile turns into fast code (below)."""

    def forward(self, x):
        return ReLUFromOutput.apply(x)


class ReLUFromOutput(torch.autograd.Function):
    """ReLU whose gradient is read from its output. Under torch.compile, nn.ReLU's backward test
    (output <= 0) is moved into the forward and saved as a boolean tensor, being smaller than a
    float, and Inductor's boolean stores are slow on AVX2 CPUs (2.6 ms instead of 0.03 ms for a
    768x512 activation). Multiplying by sign(output), a float computed from an output that is
    kept anyway, leaves nothing extra to save."""

    @staticmethod
    def forward(ctx, x):
        out = F.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        if torch.compiler.is_compiling():
            return grad * out.sign()
        return torch.ops.aten.threshold_backward(grad, out, 0)  # nn.ReLU's own, one pass
