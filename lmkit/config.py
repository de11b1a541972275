"""Training hyperparameters: one dataclass, from which every command-line flag is derived."""
import argparse
from dataclasses import asdict, dataclass, field, fields

from lmkit.errors import UserError


def option(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Fields shared by both models; each train.py subclasses it with its seed recipe as defaults."""
    device: str = option("auto", "where to train; auto picks cuda, then mps, then cpu",
                         ["auto", "cpu", "cuda", "mps"])
    resume: bool = option(False, "continue from checkpoints/<run>/last.pt; flags you leave out "
                                 "keep the checkpoint's values")
    run: str = option("", "name of the subfolder in checkpoints/, plots/ and samples/ "
                          "(default: the model's name)")
    seed: int = option(1337, "random seed for initialisation, batches and dropout")
    max_iters: int = option(5000, "optimizer steps in the whole run")
    eval_interval: int = option(500, "steps between evaluations, checkpoints and plot updates")
    eval_iters: int = option(200, "random batches averaged for the train loss at each evaluation "
                                  "(the val loss always covers the whole split)")
    log_interval: int = option(50, "steps between progress updates")
    batch_size: int = option(64, "sequences per micro-batch")
    block_size: int = option(256, "context length in tokens")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step (divided across "
                                      "processes under torchrun)")
    n_layer: int = option(6, "transformer blocks")
    n_head: int = option(6, "attention heads per block")
    n_embd: int = option(384, "embedding width")
    dropout: float = option(0.2, "dropout probability")
    learning_rate: float = option(3e-4, "peak learning rate")
    min_lr: float = option(3e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(100, "steps of linear warmup; -1 means a quarter of --max-iters")
    lr_schedule: str = option("cosine", "cosine: warmup then cosine decay to --min-lr; "
                                        "constant: --learning-rate throughout",
                              ["cosine", "constant"])
    weight_decay: float = option(0.01, "AdamW weight decay, applied to tensors of 2+ dimensions")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.999, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 turns clipping off)")
    dtype: str = option("auto", "compute precision; auto: bfloat16 autocast where it is "
                                "supported and faster, else float32",
                        ["auto", "float32", "bfloat16"])
    compile: bool = option(False, "torch.compile the model (pays off on long runs)")
    sample_tokens: int = option(300, "tokens in the sample written at the end of training")
    data_dir: str = option("", "folder with train.bin, val.bin and meta.json "
                               "(default: data/<tokenizer>; --resume keeps the run's)")
    overwrite: bool = option(False, "start afresh even if checkpoints/<run>/ already holds a run")
    out_dir: str = option("", "folder holding checkpoints/, plots/ and samples/ "
                              "(default: the repository root)")

    def to_dict(self) -> dict:
        return asdict(self)


# Each model's train config subclasses TrainConfig to change defaults; help and choices live here.
BASE_FIELDS = {f.name: f for f in fields(TrainConfig)}

# torchrun's own parser takes a script's "--run" for an abbreviation of its "--run-path";
# "--run-name" gets through it.
ALIASES = {"run": ("--run-name",)}

# Flags that only steer this invocation; they are neither saved nor restored on --resume.
PER_INVOCATION = ("device", "resume", "run", "out_dir", "overwrite")


def _flag_help(f, seed_value, presets):
    text = BASE_FIELDS[f.name].metadata["help"]
    shown = [f"seed: {seed_value}"]
    shown += [f"{name}: {values[f.name]}" for name, values in presets.items() if f.name in values]
    return f"{text} ({'; '.join(shown)})".replace("%", "%%")


def build_parser(config_cls, presets: dict, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["seed", *presets], default=None,
                        help="starting values for every flag below; any flag overrides it "
                             "(default: seed)")
    for f in fields(config_cls):
        flags = ["--" + f.name.replace("_", "-"), *ALIASES.get(f.name, ())]
        help_text = _flag_help(f, f.default, presets)
        if f.type is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, type=f.type, default=None,
                                choices=BASE_FIELDS[f.name].metadata["choices"],
                                help=help_text)
    return parser


def parse_config(config_cls, presets: dict, description: str, argv=None):
    """Return (config, explicit): the full config, and the values the user chose (preset included)."""
    args = vars(build_parser(config_cls, presets, description).parse_args(argv))
    preset = args.pop("preset")
    explicit = dict(presets.get(preset, {})) if preset else {}
    explicit.update({k: v for k, v in args.items() if v is not None})
    return config_cls(**explicit), explicit


def validate(cfg: TrainConfig) -> None:
    def need(ok, message):
        if not ok:
            raise UserError(message, exit_code=2)

    for name in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size",
                 "block_size", "grad_accum_steps", "n_layer", "n_head", "n_embd"):
        need(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, "
                                      f"got {getattr(cfg, name)}")
    need(cfg.n_embd % cfg.n_head == 0,
         f"--n-embd {cfg.n_embd} is not divisible by --n-head {cfg.n_head}; pick sizes where "
         "it is (for example --n-embd 384 --n-head 6)")
    need(0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}")
    need(cfg.learning_rate > 0, f"--learning-rate must be positive, got {cfg.learning_rate}")
    need(0 <= cfg.min_lr <= cfg.learning_rate,
         f"--min-lr must be between 0 and --learning-rate, got {cfg.min_lr}")
    need(cfg.warmup_iters >= -1, f"--warmup-iters must be -1 or more, got {cfg.warmup_iters}")
    need(cfg.weight_decay >= 0, f"--weight-decay must be 0 or more, got {cfg.weight_decay}")
    need(0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)")
    need(cfg.eps > 0, f"--eps must be positive, got {cfg.eps}")
    need(cfg.grad_clip >= 0, f"--grad-clip must be 0 or more, got {cfg.grad_clip}")
    need(cfg.sample_tokens >= 0, f"--sample-tokens must be 0 or more, got {cfg.sample_tokens}")
