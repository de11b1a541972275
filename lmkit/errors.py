"""User-facing failures: one clear sentence on stderr and a non-zero exit, never a traceback."""
import os
import sys


class UserError(Exception):
    """A failure the user caused and can fix; the message says how."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def run_main(main) -> None:
    """Run a script's main(), turning UserError and Ctrl-C into a message and an exit code."""
    try:
        code = main()
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if not _out_of_memory(e):
            raise
        print("error: out of memory; use a smaller --batch-size (or --num-samples) or a smaller "
              "model", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


def _out_of_memory(e: Exception) -> bool:
    torch = sys.modules.get("torch")  # only a script that loaded torch can hit its OOM
    return isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError))
