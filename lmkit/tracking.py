"""Optional experiment tracking: TensorBoard event files (--tensorboard) and Weights & Biases
(--wandb), both under the run's checkpoint folder.

Each backend is a reporter with four methods: scalars(step, values), text(step, tag, text),
flush() and close(). Tracking holds the reporters the flags asked for (none by default) and turns
what the trainer reports into the same tags for all of them:

    train/loss, train/lr, train/tokens_per_s      at every progress line
    eval/train_loss, eval/val_loss, eval/val_bpc  at every evaluation
    eval/sample (text)                            at every evaluation

Neither package is imported unless its flag is given.
"""
import html
import netrc
import os
import secrets
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from lmkit.errors import UserError
from lmkit.files import FULL_DISK, atomic_write_text, write_error

TENSORBOARD_DIR = "tensorboard"  # inside checkpoints/<run>/
WANDB_DIR = "wandb"              # inside checkpoints/<run>/; W&B makes it itself
WANDB_PROJECT = "shakespeare-lm"  # unless WANDB_PROJECT says otherwise


def _import_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package; install it with "
                        "`pip install tensorboard`, or train without --tensorboard") from None
    return SummaryWriter


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package; install it with `pip install wandb`, "
                        "or train without --wandb") from None
    return wandb


def check_installed(cfg) -> None:
    """Refuse a flag whose package is missing before the run writes anything."""
    if cfg.tensorboard:
        _import_summary_writer()
    if cfg.wandb:
        _import_wandb()


class TensorBoardReporter:
    """Event files in checkpoints/<run>/tensorboard/. A resumed run writes a new event file in
    the same folder; purge_step makes TensorBoard drop what an earlier session logged after the
    checkpoint the run resumed from, so no step shows twice."""

    name, flag = "TensorBoard", "--tensorboard"

    def __init__(self, folder: Path, purge_step: int):
        SummaryWriter = _import_summary_writer()
        self.folder = folder
        # The writer's thread re-raises a failed write (a full disk) after handing it to the
        # writer, which raises it here on the next call: Tracking warns about that copy, and
        # the thread's traceback would only repeat it. close() puts the old hook back.
        self.previous_hook = threading.excepthook
        threading.excepthook = self._quiet_write_errors
        try:
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)
        except OSError as e:
            self.close_hook()
            fix = ("move away what is in the way or fix its permissions"
                   if e.errno not in FULL_DISK else write_error(folder, e, True).fix)
            raise UserError(f"cannot write TensorBoard events to {folder} ({e.strerror or e}); "
                            f"{fix}") from None

    def _quiet_write_errors(self, args) -> None:
        if not (isinstance(args.exc_value, OSError)
                and type(args.thread).__name__ == "_AsyncWriterThread"):
            self.previous_hook(args)

    def close_hook(self) -> None:
        if threading.excepthook == self._quiet_write_errors:
            threading.excepthook = self.previous_hook

    def scalars(self, step: int, values: dict) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        # TensorBoard renders text as Markdown: indenting makes it a code block, which keeps
        # the sample's line breaks and spacing as generated.
        self.writer.add_text(tag, "\n".join("    " + line for line in text.split("\n")), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            self.close_hook()


def wandb_logged_in() -> bool:
    """Whether W&B has an API key here: WANDB_API_KEY, or the netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


class WandbReporter:
    """A W&B run whose files go in checkpoints/<run>/wandb/. Offline unless W&B has an API key
    (WANDB_MODE, when set, decides instead); `wandb sync` uploads an offline run later. The
    run's W&B id is kept in wandb/run_id.txt, so a resumed training run continues its W&B run."""

    name, flag = "W&B", "--wandb"

    def __init__(self, folder: Path, name: str, config: dict, resuming: bool):
        self.wandb = _import_wandb()
        self.folder = folder / WANDB_DIR
        id_file = folder / WANDB_DIR / "run_id.txt"
        run_id = (id_file.read_text(encoding="utf-8").strip()
                  if resuming and id_file.is_file() else "")
        if not run_id:
            run_id = secrets.token_hex(4)
            atomic_write_text(id_file, run_id + "\n")
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
        try:
            self.run = self.wandb.init(
                project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT, name=name, id=run_id,
                resume="allow", dir=str(folder), mode=mode, config=config,
                # the trainer logs what matters; W&B need not wrap the console streams
                settings=self.wandb.Settings(console="off"))
        except self.wandb.Error as e:
            raise UserError(f"cannot start the W&B run ({e}); check `wandb login`, or set "
                            "WANDB_MODE=offline and sync later") from None

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        # inject=False: no stylesheet link to wandb.ai in the saved page
        page = self.wandb.Html(f"<pre>{html.escape(text)}</pre>", inject=False)
        self.run.log({tag: page}, step=step)

    def flush(self) -> None:
        pass  # W&B's own process writes as it receives

    def close(self) -> None:
        self.run.finish()
        # finish() can return before W&B's service process has written the run's file;
        # teardown waits for it (a training process has no other W&B run to disturb).
        self.wandb.teardown()


class Tracking:
    """The reporters a run logs to; with none, every call does nothing."""

    def __init__(self, reporters=()):
        self.reporters = list(reporters)

    @classmethod
    def open(cls, cfg, folder: Path, run_name: str, step: int, config: dict) -> "Tracking":
        """The reporters cfg asks for, writing under the run's checkpoint folder; step: the
        step the run starts from (0, or the resumed checkpoint's)."""
        tracking = cls()
        try:
            if cfg.tensorboard:
                # the first step this session logs is step + 1
                tracking.reporters.append(TensorBoardReporter(folder / TENSORBOARD_DIR,
                                                              purge_step=step + 1))
            if cfg.wandb:
                tracking.reporters.append(WandbReporter(folder, run_name, config,
                                                        resuming=cfg.resume))
        except BaseException:
            tracking.close()
            raise
        return tracking

    def __bool__(self) -> bool:
        return bool(self.reporters)

    def progress(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        for reporter in list(self.reporters):
            with self._dropped_on_write_error(reporter):
                reporter.scalars(step, {"train/loss": loss, "train/lr": lr,
                                        "train/tokens_per_s": tokens_per_s})

    def evaluation(self, step: int, result: dict, sample: str) -> None:
        """Log an evaluation and write it out now: the trainer calls this before it saves the
        checkpoint, so a run killed afterwards has no logged steps missing when resumed."""
        for reporter in list(self.reporters):
            with self._dropped_on_write_error(reporter):
                reporter.scalars(step, {"eval/" + key: result[key]
                                        for key in ("train_loss", "val_loss", "val_bpc")})
                reporter.text(step, "eval/sample", sample)
                reporter.flush()

    def close(self) -> None:
        reporters, self.reporters = self.reporters, []
        for reporter in reporters:
            with self._dropped_on_write_error(reporter):
                reporter.close()

    @contextmanager
    def _dropped_on_write_error(self, reporter):
        """A log that cannot be written (a full disk, a quota) must not stop the training, whose
        checkpoint is what matters: warn once and log on without that reporter."""
        try:
            yield
        except OSError as e:
            if reporter in self.reporters:
                self.reporters.remove(reporter)
            try:
                reporter.close()
            except OSError:  # what is still buffered cannot be written either
                pass
            folder = getattr(reporter, "folder", "its folder")
            failure = write_error(folder, e, existed=True)
            print(f"warning: could not write the {reporter.name} logs in {folder} "
                  f"({failure.reason}); training goes on without them: {failure.fix}, then "
                  f"--resume with {reporter.flag} continues the curves",
                  file=sys.stderr)


def forgotten_flags(cfg, folder: Path) -> list:
    """The tracking flags an earlier session of this run used and this one leaves out."""
    used = {"--tensorboard": (cfg.tensorboard, TENSORBOARD_DIR), "--wandb": (cfg.wandb, WANDB_DIR)}
    return [flag for flag, (given, name) in used.items() if not given and (folder / name).is_dir()]
