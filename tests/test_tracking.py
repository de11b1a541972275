"""Experiment tracking (--tensorboard, --wandb) and the live view (val bpc in the progress
line, --show-samples): what a tiny run logs, read back from the files it wrote."""
import importlib.util
import io
import json
import os
from pathlib import Path

import pytest
from tqdm import tqdm

from bigram.train import main as bigram_main
from conftest import one_error_line, read_metrics, run_script, tiny_flags
from lmkit.history import TrainingHistory
from lmkit.reporting import ProgressDisplay, one_line

PROGRESS_TAGS = {"train/loss", "train/lr", "train/tokens_per_s"}
EVAL_TAGS = {"eval/train_loss", "eval/val_loss", "eval/val_bpc"}
# Both are in requirements-dev.txt; training needs neither unless its flag is given.
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="pip install tensorboard")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="pip install wandb")


def read_tensorboard(folder: Path):
    """(scalars {tag: [(step, value)]}, samples [(step, text)]) from a run's event files, as
    TensorBoard shows them (steps an earlier session logged past a resumed checkpoint purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}
    samples = [(e.step, e.tensor_proto.string_val[0].decode())
               for e in events.Tensors("eval/sample/text_summary")]
    return scalars, samples


def wandb_history(run_file: Path) -> list:
    """The rows a W&B run file (.wandb) holds, one dict per logged step. The file is a
    LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each with a 7-byte
    header (checksum, length, kind: 1 whole, 2 first, 3 middle, 4 last piece)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    rows, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: the block is padded
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def steps_of(rows: list, key: str) -> list:
    return [row["_step"] for row in rows if key in row]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No W&B login here, and W&B's own cache and settings in tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


@needs_tensorboard
def test_tensorboard_logs_losses_bpc_lr_throughput_and_samples(prepared, tmp_path):
    assert bigram_main(tiny_flags(prepared / "char", tmp_path, tensorboard=True)) == 0
    scalars, samples = read_tensorboard(tmp_path / "checkpoints/bigram/tensorboard")
    assert set(scalars) == PROGRESS_TAGS | EVAL_TAGS
    for tag in PROGRESS_TAGS:
        assert [step for step, _ in scalars[tag]] == [3, 6, 9, 12]
    rows = read_metrics(tmp_path, "bigram")
    for tag in EVAL_TAGS:  # the same values metrics.csv holds
        name = tag.split("/")[1]
        assert scalars[tag] == [(int(r["step"]), pytest.approx(float(r[name]), rel=1e-6))
                                for r in rows]
    lr = dict(scalars["train/lr"])
    assert [lr[int(r["step"])] for r in rows] == [pytest.approx(float(r["lr"])) for r in rows]
    assert all(value > 0 for _, value in scalars["train/tokens_per_s"])
    assert [step for step, _ in samples] == [6, 12]
    assert all(len(text.strip()) > 50 for _, text in samples)


@needs_tensorboard
def test_tensorboard_resume_continues_the_run_without_duplicate_steps(prepared, tmp_path,
                                                                      monkeypatch, capsys):
    """Killed during step 10 (step 9 logged, last checkpoint at 6), then resumed: the resumed
    session writes into the same folder and TensorBoard shows every step once."""
    flags = tiny_flags(prepared / "char", tmp_path, tensorboard=True)
    crash = TrainingHistory.record_step

    def record_step(self, *args):
        if self.step + 1 == 10:
            raise KeyboardInterrupt  # a second Ctrl-C: aborts without saving
        return crash(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(TrainingHistory, "record_step", record_step)
        with pytest.raises(KeyboardInterrupt):
            bigram_main(flags)
    folder = tmp_path / "checkpoints/bigram/tensorboard"
    assert [step for step, _ in read_tensorboard(folder)[0]["train/loss"]] == [3, 6, 9]

    capsys.readouterr()
    assert bigram_main(["--resume", "--device", "cpu", "--out-dir", str(tmp_path),
                        "--tensorboard"]) == 0
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    scalars, samples = read_tensorboard(folder)
    for tag in PROGRESS_TAGS:
        assert [step for step, _ in scalars[tag]] == [3, 6, 9, 12]
    assert [step for step, _ in scalars["eval/val_loss"]] == [6, 12]
    assert [step for step, _ in samples] == [6, 12]
    # The resumed progress line shows the val bpc of the checkpoint's evaluation at once.
    bpc_at_6 = float(read_metrics(tmp_path, "bigram")[0]["val_bpc"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("step 9/12"))
    assert line.endswith(f"val bpc {bpc_at_6:.4f}")


@needs_wandb
def test_wandb_logs_the_same_keys_offline_without_a_login(prepared, tmp_path, offline_wandb):
    assert bigram_main(tiny_flags(prepared / "char", tmp_path, wandb=True)) == 0
    folder = tmp_path / "checkpoints/bigram/wandb"
    run_id = (folder / "run_id.txt").read_text().strip()
    [session] = folder.glob(f"offline-run-*-{run_id}")  # offline: no API key, no netrc login
    rows = wandb_history(session / f"run-{run_id}.wandb")
    for key in PROGRESS_TAGS:
        assert steps_of(rows, key) == [3, 6, 9, 12]
    for key in EVAL_TAGS | {"eval/sample/path"}:
        assert steps_of(rows, key) == [6, 12]
    metrics = read_metrics(tmp_path, "bigram")
    assert [row["eval/val_bpc"] for row in rows if "eval/val_bpc" in row] == [
        pytest.approx(float(m["val_bpc"])) for m in metrics]
    page = (session / "files" / rows[-1]["eval/sample/path"]).read_text()
    assert page.startswith("<pre>") and page.endswith("</pre>") and len(page) > 60


@needs_wandb
@pytest.mark.slow
def test_wandb_resume_continues_its_run_and_the_flag_is_not_inherited(prepared, tmp_path,
                                                                     offline_wandb, capsys):
    resume = ["--resume", "--device", "cpu", "--out-dir", str(tmp_path)]
    assert bigram_main(tiny_flags(prepared / "char", tmp_path, max_iters=6, wandb=True)) == 0
    capsys.readouterr()
    assert bigram_main(resume + ["--max-iters", "9"]) == 0
    assert "logged with --wandb; this one does not" in capsys.readouterr().out
    assert bigram_main(resume + ["--max-iters", "12", "--wandb"]) == 0

    folder = tmp_path / "checkpoints/bigram/wandb"
    run_id = (folder / "run_id.txt").read_text().strip()
    sessions = sorted(folder.glob("offline-run-*"))  # none for the session without --wandb
    assert [s.name.rsplit("-", 1)[1] for s in sessions] == [run_id, run_id]
    first, resumed = (wandb_history(s / f"run-{run_id}.wandb") for s in sessions)
    assert [row["_step"] for row in first] == [3, 6]
    assert [row["_step"] for row in resumed] == [12]


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_package_is_one_sentence_and_nothing_is_written(package, prepared, tmp_path):
    """--tensorboard or --wandb without its package (a stand-in that fails to import comes
    first on the path) is refused before the run's folders exist."""
    hidden = tmp_path / "hide" / package
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(f"raise ModuleNotFoundError({package!r})\n")
    out = tmp_path / "out"
    result = run_script("bigram/train.py", *tiny_flags(prepared / "char", out, **{package: True}),
                        env={**os.environ, "PYTHONPATH": str(hidden.parent)})
    assert result.returncode == 1
    assert f"`pip install {package}`" in one_error_line(result.stderr)
    assert not out.exists()


def test_progress_line_shows_val_bpc_and_show_samples_prints_a_line(prepared, tmp_path, capsys):
    assert bigram_main(tiny_flags(prepared / "char", tmp_path, dropout=0.1,
                                  show_samples=True)) == 0
    lines = capsys.readouterr().out.splitlines()
    bpc = [float(r["val_bpc"]) for r in read_metrics(tmp_path, "bigram")]
    progress = [l for l in lines if l.startswith("step ") and "/12" in l]
    assert "val bpc" not in progress[0] and "val bpc" not in progress[1]  # steps 3 and 6
    assert progress[2].endswith(f"val bpc {bpc[0]:.4f}")  # step 9: the evaluation at 6
    for step in (6, 12):
        after = lines[lines.index(next(l for l in lines if l.startswith(f"step {step}: "))) + 1]
        assert after.startswith("  sample: ")
        assert 78 <= len(after) - len("  sample: ") <= 80  # the sample is longer than that
    assert not (tmp_path / "checkpoints/bigram/tensorboard").exists()

    assert bigram_main(tiny_flags(prepared / "char", tmp_path, dropout=0.1, run="quiet")) == 0
    assert "sample: " not in capsys.readouterr().out
    # Sampling draws from its own generator: the training's dropout and batches are unchanged.
    def losses(run):
        return [(row["train_loss"], row["val_loss"]) for row in read_metrics(tmp_path, run)]
    assert losses("bigram") == losses("quiet")


def test_progress_bar_shows_val_bpc_after_an_evaluation():
    display = ProgressDisplay(enabled=True)
    display.bar = tqdm(total=12, file=io.StringIO())
    display.show(3, 12, loss=2.5, lr=1e-3, tokens_per_s=100.0)
    assert "val_bpc" not in display.bar.postfix
    display.evaluated(3.14159)
    assert "val_bpc=3.1416" in display.bar.postfix and "loss=2.5000" in display.bar.postfix
    display.close()


def test_sample_line_escapes_line_breaks_and_keeps_other_text():
    assert one_line("To be,\nor not\tto bé\x00", 80) == "To be,\\nor not\\tto bé\\x00"
    assert one_line("a\nb" * 50, 10) == "a\\nba\\nba"  # an escape is never cut in half


@needs_tensorboard
@pytest.mark.slow
def test_under_torchrun_only_rank_0_logs(prepared, tmp_path):
    from test_distributed import ok, torchrun

    flags = tiny_flags(prepared / "char", tmp_path, grad_accum_steps=2, tensorboard=True,
                       show_samples=True)
    result = ok(torchrun("bigram/train.py", *flags))
    assert result.stdout.count("  sample: ") == 2  # one per evaluation, from rank 0 alone
    folder = tmp_path / "checkpoints/bigram/tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    scalars, samples = read_tensorboard(folder)
    assert [step for step, _ in scalars["train/loss"]] == [3, 6, 9, 12]
    assert [step for step, _ in samples] == [6, 12]
