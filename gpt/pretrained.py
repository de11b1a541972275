"""GPT-2's weights for gpt/model.py (--init-from): a Hugging Face GPT-2 folder, or a model name
found in the local Hugging Face cache or downloaded once.

Our GPT is GPT-2's architecture with GPT-2's own names, so loading is a rename-free copy: only
the Conv1D weights are stored transposed. huggingface_hub is imported only to resolve a model
name.
"""
import json
import math
from pathlib import Path

import torch

from gpt.model import GPT, GPTConfig
from lmkit.config import heads_problem, size_problem
from lmkit.device import check_fits, model_shapes
from lmkit.errors import UserError
from lmkit.hf import safetensors_torch
from lmkit.tokenizers import GPT2_VOCAB_SIZE

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # one formula, several names
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# config.json's sizes: the GPTConfig field each gives, and GPT-2's value when it is missing
# (n_positions falls back on the older n_ctx first)
SIZE_FIELDS = {"vocab_size": ("vocab_size", GPT2_VOCAB_SIZE), "n_positions": ("block_size", 1024),
               "n_layer": ("n_layer", 12), "n_head": ("n_head", 12), "n_embd": ("n_embd", 768)}
# config.json's switches, with GPT-2's values
FLAGS = {"scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
         "add_cross_attention": False, "tie_word_embeddings": True}
MAX_CONFIG_BYTES = 1 << 20  # GPT-2's config.json is under 1 KB
# GPT-2's Conv1D layers, whose weights are the transpose of nn.Linear's
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")


def resolve_source(source: str) -> Path:
    """A folder on disk, or a Hub model name found in the local cache or downloaded once."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{source} is a file; give a Hugging Face model folder or model name")
    # Hub names are "name" or "owner/name"; anything else was meant as a folder.
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        raise UserError(f"folder {source} does not exist; check the path")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{source} is not a folder, and loading a model by name needs "
                        "huggingface_hub; run `pip install transformers`") from None
    try:
        return _snapshot(snapshot_download, source, local_files_only=True)
    except Exception:
        pass
    try:
        return _snapshot(snapshot_download, source, local_files_only=False)
    except Exception as e:
        from huggingface_hub import constants
        why = ("HF_HUB_OFFLINE forbids downloading it" if constants.HF_HUB_OFFLINE
               else f"downloading it failed ({type(e).__name__})")
        raise UserError(f"{source} is neither a folder nor a model in the local Hugging Face "
                        f"cache, and {why}; give a folder, or download the model once on a "
                        "machine with network access") from None


def _snapshot(snapshot_download, name: str, local_files_only: bool) -> Path:
    """The snapshot folder of name holding config.json and one weights file."""
    for weights in WEIGHT_FILES:
        folder = Path(snapshot_download(name, allow_patterns=["config.json", weights],
                                        local_files_only=local_files_only))
        if (folder / "config.json").is_file() and (folder / weights).is_file():
            return folder
    raise FileNotFoundError(name)


def read_gpt2_config(folder: Path) -> dict:
    """GPTConfig's values from folder's config.json, refused in one sentence unless it holds a
    GPT-2 that gpt/model.py can be: each size a whole number in range (lmkit.config.MAX_SIZES),
    every other setting of its type and GPT-2's. A missing field takes GPT-2's value; fields
    gpt/model.py does not use are ignored."""
    path = folder / "config.json"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UserError(f"{path} is {path.stat().st_size:,} bytes, not a model config (GPT-2's "
                            "is under 1 KB); fix --init-from")
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json; it is not a Hugging Face model "
                        "folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{path} is not a readable JSON file") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a Hugging Face model config")

    def refuse(problem: str):
        raise UserError(f"{path} is not a GPT-2 config gpt/model.py can load: {problem}; fix the "
                        "file or give another --init-from")

    model_type = config.get("model_type")
    architectures = config.get("architectures") or ["GPT2LMHeadModel"]
    if not ((model_type is None or isinstance(model_type, str)) and isinstance(architectures, list)
            and all(isinstance(a, str) for a in architectures)):
        refuse("model_type must be a string and architectures a list of strings")
    if model_type != "gpt2" or not all(a.startswith("GPT2") for a in architectures):
        raise UserError(f"{folder} holds a {model_type or 'unknown'} model "
                        f"({', '.join(architectures)}), not GPT-2; only GPT-2 weights fit "
                        "gpt/model.py")
    activation = config.get("activation_function", "gelu_new")
    if activation not in TANH_GELUS:
        raise UserError(f"{folder}'s activation is {activation}, but gpt/model.py uses the tanh "
                        "GELU (gelu_new)")
    values = {}
    for key, (name, default) in SIZE_FIELDS.items():
        value = config.get(key, config.get("n_ctx", default) if key == "n_positions" else default)
        problem = size_problem(name, value)
        if problem:
            refuse(f"its {key} {problem}")
        values[name] = value
    problem = heads_problem(values)
    if problem:
        refuse(problem)
    for key, default in FLAGS.items():
        if not isinstance(config.get(key, default), bool):
            refuse(f"its {key} {config[key]!r} is not true or false")
    epsilon = config.get("layer_norm_epsilon", 1e-5)
    if type(epsilon) not in (int, float) or not math.isfinite(epsilon):
        refuse(f"its layer_norm_epsilon {epsilon!r} is not a number")
    n_inner = config.get("n_inner")
    if n_inner is not None and type(n_inner) is not int:
        refuse(f"its n_inner {n_inner!r} is not a whole number")
    unsupported = {
        "n_inner": n_inner not in (None, 4 * values["n_embd"]),
        "scale_attn_by_inverse_layer_idx": config.get("scale_attn_by_inverse_layer_idx", False),
        "scale_attn_weights=false": not config.get("scale_attn_weights", True),
        "add_cross_attention": config.get("add_cross_attention", False),
        "layer_norm_epsilon": abs(epsilon - 1e-5) > 1e-12,
        "tie_word_embeddings=false": not config.get("tie_word_embeddings", True),
    }
    named = [name for name, differs in unsupported.items() if differs]
    if named:
        raise UserError(f"{folder}'s GPT-2 differs from gpt/model.py in {', '.join(named)}")
    return {**values, "bias": True}


def weights_file(folder: Path) -> Path:
    path = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if path is None:
        raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin")
    return path


def read_gpt2_weights(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            weights = safetensors_torch().load_file(path)
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception:
        raise UserError(f"{path} is not a readable weights file (truncated or damaged)") from None
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor)
                                                for t in weights.values()):
        raise UserError(f"{path} does not hold a dictionary of tensors")
    # GPT2LMHeadModel prefixes the body with "transformer."; GPT2Model and old files do not.
    weights = {k.removeprefix("transformer."): t for k, t in weights.items()}
    # The attention mask buffers of older files are not weights.
    return {k: t for k, t in weights.items()
            if not k.endswith((".attn.bias", ".attn.masked_bias"))}


def gpt_state_from_gpt2(weights: dict, shapes: dict, folder: Path) -> dict:
    """gpt/model.py's state_dict from GPT-2's tensors, checked against the shapes its config
    gives (lmkit.device.model_shapes).

    Our GPT uses GPT-2's own names; only the Conv1D weights are stored transposed.
    """
    reference = {name: shape for name, shape in shapes.items() if name != "lm_head.weight"}
    missing = sorted(set(reference) - set(weights))  # lm_head.weight is tied to wte.weight
    extra = sorted(set(weights) - set(reference) - {"lm_head.weight"})
    if missing or extra:
        names = ", ".join((missing or extra)[:3])
        raise UserError(f"{folder}'s weights do not match its config.json: "
                        f"{'missing' if missing else 'unexpected'} {names}")
    state = {}
    for name, shape in reference.items():
        tensor = weights[name].t() if name.endswith(CONV1D_WEIGHTS) else weights[name]
        if tuple(tensor.shape) != shape:
            raise UserError(f"{folder}'s {name} has shape {tuple(tensor.shape)}, but its "
                            f"config.json needs {shape}")
        if not tensor.is_floating_point():
            raise UserError(f"{folder}'s {name} holds {tensor.dtype} values, not weights")
        state[name] = tensor.float().contiguous()
    return state


def load_gpt2(source: str, block_size: int | None) -> tuple[dict, dict]:
    """(GPTConfig field values, state_dict of gpt.model.GPT) from a GPT-2 folder or model name.

    The architecture is the checkpoint's (biases on); block_size crops the position embedding
    (None keeps all of GPT-2's positions). Dropout is left to the training flags. The
    vocabulary stays GPT-2's 50257 tokens, unpadded: padding rows of zeros would score 0, far
    above a trained GPT-2's logits for real tokens (around -60), and swamp a fine-tune's loss.
    config.json is checked, and the model's size against the memory, before any weight is read.
    """
    folder = resolve_source(source)
    values = read_gpt2_config(folder)
    n_vocab, n_positions = values["vocab_size"], values["block_size"]
    if n_vocab < GPT2_VOCAB_SIZE:
        raise UserError(f"{folder}'s vocabulary has {n_vocab} tokens, fewer than GPT-2's "
                        f"{GPT2_VOCAB_SIZE}; it was trained with another tokenizer")
    block_size = n_positions if block_size is None else block_size
    if not 1 <= block_size <= n_positions:
        raise UserError(f"block size {block_size} does not fit {folder}, which has "
                        f"{n_positions} positions")
    path = weights_file(folder)
    shapes, n_params = model_shapes(GPT, GPTConfig(**values))
    # the file's tensors, then the float32 copies of the transposed ones and of any others
    check_fits(path.stat().st_size + 4 * n_params,
               f"loading the {n_params:,}-parameter GPT-2 in {folder}",
               "give --init-from a smaller model")
    state = gpt_state_from_gpt2(read_gpt2_weights(path), shapes, folder)
    state["lm_head.weight"] = state["wte.weight"]
    state["wpe.weight"] = state["wpe.weight"][:block_size].clone()  # nanoGPT's crop_block_size
    return {**values, "block_size": block_size}, state
