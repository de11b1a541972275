"""What the training loop reports and answers to around its steps: stop requests (Ctrl-C and
the signals schedulers send), the progress line or bar, and the metrics CSV. TensorBoard and
W&B are lmkit/tracking.py."""
import csv
import io
import signal
import sys

from tqdm import tqdm

from lmkit.files import atomic_write_text

METRIC_FIELDS = ("step", "lr", "train_loss", "val_loss", "val_bpc", "tokens_seen", "elapsed_s",
                 "tokens_per_s")
SAMPLE_LINE_CHARS = 80  # how much of an evaluation's sample --show-samples prints


class StopRequest:
    """Ctrl-C, SIGTERM or SIGHUP (what schedulers send on preemption or shutdown) ask the loop
    to stop after the current step and save; a second signal aborts without saving."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.signal = signal.SIGINT  # the one that asked; it sets the exit code
        self.previous = {}
        self.announce = announce

    def __enter__(self):
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):  # Windows has no SIGHUP
                self.previous[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal = True, signum
        if self.announce:
            print("\n" + self.notice(), file=sys.stderr)

    def notice(self) -> str:
        """What the stop is and what a second signal does; under torchrun the signal may have
        reached another process only."""
        asked = signal.Signals(self.signal).name if self.requested else "another process's signal"
        return f"{asked}: stopping after this step (send it again to abort without saving)"

    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process that signal ended."""
        return 128 + int(self.signal)

    def __exit__(self, *exc):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)


def one_line(text: str, width: int) -> str:
    """The start of text as one line of at most `width` characters: line breaks and other
    control characters shown escaped (\\n), never cut in half."""
    shown = ""
    for char in text:
        piece = char if char.isprintable() else repr(char)[1:-1]
        if len(shown) + len(piece) > width:
            break
        shown += piece
    return shown


class ProgressDisplay:
    """A progress bar on a terminal, a plain line per log step otherwise; only on rank 0.
    Both show the latest evaluation's val bits per character once there is one."""

    def __init__(self, enabled: bool, val_bpc=None):
        self.enabled = enabled
        self.bar = None
        self.val_bpc = val_bpc
        self.postfix = {}

    def start(self, step: int, total: int) -> None:
        if self.enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=step, dynamic_ncols=True)

    def show(self, step: int, total: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            bpc = "" if self.val_bpc is None else f"  val bpc {self.val_bpc:.4f}"
            print(f"step {step}/{total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} "
                  f"tokens/s{bpc}", flush=True)
            return
        self.postfix = dict(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        self._set_postfix()
        self.bar.update(step - self.bar.n)

    def evaluated(self, val_bpc: float, sample=None) -> None:
        """Show val_bpc from now on, and a line of the sample when given (--show-samples)."""
        self.val_bpc = val_bpc
        if self.bar is not None:
            self._set_postfix()
        if sample is not None:
            self.write(f"  sample: {one_line(sample, SAMPLE_LINE_CHARS)}")

    def _set_postfix(self) -> None:
        bpc = {} if self.val_bpc is None else {"val_bpc": f"{self.val_bpc:.4f}"}
        self.bar.set_postfix(**self.postfix, **bpc)

    def write(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stdout)

    def warn(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_metrics(path, rows: list) -> None:
    """checkpoints/<run>/metrics.csv: one row per evaluation (lmkit.history.TrainingHistory)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())
