"""The loss plot: train/val loss against steps (tokens on a second axis) over the LR schedule."""
import io

from lmkit.files import atomic_write_bytes


def plot_losses(path, metrics: list, loss_curve: list, schedule_steps: list, schedule_lrs: list,
                tokens_per_step: int, title: str) -> None:
    """metrics: one dict per evaluation; loss_curve: [step, running training loss] pairs."""
    steps = [m["step"] for m in metrics]
    fig = new_figure((8, 6.5))
    ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if loss_curve:
        ax.plot([p[0] for p in loss_curve], [p[1] for p in loss_curve], color="tab:blue",
                alpha=0.3, lw=1, label="train loss (running)")
    ax.plot(steps, [m["train_loss"] for m in metrics], "o-", label="train loss (eval)", ms=3,
            color="tab:blue")
    ax.plot(steps, [m["val_loss"] for m in metrics], "s-", label="val loss (whole split)", ms=3,
            color="tab:orange")
    if metrics:
        best = min(metrics, key=lambda m: m["val_loss"])
        ax.plot([best["step"]], [best["val_loss"]], "*", ms=14, color="tab:red",
                label=f"best val {best['val_loss']:.4f} "
                      + (f"({best['val_bpc']:.3f} bits/char) " if best.get("val_bpc") else "")
                      + f"@ {best['step']}")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    if metrics and metrics[-1].get("val_bpc") and metrics[-1]["val_loss"] > 0:
        # Bits per character compare runs on different tokenizers; the val split fixes how many
        # characters a token covers, so the scale is one factor for the whole axis.
        per_nat = metrics[-1]["val_bpc"] / metrics[-1]["val_loss"]
        bpc_axis = ax.secondary_yaxis("right", functions=(lambda n: n * per_nat,
                                                          lambda b: b / per_nat))
        bpc_axis.set_ylabel("bits per character (val's characters per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    tokens_axis = ax.secondary_xaxis(
        "top", functions=(lambda s: s * tokens_per_step / 1e6, lambda t: t * 1e6 / tokens_per_step))
    tokens_axis.set_xlabel("tokens seen (millions)")

    ax_lr.plot(schedule_steps, schedule_lrs, color="tab:green")
    if steps:
        ax_lr.axvline(steps[-1], color="grey", ls=":", lw=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    save_png(fig, path)


def new_figure(size: tuple):
    """A figure of its own, drawn by the file-only Agg renderer: no pyplot, so nothing changes
    for the process (a notebook keeps drawing inline while a trainer in it saves plots)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path) -> None:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


X_AXES = {"steps": ("step", "step"), "tokens": ("tokens_seen", "tokens seen"),
          "seconds": ("elapsed_s", "wall-clock seconds")}


Y_AXES = {"loss": ("val_loss", "val loss (whole split, nats/token)"),
          "bpc": ("val_bpc", "val bits per character (comparable across tokenizers)")}


def plot_comparison(path, curves: dict, x: str, y: str = "loss") -> None:
    """Overlay the val curves of several runs; curves: label -> metrics rows; x and y: keys of
    X_AXES and Y_AXES."""
    (x_column, x_label), (y_column, y_label) = X_AXES[x], Y_AXES[y]
    fig = new_figure((8, 5))
    ax = fig.subplots()
    for name, rows in curves.items():
        values = [float(r[y_column]) for r in rows]
        ax.plot([float(r[x_column]) for r in rows], values, "o-", ms=3,
                label=f"{name} (best {min(values):.4f})")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)
