"""Export a trained gpt model as a Hugging Face GPT-2 folder.

    python gpt/export.py --out hf/gpt
    python gpt/export.py --run wide --out hf/wide --overwrite

The folder loads offline with transformers.AutoModelForCausalLM.from_pretrained(folder) (a
GPT2LMHeadModel) and AutoTokenizer.from_pretrained(folder) (GPT-2's tokenizer).
"""
import sys
from pathlib import Path

if not __package__:  # run as a script: make the repository root importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
from gpt.family import FAMILY  # noqa: E402
from lmkit import export_cli  # noqa: E402
from lmkit.errors import run_main  # noqa: E402


def main(argv=None) -> int:
    return export_cli.main(FAMILY, __doc__, argv)


if __name__ == "__main__":
    run_main(main)
