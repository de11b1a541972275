"""Checkpoints: written atomically, read with weights_only=True, brought up to today's format
(upgrade, the one place that reads the format version) and checked before use."""
import math
import pickle
from dataclasses import fields
from pathlib import Path

import torch

from lmkit.config import INT64_LIMIT, MAX_SIZES, TrainConfig, heads_problem, size_problem
from lmkit.device import check_fits, model_shapes
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


def load_checkpoint(path, family=None) -> dict:
    """Load a checkpoint as plain tensors and containers, refuse anything else, and upgrade it.
    Given the model family that reads it (lmkit.family), a checkpoint of that family is checked
    too (check_state): its model config, weights and counters must make that model."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    check_fits(path.stat().st_size, f"loading {path}",
               "load it on a machine with more memory, or free some")
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
    state = upgrade(state, path, family.config_cls if family is not None else None)
    if family is not None and state["kind"] == family.kind:  # another kind: the caller says so
        check_state(state, path, family)
    return state


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
    if not isinstance(model_config, dict) or not isinstance(state["kind"], str):
        raise UserError(f"{path} is a PyTorch file but not a checkpoint of this project"
                        f"{_sibling_hint(path)}")
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
    """The checkpoint at path, refused unless it is this family's, makes its model (check_state)
    and its weights are finite; command ("sample" or "export") names the script in the
    messages."""
    state = load_checkpoint(path, family)
    if state["kind"] != family.kind:
        raise UserError(f"{path} is a {state['kind']} checkpoint; {command} it with "
                        f"`python {state['kind']}/{command}.py`")
    if not all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point()):
        raise UserError(f"{path} holds NaN or infinite weights; {command} another checkpoint or "
                        "train again")
    return state


# ---- the contents, checked before a model is built from them ----------------------------------

def check_state(state: dict, path: Path, family) -> None:
    """Refuse, in one sentence naming the file, a checkpoint whose model config, weights or
    counters cannot be the family's model and its run: a size that is not a whole number in
    range (lmkit.config.MAX_SIZES), a tensor missing or of another shape, a step that is not a
    count. Nothing is allocated: the model's shapes come from its config alone."""
    problem = (_config_problem(state["model_config"], family.config_cls)
               or _weights_problem(state["model"], family, state["model_config"])
               or _counters_problem(state))
    if problem:
        raise _damaged(path, problem)


def load_optimizer_state(optimizer, saved, path: Path) -> None:
    """optimizer.load_state_dict(saved), refused in one sentence unless the saved state fits the
    optimizer's parameters: torch checks only how many there are, and a moment of another shape
    would fail at the first step."""
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError):
        raise _damaged(path, "its optimizer state does not fit the model") from None
    for param, moments in optimizer.state.items():
        for name, value in moments.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise _damaged(path, f"its optimizer's {name} of shape {tuple(value.shape)} "
                                     f"belongs to no weight of shape {tuple(param.shape)}")


def _damaged(path: Path, problem: str) -> UserError:
    other = path.with_name(SIBLINGS.get(path.name, "last.pt"))
    fix = (f"use {other}, which also exists, or train again" if other != path and other.is_file()
           else "train again, or load another checkpoint")
    return UserError(f"{path} is damaged or was not written by this project ({problem}); {fix}")


def _config_problem(config: dict, config_cls):
    known = {f.name: f for f in fields(config_cls)}
    unknown = sorted(set(config) - set(known))
    if unknown:
        return f"its model has an option this version does not know: {unknown[0]}"
    for name, f in known.items():
        value = config[name]
        if name in MAX_SIZES:
            problem = size_problem(name, value)
        elif f.type is bool:
            problem = None if type(value) is bool else f"{value!r} is not true or false"
        else:  # the dropout probability
            problem = (None if type(value) in (int, float) and 0 <= value < 1
                       else f"{value!r} is not a probability below 1")
        if problem:
            return f"its model's {name} {problem}"
    return heads_problem(config)


def _weights_problem(weights, family, config: dict):
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor)
                                                for t in weights.values()):
        return "its weights are not a dictionary of tensors"
    shapes, _ = model_shapes(family.model_cls, family.config_cls(**config))
    missing, extra = sorted(shapes.keys() - weights.keys()), sorted(weights.keys() - shapes.keys())
    if missing or extra:
        return (f"{'it lacks the weight' if missing else 'it has an unexpected weight'} "
                f"{(missing or extra)[0]} for the model its config describes")
    for name, shape in shapes.items():
        tensor = weights[name]
        if tuple(tensor.shape) != shape:
            return (f"its weight {name} has shape {tuple(tensor.shape)}, but its config makes "
                    f"{shape}")
        if not tensor.is_floating_point():
            return f"its weight {name} holds {tensor.dtype} values"
    return None


def _is_count(value) -> bool:
    return type(value) is int and 0 <= value < INT64_LIMIT


def _is_number(value) -> bool:
    return type(value) in (int, float) and not math.isnan(value)


def _counters_problem(state: dict):
    """The run's counters: sampling reads the step and the last evaluation; --resume reads the
    rest, when the checkpoint has them (lmkit.trainer.RESUME_KEYS)."""
    if not _is_count(state["step"]):
        return f"its step {state['step']!r} is not a count from 0 to 2**63 - 1"
    if "tokens_seen" in state and not _is_count(state["tokens_seen"]):
        return f"its tokens_seen {state['tokens_seen']!r} is not a count"
    for key in ("elapsed_s", "best_val_loss"):
        if key in state and not _is_number(state[key]):
            return f"its {key} {state[key]!r} is not a number"
    metrics = state["metrics"]
    if not isinstance(metrics, list) or not all(
            isinstance(row, dict) and _is_count(row.get("step")) and _is_number(row.get("val_loss"))
            for row in metrics):
        return "its metrics are not a list of evaluations, each with its step and val loss"
    curve = state.get("loss_curve", [])
    if not isinstance(curve, list) or not all(
            isinstance(point, list) and len(point) == 2 and _is_count(point[0])
            and _is_number(point[1]) for point in curve):
        return "its loss curve is not a list of [step, loss] pairs"
    if "rank_states" in state and not _rank_states_fit(state["rank_states"]):
        return "its processes' random states are not those of a CPU random generator"
    return _train_config_problem(state.get("train_config", {}))


def _rank_states_fit(ranks) -> bool:
    """Each process's batch and dropout generator states (lmkit.trainer.checkpoint_state): a
    CPU generator's state is a byte tensor of one size, and torch refuses any other."""
    size = torch.Generator().get_state().shape

    def cpu_state(t):
        return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == size

    return isinstance(ranks, list) and len(ranks) > 0 and all(
        isinstance(r, dict) and cpu_state(r.get("sampler")) and isinstance(r.get("rng"), dict)
        and cpu_state(r["rng"].get("cpu")) for r in ranks)


def _train_config_problem(train_config):
    """The training settings --resume takes the values of flags left out from. Their ranges are
    lmkit.config.validate's to check, as a flag's; here, each must be of its flag's type."""
    if not isinstance(train_config, dict):
        return "its training settings are not a dictionary"
    for f in fields(TrainConfig):
        if f.name not in train_config:
            continue
        value = train_config[f.name]
        if f.type is int:
            ok = type(value) is int and abs(value) < INT64_LIMIT
        elif f.type is float:
            ok = type(value) in (int, float)
        else:  # bool, str
            ok = type(value) is f.type
        if not ok:
            return (f"its training setting {f.name} {value!r} cannot be a value of --"
                    f"{f.name.replace('_', '-')}")
    return None
