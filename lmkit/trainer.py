"""The training loop both models share: data, accumulation, schedule, eval, checkpoints, plots.

A train.py script describes its model with a ModelSpec and calls main(); everything else
(devices, torchrun, resume, metrics, the loss plot and the final sample) happens here.
"""
import csv
import io
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lmkit import device as dev
from lmkit.checkpoint import load_checkpoint, save_checkpoint
from lmkit.config import PER_INVOCATION, parse_config, validate
from lmkit.data import BatchSampler, eval_windows, load_meta, load_split, window_batches
from lmkit.errors import UserError
from lmkit.files import REPO_ROOT, atomic_write_text, ensure_writable_dirs, remove_stale_temp_files
from lmkit.generate import generate
from lmkit.plotting import plot_losses
from lmkit.schedule import lr_at
from lmkit.tokenizers import start_ids, tokenizer_from_meta

# What --resume needs beyond what sampling needs (see lmkit.checkpoint.REQUIRED_KEYS).
RESUME_KEYS = ("train_config", "optimizer", "tokens_seen", "loss_curve", "best_val_loss",
               "elapsed_s", "rank_states")
METRIC_FIELDS = ("step", "lr", "train_loss", "val_loss", "val_bpc", "tokens_seen", "elapsed_s",
                 "tokens_per_s")


@dataclass
class ModelSpec:
    """What the shared loop needs to know about one model family."""
    kind: str             # "bigram" or "gpt": also the default run name
    tokenizer: str        # which prepared data the model reads: "char" or "gpt2"
    model_cls: type
    config_cls: type      # the model's config dataclass
    pad_vocab_to: int = 1  # round the tokenizer's vocabulary up to a multiple of this
    default_top_k: int = None  # sampling's default --top-k

    def model_config(self, cfg, vocab_size: int):
        vocab = -(-vocab_size // self.pad_vocab_to) * self.pad_vocab_to
        values = {f.name: getattr(cfg, f.name) for f in fields(self.config_cls) if hasattr(cfg, f.name)}
        return self.config_cls(**{**values, "vocab_size": vocab})


@dataclass
class RunPaths:
    checkpoints: Path
    plots: Path
    samples: Path

    @classmethod
    def for_run(cls, out_dir: Path, run: str) -> "RunPaths":
        return cls(out_dir / "checkpoints" / run, out_dir / "plots" / run, out_dir / "samples" / run)

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.checkpoints / "metrics.csv"

    @property
    def plot(self) -> Path:
        return self.plots / "loss_plot.png"


class StopRequest:
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.previous = None
        self.announce = announce

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nstopping after this step (Ctrl-C again to abort without saving)",
                  file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def make_optimizer(model, cfg, device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=dev.has_fused_adamw(device))


def resolve_config(cfg, explicit: dict, saved: dict):
    """On --resume, flags the user left out take the checkpoint's values."""
    values = {k: v for k, v in saved.items() if k not in PER_INVOCATION}
    values.update(explicit)
    values["resume"] = True
    return type(cfg)(**{k: v for k, v in values.items() if k in cfg.to_dict()})


def check_compatible(state: dict, spec: ModelSpec, model_config, meta: dict, path: Path) -> None:
    diffs = []
    if state["kind"] != spec.kind:
        diffs.append(f"model kind {state['kind']} -> {spec.kind}")
    if state["meta"].get("tokenizer") != meta.get("tokenizer"):
        diffs.append(f"tokenizer {state['meta'].get('tokenizer')} -> {meta.get('tokenizer')}")
    elif state["meta"].get("chars") != meta.get("chars"):
        diffs.append("character vocabulary of the data")
    saved = state["model_config"]
    for name, value in vars(model_config).items():
        if name != "dropout" and saved.get(name) != value:
            diffs.append(f"{name} {saved.get(name)} -> {value}")
    if diffs:
        raise UserError(f"cannot resume from {path}: it differs in {', '.join(diffs)}; drop the "
                        "changed flags, or start a new model with --run NAME")


class Trainer:
    def __init__(self, cfg, explicit: dict, spec: ModelSpec):
        self.procs, self.device = dev.start_processes(cfg.device)
        self.spec = spec
        self.run = cfg.run or spec.kind
        out_dir = Path(cfg.out_dir) if cfg.out_dir else REPO_ROOT
        self.paths = RunPaths.for_run(out_dir, self.run)
        if self.procs.is_main:
            for folder in (self.paths.checkpoints, self.paths.plots, self.paths.samples):
                remove_stale_temp_files(folder)
        state = None
        if cfg.resume:
            if not self.paths.last.is_file():
                raise UserError(f"nothing to resume: {self.paths.last} does not exist; train "
                                f"without --resume first (python {spec.kind}/train.py)")
            state = load_checkpoint(self.paths.last)
            cfg = resolve_config(cfg, explicit, state.get("train_config", {}))
        validate(cfg)
        if cfg.data_dir:  # remembered for --resume, which may run from another folder
            cfg = replace(cfg, data_dir=str(Path(cfg.data_dir).resolve()))
        self.cfg = cfg
        self.data_dir = Path(cfg.data_dir) if cfg.data_dir else REPO_ROOT / "data" / spec.tokenizer
        if not cfg.resume and self.paths.last.is_file():
            if not cfg.overwrite:
                raise UserError(f"{self.paths.checkpoints} already holds a run; continue it with "
                                "--resume, start another with --run NAME, or replace it with "
                                "--overwrite")
            if self.procs.is_main:  # no file of the old run may outlive the start of the new one
                for old in (self.paths.last, self.paths.best, self.paths.metrics, self.paths.plot):
                    old.unlink(missing_ok=True)
        if self.procs.is_main:
            ensure_writable_dirs(self.paths.checkpoints, self.paths.plots, self.paths.samples)
        self.meta = load_meta(self.data_dir)
        if self.meta.get("tokenizer") != spec.tokenizer:
            raise UserError(f"{self.data_dir} holds {self.meta.get('tokenizer')} tokens but the "
                            f"{spec.kind} model reads {spec.tokenizer} tokens; fix --data-dir")
        self.train_tokens = load_split(self.data_dir, "train", self.meta)
        self.val_tokens = load_split(self.data_dir, "val", self.meta)
        if len(self.val_tokens) < cfg.block_size + 1:
            raise UserError(f"--block-size {cfg.block_size} is longer than the validation split "
                            f"({len(self.val_tokens)} tokens); use --block-size "
                            f"{len(self.val_tokens) - 1} or less, or a longer text")
        if cfg.grad_accum_steps % self.procs.world_size:
            raise UserError(f"--grad-accum-steps {cfg.grad_accum_steps} does not divide among "
                            f"{self.procs.world_size} processes; make it a multiple of "
                            f"{self.procs.world_size}", exit_code=2)
        self.accum_steps = cfg.grad_accum_steps // self.procs.world_size
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps
        self.model_config = spec.model_config(cfg, self.meta["vocab_size"])
        self.dtype = dev.compute_dtype(self.device, cfg.dtype, large_matmuls=
                                       cfg.n_embd >= 256 or self.model_config.vocab_size >= 8192)
        if state is not None:
            check_compatible(state, spec, self.model_config, self.meta, self.paths.last)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.model = spec.model_cls(self.model_config).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.sampler = BatchSampler(self.train_tokens, cfg.block_size, cfg.batch_size, seed=cfg.seed)
        torch.manual_seed(cfg.seed + 1000 * self.procs.rank + 1)  # dropout differs per rank
        self.step, self.saved_step, self.tokens_seen = 0, 0, 0
        self.metrics, self.elapsed = [], 0.0
        self.loss_curve = []  # [step, mean training loss since the previous log] pairs
        self.best_val = math.inf
        if state is not None:
            self._restore(state)
        self.forward_model = self.model
        if cfg.compile:
            self.forward_model = torch.compile(self.model)
        if self.procs.distributed:
            self.forward_model = DistributedDataParallel(self.forward_model,
                                                         device_ids=dev.ddp_device_ids(self.device))

    # ---- state -------------------------------------------------------------------------
    def _restore(self, state: dict) -> None:
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise UserError(f"{self.paths.last} lacks {', '.join(missing)} (written by an older "
                            "version of this project); it can still be sampled, but start a new "
                            "run to train on")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # load_state_dict brings back the saved hyperparameters; flags given now win.
        fresh = make_optimizer(self.model, self.cfg, self.device)
        for group, wanted in zip(self.optimizer.param_groups, fresh.param_groups):
            group.update({k: v for k, v in wanted.items() if k != "params"})
        self.step = self.saved_step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.metrics = list(state["metrics"])
        self.loss_curve = [list(p) for p in state["loss_curve"]]
        self.elapsed = state["elapsed_s"]
        self.best_val = state["best_val_loss"]
        ranks = state["rank_states"]
        rank = self.procs.rank
        if len(ranks) == self.procs.world_size:
            self.sampler.set_state(ranks[rank]["sampler"])
            dev.set_rng_state(ranks[rank]["rng"], self.device)
        else:
            # Batch generators are identical on every rank (see BatchSampler), so the data
            # order carries over; dropout streams are per rank, so start fresh ones that
            # depend on the step, keeping the resumed run reproducible.
            self.sampler.set_state(ranks[0]["sampler"])
            torch.manual_seed(self.cfg.seed + 1000 * rank + 7919 * self.step + 1)
            if self.procs.is_main:
                print(f"resuming a {len(ranks)}-process run with {self.procs.world_size} "
                      "processes: weights, optimizer, step and data order are exact; dropout "
                      "masks are new")

    def _state(self) -> dict:
        mine = {"sampler": self.sampler.state(),
                "rng": {k: v.cpu() for k, v in dev.rng_state(self.device).items()}}
        ranks = dev.all_gather_objects(mine, self.procs)
        return {
            "version": 1,
            "kind": self.spec.kind,
            "model_config": vars(self.model_config).copy(),
            "train_config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "metrics": list(self.metrics),
            "loss_curve": [list(p) for p in self.loss_curve],
            "best_val_loss": self.best_val,
            "elapsed_s": self.elapsed,
            "rank_states": ranks,
            "meta": self.meta,
        }

    # ---- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Val loss over every token of the val split (sharded across ranks), train loss on
        eval_iters random batches, and val bits per character."""
        cfg, model = self.cfg, self.model
        model.eval()
        sums = torch.zeros(4, dtype=dev.accumulator_dtype(self.device), device=self.device)
        windows = eval_windows(self.val_tokens, cfg.block_size)[self.procs.rank::self.procs.world_size]
        with dev.autocast(self.device, self.dtype):
            for x, y in window_batches(self.val_tokens, windows, cfg.batch_size, self.device):
                _, loss = model(x, y)
                sums[0] += loss.to(sums.dtype) * y.numel()
                sums[1] += y.numel()
            train_sampler = BatchSampler(self.train_tokens, cfg.block_size, cfg.batch_size,
                                         seed=cfg.seed + 1000 * self.procs.rank + 104729 * self.step)
            for _ in range(self.procs.rank, cfg.eval_iters, self.procs.world_size):
                _, loss = model(*train_sampler.next_batch(self.device))
                sums[2] += loss.to(sums.dtype)
                sums[3] += 1
        model.train()
        val_loss, n_val, train_loss, n_train = dev.all_reduce_sum(sums, self.procs).tolist()
        val_loss /= n_val
        bpc = val_loss * self.meta["n_val_tokens"] / self.meta["n_val_chars"] / math.log(2)
        return {"train_loss": train_loss / n_train, "val_loss": val_loss, "val_bpc": bpc}

    # ---- outputs (rank 0) ---------------------------------------------------------------
    def _write_metrics(self) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.metrics)
        atomic_write_text(self.paths.metrics, out.getvalue())

    def _plot(self) -> None:
        stride = max(1, self.cfg.max_iters // 500)
        steps = list(range(0, self.cfg.max_iters + 1, stride))
        name = self.run if self.run == self.spec.kind else f"{self.run} ({self.spec.kind})"
        plot_losses(self.paths.plot, self.metrics, self.loss_curve, steps,
                    [lr_at(s, self.cfg) for s in steps], self.tokens_per_step,
                    f"{name}: {self.model.num_params() / 1e6:.2f}M parameters")

    def write_sample(self) -> Path:
        tokenizer = tokenizer_from_meta(self.meta)
        idx = torch.tensor([start_ids(tokenizer)], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        self.model.eval()
        out = generate(self.model, idx, self.cfg.sample_tokens, top_k=self.spec.default_top_k,
                       generator=generator, vocab_size=self.meta["vocab_size"])
        self.model.train()
        text = tokenizer.decode(out[0, 1:].tolist())
        path = self.paths.samples / "train_sample.txt"
        atomic_write_text(path, f"# {self.run} at step {self.step}, val loss "
                                f"{self.metrics[-1]['val_loss']:.4f}, temperature 1.0\n{text}\n")
        return path

    def checkpoint(self, evaluated: bool) -> None:
        is_best = evaluated and self.metrics[-1]["val_loss"] <= self.best_val
        if is_best:
            self.best_val = self.metrics[-1]["val_loss"]
        state = self._state()  # every rank joins the gathers inside
        if not self.procs.is_main:
            return
        save_checkpoint(self.paths.last, state)
        self.saved_step = self.step
        if is_best:
            save_checkpoint(self.paths.best, state)
        self._write_metrics()
        if evaluated:
            self._plot()

    # ---- the loop -----------------------------------------------------------------------
    def _train_step(self, lr: float) -> tuple:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        batches = self.sampler.step_batches(self.cfg.grad_accum_steps, self.procs.rank,
                                            self.procs.world_size, self.device)
        for micro, (x, y) in enumerate(batches):
            last = micro == self.accum_steps - 1
            sync = nullcontext() if last or not self.procs.distributed else self.forward_model.no_sync()
            with sync:
                with dev.autocast(self.device, self.dtype):
                    _, loss = self.forward_model(x, y)
                (loss / self.accum_steps).backward()
            loss_sum += loss.detach()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.accum_steps, grad_norm

    def _stop_agreed(self, stop: StopRequest) -> bool:
        flag = torch.tensor([float(stop.requested)], device=self.device)
        return dev.all_reduce_sum(flag, self.procs).item() > 0

    def _fail_non_finite(self, step: int) -> None:
        saved = (f"{self.paths.last} still holds step {self.saved_step}" if self.saved_step
                 else "no checkpoint was written")
        raise UserError(f"the loss or gradient became non-finite at step {step}; stopped without "
                        f"saving ({saved}); lower --learning-rate or check the data")

    def fit(self) -> int:
        cfg, main = self.cfg, self.procs.is_main
        if self.step >= cfg.max_iters:
            if main:
                print(f"{self.paths.last} is already at step {self.step}; nothing to do "
                      "(raise --max-iters to train on)")
            return 0
        if main:
            note = dev.slow_dtype_note(self.device, self.dtype)
            if note:
                print(note, file=sys.stderr)
            print(f"{self.spec.kind}: {self.model.num_params():,} parameters, device "
                  f"{self.device}, {str(self.dtype).replace('torch.', '')}, "
                  f"{self.procs.world_size} process(es), {self.tokens_per_step:,} tokens/step")
            if self.step:
                print(f"resuming {self.paths.last} at step {self.step}")
        progress = Progress(self)
        stopped = at_eval = False
        with StopRequest(announce=main) as stop:
            while self.step < cfg.max_iters and not stopped:
                t0 = time.time()
                loss, grad_norm = self._train_step(lr_at(self.step, cfg))
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                progress.record(loss, grad_norm, self.step)
                at_eval = self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters
                at_log = self.step % cfg.log_interval == 0 or at_eval
                if not self.procs.distributed:
                    stopped = stop.requested
                elif at_log:  # ranks agree at log steps only, to keep the hot loop sync-free
                    stopped = self._stop_agreed(stop)
                progress.train_time += time.time() - t0
                if at_log or stopped:
                    progress.log()
                if at_eval:
                    self._evaluate_and_save(progress)
        progress.close()
        if stopped and self.step < cfg.max_iters:
            if not at_eval:
                self.elapsed = progress.elapsed()
                self.checkpoint(evaluated=False)
            if main:
                print(f"stopped at step {self.step}; {self.paths.last} is saved. Continue with:\n"
                      f"  python {self.spec.kind}/train.py --resume"
                      + (f" --run {self.run}" if self.run != self.spec.kind else "")
                      + (f" --out-dir {self.cfg.out_dir}" if self.cfg.out_dir else ""))
            return 130
        if main:
            self._report()
        return 0

    def _evaluate_and_save(self, progress: "Progress") -> None:
        result = self.evaluate()
        self.elapsed = progress.elapsed()
        if not math.isfinite(result["val_loss"]):
            self._fail_non_finite(self.step)
        self.metrics.append({"step": self.step, "lr": lr_at(self.step - 1, self.cfg), **result,
                             "tokens_seen": self.tokens_seen, "elapsed_s": round(self.elapsed, 3),
                             "tokens_per_s": round(progress.train_rate(self.tokens_seen), 1)})
        self.checkpoint(evaluated=True)
        if self.procs.is_main:
            tqdm.write(f"step {self.step}: train {result['train_loss']:.4f}  val "
                       f"{result['val_loss']:.4f}  val bpc {result['val_bpc']:.4f}", file=sys.stdout)
        progress.window_start = time.time()

    def _report(self) -> None:
        sample = self.write_sample() if self.cfg.sample_tokens else None
        best = min(self.metrics, key=lambda m: m["val_loss"])
        print(f"done: best val loss {best['val_loss']:.4f} ({best['val_bpc']:.4f} bits/char) "
              f"at step {best['step']}, {self.elapsed:.0f}s wall time")
        print(f"  checkpoint  {self.paths.best}\n  plot        {self.paths.plot}\n"
              f"  metrics     {self.paths.metrics}" + (f"\n  sample      {sample}" if sample else ""))


class Progress:
    """The running loss and throughput between log steps, a progress bar (or plain lines on a
    non-terminal), and the first step whose loss or gradient was not finite. Reading losses
    back from the device only at log steps keeps the training loop free of host syncs."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        show = trainer.procs.is_main and sys.stderr.isatty()
        self.bar = tqdm(total=trainer.cfg.max_iters, initial=trainer.step, disable=not show,
                        dynamic_ncols=True)
        self.losses, self.window_start = [], time.time()
        self.train_time, self.tokens_at_eval = 0.0, trainer.tokens_seen
        self.elapsed_before, self.run_start = trainer.elapsed, time.time()
        self.first_bad = torch.full((), -1, device=trainer.device, dtype=torch.long)

    def record(self, loss, grad_norm, step: int) -> None:
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        self.losses.append(loss)

    def elapsed(self) -> float:
        """Wall time of the whole run, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.time() - self.run_start

    def train_rate(self, tokens_seen: int) -> float:
        """Training tokens/s since the previous evaluation, evaluation time excluded."""
        rate = (tokens_seen - self.tokens_at_eval) / max(self.train_time, 1e-9)
        self.train_time, self.tokens_at_eval = 0.0, tokens_seen
        return rate

    def log(self) -> None:
        t = self.trainer
        if self.first_bad.item() >= 0:
            t._fail_non_finite(self.first_bad.item())
        mean_loss = dev.all_reduce_sum(torch.stack(self.losses).mean(), t.procs).item()
        mean_loss /= t.procs.world_size
        rate = len(self.losses) * t.tokens_per_step / max(time.time() - self.window_start, 1e-9)
        self.losses, self.window_start = [], time.time()
        t.loss_curve.append([t.step, mean_loss])
        if t.procs.is_main:
            lr = lr_at(t.step - 1, t.cfg)
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
            self.bar.update(t.step - self.bar.n)
            if self.bar.disable:
                print(f"step {t.step}/{t.cfg.max_iters}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                      f"{rate:,.0f} tokens/s", flush=True)

    def close(self) -> None:
        self.bar.close()


def main(config_cls, presets: dict, spec: ModelSpec, description: str, argv=None) -> int:
    cfg, explicit = parse_config(config_cls, presets, description, argv)
    try:
        code = Trainer(cfg, explicit, spec).fit()
        dev.stop_processes(wait_for_all=True)
        return code
    finally:
        dev.stop_processes()
