"""The optimizer: AdamW, with weight decay on matrices and embeddings only; or, with
--optimizer muon, Muon for the matrices inside the transformer blocks and AdamW for the rest
(embeddings, the head, norm gains, biases), stepped as one optimizer. --embedding-lr gives the
embedding tables an AdamW rate of their own.

Muon (Keller Jordan's, from the modded-nanogpt speedrun) replaces each matrix's momentum
update by (roughly) the nearest semi-orthogonal matrix, found with a few Newton-Schulz steps.
torch.optim.Muon runs them in bfloat16; where a device only emulates bfloat16 (CPUs without
AVX-512 BF16 or AMX: 25-35x slower than float32 there), Float32Muon runs the same update
in float32.
"""
import math

import torch
import torch.nn as nn

from lmkit import device as dev


def make_optimizer(model, cfg, device):
    """torch's AdamW (cfg.optimizer "adamw"), or a MuonWithAdamW ("muon")."""
    params = [p for p in model.parameters() if p.requires_grad]
    embeddings = [m.weight for m in model.modules()
                  if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    if cfg.optimizer != "muon":
        return adamw(params, embeddings, cfg, device)
    matrices = block_matrices(model)
    in_muon = {id(p) for p in matrices}
    muon_lr = cfg.muon_lr
    muon_cls = torch.optim.Muon if dev.has_native_bf16(device) else Float32Muon
    # lr_scale: set_learning_rate gives Muon muon_lr where AdamW gets learning_rate, so both
    # follow the same warmup and decay.
    muon = muon_cls([{"params": matrices, "lr_scale": muon_lr / cfg.learning_rate}],
                    lr=muon_lr, momentum=cfg.muon_momentum,
                    weight_decay=cfg.weight_decay)
    rest = [p for p in params if id(p) not in in_muon]
    return MuonWithAdamW(muon, adamw(rest, embeddings, cfg, device))


def adamw(params, embeddings, cfg, device) -> torch.optim.AdamW:
    """Weight decay on tensors of 2+ dimensions; with cfg.embedding_lr, the embedding tables
    in a group of their own at that peak rate (a third group, so that runs without it keep
    the two groups their checkpoints hold)."""
    own_rate = {id(p) for p in embeddings} if cfg.embedding_lr > 0 else set()
    groups = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in own_rate],
               "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if own_rate:
        groups.append({"params": [p for p in params if id(p) in own_rate],
                       "weight_decay": cfg.weight_decay,
                       "lr_scale": cfg.embedding_lr / cfg.learning_rate})
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=dev.has_fused_adamw(device))


def block_matrices(model) -> list:
    """The 2-D weights inside the transformer blocks (the model's nn.ModuleLists), in order."""
    return [p for module in model.modules() if isinstance(module, nn.ModuleList)
            for p in module.parameters() if p.dim() == 2 and p.requires_grad]


def set_learning_rate(optimizer, lr: float) -> None:
    """This step's rate: lr, times a group's lr_scale where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def describe(optimizer) -> str:
    """One line naming the optimizer a run uses, e.g. to print at its start."""
    if isinstance(optimizer, MuonWithAdamW):
        muon = ("Float32Muon (Newton-Schulz in float32: this device has no native bfloat16)"
                if isinstance(optimizer.muon, Float32Muon)
                else "torch.optim.Muon (Newton-Schulz in bfloat16)")
        n_muon = sum(len(g["params"]) for g in optimizer.muon.param_groups)
        n_adamw = sum(len(g["params"]) for g in optimizer.adamw.param_groups)
        return (f"{muon} for {n_muon} block matrices, {describe(optimizer.adamw)} for the other "
                f"{n_adamw} tensors")
    if isinstance(optimizer, torch.optim.AdamW):
        return "AdamW (fused)" if optimizer.defaults.get("fused") else "AdamW"
    return type(optimizer).__name__


class MuonWithAdamW:
    """Muon and AdamW over disjoint parameters, with the one-optimizer interface the trainer
    uses: step, zero_grad, state_dict, load_state_dict, param_groups (AdamW's, then Muon's)
    and state."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list:
        # built on every call: load_state_dict replaces each optimizer's group dicts
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self) -> dict:
        """Each parameter's state (its moments), as torch.optim.Optimizer.state holds it."""
        return {**self.adamw.state, **self.muon.state}

    def step(self):
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True):
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict):
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


def orthogonalize(g: torch.Tensor, coefficients=(3.4445, -4.7750, 2.0315), steps: int = 5,
                  eps: float = 1e-7, dtype=torch.float32) -> torch.Tensor:
    """Muon's Newton-Schulz iteration: roughly U V^T for g = U S V^T, in `dtype`.

    Each step maps every singular value s to a*s + b*s^3 + c*s^5. These coefficients push
    small values up fast and leave the result's singular values between about 0.7 and 1.2
    rather than converging to 1, which Muon does not need.
    """
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: the Gram matrix x x^T is then the smaller one
        x = x.T
    x = x / x.norm().clamp(min=eps)  # the Frobenius norm bounds the largest singular value
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Float32Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32 instead of bfloat16.

    The same hyperparameters, update and state (one momentum buffer per matrix), so either
    class loads the other's state_dict; only the precision of the orthogonalisation differs.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"],
                                       group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * shape_factor(p.shape, group["adjust_lr_fn"]))
        return loss


def shape_factor(shape, adjust_lr_fn) -> float:
    """torch.optim.Muon's per-matrix rate factor for an (out, in) matrix."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):  # every update gets RMS about 1/sqrt(cols)
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0
