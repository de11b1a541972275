"""When one process of a torchrun job fails, the others stop too, and one process says why.

The survivors learn of a failure from a collective (DDP's gradient all-reduce, the progress
average, the checkpoint's gather, the last barrier), which raises: at once when the failed
process's sockets close (it died, or raised and exited), and after --peer-timeout seconds when
it stopped answering (frozen by SIGSTOP or a debugger, or stuck). torchrun also sends SIGTERM to
every process once one has exited.

PeerWatch turns this into one sentence. Every process writes its host and pid into the job's
key-value store (torchrun's agent holds it, so it outlives any worker), and a process that
fails on its own writes what failed. The first process to explain a failure claims the report;
the others exit quietly:

    a process fails with a UserError     it prints its own sentence (the others stay quiet)
    a process fails with a bug           its traceback, then a survivor's sentence naming it
    a process dies or freezes            a survivor's sentence naming it and how it was lost

This is what Gloo (CPU processes) does and the tests check. NCCL (GPUs) applies --peer-timeout
in a watchdog thread that, by torch's default, ends the waiting process with NCCL's own log
instead of raising, so on GPUs the survivors stop within the timeout but may not say why.
"""
import datetime
import errno
import os
import signal
import socket
import sys
import time

from lmkit.errors import UserError

STORE_TIMEOUT_S = 5  # how long a look into the store may take once things have gone wrong
# A killed process closes its sockets before the process table shows it dead: how long to look.
DEATH_GRACE_S = 2
# What a collective's error says when a peer is gone: Gloo's socket errors and timeouts,
# NCCL's errors, torch's own DistError types.
PEER_ERRORS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe",
               "timed out")


class Terminated(Exception):
    """SIGTERM outside the training loop (whose own handler stops it after a step and saves)."""


def _raise_terminated(signum, frame):
    raise Terminated(signal.Signals(signum).name)


class PeerWatch:
    """One process's watch on the others of its torchrun job; does nothing in a plain run."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.store = None
        self.trainer = None  # set once the trainer is built: the run's folder and step
        self.prefix = (f"lmkit/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
                       f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def __enter__(self):
        if self.active:
            # torchrun's SIGTERM (another process failed, or the job is stopped) ends setup at
            # once, through explain(), instead of killing the process before it can say why.
            self.previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
            self.store = _connect_store()
            self._set(f"pid/{self.rank}", f"{socket.gethostname()} {os.getpid()}")
        return self

    def __exit__(self, *exc):
        if self.active and signal.getsignal(signal.SIGTERM) is _raise_terminated:
            signal.signal(signal.SIGTERM, self.previous_handler)

    # ---- the store: every call may fail once the job is breaking up -------------------------
    def _set(self, key: str, value: str) -> None:
        try:
            self.store.set(self.prefix + key, value)
        except Exception:  # no store, or its host is gone: the report says less
            pass

    def _get(self, key: str):
        try:
            if self.store.check([self.prefix + key]):
                return self.store.get(self.prefix + key).decode("utf-8", "replace")
        except Exception:
            pass
        return None

    def _claim_report(self, alone=True):
        """True for the first process to explain a failure; without a store, `alone`."""
        try:
            return self.store.add(self.prefix + "reported", 1) == 1
        except Exception:
            return alone

    # ---- explaining a failure -----------------------------------------------------------------
    def explain(self, error: BaseException):
        """What to raise instead of `error`, or None to raise it as it is. A lost peer becomes
        one sentence; this process's own failure is recorded for the others to name."""
        if not self.active:
            return None
        # From here the process is on its way out; torchrun's SIGTERM must not cut its message.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if is_peer_error(error) or isinstance(error, Terminated):
            lost = self._lost_peers()
            deadline = time.time() + DEATH_GRACE_S
            while not lost and time.time() < deadline:
                time.sleep(0.05)
                lost = self._lost_peers()
            if lost or not isinstance(error, Terminated):
                return self._report_lost(lost, error)
            return UserError(f"stopped by {error} outside the training steps (torchrun passes "
                             "it on when the job is stopped); every checkpoint written is intact",
                             exit_code=128 + signal.SIGTERM, speak=self._claim_report())
        if isinstance(error, UserError):
            self._set(f"failed/{self.rank}", "user")
            # without a store, rank 0 speaks (the usual rule): an error every process hits
            # (a bad flag, changed data) is then said once
            error.speak = self._claim_report(alone=None)
        else:
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            self._set(f"failed/{self.rank}", f"{type(error).__name__}: {first_line}".rstrip(": "))
        return None

    def _lost_peers(self) -> dict:
        """{rank: how it was lost} for the peers that failed, died or froze, as far as the
        store and, for processes on this machine, the process table tell."""
        lost, here = {}, socket.gethostname()
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            failure = self._get(f"failed/{rank}")
            if failure:
                lost[rank] = failure
                continue
            host, _, pid = (self._get(f"pid/{rank}") or "").partition(" ")
            if host == here and pid.isdigit():
                state = process_state(int(pid))
                if state:
                    lost[rank] = state
        return lost

    def _report_lost(self, lost: dict, error: BaseException) -> UserError:
        quiet = any(how == "user" for how in lost.values())  # it said why itself
        speak = not quiet and self._claim_report()
        timed_out = "timed out" in str(error).lower()
        wait = (f"{self.trainer.cfg.peer_timeout:g} s (--peer-timeout)"
                if self.trainer is not None else "--peer-timeout seconds")
        if not lost and self.world_size == 2:
            lost = {1 - self.rank: "answering" if timed_out else "lost"}
        if lost:
            names = " and ".join(str(rank) for rank in sorted(lost))
            whats = sorted(set(lost.values()))
            what = "; ".join(_describe(how, timed_out, wait) for how in whats)
            who = (f"process {names} of {self.world_size}" if len(lost) == 1
                   else f"processes {names} of {self.world_size}")
        else:
            who, what = "another process", _describe("lost", timed_out, wait)
        return UserError(f"{who} {what}, so this torchrun job stopped{self._where()}",
                         speak=speak)

    def _where(self) -> str:
        """Where the run stands, and the command that continues it."""
        trainer = self.trainer
        if trainer is None:
            return " while starting; run the same command again"
        if trainer.history.step >= trainer.cfg.max_iters:
            return f" after the run's last step; {trainer.paths.last} holds the finished run"
        step = f" at step {trainer.history.step}"
        if trainer.paths.last.is_file():
            return (f"{step}; {trainer.paths.last} holds the last checkpoint saved: run the same "
                    "command with --resume to continue from it")
        return f"{step}, before its first checkpoint; run the same command again"


def _describe(how: str, timed_out: bool, wait: str) -> str:
    if how == "dead":
        return "died (killed, or exited without a message)"
    if how == "frozen":
        return f"froze (stopped by SIGSTOP or a debugger) and did not answer in {wait}"
    if how == "answering" or (how == "lost" and timed_out):
        return f"did not answer in {wait} (stuck or overloaded)"
    if how == "lost":
        return "was lost (it died, or its connection broke)"
    return f"failed with {how} (its traceback is above)"


def process_state(pid: int):
    """'dead' or 'frozen' for a process of this machine that is one, else None (it runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except OSError as e:
        return None if e.errno == errno.EPERM else "dead"
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):  # no /proc (macOS), or it ended just now
        return None
    return {"Z": "dead", "X": "dead", "T": "frozen", "t": "frozen"}.get(state)


def is_peer_error(error: BaseException) -> bool:
    """Whether error is a collective's complaint about a peer, rather than this process's own."""
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is not None and isinstance(error, getattr(torch_dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(w in str(error).lower() for w in PEER_ERRORS)


def _connect_store():
    """A client of the job's store, or None: torchrun's agent hosts it, so it outlives every
    worker (a job started otherwise keeps it in rank 0, which is not up yet)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                             is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))
    except Exception:
        return None
