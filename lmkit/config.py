"""Hyperparameters and the command line derived from them.

Two dataclasses hold every flag: TrainConfig (how to train; the same fields for both models)
and the model's own config dataclass in its model.py (the architecture). A model family
(lmkit.family) gives the values of its seed recipe and presets; nothing here is any model's
recipe.
"""
import argparse
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

from lmkit.errors import UserError


def option(help, default=MISSING, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # The recipe: each model family's seed recipe gives these values.
    max_iters: int = option("optimizer steps in the whole run")
    eval_interval: int = option("steps between evaluations, checkpoints and plot updates")
    eval_iters: int = option("random batches averaged for the train loss at each evaluation "
                             "(the val loss always covers the whole split)")
    batch_size: int = option("sequences per micro-batch")
    grad_accum_steps: int = option("micro-batches per optimizer step (divided across processes "
                                   "under torchrun)")
    learning_rate: float = option("peak learning rate")
    min_lr: float = option("learning rate at the end of the cosine decay")
    warmup_iters: int = option("steps of linear warmup; -1 means a quarter of --max-iters")
    weight_decay: float = option("decoupled weight decay of the tensors of 2+ dimensions "
                                "(AdamW's, and Muon's matrices)")
    beta2: float = option("AdamW beta2")
    # Settings with one default for every model.
    optimizer: str = option("adamw: AdamW for every weight; muon: Muon for the 2-D matrices "
                            "inside the blocks, AdamW for the rest", "adamw", ["adamw", "muon"])
    muon_lr: float = option("Muon's peak learning rate (the schedule scales it like "
                            "--learning-rate)", 0.02)
    muon_momentum: float = option("Muon's Nesterov momentum", 0.95)
    embedding_lr: float = option("AdamW peak rate for the embedding tables (the GPT's token "
                                 "embedding is also its head); 0 means --learning-rate. The "
                                 "schedule scales it like --learning-rate", 0.0)
    beta1: float = option("AdamW beta1", 0.9)
    eps: float = option("AdamW epsilon", 1e-8)
    grad_clip: float = option("clip the gradient norm to this (0 turns clipping off)", 1.0)
    lr_schedule: str = option("cosine: warmup then cosine decay to --min-lr; constant: "
                              "--learning-rate throughout", "cosine", ["cosine", "constant"])
    seed: int = option("random seed for initialisation, batches and dropout", 1337)
    log_interval: int = option("steps between progress updates", 50)
    dtype: str = option("compute precision; auto: bfloat16 autocast where it is supported and "
                        "faster, float16 with a gradient scaler on CUDA GPUs without bfloat16, "
                        "else float32", "auto", ["auto", "float32", "bfloat16", "float16"])
    compile: bool = option("torch.compile the model (pays off on long runs)", False)
    sample_tokens: int = option("tokens in the sample written at the end of training", 300)
    data_dir: str = option("folder with train.bin, val.bin and meta.json (default: "
                           "data/<tokenizer>; --resume keeps the run's)", "")
    init_from: str = option("gpt only: start from GPT-2 weights, a Hugging Face GPT-2 folder or "
                            "a model name (gpt2, gpt2-medium, ...) from the local Hugging Face "
                            "cache or the network; the model takes its architecture, its "
                            "positions cropped to --block-size", "")
    # Per invocation: neither saved in the checkpoint nor restored by --resume.
    device: str = option("where to train; auto picks cuda, then mps, then cpu", "auto",
                         ["auto", "cpu", "cuda", "mps"])
    resume: bool = option("continue from checkpoints/<run>/last.pt; flags you leave out keep "
                          "the checkpoint's values", False)
    run: str = option("name of the subfolder in checkpoints/, plots/ and samples/ (default: "
                      "the model's name)", "")
    overwrite: bool = option("start afresh even if checkpoints/<run>/ already holds a run (its "
                             "files go once the new run has saved its first checkpoint)", False)
    new_data: bool = option("with --resume: continue although the data was prepared from "
                            "another text since the run was saved", False)
    out_dir: str = option("folder holding checkpoints/, plots/ and samples/ (default: the "
                          "repository root)", "")
    tensorboard: bool = option("log the train and val loss, val bits per character, learning "
                               "rate, tokens/s and each evaluation's sample to TensorBoard event "
                               "files in checkpoints/<run>/tensorboard/ (needs `pip install "
                               "tensorboard`)", False)
    wandb: bool = option("log the same to Weights & Biases, in checkpoints/<run>/wandb/; offline "
                         "(sync later with `wandb sync`) unless W&B has an API key or WANDB_MODE "
                         "says otherwise (needs `pip install wandb`)", False)
    show_samples: bool = option("print the start of a generated sample after each evaluation",
                                False)
    peer_timeout: float = option("under torchrun: seconds a process waits for the others at each "
                                 "synchronisation before it stops the run, naming the process that "
                                 "did not answer; a dead process is noticed at once, this bounds "
                                 "the wait for a frozen one (NCCL's own default)", 600.0)

    def to_dict(self) -> dict:
        return asdict(self)


# Tracking and display flags are per invocation too: they say how to watch this session, not
# how to train, and a --resume on a machine without tensorboard or wandb should not fail on a
# flag nobody typed (the trainer names the ones an earlier session used; see lmkit.tracking).
PER_INVOCATION = ("device", "resume", "run", "overwrite", "new_data", "out_dir", "tensorboard",
                  "wandb", "show_samples", "peer_timeout")

# Help for the architecture flags, which come from the model's own config dataclass.
MODEL_HELP = {
    "block_size": "context length in tokens",
    "n_layer": "transformer blocks",
    "n_head": "attention heads per block",
    "n_embd": "embedding width",
    "dropout": "dropout probability",
    "bias": "biases in the linear and LayerNorm layers",
    "rotary": "rotary position embeddings on queries and keys instead of a learned position "
              "table (needs an even n_embd / n_head)",
    "qk_norm": "scale every head's queries and keys to RMS 1 before attention (QK-norm, no "
               "gains)",
}

# The largest architecture a model config may ask for, by flag, in a checkpoint or in a Hugging
# Face config.json: far beyond any model this project trains (GPT-3 has 96 layers of width
# 12,288), and small enough that every tensor's size fits in 64 bits and a config is checked in
# an instant. The memory check (lmkit.device) refuses the sizes in between that a machine cannot
# hold.
MAX_SIZES = {"vocab_size": 2 ** 24, "block_size": 2 ** 24, "n_layer": 2 ** 12, "n_head": 2 ** 16,
             "n_embd": 2 ** 16}
INT64_LIMIT = 2 ** 63  # counts (steps, iterations, seeds) stay below it: torch keeps them in int64


def size_problem(name: str, value):
    """What is wrong with value as the model size `name` (a key of MAX_SIZES), or None: a size is
    a whole number (not a bool, a float or a string) from 1 to its limit."""
    if type(value) is not int:
        return f"{value!r} is not a whole number"
    if value < 1:
        return f"{value} is below 1"
    if value > MAX_SIZES[name]:
        return f"{value:,} is beyond the largest this project builds, {MAX_SIZES[name]:,}"
    return None


def heads_problem(values: dict):
    """What is wrong with a model config's (checkpoint's or config.json's) heads, or None: the
    width must split evenly into heads, and rotary positions need an even head size."""
    if values["n_embd"] % values["n_head"]:
        return f"its n_embd {values['n_embd']} is not divisible by its n_head {values['n_head']}"
    if values.get("rotary") and values["n_embd"] // values["n_head"] % 2:
        return "its rotary model has an odd head size"
    return None

# torchrun's own parser takes a script's "--run" for an abbreviation of its "--run-path";
# "--run-name" gets through it.
ALIASES = {"run": ("--run-name",)}


def train_fields() -> dict:
    return {f.name: f for f in fields(TrainConfig)}


def model_fields(family) -> dict:
    """The model config's fields a user sets; vocab_size comes from the data."""
    return {f.name: f for f in fields(family.config_cls) if f.name != "vocab_size"}


def recipe_values(family) -> dict:
    """Every flag's value in the family's seed recipe."""
    values = {name: f.default for name, f in train_fields().items() if f.default is not MISSING}
    values.update(family.recipe)
    values.update({name: f.default for name, f in model_fields(family).items()})
    return values


def build_parser(family, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["seed", *family.presets], default=None,
                        help="starting values for every flag below; any flag overrides it "
                             "(default: seed)")
    seed = recipe_values(family)
    for name, f in {**train_fields(), **model_fields(family)}.items():
        shown = [f"seed: {seed[name]}"] + [f"{preset}: {values[name]}" for preset, values
                                           in family.presets.items() if name in values]
        help_text = f"{f.metadata.get('help') or MODEL_HELP.get(name, name)} ({'; '.join(shown)})"
        flags = ["--" + name.replace("_", "-"), *ALIASES.get(name, ())]
        if f.type is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text.replace("%", "%%"))
        else:
            parser.add_argument(*flags, dest=name, type=f.type, default=None,
                                choices=f.metadata.get("choices"),
                                help=help_text.replace("%", "%%"))
    return parser


def parse_flags(family, description: str, argv=None) -> dict:
    """The values the user chose on the command line, a preset's included, with the recipe's
    schedule fitted to a shorter --max-iters (see fit_schedule)."""
    args = vars(build_parser(family, description).parse_args(argv))
    preset = args.pop("preset")
    chosen = dict(family.presets.get(preset, {})) if preset else {}
    explicit = {k: v for k, v in args.items() if v is not None}
    if not explicit.get("resume"):  # a resumed run's schedule is the checkpoint's, not a recipe's
        changes = fit_schedule({**recipe_values(family), **chosen}, explicit)
        if changes and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 says it
            print("short run: " + ", ".join(f"--{name.replace('_', '-')} {old} -> {new}"
                                            for name, (old, new) in changes.items())
                  + f" to fit --max-iters {explicit['max_iters']}")
        chosen.update({name: new for name, (old, new) in changes.items()})
    chosen.update(explicit)
    return chosen


def fit_schedule(recipe: dict, explicit: dict) -> dict:
    """{name: (recipe's value, fitted value)} for the recipe's (or preset's) warmup and
    evaluation interval when they exceed a shorter --max-iters given in `explicit`. Warmup
    keeps its fraction of the recipe's run; evaluation comes at the end. Values the user gave
    stay as given (validate refuses a warmup longer than the run)."""
    max_iters, changes = explicit.get("max_iters"), {}
    if max_iters is None or max_iters < 1:  # validate says what is wrong with < 1
        return changes
    warmup = recipe["warmup_iters"]  # -1 (a quarter of the run) always fits
    if "warmup_iters" not in explicit and warmup > max_iters:
        fitted = round(warmup * max_iters / recipe["max_iters"])
        changes["warmup_iters"] = (warmup, max(0, min(max_iters, fitted)))
    if "eval_interval" not in explicit and recipe["eval_interval"] > max_iters:
        changes["eval_interval"] = (recipe["eval_interval"], max_iters)
    return changes


def split_values(family, values: dict) -> tuple:
    """(TrainConfig, the model config's values without vocab_size) from one dict of flags."""
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in train_fields()})
    model_values = {k: v for k, v in values.items() if k in model_fields(family)}
    return cfg, model_values


def validate(cfg: TrainConfig, model_values: dict) -> None:
    def need(ok, message):
        if not ok:
            raise UserError(message, exit_code=2)

    counts = {**{k: getattr(cfg, k) for k in ("max_iters", "eval_interval", "eval_iters",
                                              "log_interval", "batch_size", "grad_accum_steps")},
              **{k: model_values[k] for k in ("block_size", "n_layer", "n_head", "n_embd")}}
    for name, value in counts.items():
        need(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name, limit in MAX_SIZES.items():
        value = model_values.get(name, 1)
        need(value <= limit, f"--{name.replace('_', '-')} must be at most {limit:,}, got {value:,}")
    need(0 <= cfg.seed < 2 ** 63, f"--seed must be between 0 and 2**63 - 1, got {cfg.seed}")
    whole_numbers = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.type is int}
    for name, value in whole_numbers.items():
        need(abs(value) < INT64_LIMIT, f"--{name.replace('_', '-')} must be below 2**63, got "
                                       f"{value}")
    need(model_values["n_embd"] % model_values["n_head"] == 0,
         f"--n-embd {model_values['n_embd']} is not divisible by --n-head "
         f"{model_values['n_head']}; pick sizes where it is (for example --n-embd 384 --n-head 6)")
    need(0 <= model_values["dropout"] < 1, f"--dropout must be in [0, 1), got "
                                           f"{model_values['dropout']}")
    floats = {**{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.type is float},
              **{k: v for k, v in model_values.items() if isinstance(v, float)}}
    for name, value in floats.items():
        need(math.isfinite(value), f"--{name.replace('_', '-')} must be a finite number, got {value}")
    need(cfg.learning_rate > 0, f"--learning-rate must be positive, got {cfg.learning_rate}")
    need(cfg.muon_lr > 0, f"--muon-lr must be positive, got {cfg.muon_lr}")
    need(cfg.embedding_lr >= 0, f"--embedding-lr must be 0 (--learning-rate) or more, got "
                                f"{cfg.embedding_lr}")
    need(0 <= cfg.muon_momentum < 1, f"--muon-momentum must be in [0, 1), got {cfg.muon_momentum}")
    head_size = model_values["n_embd"] // model_values["n_head"]
    need(not model_values.get("rotary") or head_size % 2 == 0,
         f"--rotary needs an even head size (--n-embd / --n-head), got {head_size}")
    need(0 <= cfg.min_lr <= cfg.learning_rate,
         f"--min-lr must be between 0 and --learning-rate, got {cfg.min_lr}")
    need(cfg.warmup_iters >= -1, f"--warmup-iters must be -1 or more, got {cfg.warmup_iters}")
    need(cfg.warmup_iters <= cfg.max_iters,
         f"--warmup-iters {cfg.warmup_iters} is more than --max-iters {cfg.max_iters}, so the "
         "learning rate would never reach its peak; use at most --max-iters (or -1 for a quarter)")
    need(cfg.weight_decay >= 0, f"--weight-decay must be 0 or more, got {cfg.weight_decay}")
    need(0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)")
    need(cfg.eps > 0, f"--eps must be positive, got {cfg.eps}")
    need(cfg.grad_clip >= 0, f"--grad-clip must be 0 or more, got {cfg.grad_clip}")
    need(0 < cfg.peer_timeout <= 86400, f"--peer-timeout must be more than 0 and at most 86400 "
                                        f"seconds (a day), got {cfg.peer_timeout}")
    need(cfg.sample_tokens >= 0, f"--sample-tokens must be 0 or more, got {cfg.sample_tokens}")
