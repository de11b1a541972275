"""A GPT-2-style language model over tiktoken's GPT-2 BPE.

Pre-LayerNorm blocks of fused-QKV causal self-attention (scaled_dot_product_attention) and a
4x GELU MLP, learned position embeddings, token embedding tied to the output head, init
std 0.02 with residual projections scaled by (2 * n_layer) ** -0.5, vocabulary padded to
50304 (a multiple of 64) for faster matrix multiplies.

GPTConfig's last two fields are options from the modded-nanogpt speedrun, each off by default
(the GPT-2 model above): rotary position embeddings and QK-norm.

The file reads alone, top to bottom. lmkit appears only in decoder_weights, the model's last
method, which lists its weights for the shared fast sampler and the Hugging Face export; the
chunked loss of the output head, written for speed, closes the file.
"""
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

from lmkit.decoder import DecoderWeights, LayerWeights, linear_weights, norm_weights


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    bias: bool = True
    rotary: bool = False   # rotate queries and keys by position instead of wpe
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        head_size = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        self.rotary = Rotary(head_size, config.block_size) if config.rotary else None

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        if self.qk_norm:  # each head's queries and keys to RMS 1, without gains
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if not config.rotary:
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        """Both models' one contract. Without targets (generation): the last position's logits
        (B, 1, vocab_size) and None. With targets (training and evaluation, train or eval
        mode alike): None and the mean cross-entropy loss."""
        B, T = idx.shape
        x = self.wte(idx)
        if not self.config.rotary:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        # Training never needs the (B, T, vocab) logits themselves, only the loss: head_loss
        # (at the end of the file) computes it in chunks of rows.
        return None, head_loss(x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T))

    def decoder_weights(self) -> DecoderWeights:
        """The weights in the layout lmkit.decoder runs for fast cached sampling."""
        c = self.config
        layers = [LayerWeights(ln_1=norm_weights(b.ln_1),
                               attn_qkv=linear_weights(b.attn.c_attn),
                               attn_proj=linear_weights(b.attn.c_proj),
                               ln_2=norm_weights(b.ln_2),
                               mlp_fc=linear_weights(b.mlp.c_fc),
                               mlp_proj=linear_weights(b.mlp.c_proj))
                  for b in self.h]
        rotary = self.h[0].attn.rotary  # every block holds the same tables
        return DecoderWeights(token_embedding=self.wte.weight,
                              position_embedding=None if c.rotary else self.wpe.weight,
                              layers=layers, ln_f=norm_weights(self.ln_f),
                              head=linear_weights(self.lm_head), n_head=c.n_head,
                              activation=partial(F.gelu, approximate="tanh"),
                              block_size=c.block_size, qk_norm=c.qk_norm,
                              rotary=(rotary.cos, rotary.sin) if c.rotary else None)


# ---- speed: the output head's loss without all its logits (docs/performance.md) -------------

class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the output head, x @ weight.T, without all logits at once.

    The gradient of cross-entropy with respect to the logits is softmax minus one-hot, so
    each chunk of rows computes its loss and its gradients for x and weight right away and
    drops its logits; backward only scales them. With a 50304-token vocabulary this saves
    most of the memory traffic of the plain logits -> log_softmax -> nll path, which is the
    bulk of a CPU training step. The result equals F.cross_entropy(x @ weight.T, targets).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        n, device = x.size(0), x.device.type
        # Under autocast, multiply in its dtype, casting the weight once rather than per chunk.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x_mm, weight_mm = x.to(dtype), weight.to(dtype)
            loss = torch.zeros((), device=x.device)
            grad_x = torch.empty(x.shape, dtype=dtype, device=x.device)
            grad_weight = torch.zeros(weight.shape, device=x.device)
            for start in range(0, n, chunk_rows):
                rows = slice(start, start + chunk_rows)
                target_chunk = targets[rows, None]
                logits = (x_mm[rows] @ weight_mm.t()).float()
                logits -= logits.amax(dim=-1, keepdim=True)  # for a stable exp
                target_logits = logits.gather(1, target_chunk)
                probs = logits.exp_()  # unnormalised, in place
                sums = probs.sum(dim=-1, keepdim=True)
                loss += (sums.log() - target_logits).sum()
                grad_logits = probs.div_(sums * n)  # (softmax - one_hot) / n, in two steps
                grad_logits.scatter_add_(1, target_chunk, torch.full_like(target_logits, -1.0 / n))
                grad_logits = grad_logits.to(dtype)
                grad_x[rows] = grad_logits @ weight_mm
                grad_weight += grad_logits.t() @ x_mm[rows]
        ctx.save_for_backward(grad_x.to(x.dtype), grad_weight)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None


def head_loss(x, weight, targets, chunk_rows=128):
    """Mean cross-entropy of logits x @ weight.T against targets, chunked over rows."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedHeadLoss.apply(x, weight, targets, chunk_rows)
    loss = torch.zeros((), device=x.device)
    for start in range(0, x.size(0), chunk_rows):
        logits = (x[start:start + chunk_rows] @ weight.t()).float()
        loss += F.cross_entropy(logits, targets[start:start + chunk_rows], reduction="sum")
    return loss / x.size(0)
