"""Train the GPT-2-style model on GPT-2 BPE tokens.

    python gpt/train.py                  # the seed recipe: 4096 tokens/step, 4000 steps
    python gpt/train.py --preset cpu     # a shorter run for a laptop CPU
    python gpt/train.py --resume         # continue checkpoints/gpt/last.pt exactly
    torchrun --standalone --nproc_per_node=2 gpt/train.py   # several processes (DDP)

The seed recipe and the presets are in gpt/family.py; the training loop is lmkit/trainer.py.
"""
import sys
from pathlib import Path

if not __package__:  # run as a script: make the repository root importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
from gpt.family import FAMILY  # noqa: E402
from lmkit import train_cli  # noqa: E402
from lmkit.errors import run_main  # noqa: E402


def main(argv=None) -> int:
    return train_cli.main(FAMILY, __doc__, argv)


if __name__ == "__main__":
    run_main(main)
