"""The character-level transformer of the "Zero to Hero" lectures.

The folder is called bigram for history; the model is a decoder-only transformer:
token + learned position embeddings, n_layer pre-LayerNorm blocks of multi-head causal
self-attention and a 4x ReLU feed-forward, a final LayerNorm, and a linear head.
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


class MultiHeadAttention(nn.Module):
    """n_head causal self-attention heads side by side, then a projection back to n_embd."""

    def __init__(self, config: BigramConfig):
        super().__init__()
        self.n_head = config.n_head
        # query, key and value of every head in one product (the lectures' three per head)
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, config: BigramConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.ReLU(),
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
        """Logits for every position (or only the last when no targets), and the mean loss."""
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device)
        x = self.token_embedding_table(idx) + self.position_embedding_table(positions)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def decoder_weights(self) -> DecoderWeights:
        """The weights in the layout lmkit.decoder runs for fast cached sampling."""
        layers = [LayerWeights(ln_1=norm_weights(b.ln1),
                               attn_qkv=linear_weights(b.sa.qkv),
                               attn_proj=linear_weights(b.sa.proj),
                               ln_2=norm_weights(b.ln2),
                               mlp_fc=linear_weights(b.ffwd.net[0]),
                               mlp_proj=linear_weights(b.ffwd.net[2]))
                  for b in self.blocks]
        return DecoderWeights(token_embedding=self.token_embedding_table.weight,
                              position_embedding=self.position_embedding_table.weight,
                              layers=layers, ln_f=norm_weights(self.ln_f),
                              head=linear_weights(self.lm_head), n_head=self.config.n_head,
                              activation=F.relu)
