"""torchrun with 2 CPU processes (Gloo): one model, one set of outputs, same math as 1 process."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, read_metrics, tiny_flags
from gpt.train import main as gpt_main

pytestmark = pytest.mark.slow  # every test here starts torchrun and its processes


def torchrun(script, *args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(REPO_ROOT / script), *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)


def val_losses(out_dir, run):
    return [float(r["val_loss"]) for r in read_metrics(out_dir, run)]


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_two_processes_train_one_model_with_one_set_of_outputs(prepared, tmp_path):
    """The loss falls, rank 0 alone writes files and prints, the math matches 1 process."""
    flags = tiny_flags(prepared / "gpt2", tmp_path, grad_accum_steps=2, max_iters=12,
                       learning_rate=1e-2)
    result = ok(torchrun("gpt/train.py", *flags, "--run-name", "ddp"))
    assert result.stdout.count("done: best val loss") == 1
    assert "2 process(es)" in result.stdout
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                   if p.is_file() and not p.name.startswith("."))  # .lock: the run's owner
    assert files == ["checkpoints/ddp/best.pt", "checkpoints/ddp/last.pt",
                     "checkpoints/ddp/metrics.csv", "plots/ddp/loss_plot.png",
                     "samples/ddp/train_sample.txt"]
    ddp = val_losses(tmp_path, "ddp")
    assert ddp[-1] < ddp[0]

    # One process with twice the accumulation steps sees the same batches.
    assert gpt_main(flags + ["--run", "single", "--grad-accum-steps", "2"]) == 0
    assert ddp == pytest.approx(val_losses(tmp_path, "single"), abs=1e-4)
    state = torch.load(tmp_path / "checkpoints/ddp/last.pt", weights_only=True)
    assert len(state["rank_states"]) == 2


def test_accumulation_must_divide_among_processes(prepared, tmp_path):
    result = torchrun("bigram/train.py", *tiny_flags(prepared / "char", tmp_path,
                                                      grad_accum_steps=3))
    assert result.returncode != 0
    assert "--grad-accum-steps 3 does not divide among 2 processes" in result.stderr


def test_stopped_two_process_run_resumes_with_two_or_one_processes(prepared, tmp_path):
    """Resume after 6 of 12 steps, under 2 processes and under 1: both match a straight run."""
    flags = tiny_flags(prepared / "char", tmp_path, grad_accum_steps=2, lr_schedule="constant")
    ok(torchrun("bigram/train.py", *flags, "--run-name", "straight"))
    for run, nproc in (("again2", 2), ("again1", 1)):
        ok(torchrun("bigram/train.py", *flags, "--run-name", run, "--max-iters", 6))
        resume = ["--resume", "--run-name", run, "--max-iters", 12, "--out-dir", tmp_path,
                  "--data-dir", prepared / "char"]
        result = ok(torchrun("bigram/train.py", *resume, nproc=nproc))
        assert "resuming" in result.stdout
        assert val_losses(tmp_path, run) == pytest.approx(val_losses(tmp_path, "straight"), abs=1e-4)
