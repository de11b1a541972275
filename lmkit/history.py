"""A training run's bookkeeping: steps, tokens, losses, evaluations, best val loss, time."""
import math
import time

import torch

from lmkit import device as dev


class TrainingHistory:
    """Everything a run counts and keeps, and the part of the checkpoint that holds it.

    The loss of each step stays on the device until the next log step, where the window's
    mean is read in one go (with the first step whose loss or gradient was not finite): the
    hot loop then never waits for the device.
    """

    def __init__(self, tokens_per_step: int, device: torch.device):
        self.tokens_per_step = tokens_per_step
        self.step = 0
        self.tokens_seen = 0
        self.metrics = []     # one row per evaluation (lmkit.reporting.METRIC_FIELDS)
        self.loss_curve = []  # [step, mean training loss since the previous log step]
        self.best_val = math.inf
        self.saved_step = 0   # the step last.pt holds
        self.elapsed_before = 0.0  # wall time of earlier sessions of a resumed run
        self.session_start = time.time()
        self.window_losses = []
        self.window_start = time.time()
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.train_seconds, self.tokens_at_eval = 0.0, 0

    def record_step(self, loss: torch.Tensor, grad_norm, seconds: float) -> int:
        """Count one finished optimizer step; return its number. grad_norm None: not checked."""
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.train_seconds += seconds
        bad = ~torch.isfinite(loss)
        if grad_norm is not None:
            bad |= ~torch.isfinite(grad_norm)
        self.first_bad = torch.where(bad & (self.first_bad < 0), self.step, self.first_bad)
        self.window_losses.append(loss)
        return self.step

    def first_non_finite_step(self):
        """The first step whose loss or gradient was NaN or infinite, or None."""
        step = self.first_bad.item()
        return step if step >= 0 else None

    def close_window(self, procs) -> tuple:
        """(mean training loss over all processes, tokens/s) since the previous log step."""
        mean = dev.all_reduce_sum(torch.stack(self.window_losses).mean(), procs).item()
        mean /= procs.world_size
        rate = (len(self.window_losses) * self.tokens_per_step
                / max(time.time() - self.window_start, 1e-9))
        self.loss_curve.append([self.step, mean])
        self.window_losses, self.window_start = [], time.time()
        return mean, rate

    def elapsed(self) -> float:
        """Wall time of the whole run, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.time() - self.session_start

    def add_evaluation(self, result: dict, lr: float) -> bool:
        """Keep one evaluation's row; return whether its val loss is the best so far."""
        rate = (self.tokens_seen - self.tokens_at_eval) / max(self.train_seconds, 1e-9)
        self.train_seconds, self.tokens_at_eval = 0.0, self.tokens_seen
        self.metrics.append({"step": self.step, "lr": lr, **result,
                             "tokens_seen": self.tokens_seen,
                             "elapsed_s": round(self.elapsed(), 3), "tokens_per_s": round(rate, 1)})
        self.window_start = time.time()  # the evaluation's time is not training throughput
        is_best = result["val_loss"] <= self.best_val
        self.best_val = min(self.best_val, result["val_loss"])
        return is_best

    def best(self) -> dict:
        return min(self.metrics, key=lambda m: m["val_loss"])

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "metrics": list(self.metrics),
                "loss_curve": [list(p) for p in self.loss_curve], "best_val_loss": self.best_val,
                "elapsed_s": self.elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self.step = self.saved_step = state["step"]
        self.tokens_seen = self.tokens_at_eval = state["tokens_seen"]
        self.metrics = list(state["metrics"])
        self.loss_curve = [list(p) for p in state["loss_curve"]]
        self.best_val = state["best_val_loss"]
        self.elapsed_before = state["elapsed_s"]
        self.session_start = time.time()
