"""Checkpoints: written atomically, read with weights_only=True, brought up to today's format
(upgrade, the one place that reads the format version) and checked before use."""
import pickle
from dataclasses import fields
from pathlib import Path

import torch

from lmkit.errors import UserError
from lmkit.files import REPO_ROOT, RunPaths, atomic_write, check_run_name

# The format Trainer.checkpoint_state writes. Raise it when a change to the format needs more than
# upgrade() can fill in, and teach upgrade() the step from the version before.
FORMAT_VERSION = 1
# What sampling needs; training's --resume checks for more (lmkit.trainer.RESUME_KEYS).
REQUIRED_KEYS = ("kind", "model_config", "model", "step", "metrics", "meta")
SIBLINGS = {"last.pt": "best.pt", "best.pt": "last.pt"}
# Model options that were tried in the laptop speedrun, paid at no preset and were removed
# (docs/speedrun.md). Checkpoints written while they existed store them: off, or
# zero_init (which only changed the initialisation), loads as today's model; on, it cannot.
RETIRED_OPTIONS = {"rmsnorm": "--rmsnorm", "relu_squared": "--relu-squared"}
RETIRED_HARMLESS = ("zero_init",)


def save_checkpoint(path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def _sibling_hint(path: Path) -> str:
    other = path.with_name(SIBLINGS.get(path.name, "last.pt"))
    if other != path and other.is_file():
        return f"; {other} also exists and may be intact"
    return ""


def load_checkpoint(path, config_cls=None) -> dict:
    """Load a checkpoint as plain tensors and containers, refuse anything else, and upgrade it
    (config_cls: the model config the caller builds from it; see upgrade)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"refused to load {path}: it holds Python objects that would run "
                            f"code when unpickled, which no checkpoint of this project does; "
                            f"only load files you trust{_sibling_hint(path)}") from None
        raise UserError(f"{path} is not a readable checkpoint (damaged or truncated)"
                        f"{_sibling_hint(path)}") from None
    except Exception:  # a damaged file can make the unpickler fail in many ways
        raise UserError(f"{path} is not a readable checkpoint (damaged, truncated or not a "
                        f"PyTorch file){_sibling_hint(path)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is a PyTorch file but not a checkpoint of this project"
                        f"{_sibling_hint(path)}")
    return upgrade(state, path, config_cls)


def upgrade(state: dict, path, config_cls=None) -> dict:
    """The checkpoint brought up to today's format; one sentence refuses a format this version
    cannot read.

    Format 1 is the first (a checkpoint without a version is read as 1) and still today's. Within
    it the model options changed: an option retired since is dropped when it was off and refused
    when it was on (RETIRED_OPTIONS); with config_cls, an option added since takes its default
    there, which is off: the model the weights were trained as.
    """
    version = state.get("version", 1)
    if type(version) is not int or version < 1:
        raise UserError(f"{path} has an unknown checkpoint format ({version!r}); it was not "
                        "written by this project")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer version of this project (checkpoint "
                        f"format {version}, this one reads up to {FORMAT_VERSION}); update the "
                        "project to load it")
    if any(k not in state for k in REQUIRED_KEYS):
        raise UserError(f"{path} is a PyTorch file but not a checkpoint of this project"
                        f"{_sibling_hint(path)}")
    model_config = state["model_config"]
    used = [flag for name, flag in RETIRED_OPTIONS.items() if model_config.get(name)]
    if used:
        raise UserError(f"{path} was trained with {' and '.join(used)}, an option this version "
                        "no longer has (it paid at no preset); train a new model, or use the "
                        "project's version from before it was removed")
    for name in (*RETIRED_OPTIONS, *RETIRED_HARMLESS):
        model_config.pop(name, None)
    if config_cls is not None:
        defaults = {f.name: f.default for f in fields(config_cls)}
        state["model_config"] = {**defaults, **model_config}
    state["version"] = FORMAT_VERSION
    return state


def find_checkpoint(checkpoint, run: str, out_dir: Path, kind: str) -> Path:
    """The checkpoint file given (--checkpoint), else checkpoints/<run>/best.pt under out_dir
    (else its last.pt), for sample.py and export.py; kind names the train.py to suggest."""
    check_run_name(run)
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise UserError(f"checkpoint {checkpoint} does not exist")
        return checkpoint
    paths = RunPaths.for_run(out_dir, run)
    for path in (paths.best, paths.last):
        if path.is_file():
            return path
    run_flag = f" --run {run}" if run != kind else ""
    if out_dir.resolve() != REPO_ROOT:
        run_flag += f" --out-dir {out_dir}"
    raise UserError(f"no checkpoint in {paths.checkpoints}; train one first with "
                    f"`python {kind}/train.py{run_flag}`")


def load_checkpoint_of(family, path: Path, command: str) -> dict:
    """The checkpoint at path, refused unless it is this family's and its weights are finite;
    command ("sample" or "export") names the script in the messages."""
    state = load_checkpoint(path)
    if state["kind"] != family.kind:
        raise UserError(f"{path} is a {state['kind']} checkpoint; {command} it with "
                        f"`python {state['kind']}/{command}.py`")
    if not all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point()):
        raise UserError(f"{path} holds NaN or infinite weights; {command} another checkpoint or "
                        "train again")
    return state
