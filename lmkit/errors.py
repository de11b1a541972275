"""User-facing failures: one clear sentence on stderr and a non-zero exit, never a traceback.

run_main also makes the console safe to lose: text a console cannot encode is shown with
replacement characters, and a reader that goes away (`| head`, a dead `tee`) silences the
output instead of killing the run. Files, not the console, hold every result.
"""
import errno
import os
import sys


class UserError(Exception):
    """A failure the user caused and can fix; the message says how."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class ForgivingStream:
    """A console stream whose reader may go away: writes after that go to /dev/null."""

    def __init__(self, stream):
        self.stream = stream

    def _silence(self) -> None:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError):
            self.stream = open(os.devnull, "w")

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EINVAL, errno.EIO):
                raise
            self._silence()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EINVAL, errno.EIO):
                raise
            self._silence()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def protect_console() -> None:
    """Replace what the console cannot encode, and survive a reader that goes away."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, ForgivingStream) or stream is None:
            continue
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
        setattr(sys, name, ForgivingStream(stream))


def run_main(main) -> None:
    """Run a script's main(), turning UserError and Ctrl-C into a message and an exit code."""
    protect_console()
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
        print("error: out of memory; use a smaller --batch-size with a larger --grad-accum-steps "
              "(the same tokens per step), a smaller model, or fewer --num-samples when sampling; "
              "the last checkpoint written is intact", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


def _out_of_memory(e: Exception) -> bool:
    if isinstance(e, MemoryError):
        return True
    if "torch" not in sys.modules:  # only a script that loaded torch can hit its other OOMs
        return False
    from lmkit.device import is_out_of_memory
    return is_out_of_memory(e)
