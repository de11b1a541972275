"""Generate text from a trained gpt model.

    python gpt/sample.py --num-samples 4
    python gpt/sample.py --prompt "ROMEO:" --temperature 0.8 --stream
"""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)
from gpt.train import SPEC  # noqa: E402
from lmkit import sampling  # noqa: E402
from lmkit.errors import run_main  # noqa: E402

DEFAULT_TOP_K = 50  # as in the seed recipe


def main(argv=None) -> int:
    return sampling.main(SPEC, DEFAULT_TOP_K, __doc__, argv)


if __name__ == "__main__":
    run_main(main)
