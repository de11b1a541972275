"""User-facing failures: one clear sentence on stderr and a non-zero exit, never a traceback."""
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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
