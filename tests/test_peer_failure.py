"""torchrun with 2 CPU processes (Gloo) where one of them fails: killed, frozen, crashing on a
bug, refusing with a UserError, or exiting without a word, as rank 0 or rank 1, mid-run or while
starting. The other process stops within --peer-timeout, and the job says in one sentence which
process failed and how to resume; the last checkpoint stays intact."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT, tiny_flags
from lmkit.peers import is_peer_error, process_state

# Runs bigram/train.py with one process failing as FAIL_HOW, on rank FAIL_RANK, at the end of
# step FAIL_STEP (0: while building the model, before any collective of the training).
LAUNCHER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from bigram.train import main
from lmkit.errors import UserError, run_main
from lmkit.history import TrainingHistory
from lmkit.trainer import Trainer

how, rank, at = os.environ["FAIL_HOW"], int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_STEP"])

def fail():
    if int(os.environ["RANK"]) != rank:
        return
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "stop":  # the test wakes it (SIGCONT) once the other process has reported
        with open(os.environ["FROZEN_PID_FILE"], "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
    if how == "exit":
        os._exit(3)
    if how == "bug":
        raise RuntimeError("boom")
    if how == "user":
        raise UserError("the data changed under the run; prepare it again")

record_step, build = TrainingHistory.record_step, Trainer._build_model_and_optimizer

def record_step_then_fail(self, *args):
    step = record_step(self, *args)
    if step == at:
        fail()
    return step

def fail_then_build(self):
    if at == 0:
        fail()
    return build(self)

TrainingHistory.record_step = record_step_then_fail
Trainer._build_model_and_optimizer = fail_then_build
run_main(main)
"""
PEER_TIMEOUT_S = 3


def run_failing_job(prepared, tmp_path, how, rank, step):
    """(torchrun's exit code, its stderr, seconds it ran). A frozen process is woken once the
    other has reported: torchrun would wait 30 s before it kills it."""
    launcher, stderr, frozen_pid = (tmp_path / name for name in ("launch.py", "stderr.txt",
                                                                 "frozen.pid"))
    launcher.write_text(LAUNCHER.format(root=str(REPO_ROOT)), encoding="utf-8")
    flags = tiny_flags(prepared / "char", tmp_path, grad_accum_steps=2, max_iters=400,
                       eval_interval=10, log_interval=5, peer_timeout=PEER_TIMEOUT_S)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAIL_HOW": how, "FAIL_RANK": str(rank),
           "FAIL_STEP": str(step), "FROZEN_PID_FILE": str(frozen_pid)}
    started = time.time()
    with open(stderr, "w") as err:
        job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc_per_node=2", str(launcher), *flags], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        while job.poll() is None and time.time() < started + 120:
            if frozen_pid.is_file() and "error:" in stderr.read_text():
                os.kill(int(frozen_pid.read_text()), signal.SIGCONT)
                frozen_pid.unlink()
            time.sleep(0.1)
    finally:
        job.kill()
        job.wait()
    return job.returncode, stderr.read_text(), time.time() - started


def our_lines(stderr: str) -> list:
    """stderr without torchrun's own report of the failed job (its log lines and table)."""
    report = stderr.find("Traceback (most recent call last):\n  File \"<frozen runpy>\"")
    lines = (stderr[:report] if report >= 0 else stderr).splitlines()
    return [line for line in lines if line and not line[:1] in "WEI" or line.startswith("error:")]


@pytest.mark.slow
@pytest.mark.parametrize("how, rank, step, expected", [
    ("kill", 1, 25, "process 1 of 2 died"),
    ("exit", 0, 25, "process 0 of 2 died"),
    ("bug", 1, 25, "process 1 of 2 failed with RuntimeError: boom (its traceback is above)"),
    ("stop", 1, 25, f"process 1 of 2 froze (stopped by SIGSTOP or a debugger) and did not "
                    f"answer in {PEER_TIMEOUT_S} s (--peer-timeout)"),
    ("kill", 0, 0, "process 0 of 2 died"),
])
def test_a_failed_process_stops_the_job_with_one_sentence(prepared, tmp_path, how, rank, step,
                                                          expected):
    code, stderr, seconds = run_failing_job(prepared, tmp_path, how, rank, step)
    assert code != 0
    assert seconds < 60, stderr
    lines = our_lines(stderr)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert expected in errors[0]
    assert "gloo" not in stderr.lower() and "DistBackendError" not in stderr
    last = tmp_path / "checkpoints" / "bigram" / "last.pt"
    if step:
        assert "stopped at step 2" in errors[0]  # the survivor's own step: 25 or the next one
        assert f"{last} holds the last checkpoint saved: run the same command with --resume" \
            in errors[0]
        assert torch.load(last, weights_only=True)["step"] == 20
    else:
        assert "stopped while starting; run the same command again" in errors[0]
        assert not last.exists()
    if how == "bug":  # the failing process's own traceback, and nothing from the survivor
        assert [line for line in lines if "Traceback" in line] == ["[rank1]: Traceback (most "
                                                                   "recent call last):"]
    else:
        assert "Traceback" not in "\n".join(lines)
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_a_process_that_refuses_speaks_for_itself_and_the_other_stays_quiet(prepared, tmp_path):
    _, stderr, _ = run_failing_job(prepared, tmp_path, "user", 1, 25)
    errors = [line for line in our_lines(stderr) if line.startswith("error:")]
    assert errors == ["error: the data changed under the run; prepare it again"], stderr


def test_a_frozen_and_a_dead_process_are_told_apart(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_state(child.pid) is None  # running
        child.send_signal(signal.SIGSTOP)
        deadline = time.time() + 10
        while process_state(child.pid) != "frozen" and time.time() < deadline:
            time.sleep(0.05)
        assert process_state(child.pid) == "frozen"
        child.kill()
        while process_state(child.pid) != "dead" and time.time() < deadline:
            time.sleep(0.05)
        assert process_state(child.pid) == "dead"  # a zombie until waited for
    finally:
        child.kill()
        child.wait()
    assert process_state(child.pid) == "dead"


def test_collective_errors_are_told_from_the_process_own():
    assert is_peer_error(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by "
                                      "peer [127.0.0.1]:6370"))
    assert is_peer_error(RuntimeError("[../gloo/unbound_buffer.cc:78] Timed out waiting 5000ms "
                                      "for recv operation to complete"))
    assert is_peer_error(torch.distributed.DistBackendError("NCCL error in: ..."))
    assert not is_peer_error(RuntimeError("boom"))
    assert not is_peer_error(ValueError("connection closed"))
