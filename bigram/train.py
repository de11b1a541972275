"""Train the character-level transformer of the lectures.

    python bigram/train.py                  # the seed recipe (about 10.8M parameters)
    python bigram/train.py --preset cpu     # a small model that trains in minutes on a laptop CPU
    python bigram/train.py --resume         # continue checkpoints/bigram/last.pt exactly
    torchrun --standalone --nproc_per_node=2 bigram/train.py   # several processes (DDP)

The seed recipe and the presets are in bigram/family.py; the training loop is lmkit/trainer.py.
"""
import sys
from pathlib import Path

if not __package__:  # run as a script: make the repository root importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
from bigram.family import FAMILY  # noqa: E402
from lmkit import train_cli  # noqa: E402
from lmkit.errors import run_main  # noqa: E402


def main(argv=None) -> int:
    return train_cli.main(FAMILY, __doc__, argv)


if __name__ == "__main__":
    run_main(main)
