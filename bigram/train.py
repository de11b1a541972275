"""Train the character-level transformer of the lectures.

    python bigram/train.py                  # the seed recipe (about 10.8M parameters)
    python bigram/train.py --preset cpu     # a small model that trains in minutes on a laptop CPU
    python bigram/train.py --resume         # continue checkpoints/bigram/last.pt exactly
    torchrun --standalone --nproc_per_node=2 bigram/train.py   # several processes (DDP)
"""
import sys
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a script: make the repository root importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
from bigram.model import BigramConfig, BigramLanguageModel  # noqa: E402
from lmkit import trainer  # noqa: E402
from lmkit.config import TrainConfig  # noqa: E402
from lmkit.errors import run_main  # noqa: E402


@dataclass
class BigramTrainConfig(TrainConfig):
    """The seed recipe of the lectures: its values are the defaults of every flag."""
    max_iters: int = 5000
    eval_interval: int = 500
    eval_iters: int = 200
    batch_size: int = 64
    block_size: int = BigramConfig.block_size
    n_layer: int = BigramConfig.n_layer
    n_head: int = BigramConfig.n_head
    n_embd: int = BigramConfig.n_embd
    dropout: float = BigramConfig.dropout
    learning_rate: float = 3e-4
    min_lr: float = 3e-5
    warmup_iters: int = 100
    weight_decay: float = 0.01
    beta2: float = 0.999


PRESETS = {
    # Val loss about 1.73 in about 75 s on a 2-core CPU (see the README's results).
    "cpu": dict(max_iters=600, eval_interval=200, eval_iters=20, batch_size=64, block_size=64,
                n_layer=4, n_head=4, n_embd=128, dropout=0.0, learning_rate=2e-3, min_lr=2e-4,
                warmup_iters=100, beta2=0.99, weight_decay=0.1),
}

SPEC = trainer.ModelSpec(kind="bigram", tokenizer="char", model_cls=BigramLanguageModel,
                         config_cls=BigramConfig, default_top_k=None)


def main(argv=None) -> int:
    return trainer.main(BigramTrainConfig, PRESETS, SPEC, __doc__, argv)


if __name__ == "__main__":
    run_main(main)
