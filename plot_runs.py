"""Overlay the val loss of several runs in one plot, to compare experiments at a glance.

    python plot_runs.py bigram fast                     # runs in checkpoints/, against steps
    python plot_runs.py bigram fast --x seconds --out plots/compare.png
    python plot_runs.py bigram gpt --y bpc               # bits/char: both tokenizers on one scale
    python plot_runs.py gpt path/to/metrics.csv --x tokens

A run is a run name (its checkpoints/<run>/metrics.csv), the path of a metrics.csv, or the path
of a nanoGPT training log (its train.py's printed output), to put nanoGPT's curve beside yours:

    python plot_runs.py mine nanogpt.log --x seconds

nanoGPT's val loss is its own estimate on eval_iters random batches, not a whole-split loss.
"""
import argparse
import csv
import math
import re
import statistics
import sys
from pathlib import Path

if not __package__:  # run as a script: make the repository root importable
    sys.path[0] = str(Path(__file__).resolve().parent)
from lmkit.errors import UserError, run_main  # noqa: E402
from lmkit.files import REPO_ROOT, RunPaths, check_run_name  # noqa: E402
from lmkit.plotting import X_AXES, Y_AXES, plot_comparison  # noqa: E402
from lmkit.process import protect_console  # noqa: E402


def read_run(run: str, out_dir: Path, x_column: str, y_column: str) -> tuple:
    """(label, evaluations) of a run name, a metrics.csv path or a nanoGPT log path; each
    evaluation is {x_column: float, y_column: float}. Empty when the file has none usable."""
    if Path(run).is_file() and not run.endswith(".csv"):
        label, rows = read_nanogpt_log(Path(run), y_column)
        return label, [{x_column: row[x_column], y_column: row[y_column]} for row in rows]
    if run.endswith(".csv"):
        path, label = Path(run), run
    else:
        path, label = RunPaths.for_run(out_dir, check_run_name(run)).metrics, run
    return label, read_metrics(path, run, (x_column, y_column))


def read_metrics(path: Path, run: str, columns: tuple) -> list:
    """The evaluations in a metrics.csv whose columns all hold finite numbers. A damaged row (a
    word where a number belongs, a cut-off last line) is left out with a warning naming its
    line; a file with no usable row is left out with one warning."""
    evaluations = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or ())]
            if missing:
                return skip_file(path, "no header" if not reader.fieldnames else
                                 f"no {' or '.join(missing)} column")
            problems = []
            for row in reader:
                problem = row_problem(row, columns)
                if problem:
                    problems.append(f"line {reader.line_num}: {problem}")
                else:
                    evaluations.append({c: float(row[c]) for c in columns})
    except FileNotFoundError:
        raise UserError(f"no metrics for {run!r}: {path} does not exist; train it first, or "
                        "give the path of a metrics.csv") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; give the path of a metrics.csv") from None
    except (UnicodeDecodeError, csv.Error) as e:
        return skip_file(path, f"it is not a readable CSV ({e})")
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    if not evaluations:
        return skip_file(path, problems[0] if problems else "a header and no evaluations")
    for problem in problems:
        warn(f"{path} {problem}; that evaluation is left out")
    return evaluations


def row_problem(row: dict, columns: tuple):
    """Why a metrics row cannot be plotted, or None when it can."""
    for column in columns:
        value = row.get(column)
        if value is None:
            return f"the row ends before its {column} column (a cut-off line?)"
        try:
            number = float(value)
        except ValueError:
            return f"{column} is {value!r}, not a number"
        if not math.isfinite(number):
            return f"{column} is {value!r}, not a finite number"
    return None


def skip_file(path: Path, why: str) -> list:
    warn(f"{path} has no evaluation to plot ({why}); it is left out of the plot")
    return []


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_nanogpt_log(path: Path, y_column: str = "val_loss") -> tuple:
    """(label, metrics rows) from the output of nanoGPT's train.py: its evaluations, with the
    seconds each was reached at rebuilt from the iteration times it prints every log_interval
    iterations (an evaluation's own time lands in the iteration that ran it)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    evals = {int(s): float(v) for s, v in
             re.findall(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", text, re.M)}
    iter_ms = {int(i): float(ms) for i, ms in
               re.findall(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", text, re.M)}
    tokens = re.search(r"tokens per iteration will be: ([\d,]+)", text)
    if not evals or not iter_ms or not tokens:
        raise UserError(f"{path} is neither a metrics.csv nor a nanoGPT training log with "
                        "evaluations")
    tokens_per_iter = int(tokens.group(1).replace(",", ""))
    typical_ms = statistics.median(ms for i, ms in iter_ms.items() if i not in evals)
    char_level = re.search(r"found vocab_size = (\d+)", text)
    char_level = char_level is not None and int(char_level.group(1)) < 1000
    if y_column == "val_bpc" and not char_level:
        raise UserError(f"{path} is a BPE nanoGPT log, which has no bits per character; "
                        "plot it with --y loss")
    rows, extra_ms = [], 0.0
    for step in sorted(evals):
        extra_ms += iter_ms.get(step, typical_ms) - typical_ms  # this evaluation's own time
        if step == 0:  # before training, where this repo's runs have no point either
            continue
        rows.append({"step": step, "tokens_seen": step * tokens_per_iter,
                     "elapsed_s": (step * typical_ms + extra_ms) / 1000,
                     "val_loss": evals[step],
                     # a character-level log's loss is per character; a BPE log has no bpc
                     "val_bpc": evals[step] / math.log(2) if char_level else math.nan})
    return f"nanoGPT ({path.name}, val estimated on few batches)", rows


def main(argv=None) -> int:
    protect_console()  # a closed pipe must not stop the plotting; the file holds the result
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run names or metrics.csv paths")
    p.add_argument("--x", choices=list(X_AXES), default="steps",
                   help="what the horizontal axis counts (default: %(default)s)")
    p.add_argument("--y", choices=list(Y_AXES), default="loss",
                   help="val loss, or val bits per character to compare the two tokenizers "
                        "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "plots" / "compare.png",
                   help="the PNG to write (default: plots/compare.png)")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT,
                   help="folder holding checkpoints/ (default: the repository root)")
    args = p.parse_args(argv)
    x_column, y_column = X_AXES[args.x][0], Y_AXES[args.y][0]
    curves = {}
    for run in args.runs:
        label, evaluations = read_run(run, args.out_dir, x_column, y_column)
        if evaluations:
            curves[label] = evaluations
    if not curves:
        raise UserError(f"none of the runs has an evaluation to plot against {args.x} "
                        f"(see the warnings above); train them, or check their metrics.csv")
    plot_comparison(args.out, curves, args.x, args.y)
    print(f"{len(curves)} runs against {args.x}: {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
