"""Faults: kill -9 at any moment, Ctrl-C, hostile or damaged checkpoints, NaN, full or read-only disks."""
import errno
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from bigram.train import main as bigram_main
from conftest import REPO_ROOT, run_script, saved_weights, tiny_flags
from lmkit import files, trainer
from lmkit.errors import UserError
from lmkit.history import TrainingHistory


def crash_flags(prepared, out_dir, **overrides):
    """A run that checkpoints every step, with checkpoints big enough to catch mid-write."""
    values = dict(n_layer=2, n_embd=128, n_head=4, max_iters=20, eval_interval=1, eval_iters=1,
                  dropout=0.1, sample_tokens=0)
    values.update(overrides)
    return tiny_flags(prepared / "char", out_dir, **values)


def start_training(flags):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "bigram/train.py"), *map(str, flags)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "training ended before the moment to kill it"
        assert time.time() < deadline, "the moment to kill never came"
        time.sleep(0.0005)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """An uninterrupted run to compare killed-and-resumed runs against."""
    out = tmp_path_factory.mktemp("reference")
    run_script("bigram/train.py", *crash_flags(prepared, out), check=True)
    return saved_weights(out, "bigram")


def temp_file_of(folder, name):
    return lambda: folder.is_dir() and any(f.startswith(f".{name}.") for f in os.listdir(folder))


def step_at_least(folder, step):
    def check():
        try:
            return torch.load(folder / "last.pt", weights_only=True)["step"] >= step
        except Exception:
            return False
    return check


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["writing last.pt", "writing best.pt", "between steps"])
def test_kill_9_at_any_moment_then_resume_equals_uninterrupted(moment, prepared, tmp_path, reference):
    """kill -9 leaves whole checkpoints (old or new); --resume ends with the same weights."""
    folder = tmp_path / "checkpoints" / "bigram"
    proc = start_training(crash_flags(prepared, tmp_path))
    try:
        wait_for(step_at_least(folder, 3), proc)
        if moment == "between steps":
            time.sleep(0.3)
        else:
            wait_for(temp_file_of(folder, moment.split()[-1]), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    for name in ("last.pt", "best.pt"):
        if (folder / name).exists():
            state = torch.load(folder / name, weights_only=True)
            assert state["step"] >= 1 and "model" in state
    result = run_script("bigram/train.py", "--resume", "--out-dir", tmp_path,
                        "--data-dir", prepared / "char", check=True)
    assert "resuming" in result.stdout
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]
    assert_same_weights(saved_weights(tmp_path, "bigram"), reference)


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_equals_uninterrupted(prepared, tmp_path, reference):
    """SIGINT: the step finishes, last.pt is written, the resume command is printed, exit 130."""
    proc = start_training(crash_flags(prepared, tmp_path, eval_interval=10))
    try:
        wait_for(step_at_least(tmp_path / "checkpoints" / "bigram", 10), proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert "bigram/train.py --resume" in out
    state = torch.load(tmp_path / "checkpoints/bigram/last.pt", weights_only=True)
    assert 10 <= state["step"] < 20
    run_script("bigram/train.py", "--resume", "--out-dir", tmp_path, "--data-dir",
               prepared / "char", check=True)
    assert_same_weights(saved_weights(tmp_path, "bigram"), reference)


class RunsCode:
    """Unpickling this would create a marker file: the attack a weights_only load stops."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_runs_code_is_refused_and_code_does_not_run(trained, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "gpt", "model_config": {}, "model": RunsCode(marker), "step": 1,
                "meta": {}}, evil)
    result = run_script("gpt/sample.py", "--checkpoint", evil, "--out-dir", tmp_path)
    assert result.returncode == 1
    assert "refused to load" in result.stderr and str(evil) in result.stderr
    assert not marker.exists()

    run_dir = tmp_path / "checkpoints" / "bigram"
    run_dir.mkdir(parents=True)
    with open(run_dir / "last.pt", "wb") as f:
        pickle.dump(RunsCode(marker), f)
    result = run_script("bigram/train.py", "--resume", "--out-dir", tmp_path)
    assert result.returncode == 1 and "refused to load" in result.stderr
    assert not marker.exists()


def test_truncated_checkpoint_names_file_and_points_to_the_other(trained, tmp_path):
    run_dir = tmp_path / "checkpoints" / "gpt"
    run_dir.mkdir(parents=True)
    good = (trained / "checkpoints/gpt/last.pt").read_bytes()
    (run_dir / "best.pt").write_bytes(good[: len(good) // 2])
    (run_dir / "last.pt").write_bytes(good)
    result = run_script("gpt/sample.py", "--out-dir", tmp_path, "--max-new-tokens", 5)
    assert result.returncode == 1
    assert f"{run_dir / 'best.pt'} is not a readable checkpoint" in result.stderr
    assert f"{run_dir / 'last.pt'} also exists" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"just some text\n", "tensor"])
def test_file_that_is_not_a_checkpoint(content, tmp_path):
    path = tmp_path / "thing.pt"
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    result = run_script("bigram/sample.py", "--checkpoint", path)
    assert result.returncode == 1 and str(path) in result.stderr
    assert "not a checkpoint" in result.stderr or "not a readable checkpoint" in result.stderr


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(
        prepared, tmp_path, monkeypatch):
    flags = tiny_flags(prepared / "char", tmp_path, max_iters=20, eval_interval=5, log_interval=5)
    original = TrainingHistory.record_step

    def poisoned(self, loss, grad_norm, seconds):
        if self.step + 1 >= 8:  # the step being finished now
            loss = loss * float("nan")
        return original(self, loss, grad_norm, seconds)

    monkeypatch.setattr(TrainingHistory, "record_step", poisoned)
    with pytest.raises(UserError, match=r"non-finite at step 8.*holds step 5"):
        bigram_main(flags)
    state = torch.load(tmp_path / "checkpoints/bigram/last.pt", weights_only=True)
    assert state["step"] == 5
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.slow
def test_nan_weights_from_a_huge_learning_rate_are_never_saved(prepared, tmp_path):
    flags = tiny_flags(prepared / "char", tmp_path, learning_rate=1e30, min_lr=0, grad_clip=0,
                       warmup_iters=0, max_iters=20, eval_interval=20)
    result = run_script("bigram/train.py", *flags)
    assert result.returncode == 1 and "non-finite at step" in result.stderr
    assert not (tmp_path / "checkpoints/bigram/last.pt").exists()


def test_disk_full_while_checkpointing_keeps_previous_and_leaves_no_temp(
        prepared, tmp_path, monkeypatch):
    flags = tiny_flags(prepared / "char", tmp_path, max_iters=12, eval_interval=6)
    assert bigram_main(flags + ["--max-iters", "6"]) == 0
    folder = tmp_path / "checkpoints" / "bigram"
    before = {name: (folder / name).read_bytes() for name in ("last.pt", "best.pt")}

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(UserError, match=r"no space left on the device while writing .*(best|last)\.pt"):
        bigram_main(["--resume", "--max-iters", "12", "--out-dir", str(tmp_path),
                     "--data-dir", str(prepared / "char")])
    for name, content in before.items():
        assert (folder / name).read_bytes() == content
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


@pytest.mark.slow
def test_unwritable_output_folder_fails_before_training(prepared, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_script("gpt/train.py", *tiny_flags(prepared / "gpt2", blocker / "out"))
    assert result.returncode == 1
    assert "cannot write to" in result.stderr and "parameters" not in result.stdout
    result = run_script("prepare_data.py", "--input", prepared.parent / "corpus0" / "play.txt",
                        "--out-dir", blocker / "data")
    assert result.returncode == 1 and "cannot write to" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_checkpoint_folder_fails_before_training(prepared, tmp_path):
    (tmp_path / "checkpoints" / "bigram").mkdir(parents=True)
    (tmp_path / "checkpoints" / "bigram").chmod(0o555)
    result = run_script("bigram/train.py", *tiny_flags(prepared / "char", tmp_path))
    assert result.returncode == 1 and "cannot write to" in result.stderr


def test_kill_between_best_and_last_leaves_them_agreeing(prepared, tmp_path, monkeypatch):
    """An evaluation that improves writes two checkpoints. Killed after the first, last.pt
    never claims a better val loss than best.pt holds, and --resume still ends exactly."""
    flags = tiny_flags(prepared / "char", tmp_path, max_iters=12, eval_interval=3,
                       learning_rate=1e-2)
    assert bigram_main(flags + ["--run", "straight"]) == 0
    writes = []

    def killed_between(path, state):
        writes.append(state["step"])
        if writes.count(9) == 2:  # the second checkpoint written at step 9
            raise KeyboardInterrupt
        files.atomic_write(path, lambda f: torch.save(state, f))

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_checkpoint", killed_between)
        with pytest.raises(KeyboardInterrupt):
            bigram_main(flags + ["--run", "killed"])
    folder = tmp_path / "checkpoints" / "killed"
    best = torch.load(folder / "best.pt", weights_only=True)
    last = torch.load(folder / "last.pt", weights_only=True)
    assert best["step"] == 9 and last["step"] == 6  # the val loss improved at step 9
    assert best["metrics"][-1]["val_loss"] <= last["best_val_loss"]
    assert bigram_main(["--resume", "--run", "killed", "--out-dir", str(tmp_path)]) == 0
    assert_same_weights(saved_weights(tmp_path, "killed"), saved_weights(tmp_path, "straight"))
    assert_same_weights(saved_weights(tmp_path, "killed", "best.pt"),
                        saved_weights(tmp_path, "straight", "best.pt"))
