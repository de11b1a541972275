"""Generate text from a trained bigram model.

    python bigram/sample.py --num-samples 4
    python bigram/sample.py --prompt "ROMEO:" --temperature 0.8 --stream
    python bigram/sample.py --interactive --max-new-tokens 200
"""
import sys
from pathlib import Path

if not __package__:  # run as a script: make the repository root importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
from bigram.family import FAMILY  # noqa: E402
from lmkit import sample_cli  # noqa: E402
from lmkit.errors import run_main  # noqa: E402


def main(argv=None) -> int:
    return sample_cli.main(FAMILY, __doc__, argv)


if __name__ == "__main__":
    run_main(main)
