"""A run's .lock never harms a file it did not make: a planted symlink or a folder is refused,
and nothing is truncated before the lock is held."""
import os

import pytest

from conftest import one_error_line, run_script, tiny_flags
from lmkit.errors import UserError
from lmkit.files import RunLock


def test_a_symlinked_lock_is_refused_and_its_target_is_unchanged(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("years of notes\n")
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / ".lock").symlink_to(precious)
    with pytest.raises(UserError, match="is not a plain file .*remove it and run again"):
        RunLock(run_folder).acquire("run 'x'")
    assert precious.read_text() == "years of notes\n"
    assert (run_folder / ".lock").is_symlink()


def test_a_lock_that_is_a_folder_is_one_sentence(tmp_path):
    (tmp_path / ".lock").mkdir()
    (tmp_path / ".lock" / "kept").write_text("x")
    with pytest.raises(UserError, match="is not a plain file") as refusal:
        RunLock(tmp_path).acquire("run 'x'")
    assert "\n" not in str(refusal.value) and (tmp_path / ".lock" / "kept").read_text() == "x"


def test_a_dangling_symlinked_lock_creates_nothing(tmp_path):
    (tmp_path / ".lock").symlink_to(tmp_path / "would-be-created")
    with pytest.raises(UserError, match="is not a plain file"):
        RunLock(tmp_path).acquire("run 'x'")
    assert not (tmp_path / "would-be-created").exists()


def test_a_lock_is_held_once_and_names_its_holder(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire("run 'x'")
    try:
        assert (tmp_path / ".lock").read_text() == f"process {os.getpid()}"
        with pytest.raises(UserError, match=f"run 'x' is in use by process {os.getpid()}"):
            second.acquire("run 'x'")
        assert (tmp_path / ".lock").read_text() == f"process {os.getpid()}"  # left as it was
    finally:
        first.release()
    second.acquire("run 'x'")  # free again once the first lets go
    second.release()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text("process 999999999 that is long gone")
    lock = RunLock(tmp_path)
    lock.acquire("run 'x'")
    lock.release()
    assert (tmp_path / ".lock").read_text() == f"process {os.getpid()}"


def test_train_py_refuses_a_symlinked_lock_before_touching_anything(prepared, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    folder = tmp_path / "checkpoints" / "bigram"
    folder.mkdir(parents=True)
    (folder / ".lock").symlink_to(precious)
    result = run_script("bigram/train.py", *tiny_flags(prepared, tmp_path))
    assert result.returncode == 1 and "is not a plain file" in one_error_line(result.stderr)
    assert precious.read_text() == "keep me" and sorted(os.listdir(folder)) == [".lock"]
