"""Process-wide settings. Only the commands' main() functions call these, each once and with its
reason; the rest of lmkit leaves the process as it finds it.

    protect_console()    every command: a closed pipe or a console that cannot encode the text
                         must not kill a run (files, not the console, hold every result)
    allow_tf32()         training and sampling: float32 matrix products on NVIDIA GPUs in TF32
    keep_freed_memory()  training on a CPU: no page faults for memory each step allocates again
"""
import errno
import os
import sys


class ForgivingStream:
    """A console stream whose reader may go away: writes after that go to /dev/null."""

    def __init__(self, stream):
        self.stream = stream

    def _silence(self) -> None:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError):
            self.stream = open(os.devnull, "w", encoding="utf-8")

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
    """Replace what the console cannot encode, and survive a reader that goes away (`| head`,
    a dead `tee`): sys.stdout and sys.stderr become ForgivingStreams."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, ForgivingStream) or stream is None:
            continue
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
        setattr(sys, name, ForgivingStream(stream))


def allow_tf32() -> None:
    """Let CUDA run float32 matrix products and convolutions in TF32 (a 10-bit mantissa), several
    times faster on Ampere and later GPUs and precise enough for training and sampling. No effect
    without a CUDA GPU."""
    import torch  # here, not above: plot_runs.py takes the console guard and never loads torch
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for the next allocation instead of returning it to the OS.

    A training step frees its activations and allocates the same sizes again in the next step.
    By default glibc hands blocks over 128 KiB back to the kernel (and trims its heap), so every
    step page-faults its activations in afresh, zeroed page by page: 700-1,100 faults a step on
    nanoGPT's CPU char recipe, which cost 6-15% of its step time on a 2-core AVX2 machine. The
    process keeps its peak memory instead, which a training run reaches every step anyway.
    Returns whether the setting took: False where the C library is not glibc (macOS, Windows,
    musl).
    """
    import ctypes
    import ctypes.util
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD in malloc.h
    # older glibc caps the mmap threshold at 32 MiB and refuses more
    mmap_ok = mallopt(mmap_threshold, 1 << 30) or mallopt(mmap_threshold, 32 << 20)
    return bool(mmap_ok) and bool(mallopt(trim_threshold, 1 << 30))
