"""Overlay the val loss of several runs in one plot, to compare experiments at a glance.

    python plot_runs.py bigram fast                     # runs in checkpoints/, against steps
    python plot_runs.py bigram fast --x seconds --out plots/compare.png
    python plot_runs.py bigram gpt --y bpc               # bits/char: both tokenizers on one scale
    python plot_runs.py gpt path/to/metrics.csv --x tokens

A run is a run name (its checkpoints/<run>/metrics.csv) or the path of a metrics.csv.
"""
import argparse
import csv
import sys
from pathlib import Path

if not __package__:  # run as a script: make the repository root importable
    sys.path[0] = str(Path(__file__).resolve().parent)
from lmkit.errors import UserError, run_main  # noqa: E402
from lmkit.files import REPO_ROOT, RunPaths, check_run_name  # noqa: E402
from lmkit.plotting import X_AXES, Y_AXES, plot_comparison  # noqa: E402


def read_run(run: str, out_dir: Path) -> tuple:
    """(label, metrics rows) of a run name or a metrics.csv path."""
    if run.endswith(".csv"):
        path, label = Path(run), run
    else:
        path, label = RunPaths.for_run(out_dir, check_run_name(run)).metrics, run
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise UserError(f"no metrics for {run!r}: {path} does not exist; train it first, or "
                        "give the path of a metrics.csv") from None
    except (OSError, UnicodeDecodeError, csv.Error):
        raise UserError(f"cannot read {path}; is it a metrics.csv written by train.py?") from None
    needed = {column for column, _ in (*X_AXES.values(), *Y_AXES.values())}
    if not rows or not needed <= set(rows[0]):
        raise UserError(f"{path} has no evaluations, or is not a metrics.csv written by train.py")
    return label, rows


def main(argv=None) -> int:
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
    curves = dict(read_run(run, args.out_dir) for run in args.runs)
    plot_comparison(args.out, curves, args.x, args.y)
    print(f"{len(curves)} runs against {args.x}: {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
