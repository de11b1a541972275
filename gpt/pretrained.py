"""GPT-2's weights for gpt/model.py (--init-from): a Hugging Face GPT-2 folder, or a model name
found in the local Hugging Face cache or downloaded once.

Our GPT is GPT-2's architecture with GPT-2's own names, so loading is a rename-free copy: only
the Conv1D weights are stored transposed. huggingface_hub is imported only to resolve a model
name.
"""
import json
from pathlib import Path

import torch

from gpt.model import GPT, GPTConfig
from lmkit.errors import UserError
from lmkit.hf import safetensors_torch
from lmkit.tokenizers import GPT2_VOCAB_SIZE

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # one formula, several names
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
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
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json; it is not a Hugging Face model "
                        "folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is not a readable JSON file") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a Hugging Face model config")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or ["GPT2LMHeadModel"]
    if model_type != "gpt2" or not all(a.startswith("GPT2") for a in architectures):
        raise UserError(f"{folder} holds a {model_type or 'unknown'} model "
                        f"({', '.join(architectures)}), not GPT-2; only GPT-2 weights fit "
                        "gpt/model.py")
    activation = config.get("activation_function", "gelu_new")
    if activation not in TANH_GELUS:
        raise UserError(f"{folder}'s activation is {activation}, but gpt/model.py uses the tanh "
                        "GELU (gelu_new)")
    n_embd = config.get("n_embd", 768)
    unsupported = {
        "n_inner": config.get("n_inner") not in (None, 4 * n_embd),
        "scale_attn_by_inverse_layer_idx": config.get("scale_attn_by_inverse_layer_idx", False),
        "scale_attn_weights=false": not config.get("scale_attn_weights", True),
        "add_cross_attention": config.get("add_cross_attention", False),
        "layer_norm_epsilon": abs(config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12,
        "tie_word_embeddings=false": not config.get("tie_word_embeddings", True),
    }
    named = [name for name, differs in unsupported.items() if differs]
    if named:
        raise UserError(f"{folder}'s GPT-2 differs from gpt/model.py in {', '.join(named)}")
    return config


def read_gpt2_weights(folder: Path) -> dict:
    path = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if path is None:
        raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin")
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


def gpt_state_from_gpt2(weights: dict, values: dict, folder: Path) -> dict:
    """gpt/model.py's state_dict from GPT-2's tensors, checked against the config's shapes.

    Our GPT uses GPT-2's own names; only the Conv1D weights are stored transposed.
    """
    with torch.device("meta"):  # shapes only, no memory
        reference = GPT(GPTConfig(**values)).state_dict()
    reference.pop("lm_head.weight")  # tied to wte.weight
    missing = sorted(set(reference) - set(weights))
    extra = sorted(set(weights) - set(reference) - {"lm_head.weight"})
    if missing or extra:
        names = ", ".join((missing or extra)[:3])
        raise UserError(f"{folder}'s weights do not match its config.json: "
                        f"{'missing' if missing else 'unexpected'} {names}")
    state = {}
    for name, like in reference.items():
        tensor = weights[name].t() if name.endswith(CONV1D_WEIGHTS) else weights[name]
        if tensor.shape != like.shape:
            raise UserError(f"{folder}'s {name} has shape {tuple(tensor.shape)}, but its "
                            f"config.json needs {tuple(like.shape)}")
        state[name] = tensor.float().contiguous()
    return state


def load_gpt2(source: str, block_size: int | None) -> tuple[dict, dict]:
    """(GPTConfig field values, state_dict of gpt.model.GPT) from a GPT-2 folder or model name.

    The architecture is the checkpoint's (biases on); block_size crops the position embedding
    (None keeps all of GPT-2's positions). Dropout is left to the training flags. The
    vocabulary stays GPT-2's 50257 tokens, unpadded: padding rows of zeros would score 0, far
    above a trained GPT-2's logits for real tokens (around -60), and swamp a fine-tune's loss.
    """
    folder = resolve_source(source)
    config = read_gpt2_config(folder)
    weights = read_gpt2_weights(folder)
    n_vocab = config.get("vocab_size", GPT2_VOCAB_SIZE)
    n_positions = config.get("n_positions", config.get("n_ctx", 1024))
    values = dict(vocab_size=n_vocab, block_size=n_positions, n_layer=config.get("n_layer", 12),
                  n_head=config.get("n_head", 12), n_embd=config.get("n_embd", 768), bias=True)
    if values["n_embd"] % values["n_head"]:
        raise UserError(f"{folder}'s n_embd {values['n_embd']} is not divisible by its n_head "
                        f"{values['n_head']}")
    if n_vocab < GPT2_VOCAB_SIZE:
        raise UserError(f"{folder}'s vocabulary has {n_vocab} tokens, fewer than GPT-2's "
                        f"{GPT2_VOCAB_SIZE}; it was trained with another tokenizer")
    block_size = n_positions if block_size is None else block_size
    if not 1 <= block_size <= n_positions:
        raise UserError(f"block size {block_size} does not fit {folder}, which has "
                        f"{n_positions} positions")
    state = gpt_state_from_gpt2(weights, values, folder)
    state["lm_head.weight"] = state["wte.weight"]
    state["wpe.weight"] = state["wpe.weight"][:block_size].clone()  # nanoGPT's crop_block_size
    return {**values, "block_size": block_size}, state
