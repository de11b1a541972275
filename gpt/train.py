"""Train the GPT-2-style model on GPT-2 BPE tokens.

    python gpt/train.py                  # the seed recipe: 4096 tokens/step, 4000 steps
    python gpt/train.py --preset cpu     # a shorter run for a laptop CPU
    python gpt/train.py --resume         # continue checkpoints/gpt/last.pt exactly
    torchrun --standalone --nproc_per_node=2 gpt/train.py   # several processes (DDP)
"""
import sys
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a script: make the repository root importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
from gpt.model import GPT, GPTConfig  # noqa: E402
from lmkit import trainer  # noqa: E402
from lmkit.config import TrainConfig  # noqa: E402
from lmkit.errors import run_main  # noqa: E402


@dataclass
class GPTTrainConfig(TrainConfig):
    """The seed recipe: its values are the defaults of every flag."""
    max_iters: int = 4000
    eval_interval: int = 250
    eval_iters: int = 50
    batch_size: int = 8
    block_size: int = GPTConfig.block_size
    grad_accum_steps: int = 8
    n_layer: int = GPTConfig.n_layer
    n_head: int = GPTConfig.n_head
    n_embd: int = GPTConfig.n_embd
    dropout: float = GPTConfig.dropout
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = -1  # a quarter of max_iters
    weight_decay: float = 0.1
    beta2: float = 0.95


PRESETS = {
    # About ten minutes on a 2-core CPU.
    "cpu": dict(max_iters=600, eval_interval=100, eval_iters=20, grad_accum_steps=4,
                learning_rate=1e-3, min_lr=1e-4, warmup_iters=60),
}

SPEC = trainer.ModelSpec(kind="gpt", tokenizer="gpt2", model_cls=GPT, config_cls=GPTConfig,
                         pad_vocab_to=64, default_top_k=50)


def main(argv=None) -> int:
    return trainer.main(GPTTrainConfig, PRESETS, SPEC, __doc__, argv)


if __name__ == "__main__":
    run_main(main)
