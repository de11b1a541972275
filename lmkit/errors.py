"""User-facing failures: one clear sentence on stderr and a non-zero exit, never a traceback."""
import os
import sys


class UserError(Exception):
    """A failure the user caused and can fix; the message says how."""

    def __init__(self, message: str, exit_code: int = 1, speak=None):
        super().__init__(message)
        self.exit_code = exit_code
        # Whether this process prints it; None: rank 0 does, as every process of a torchrun job
        # hits the same error (lmkit.peers decides for the errors one process hits alone).
        self.speak = speak


def run_main(main) -> None:
    """Run a script's main(), turning UserError and Ctrl-C into a message and an exit code."""
    try:
        code = main()
    except UserError as e:
        speak = e.speak if e.speak is not None else os.environ.get("RANK", "0") == "0"
        if speak:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        print("error: out of memory; use a smaller --batch-size with a larger --grad-accum-steps "
              "(the same tokens per step), a smaller model, or fewer --num-samples when sampling; "
              "the last checkpoint written is intact", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


def is_out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA), and the plain RuntimeError that
    Apple GPUs raise ("MPS backend out of memory")."""
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")  # only a script that loaded torch can hit its errors
    if torch is None:
        return False
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
