"""Learning-rate schedule: linear warmup, then cosine decay to min_lr (or a constant rate)."""
import math


def warmup_steps(cfg) -> int:
    return cfg.max_iters // 4 if cfg.warmup_iters < 0 else cfg.warmup_iters


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    warmup = warmup_steps(cfg)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if step >= cfg.max_iters:
        return cfg.min_lr
    progress = (step - warmup) / max(1, cfg.max_iters - warmup)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)
