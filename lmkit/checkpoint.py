"""Checkpoints: written atomically, read with weights_only=True, checked before use."""
import pickle
from pathlib import Path

import torch

from lmkit.errors import UserError
from lmkit.files import atomic_write

# What sampling needs; training's --resume checks for more (lmkit.trainer.RESUME_KEYS).
REQUIRED_KEYS = ("kind", "model_config", "model", "step", "metrics", "meta")
SIBLINGS = {"last.pt": "best.pt", "best.pt": "last.pt"}
# Model options that were tried in the laptop speedrun, paid at no preset and were removed
# (README, "The laptop speedrun"). Checkpoints written while they existed store them: off, or
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


def load_checkpoint(path) -> dict:
    """Load a checkpoint as plain tensors and containers; refuse anything else."""
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
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise UserError(f"{path} is a PyTorch file but not a checkpoint of this project"
                        f"{_sibling_hint(path)}")
    drop_retired_options(state["model_config"], path)
    return state


def drop_retired_options(model_config: dict, path) -> None:
    used = [flag for name, flag in RETIRED_OPTIONS.items() if model_config.get(name)]
    if used:
        raise UserError(f"{path} was trained with {' and '.join(used)}, an option this version "
                        "no longer has (it paid at no preset); train a new model, or use the "
                        "project's version from before it was removed")
    for name in (*RETIRED_OPTIONS, *RETIRED_HARMLESS):
        model_config.pop(name, None)
