"""A full disk (ENOSPC), a used-up quota (EDQUOT) or a file size limit (EFBIG) at every file a
run, sample.py or export.py writes: one sentence naming the file and the fix, the last good
file intact, no temp file left. A checkpoint that cannot be written stops the run; a metrics
CSV, a plot, a sample or TensorBoard logs that cannot be written are a warning, and the
training goes on.

Each writer is tried twice: with the error injected at the write (anywhere), and on a real
full file system (a 1 MiB tmpfs, which needs root; skipped elsewhere) or a real file size
limit (RLIMIT_FSIZE, anywhere)."""
import errno
import importlib.util
import os
import resource
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from bigram.train import main as bigram_main
from conftest import one_error_line, run_script, tiny_flags
from lmkit import files
from lmkit.errors import UserError

FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
        errno.EFBIG: "the file grew past the largest size allowed"}


def fail_writes_to(monkeypatch, name: str, code: int) -> None:
    """Make every atomic write of a file called `name` fail with OSError(code), as the disk
    does: at the data's flush to the disk (the temp file beside it is .<name>.XXXX.tmp)."""
    real_fsync = files.os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)


def snapshot(folder) -> dict:
    """Every file under folder and its bytes, but the run's .lock (it names its process)."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock"}


def no_temp_files(folder) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


@needs_proc
@pytest.mark.parametrize("code", sorted(FULL))
@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_last(
        prepared, tmp_path, monkeypatch, name, code):
    flags = tiny_flags(prepared / "char", tmp_path, max_iters=6, eval_interval=6)
    assert bigram_main(flags) == 0
    before = snapshot(tmp_path / "checkpoints")
    fail_writes_to(monkeypatch, name, code)
    with pytest.raises(UserError) as stopped:
        bigram_main(["--resume", "--max-iters", "12", "--out-dir", str(tmp_path)])
    message = str(stopped.value)
    assert message.startswith(f"{FULL[code]} while writing {tmp_path}/checkpoints/bigram/{name}, "
                              "so the run stopped at step 12; ")
    assert "last.pt still holds step 6: " in message and message.endswith("continue with --resume")
    assert "\n" not in message
    after = snapshot(tmp_path / "checkpoints")
    if name == "last.pt":  # best.pt comes first, and was written
        del before[Path("bigram/best.pt")], after[Path("bigram/best.pt")]
    assert after == before
    assert no_temp_files(tmp_path)


@needs_proc
@pytest.mark.parametrize("name, code", [("metrics.csv", errno.ENOSPC),
                                        ("loss_plot.png", errno.EDQUOT),
                                        ("train_sample.txt", errno.EFBIG)])
def test_an_output_besides_the_checkpoint_that_cannot_be_written_is_a_warning(
        prepared, tmp_path, monkeypatch, capsys, name, code):
    flags = tiny_flags(prepared / "char", tmp_path, max_iters=6, eval_interval=6)
    assert bigram_main(flags) == 0
    path = next(tmp_path.rglob(name))
    before = path.read_bytes()
    capsys.readouterr()
    fail_writes_to(monkeypatch, name, code)
    assert bigram_main(["--resume", "--max-iters", "12", "--out-dir", str(tmp_path)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warn")]
    meanwhile = "the run is saved" if name == "train_sample.txt" else "training goes on"
    assert warnings == [f"warning: could not write {path} ({FULL[code]}); {meanwhile}: "
                        + files.FULL_DISK[code][1].format(folder=path.parent)]
    assert path.read_bytes() == before  # the last good one
    assert torch.load(tmp_path / "checkpoints/bigram/last.pt", weights_only=True)["step"] == 12
    assert no_temp_files(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="pip install tensorboard")
def test_tensorboard_logs_that_cannot_be_written_are_a_warning(prepared, tmp_path, monkeypatch,
                                                              capsys):
    from tensorboard.summary.writer import record_writer
    real_write, written = record_writer.RecordWriter.write, []

    def fills_the_disk(self, data):  # the events file's first record (its version) fits
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(data)
        return real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", fills_the_disk)
    hook = threading.excepthook
    assert bigram_main(tiny_flags(prepared / "char", tmp_path, tensorboard=True)) == 0
    assert threading.excepthook is hook  # the writer's quieted thread errors: back as they were
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warn")]
    assert len(warnings) == 1, err
    assert "Traceback" not in err  # nor from TensorBoard's writer thread
    assert warnings[0].startswith(f"warning: could not write the TensorBoard logs in "
                                  f"{tmp_path}/checkpoints/bigram/tensorboard (no space left on "
                                  "the device); training goes on without them: free space")
    assert torch.load(tmp_path / "checkpoints/bigram/last.pt", weights_only=True)["step"] == 12


@needs_proc
def test_sample_out_and_export_that_cannot_be_written_say_so(prepared, tmp_path, monkeypatch):
    from bigram.export import main as export_main
    from bigram.sample import main as sample_main
    from lmkit import hf

    assert bigram_main(tiny_flags(prepared / "char", tmp_path, max_iters=6, eval_interval=6)) == 0
    out = tmp_path / "samples.txt"
    out.write_text("the last good samples")
    fail_writes_to(monkeypatch, "samples.txt", errno.EDQUOT)
    with pytest.raises(UserError) as refused:
        sample_main(["--out-dir", str(tmp_path), "--max-new-tokens", "5", "--out", str(out)])
    assert str(refused.value) == (f"cannot write {out}: the disk quota is used up; the previous "
                                  f"file is intact: free space in your quota on the disk that "
                                  f"holds {tmp_path}, or raise the quota, then run again")
    assert out.read_text() == "the last good samples"

    def too_big(path, data):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(hf, "write_file", too_big)
    with pytest.raises(UserError, match=r"^the file grew past the largest size allowed while "
                                        r"writing .*hf; nothing there changed: raise the file "
                                        r"size limit \(ulimit -f\)"):
        export_main(["--out-dir", str(tmp_path), "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists() and no_temp_files(tmp_path)


@pytest.mark.parametrize("code", sorted(FULL))
@pytest.mark.parametrize("existed", [True, False])
def test_every_atomic_write_says_what_failed_and_what_to_do(tmp_path, code, existed):
    path = tmp_path / "out.txt"
    if existed:
        path.write_text("old")

    def write(f):
        f.write(b"new")
        raise OSError(code, os.strerror(code))

    with pytest.raises(files.WriteError) as failed:
        files.atomic_write(path, write)
    kept = "the previous file is intact" if existed else "nothing was written"
    assert str(failed.value).startswith(f"cannot write {path}: {FULL[code]}; {kept}: ")
    assert (path.read_text() if existed else path.exists()) == ("old" if existed else False)
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_folder_that_takes_no_file_at_the_start_says_why(tmp_path, monkeypatch, code):
    """The start-up check of the output folders: a full disk asks for space, not permissions."""
    def mkstemp(**kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    with pytest.raises(UserError) as refused:
        files.ensure_writable_dirs(tmp_path / "checkpoints")
    fix = ("free space on the disk that holds" if code == errno.ENOSPC
           else "fix its permissions or point the script at a writable folder")
    assert f"cannot write to {tmp_path / 'checkpoints'} ({os.strerror(code)}); {fix}" in str(
        refused.value)


def test_a_write_error_torch_save_wraps_is_still_told(tmp_path):
    """torch.save reports a failed write as RuntimeError("unexpected pos"), raised while handling
    the OSError: the sentence names the OSError."""
    class FullFile:
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(f):
        torch.save({"weights": torch.zeros(100_000)}, FullFile())

    with pytest.raises(files.WriteError, match="no space left on the device"):
        files.atomic_write(tmp_path / "last.pt", write)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a train.py process of its own
def test_a_real_file_size_limit_stops_the_run_in_one_sentence(prepared, tmp_path):
    """RLIMIT_FSIZE (ulimit -f) makes the kernel refuse the checkpoint with EFBIG: a real
    failing write through torch.save, no mount needed."""
    assert bigram_main(tiny_flags(prepared / "char", tmp_path, max_iters=6, eval_interval=6)) == 0
    before = snapshot(tmp_path / "checkpoints")
    limit = (tmp_path / "checkpoints/bigram/last.pt").stat().st_size // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run_script("bigram/train.py", "--resume", "--max-iters", "12", "--out-dir", tmp_path,
                        preexec_fn=limit_file_size)
    line = one_error_line(result.stderr)
    assert result.returncode == 1
    assert line.startswith(f"error: the file grew past the largest size allowed while writing "
                           f"{tmp_path}/checkpoints/bigram/")
    assert "last.pt still holds step 6: raise the file size limit (ulimit -f)" in line
    assert snapshot(tmp_path / "checkpoints") == before
    assert no_temp_files(tmp_path)


# ---- a real full file system ---------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk, and a function that fills it up; skipped unless this
    process may mount (root on Linux)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True) if os.geteuid() == 0 else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")

    def fill():
        with open(disk / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    try:
        yield disk, fill
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_real_full_disk_at_checkpoint_sample_and_export(prepared, tmp_path, small_disk):
    disk, fill = small_disk
    flags = tiny_flags(prepared / "char", disk, max_iters=6, eval_interval=6)
    assert bigram_main(flags) == 0
    before = snapshot(disk)
    fill()
    with pytest.raises(UserError, match=r"^no space left on the device while writing .*\.pt, so "
                                        r"the run stopped at step 12; .*still holds step 6"):
        bigram_main(["--resume", "--max-iters", "12", "--out-dir", str(disk)])
    after = snapshot(disk)
    after.pop(next(p for p in after if p.name == "filler"))
    assert after == before
    assert no_temp_files(disk)

    from bigram.export import main as export_main
    from bigram.sample import main as sample_main
    with pytest.raises(UserError, match="no space left on the device"):
        sample_main(["--out-dir", str(disk), "--max-new-tokens", "2000", "--out",
                     str(disk / "samples.txt")])
    with pytest.raises(UserError, match="no space left on the device"):
        export_main(["--out-dir", str(disk), "--out", str(disk / "hf")])
    assert sorted(p.name for p in disk.iterdir()) == ["checkpoints", "filler", "plots", "samples"]
    assert no_temp_files(disk)


@pytest.mark.slow  # a train.py process of its own
def test_a_real_full_disk_under_tensorboard_is_refused_at_the_start(prepared, tmp_path,
                                                                     small_disk):
    """TensorBoard writes its events file in a thread of its own: a disk already full stops the
    run before its first step, in one sentence (the thread's own traceback is silenced)."""
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("pip install tensorboard")
    disk, fill = small_disk
    flags = tiny_flags(prepared / "char", disk, max_iters=6, eval_interval=6, tensorboard=True)
    assert bigram_main(flags) == 0
    fill()
    result = run_script("bigram/train.py", "--resume", "--max-iters", "12", "--out-dir", disk,
                        "--tensorboard")
    assert result.returncode == 1
    assert one_error_line(result.stderr).startswith(
        f"error: cannot write TensorBoard events to {disk}/checkpoints/bigram/tensorboard (No "
        f"space left on device); free space on the disk that holds {disk}/checkpoints/bigram")
