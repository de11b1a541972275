"""The training loop both models share (the command around it is lmkit/train_cli.py).

Read `Trainer.fit` for the loop, one screen: each step is `Trainer.train_step` (the step's
batches forward and backward, clipping, the optimizer's update), and around it the loop counts
the step and, when due, reports progress, evaluates and saves, or stops. `Trainer.__init__` sets
a run up in five short phases: read the configuration (and the checkpoint to resume), claim the
run's folder, load the data, build the model and optimizer, restore.
"""
import math
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from lmkit import device as dev
from lmkit.checkpoint import (FORMAT_VERSION, load_checkpoint, load_optimizer_state,
                              save_checkpoint)
from lmkit.config import PER_INVOCATION, recipe_values, split_values, validate
from lmkit.data import (BatchSampler, data_folder_name, eval_windows, load_meta, load_split,
                        same_tokenizer, tokenizer_name, window_batches)
from lmkit.errors import UserError
from lmkit.files import (REPO_ROOT, RunLock, RunPaths, WriteError, atomic_write_text,
                         check_run_name, ensure_writable_dirs, remove_stale_temp_files)
from lmkit.generation import generate
from lmkit.history import TrainingHistory
from lmkit.optim import describe, make_optimizer, set_learning_rate
from lmkit.plotting import plot_losses
from lmkit.reporting import ProgressDisplay, StopRequest, write_metrics
from lmkit.schedule import lr_at
from lmkit.tokenizers import start_ids, tokenizer_from_meta
from lmkit.tracking import Tracking, check_installed, forgotten_flags

# What --resume needs beyond what sampling needs (see lmkit.checkpoint.REQUIRED_KEYS).
RESUME_KEYS = ("train_config", "optimizer", "tokens_seen", "loss_curve", "best_val_loss",
               "elapsed_s", "rank_states")
EVAL_SAMPLE_TOKENS = 100  # the sample each evaluation logs (--tensorboard, --wandb) or shows
# The seeds a run derives from --seed, apart so that no two streams start alike: rank r's sit
# RANK_SEED_STRIDE * r up; streams started at step s, a prime times s up.
RANK_SEED_STRIDE = 1000
DROPOUT_SEED_OFFSET = 1      # rank 0's dropout does not replay the stream the weights came from
DROPOUT_STEP_STRIDE = 7919   # dropout of a run resumed on another number of processes
EVAL_STEP_STRIDE = 104729    # the train batches each evaluation draws


def derived_seed(seed: int, offset: int) -> int:
    """A seed for one purpose (a rank's dropout, an evaluation's batches), in torch's range."""
    return (seed + offset) % 2 ** 63


def dropout_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's dropout stream: from the start (step 0), or from `step` when a run
    resumes on another number of processes."""
    return derived_seed(seed, RANK_SEED_STRIDE * rank + DROPOUT_STEP_STRIDE * step
                        + DROPOUT_SEED_OFFSET)


def eval_batches_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the random train batches a rank's evaluation at `step` averages."""
    return derived_seed(seed, RANK_SEED_STRIDE * rank + EVAL_STEP_STRIDE * step)


def resumed_values(family, flags: dict, state: dict) -> dict:
    """On --resume, flags the user left out take the checkpoint's values."""
    values = recipe_values(family)
    # Checkpoints before the model config had its own flags kept those in train_config too.
    saved = {**state.get("train_config", {}), **state["model_config"]}
    values.update({k: v for k, v in saved.items() if k in values and k not in PER_INVOCATION})
    values.update(flags)
    return values


def check_compatible(state: dict, family, model_config, meta: dict, path: Path,
                     new_data: bool) -> None:
    diffs = []
    if state["kind"] != family.kind:
        diffs.append(f"model kind {state['kind']} -> {family.kind}")
    if tokenizer_name(state["meta"]) != tokenizer_name(meta):
        diffs.append(f"tokenizer {tokenizer_name(state['meta'])} -> {tokenizer_name(meta)}")
    elif not same_tokenizer(state["meta"], meta):
        diffs.append(f"the data's {tokenizer_name(meta)} tokenizer (the same size, other merges: "
                     "learned from another text or another split)")
    saved = state["model_config"]  # with the options added since (lmkit.checkpoint.upgrade)
    for name, value in vars(model_config).items():
        if name != "dropout" and saved.get(name) != value:
            diffs.append(f"{name} {saved.get(name)} -> {value}")
    if diffs:
        raise UserError(f"cannot resume from {path}: it differs in {', '.join(diffs)}; drop the "
                        "changed flags, or start a new model with --run NAME")
    saved_text, text = state["meta"].get("source_sha256"), meta.get("source_sha256")
    if saved_text and text and saved_text != text and not new_data:
        raise UserError(f"the data was prepared from another text since {path} was saved (sha256 "
                        f"{saved_text[:12]}... then, {text[:12]}... now); prepare the old text "
                        "again, or add --new-data to continue on the new one")


class Trainer:
    def __init__(self, family, flags: dict):
        """flags: the values the user chose (lmkit.config.parse_flags)."""
        self.family = family
        self.lock = None  # rank 0 owns the run folder from _claim_run_folder on; close() lets go
        self.tracking = Tracking()  # rank 0's TensorBoard and W&B writers, if asked for
        self.replacing = False  # --overwrite: the old run's files stay until the first save
        try:
            state = self._configure(flags)
            self.procs, self.device = dev.start_processes(self.cfg.device, self.cfg.peer_timeout)
            self.is_main = self.procs.is_main
            self._claim_run_folder()
            self._load_data()
            self._build_model_and_optimizer()
            self.history = TrainingHistory(self.tokens_per_step, self.device)
            if state is not None:
                self._restore(state)
            if self.is_main:  # only rank 0 logs
                config = {"kind": self.family.kind, **self.cfg.to_dict(), **vars(self.model_config)}
                self.tracking = Tracking.open(self.cfg, self.paths.checkpoints, self.run,
                                              self.history.step, config)
        except BaseException:
            self.close()
            raise
        self.forward_model = self.model  # what the training step calls: compiled, DDP-wrapped
        if self.cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        if self.procs.distributed:
            self.forward_model = DistributedDataParallel(
                self.forward_model, device_ids=dev.ddp_device_ids(self.device))
        # fit() installs its Ctrl-C handler; under torchrun rank 0 announces a stop once the
        # processes agree on it (torchrun's SIGTERM after a crash stops nothing: the crash does)
        self.stop = StopRequest(announce=self.is_main and not self.procs.distributed)
        latest = self.history.metrics[-1]["val_bpc"] if self.history.metrics else None
        self.display = ProgressDisplay(enabled=self.is_main, val_bpc=latest)

    # ---- setup, in the order __init__ runs it -----------------------------------------------
    def _configure(self, flags: dict):
        """The run's name, folders and configuration, and the checkpoint to resume (or None)."""
        self.run = check_run_name(flags.get("run") or self.family.kind)
        out_dir = Path(flags["out_dir"]) if flags.get("out_dir") else REPO_ROOT
        self.paths = RunPaths.for_run(out_dir, self.run)
        state, values = None, {**recipe_values(self.family), **flags}
        if values["resume"]:
            if not self.paths.last.is_file():
                raise UserError(f"nothing to resume: {self.paths.last} does not exist; train "
                                f"without --resume first (python {self.family.kind}/train.py)")
            # Reading is safe even beside a running writer, which replaces whole files.
            state = load_checkpoint(self.paths.last, self.family)
            values = resumed_values(self.family, flags, state)
        cfg, self.model_values = split_values(self.family, values)
        validate(cfg, self.model_values)
        check_installed(cfg)  # --tensorboard, --wandb: refused before anything is written
        if cfg.compile:
            dev.check_can_compile()
        if cfg.data_dir:  # remembered for --resume, which may run from another folder
            cfg = replace(cfg, data_dir=str(Path(cfg.data_dir).resolve()))
        self.cfg = cfg
        self.pretrained = None  # the state_dict --init-from starts from
        if cfg.init_from and self.family.load_pretrained is None:
            raise UserError(f"--init-from loads GPT-2 weights, for the gpt model only; the "
                            f"{self.family.kind} model starts from random weights", exit_code=2)
        if cfg.init_from and state is None:
            if cfg.data_dir:  # refused before GPT-2's weights take their time to load
                self._check_reads_gpt2_tokens(cfg.data_dir, load_meta(cfg.data_dir))
            values, self.pretrained = self.family.load_pretrained(
                cfg.init_from, self.model_values["block_size"])
            self.model_values.update(values)  # its architecture and vocabulary win
        elif cfg.init_from:  # resuming a fine-tune: the checkpoint holds the weights
            self.model_values["vocab_size"] = state["model_config"]["vocab_size"]
        self.default_data = self._default_data(state)
        return state

    def _default_data(self, state) -> str:
        """The folder in data/ read when --data-dir is not given."""
        if self.cfg.init_from:  # GPT-2's weights read GPT-2's tokens
            return "gpt2"
        if state is not None:  # the run's own tokenizer (an older run's default was gpt2)
            return data_folder_name(state["meta"]["tokenizer"], state["meta"]["vocab_size"])
        return self.family.default_data

    @staticmethod
    def _check_reads_gpt2_tokens(data_dir, meta: dict) -> None:
        """--init-from: GPT-2's weights read GPT-2's tokens."""
        if meta["tokenizer"] != "gpt2":
            raise UserError(f"--init-from starts from GPT-2's weights, which read GPT-2 tokens, "
                            f"but {data_dir} holds {tokenizer_name(meta)} tokens; use "
                            "--data-dir data/gpt2, or leave --data-dir out")

    def _claim_run_folder(self) -> None:
        """Become the run's only writer (rank 0), then check its folders can take the outputs.
        Nothing in them changes before the lock is held."""
        paths = self.paths
        if not self.cfg.resume and paths.last.is_file():
            if not self.cfg.overwrite:
                raise UserError(f"{paths.checkpoints} already holds a run; continue it with "
                                "--resume, start another with --run NAME, or replace it with "
                                "--overwrite")
            self.replacing = True  # the old run's files go once the new one has saved
        if not self.is_main:
            return
        self.lock = RunLock(paths.checkpoints)
        self.lock.acquire(f"run {self.run!r} ({paths.checkpoints})")
        for folder in (paths.checkpoints, paths.plots, paths.samples):
            remove_stale_temp_files(folder)
        for path in (paths.last, paths.best, paths.metrics):
            if path.exists() and not path.is_file():
                raise UserError(f"{path} is not a file (a folder?); move it away so the run can "
                                "write its checkpoints there")
        ensure_writable_dirs(paths.checkpoints, paths.plots, paths.samples)

    def _load_data(self) -> None:
        family = self.family
        self.data_dir = (Path(self.cfg.data_dir) if self.cfg.data_dir
                         else REPO_ROOT / "data" / self.default_data)
        self.meta = load_meta(self.data_dir)
        if self.meta["tokenizer"] not in family.tokenizers:
            raise UserError(f"{self.data_dir} holds {tokenizer_name(self.meta)} tokens but the "
                            f"{family.kind} model reads {' or '.join(family.tokenizers)} tokens; "
                            f"fix --data-dir (data/{family.default_data} is the default)")
        if self.cfg.init_from:
            self._check_reads_gpt2_tokens(self.data_dir, self.meta)
        self.train_tokens = load_split(self.data_dir, "train", self.meta)
        self.val_tokens = load_split(self.data_dir, "val", self.meta)
        block_size = self.model_values["block_size"]
        if len(self.val_tokens) < block_size + 1:
            raise UserError(f"--block-size {block_size} is longer than the validation split "
                            f"({len(self.val_tokens)} tokens); use --block-size "
                            f"{len(self.val_tokens) - 1} or less, or a longer text")
        # The val loss averages over every token but the first: count the characters it covers.
        self.tokenizer = tokenizer_from_meta(self.meta)  # built once: samples decode with it
        first = self.tokenizer.decode([int(self.val_tokens[0])])
        self.val_target_chars = max(1, self.meta["n_val_chars"] - len(first))

    def _build_model_and_optimizer(self) -> None:
        cfg, procs = self.cfg, self.procs
        if cfg.grad_accum_steps % procs.world_size:
            raise UserError(f"--grad-accum-steps {cfg.grad_accum_steps} does not divide among "
                            f"{procs.world_size} processes; make it a multiple of "
                            f"{procs.world_size}", exit_code=2)
        self.model_config = self.family.model_config(self.model_values, self.meta["vocab_size"])
        config = self.model_config
        self.tokens_per_step = cfg.batch_size * config.block_size * cfg.grad_accum_steps
        self.dtype = dev.compute_dtype(self.device, cfg.dtype, large_matmuls=
                                       config.n_embd >= 256 or config.vocab_size >= 8192)
        dev.check_training_fits(self.family.model_cls, config, cfg.batch_size,
                                cfg.grad_accum_steps, self.device)
        with dev.RandomStream(cfg.seed, torch.device("cpu")):  # the same weights on every rank
            self.model = self.family.model_cls(config)
        if self.pretrained is not None:
            self.model.load_state_dict(self.pretrained)
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=dev.needs_grad_scaler(self.dtype))
        self.sampler = BatchSampler(self.train_tokens, config.block_size, cfg.batch_size,
                                    seed=cfg.seed)
        self.dropout = dev.RandomStream(dropout_seed(cfg.seed, procs.rank), self.device)

    def _restore(self, state: dict) -> None:
        check_compatible(state, self.family, self.model_config, self.meta, self.paths.last,
                         self.cfg.new_data)
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise UserError(f"{self.paths.last} lacks {', '.join(missing)} (written by an older "
                            "version of this project); it can still be sampled, but start a new "
                            "run to train on")
        saved_optimizer = state["train_config"].get("optimizer", "adamw")
        if saved_optimizer != self.cfg.optimizer:
            raise UserError(f"{self.paths.last} was trained with --optimizer {saved_optimizer}, "
                            f"whose state does not fit {self.cfg.optimizer}; resume with "
                            f"--optimizer {saved_optimizer}, or start a new run with --run NAME")
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"], self.paths.last)
        # load_state_dict brings back the saved hyperparameters; flags given now win.
        fresh = make_optimizer(self.model, self.cfg, self.device)
        for group, wanted in zip(self.optimizer.param_groups, fresh.param_groups):
            group.update({k: v for k, v in wanted.items() if k != "params"})
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.history.load_state_dict(state)
        ranks, rank = state["rank_states"], self.procs.rank
        if len(ranks) == self.procs.world_size:
            self.sampler.set_state(ranks[rank]["sampler"])
            self.dropout.load_state_dict(ranks[rank]["rng"])
            return
        # Batch generators are identical on every rank (see BatchSampler), so the data order
        # carries over; dropout streams are per rank, so start fresh ones that depend on the
        # step, keeping the resumed run reproducible.
        self.sampler.set_state(ranks[0]["sampler"])
        self.dropout = dev.RandomStream(dropout_seed(self.cfg.seed, rank, self.history.step),
                                        self.device)
        if self.is_main:
            print(f"resuming a {len(ranks)}-process run with {self.procs.world_size} processes: "
                  "weights, optimizer, step and data order are exact; dropout masks are new")

    # ---- the loop, and the step it repeats --------------------------------------------------
    def fit(self) -> int:
        """Train to --max-iters, or until a stop is asked for (then save); returns the exit code."""
        cfg = self.cfg
        if self.history.step >= cfg.max_iters:
            if self.is_main:
                print(f"{self.paths.last} is already at step {self.history.step}; nothing to do "
                      "(raise --max-iters to train on)")
            return 0
        if self.is_main:
            self._announce()
        self.display.start(self.history.step, cfg.max_iters)
        stopping = False
        with self.stop:  # Ctrl-C, SIGTERM, SIGHUP: stop after this step, saved
            while self.history.step < cfg.max_iters and not stopping:
                started, step = time.time(), self.history.step + 1  # step: the one taken now
                lr = lr_at(self.history.step, cfg)
                loss, grad_norm = self.train_step(lr)
                at_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
                at_log = step % cfg.log_interval == 0 or at_eval
                if at_log:  # on a GPU, time the work done rather than the work queued
                    dev.synchronize(self.device)
                self.history.record_step(loss, grad_norm, time.time() - started)
                stopping = self._stop_requested(at_log)
                if at_log or stopping:
                    self.report_progress(step, lr)
                if at_eval:
                    self.evaluate_and_save(step, lr)
                elif stopping:
                    self.save(evaluated=False, is_best=False)
        self.display.close()
        if stopping and self.history.step < cfg.max_iters:
            if self.is_main:
                self._report_stop()
            return self.stop.exit_code()
        if self.is_main:
            self._report()
        return 0

    def train_step(self, lr: float) -> tuple:
        """One optimizer step at learning rate lr: the step's micro-batches forward and backward
        (their gradients add up), then clipping and the optimizer's update. Returns the mean loss
        and the gradient norm as tensors left on the device, so nothing waits for it; the norm is
        None under float16's gradient scaler, whose steps may overflow (it skips those)."""
        set_learning_rate(self.optimizer, lr)
        batches = self.sampler.step_batches(self.cfg.grad_accum_steps, self.procs.rank,
                                            self.procs.world_size, self.device)
        loss_sum = torch.zeros((), device=self.device)
        with self.dropout:  # dropout draws from the run's own random stream
            for micro, (x, y) in enumerate(batches):
                # Under DDP, gradients are averaged across processes after the last micro-batch.
                last = micro == len(batches) - 1
                sync = last or not self.procs.distributed
                with nullcontext() if sync else self.forward_model.no_sync():
                    with dev.autocast(self.device, self.dtype):
                        _, loss = self.forward_model(x, y)
                    self.scaler.scale(loss / len(batches)).backward()
                loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)  # these scaler calls do nothing unless float16
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)  # float16: skipped when the gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / len(batches), None if self.scaler.is_enabled() else grad_norm

    # ---- the bookkeeping around the steps ---------------------------------------------------
    def report_progress(self, step: int, lr: float) -> None:
        """The progress line or bar, and the trackers' train loss; refuses a non-finite loss."""
        self._check_finite()
        loss, tokens_per_s = self.history.close_window(self.procs)
        self.display.show(step, self.cfg.max_iters, loss, lr, tokens_per_s)
        self.tracking.progress(step, loss, lr, tokens_per_s)

    def evaluate_and_save(self, step: int, lr: float) -> None:
        """Evaluate, log the result, save the checkpoints and show the result."""
        result = self.evaluate()
        if not math.isfinite(result["val_loss"]):
            self._fail_non_finite(step)
        sample = self._eval_sample()  # before add_evaluation restarts the throughput clock
        is_best = self.history.add_evaluation(result, lr)
        self.tracking.evaluation(step, result, sample)
        self.save(evaluated=True, is_best=is_best)
        self.display.write(f"step {step}: train {result['train_loss']:.4f}  val "
                           f"{result['val_loss']:.4f}  val bpc {result['val_bpc']:.4f}")
        self.display.evaluated(result["val_bpc"], sample if self.cfg.show_samples else None)

    def _stop_requested(self, at_log: bool) -> bool:
        if not self.procs.distributed:
            return self.stop.requested
        if not at_log:  # processes agree on stopping at log steps only: no sync in the hot loop
            return False
        flag = torch.tensor([float(self.stop.requested)], device=self.device)
        stopping = dev.all_reduce_sum(flag, self.procs).item() > 0
        if stopping and self.is_main:
            print(self.stop.notice(), file=sys.stderr)
        return stopping

    def _check_finite(self) -> None:
        bad_step = self.history.first_non_finite_step()
        if bad_step is not None:
            self._fail_non_finite(bad_step)

    def _fail_non_finite(self, step: int) -> None:
        saved = (f"{self.paths.last} still holds step {self.history.saved_step}"
                 if self.history.saved_step else "no checkpoint was written")
        raise UserError(f"the loss or gradient became non-finite at step {step}; stopped without "
                        f"saving ({saved}); lower --learning-rate or check the data")

    # ---- evaluation and outputs -------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Val loss over every token of the val split (sharded across ranks), train loss on
        eval_iters random batches, and val bits per character."""
        cfg, model, procs = self.cfg, self.model, self.procs
        block_size = self.model_config.block_size
        model.eval()
        sums = torch.zeros(4, dtype=dev.accumulator_dtype(self.device), device=self.device)
        windows = eval_windows(self.val_tokens, block_size)[procs.rank::procs.world_size]
        with dev.autocast(self.device, self.dtype):
            for x, y in window_batches(self.val_tokens, windows, cfg.batch_size, self.device):
                _, loss = model(x, y)
                sums[0] += loss.to(sums.dtype) * y.numel()
                sums[1] += y.numel()
            train_sampler = BatchSampler(self.train_tokens, block_size, cfg.batch_size,
                                         seed=eval_batches_seed(cfg.seed, procs.rank,
                                                                self.history.step))
            for _ in range(procs.rank, cfg.eval_iters, procs.world_size):
                _, loss = model(*train_sampler.next_batch(self.device))
                sums[2] += loss.to(sums.dtype)
                sums[3] += 1
        model.train()
        val_loss, n_targets, train_loss, n_train = dev.all_reduce_sum(sums, procs).tolist()
        val_loss /= n_targets
        bpc = val_loss * n_targets / self.val_target_chars / math.log(2)
        return {"train_loss": train_loss / n_train, "val_loss": val_loss, "val_bpc": bpc}

    def checkpoint_state(self) -> dict:
        """Everything --resume needs; every process must call it (it gathers their states)."""
        mine = {"sampler": self.sampler.state(), "rng": self.dropout.state_dict()}
        return {
            "version": FORMAT_VERSION,
            "kind": self.family.kind,
            "model_config": vars(self.model_config).copy(),
            "train_config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict(),  # empty unless float16
            **self.history.state_dict(),
            "rank_states": dev.all_gather_objects(mine, self.procs),
            "meta": self.meta,
        }

    def save(self, evaluated: bool, is_best: bool) -> None:
        """Write best.pt (when is_best), then last.pt, metrics.csv and, after an evaluation, the
        plot. best.pt goes first: a kill between the two writes leaves a last.pt whose best val
        loss is never better than the one best.pt holds."""
        state = self.checkpoint_state()
        if not self.is_main:
            return
        try:
            if is_best:
                save_checkpoint(self.paths.best, state)
            save_checkpoint(self.paths.last, state)
        except WriteError as e:
            raise self._unsaved(e) from None
        self.history.saved_step = self.history.step
        if self.replacing:  # the new run now has a checkpoint: the old run's files may go
            if not is_best:
                self.paths.best.unlink(missing_ok=True)
            if not evaluated:
                self.paths.plot.unlink(missing_ok=True)
            self.replacing = False
        # The checkpoint holds the metrics and curve too: a CSV or plot that cannot be written
        # now is a warning, and the next evaluation writes it whole again.
        self._write_or_warn(write_metrics, self.paths.metrics, self.history.metrics)
        if evaluated:
            self._write_or_warn(self._plot)

    def _unsaved(self, e: WriteError) -> UserError:
        """The sentence for a checkpoint that could not be written: the run stops there."""
        if self.history.saved_step:
            kept = f"{self.paths.last} still holds step {self.history.saved_step}"
            then = "continue with --resume"
        else:
            kept, then = "no checkpoint of this run was written", "run again"
        return UserError(f"{e.reason} while writing {e.path}, so the run stopped at step "
                         f"{self.history.step}; {kept}: {e.fix}, then {then}")

    def _write_or_warn(self, write, *args, meanwhile="training goes on") -> bool:
        """Write an output the run can do without; a failure is a warning. Returns success."""
        try:
            write(*args)
            return True
        except WriteError as e:
            self.display.warn(f"warning: could not write {e.path} ({e.reason}); {meanwhile}: "
                              f"{e.fix}")
            return False

    def _plot(self) -> None:
        stride = max(1, self.cfg.max_iters // 500)
        steps = list(range(0, self.cfg.max_iters + 1, stride))
        name = self.run if self.run == self.family.kind else f"{self.run} ({self.family.kind})"
        plot_losses(self.paths.plot, self.history.metrics, self.history.loss_curve, steps,
                    [lr_at(s, self.cfg) for s in steps], self.tokens_per_step,
                    f"{name}: {self.model.num_params() / 1e6:.2f}M parameters")

    def sample_text(self, n_tokens: int) -> str:
        """n_tokens generated from the start token, always from the same seed (so samples at
        different steps differ by the model only); the training's random state is untouched."""
        idx = torch.tensor([start_ids(self.tokenizer)], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        self.model.eval()
        out = generate(self.model, idx, n_tokens, top_k=self.family.default_top_k,
                       generator=generator, vocab_size=self.meta["vocab_size"])
        self.model.train()
        return self.tokenizer.decode(out[0, 1:].tolist())

    def _eval_sample(self):
        """The sample an evaluation logs or shows; None when nothing asks for one."""
        if self.is_main and (self.tracking or self.cfg.show_samples):
            return self.sample_text(EVAL_SAMPLE_TOKENS)
        return None

    def write_sample(self, path: Path) -> None:
        text = self.sample_text(self.cfg.sample_tokens)
        atomic_write_text(path, f"# {self.run} at step {self.history.step}, val loss "
                                f"{self.history.metrics[-1]['val_loss']:.4f}, temperature 1.0\n{text}\n")

    # ---- messages, and the end --------------------------------------------------------------
    def _announce(self) -> None:
        cfg, step = self.cfg, self.history.step
        note = dev.slow_dtype_note(self.device, self.dtype)
        if note:
            print(note, file=sys.stderr)
        print(f"{self.family.kind}: {self.model.num_params():,} parameters, device {self.device}, "
              f"{str(self.dtype).replace('torch.', '')}, {self.procs.world_size} process(es), "
              f"{self.tokens_per_step:,} tokens/step")
        if cfg.optimizer != "adamw":
            print(f"optimizer: {describe(self.optimizer)}")
        if step:
            print(f"resuming {self.paths.last} at step {step}")
            forgotten = forgotten_flags(cfg, self.paths.checkpoints)
            if forgotten:
                flags = " ".join(forgotten)
                print(f"note: an earlier session of this run logged with {flags}; this one "
                      f"does not (add {flags} to continue its curves)")

    def _report_stop(self) -> None:
        cfg, kind = self.cfg, self.family.kind
        print(f"stopped at step {self.history.step}; {self.paths.last} is saved. "
              f"Continue with:\n  python {kind}/train.py --resume"
              + (f" --run {shlex.quote(self.run)}" if self.run != kind else "")
              + (f" --out-dir {shlex.quote(cfg.out_dir)}" if cfg.out_dir else ""))

    def _report(self) -> None:
        sample = None
        if self.cfg.sample_tokens:
            path = self.paths.samples / "train_sample.txt"
            written = self._write_or_warn(self.write_sample, path, meanwhile="the run is saved")
            sample = path if written else None
        best = self.history.best()
        print(f"done: best val loss {best['val_loss']:.4f} ({best['val_bpc']:.4f} bits/char) "
              f"at step {best['step']}, {self.history.elapsed():.0f}s wall time")
        print(f"  checkpoint  {self.paths.best}\n  plot        {self.paths.plot}\n"
              f"  metrics     {self.paths.metrics}" + (f"\n  sample      {sample}" if sample else ""))

    def close(self) -> None:
        """Close the tracking writers, let go of the run folder (the process's end would) and of
        the DDP wrapper, which holds the process group: a group left alive until the
        interpreter's own teardown can abort the process as its threads are destroyed."""
        self.tracking.close()
        if self.lock is not None:
            self.lock.release()
        for split in ("train_tokens", "val_tokens"):
            if hasattr(self, split):
                getattr(self, split).close()
        if hasattr(self, "forward_model"):  # set once setup has succeeded
            self.forward_model = self.model
