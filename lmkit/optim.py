"""The optimizer: AdamW, with weight decay on matrices and embeddings only."""
import torch

from lmkit import device as dev


def make_optimizer(model, cfg, device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=dev.has_fused_adamw(device))


def set_learning_rate(optimizer, lr: float) -> None:
    """This step's rate: lr, times a group's lr_scale where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
