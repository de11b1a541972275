"""Faults that schedulers, shells and typos cause: --overwrite, two commands on one run,
SIGTERM/SIGHUP, run names that are paths, changed data, pipes that close, odd --out targets."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from bigram.family import FAMILY
from bigram.train import main as bigram_main
from conftest import (REPO_ROOT, one_error_line, run_script, stop_requested_during, tiny_flags,
                      wait_until)
from lmkit import export_cli, sample_cli
from lmkit.errors import UserError
from lmkit.tokenizers import tokenizer_from_meta


def slow_flags(prepared, out_dir, **overrides):
    """A run that takes a while (many steps) and checkpoints often."""
    values = dict(max_iters=100_000, eval_interval=5, eval_iters=1, sample_tokens=0)
    values.update(overrides)
    return tiny_flags(prepared / "char", out_dir, **values)


def start(script, *args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO_ROOT / script), *map(str, args)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kwargs)


def file_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".")}


# ---- 1. --overwrite keeps the old run until the new one has saved ---------------------------

def test_overwrite_that_fails_to_start_keeps_the_old_run(prepared, tmp_path):
    flags = tiny_flags(prepared / "char", tmp_path, max_iters=6)
    assert bigram_main(flags) == 0
    checkpoints, plot = tmp_path / "checkpoints" / "bigram", tmp_path / "plots/bigram/loss_plot.png"
    before, plot_before = file_bytes(checkpoints), plot.read_bytes()
    result = run_script("bigram/train.py", *flags, "--overwrite", "--data-dir", tmp_path / "typo")
    assert result.returncode == 1 and "prepare_data.py" in one_error_line(result.stderr)
    assert file_bytes(checkpoints) == before and plot.read_bytes() == plot_before


def test_overwrite_stopped_before_its_first_evaluation_leaves_only_the_new_run(
        prepared, tmp_path, monkeypatch):
    flags = tiny_flags(prepared / "char", tmp_path, max_iters=12, eval_interval=6)
    assert bigram_main(flags) == 0
    stop_requested_during(2, monkeypatch)
    assert bigram_main(flags + ["--overwrite"]) == 130
    folder = tmp_path / "checkpoints" / "bigram"
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 2
    assert not (folder / "best.pt").exists()  # the old run's best would be sampled otherwise
    assert not (tmp_path / "plots/bigram/loss_plot.png").exists()
    assert "step" in (folder / "metrics.csv").read_text().splitlines()[0]
    assert len((folder / "metrics.csv").read_text().splitlines()) == 1  # header, no old rows


# ---- 2. one owner per run folder -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("second", [["--overwrite"], ["--resume"]])
def test_second_command_on_a_run_in_use_is_refused_and_touches_nothing(second, prepared, tmp_path):
    folder = tmp_path / "checkpoints" / "bigram"
    first = start("bigram/train.py", *slow_flags(prepared, tmp_path))
    try:
        wait_until(lambda: (folder / "last.pt").is_file(), first)
        decoy = folder / ".last.pt.decoy.tmp"  # what a running job's half-written file looks like
        decoy.write_bytes(b"in progress")
        result = run_script("bigram/train.py", *slow_flags(prepared, tmp_path), *second)
        assert result.returncode == 1
        line = one_error_line(result.stderr)
        assert "in use by process" in line and str(first.pid) in line
        assert decoy.read_bytes() == b"in progress"
        assert first.poll() is None  # the running job goes on
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 130
    finally:
        first.kill()
    assert torch.load(folder / "last.pt", weights_only=True)["step"] >= 5


# ---- 3. SIGTERM and SIGHUP stop like Ctrl-C ---------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_scheduler_signals_save_and_print_the_resume_command(sig, prepared, tmp_path):
    folder = tmp_path / "checkpoints" / "bigram"
    proc = start("bigram/train.py", *slow_flags(prepared, tmp_path))
    try:
        wait_until(lambda: (folder / "last.pt").is_file(), proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "bigram/train.py --resume" in out and "Traceback" not in err
    state = torch.load(folder / "last.pt", weights_only=True)
    assert state["step"] >= 5 and state["step"] == int(out.split("stopped at step ")[1].split(";")[0])


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_the_run(prepared, tmp_path):
    folder = tmp_path / "checkpoints" / "bigram"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(REPO_ROOT / "bigram/train.py"),
                             *map(str, slow_flags(prepared, tmp_path, log_interval=1,
                                                   grad_accum_steps=2))],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        wait_until(lambda: (folder / "last.pt").is_file(), proc)
        step_before = torch.load(folder / "last.pt", weights_only=True)["step"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "--resume" in out, out + err
    state = torch.load(folder / "last.pt", weights_only=True)
    assert state["step"] >= step_before and f"stopped at step {state['step']};" in out


# ---- 4. a run name is a name -------------------------------------------------------------------

def test_run_names_that_are_paths_are_refused(prepared, tmp_path):
    out = tmp_path / "out"
    for name in ("..", "../escape", "/tmp/escape", "a/b", "."):
        with pytest.raises(UserError, match="is not a run name") as refused:
            bigram_main(tiny_flags(prepared / "char", out, run=name))
        assert refused.value.exit_code == 2
        with pytest.raises(UserError, match="is not a run name"):
            sample_cli.main(FAMILY, "", ["--out-dir", str(out), "--run", name])
        with pytest.raises(UserError, match="is not a run name"):
            export_cli.main(FAMILY, "", ["--out-dir", str(out), "--run", name,
                                         "--out", str(tmp_path / "hf")])
    assert not out.exists() and not (tmp_path / "escape").exists()
    result = run_script("bigram/sample.py", "--out-dir", out, "--run", "../escape")
    assert result.returncode == 2 and "is not a run name" in one_error_line(result.stderr)


@pytest.mark.slow
def test_resume_command_survives_being_pasted(prepared, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "my runs"
    stop_requested_during(3, monkeypatch)
    assert bigram_main(tiny_flags(prepared / "char", out_dir, run="first try")) == 130
    command = capsys.readouterr().out.split("Continue with:\n")[1].strip()
    assert "--run 'first try'" in command and f"--out-dir '{out_dir}'" in command
    monkeypatch.undo()
    result = subprocess.run(command.replace("python ", f"{sys.executable} ", 1), shell=True,
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert torch.load(out_dir / "checkpoints/first try/last.pt", weights_only=True)["step"] == 12


# ---- 5. --resume notices data prepared from another text ------------------------------------------

def test_resume_on_data_from_another_text_asks_first(prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared / "char", data)
    assert bigram_main(tiny_flags(data, tmp_path, max_iters=6)) == 0
    meta = json.loads((data / "meta.json").read_text())
    meta["source_sha256"] = "f" * 64  # prepare_data.py run again on another text
    (data / "meta.json").write_text(json.dumps(meta))
    resume = ["--resume", "--max-iters", "9", "--out-dir", str(tmp_path)]
    with pytest.raises(UserError, match="prepared from another text.*--new-data"):
        bigram_main(resume)
    assert bigram_main(resume + ["--new-data"]) == 0
    state = torch.load(tmp_path / "checkpoints/bigram/last.pt", weights_only=True)
    assert state["step"] == 9 and state["meta"]["source_sha256"] == "f" * 64


# ---- 6. output that goes away -------------------------------------------------------------------

def run_into_closed_pipe(args: list) -> tuple:
    """Run a script with stdout read for one line only, then closed; return (code, stderr)."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read().decode()
    return proc.wait(timeout=300), err


@pytest.mark.slow
def test_sample_into_a_pipe_that_closes_saves_its_samples(trained, tmp_path):
    out = tmp_path / "samples.txt"
    code, err = run_into_closed_pipe([REPO_ROOT / "bigram/sample.py", "--out-dir", trained,
                                      "--num-samples", 3, "--max-new-tokens", 3000, "--out", out])
    assert code == 0 and "Traceback" not in err, err
    assert out.read_text().count("---------- sample") == 3


@pytest.mark.slow
def test_training_into_a_pipe_that_closes_finishes_and_saves(prepared, tmp_path):
    code, err = run_into_closed_pipe([REPO_ROOT / "bigram/train.py",
                                      *tiny_flags(prepared / "char", tmp_path, max_iters=30,
                                                  eval_interval=10, log_interval=1)])
    assert code == 0 and "Traceback" not in err, err
    assert torch.load(tmp_path / "checkpoints/bigram/last.pt", weights_only=True)["step"] == 30


@pytest.mark.slow
def test_console_that_cannot_encode_the_text_shows_it_replaced(trained, tmp_path):
    out = tmp_path / "samples.txt"
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    result = run_script("gpt/sample.py", "--out-dir", trained, "--prompt", "Snow \u2603 falls",
                        "--max-new-tokens", 5, "--out", out, env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "Snow ? falls" in result.stdout
    assert "Snow \u2603 falls" in out.read_text(encoding="utf-8")


# ---- 7. --out behaves like the shell's > -----------------------------------------------------------

@pytest.mark.slow
def test_out_follows_symlinks_and_writes_into_fifos_and_devices(trained, tmp_path):
    target = tmp_path / "real.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    assert run_script("bigram/sample.py", "--out-dir", trained, "--max-new-tokens", 5,
                      "--out", link).returncode == 0
    assert link.is_symlink() and "---------- sample 1/1" in target.read_text()

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    assert run_script("bigram/sample.py", "--out-dir", trained, "--max-new-tokens", 5,
                      "--out", fifo).returncode == 0
    reader.join(timeout=60)
    assert "---------- sample 1/1" in received[0] and fifo.is_fifo()

    assert run_script("bigram/sample.py", "--out-dir", trained, "--max-new-tokens", 5,
                      "--out", "/dev/null").returncode == 0
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


# ---- 8. the smaller ones --------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--seed", str(2 ** 64)], "--seed must be between"),
    (["--eps", "inf"], "--eps must be a finite number"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number"),
])
def test_out_of_range_numbers_are_bad_flags(flags, message, prepared, tmp_path):
    with pytest.raises(UserError, match=message) as refused:
        bigram_main(tiny_flags(prepared / "char", tmp_path) + flags)
    assert refused.value.exit_code == 2


def test_largest_seed_trains_and_evaluates(prepared, tmp_path):
    assert bigram_main(tiny_flags(prepared / "char", tmp_path, seed=2 ** 63 - 1, max_iters=6)) == 0


def test_tiny_temperature_is_greedy(trained):
    state = torch.load(trained / "checkpoints/bigram/last.pt", weights_only=True)
    model = sample_cli.load_model(state, FAMILY, torch.device("cpu"))
    start = torch.zeros((2, 1), dtype=torch.long)
    from lmkit.generation import generate
    greedy = generate(model, start, 40, temperature=0)
    tiny = generate(model, start, 40, temperature=1e-38,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, tiny)


@pytest.mark.slow
def test_compile_without_a_compiler_is_one_sentence(prepared, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    env.pop("CXX", None)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bigram/train.py"),
                             *map(str, tiny_flags(prepared / "char", tmp_path)), "--compile"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "C++ compiler" in one_error_line(result.stderr)


def test_streaming_decodes_each_token_once(trained, monkeypatch, capsys):
    """--stream used to decode the whole output again at every token (quadratic)."""
    state = torch.load(trained / "checkpoints/gpt/last.pt", weights_only=True)
    tokenizer = tokenizer_from_meta(state["meta"])
    decoded = []
    original = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids: decoded.append(len(ids)) or original(ids))
    streamer = sample_cli.Streamer(tokenizer, "")
    ids = tokenizer.encode("To be, or not to be: that is the question. \u00e9\u2603" * 40)
    for i in ids:
        streamer(torch.tensor([[i]]))
    streamer.finish()
    assert sum(decoded) <= 4 * len(ids)  # linear: a token is held back for at most 3 more
    assert capsys.readouterr().out == original(ids) + "\n"


@pytest.mark.slow
def test_sampling_stopped_early_saves_what_it_made(trained, tmp_path):
    out = tmp_path / "samples.txt"
    proc = start("bigram/sample.py", "--out-dir", trained, "--num-samples", 2,
                 "--max-new-tokens", 10_000_000, "--no-kv-cache", "--out", out)
    try:
        time.sleep(8)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    text = out.read_text()
    assert "# stopped after" in text and text.count("---------- sample") == 2


@pytest.mark.slow
def test_last_pt_that_is_a_folder_is_refused_before_training(prepared, tmp_path):
    (tmp_path / "checkpoints" / "bigram" / "last.pt").mkdir(parents=True)
    result = run_script("bigram/train.py", *tiny_flags(prepared / "char", tmp_path))
    assert result.returncode == 1 and "is not a file" in one_error_line(result.stderr)
    assert "parameters" not in result.stdout


def test_odd_length_split_says_it_is_damaged(prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared / "char", data)
    with open(data / "train.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="not a whole number of 2-byte tokens"):
        bigram_main(tiny_flags(data, tmp_path))
