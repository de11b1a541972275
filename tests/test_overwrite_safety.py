"""export.py --overwrite replaces only a folder an earlier export wrote: never the repository,
a run's checkpoints, prepared data, or a folder of someone else's files."""
import shutil

import pytest

from conftest import REPO_ROOT
from lmkit import hf
from lmkit.errors import UserError


def export(trained, out, *flags):
    from bigram.export import main
    return main(["--out-dir", str(trained), "--out", str(out), *flags])


@pytest.fixture
def nothing_written(monkeypatch):
    """Should a refusal fail to come, no file of the replacement gets written, so the folder
    that a wrong --overwrite would have replaced is never renamed away."""
    def refuse_to_write(path, data):
        raise AssertionError(f"export wrote {path} where it should have refused")
    monkeypatch.setattr(hf, "write_file", refuse_to_write)


def test_overwrite_replaces_an_earlier_export(trained, tmp_path):
    out = tmp_path / "hf"
    assert export(trained, out) == 0
    mark = (out / hf.EXPORT_MARK).read_text()
    assert "exported by export.py from" in mark and "checkpoints/bigram" in mark
    (out / "stale.txt").write_text("from an older export")
    assert export(trained, out, "--overwrite") == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert (out / hf.EXPORT_MARK).is_file() and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_overwrite_of_a_folder_export_did_not_write_is_refused(trained, tmp_path,
                                                               nothing_written):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("irreplaceable")
    with pytest.raises(UserError, match=f"holding files export.py did not write .*{hf.EXPORT_MARK}"
                       ) as refusal:
        export(trained, out, "--overwrite")
    assert "\n" not in str(refusal.value)
    assert [p.name for p in out.iterdir()] == ["chapter1.tex"]
    assert (out / "chapter1.tex").read_text() == "irreplaceable"
    assert [p.name for p in tmp_path.iterdir()] == ["thesis"]  # no temp folder left


def test_overwrite_of_the_repository_root_is_refused(trained, tmp_path, nothing_written):
    with pytest.raises(UserError, match="is the repository root"):
        export(trained, REPO_ROOT, "--overwrite")
    assert (REPO_ROOT / "lmkit" / "hf.py").is_file()
    look_alike = tmp_path / "clone"  # another checkout, even with the mark copied into it
    (look_alike / "lmkit").mkdir(parents=True)
    (look_alike / hf.EXPORT_MARK).write_text("copied")
    with pytest.raises(UserError, match="is the repository root"):
        export(trained, look_alike, "--overwrite")
    assert (look_alike / "lmkit").is_dir()


def test_overwrite_of_checkpoints_is_refused(trained, tmp_path, nothing_written):
    run_folder = trained / "checkpoints" / "bigram"
    before = sorted(p.name for p in run_folder.iterdir())
    for out in (run_folder, run_folder.parent, trained):  # the checkpoint's folder, or above it
        with pytest.raises(UserError, match="holds the checkpoint being exported"):
            export(trained, out, "--overwrite")
    copy = tmp_path / "copied-run"  # another run's folder, the mark planted in it
    shutil.copytree(run_folder, copy)
    (copy / hf.EXPORT_MARK).write_text("planted")
    with pytest.raises(UserError, match="is a folder of training runs"):
        export(trained, copy, "--overwrite")
    for runs in (trained / "checkpoints", trained):  # exported from a copy of the checkpoint
        with pytest.raises(UserError, match="is a folder of training runs"):
            from bigram.export import main
            main(["--checkpoint", str(copy / "last.pt"), "--out", str(runs), "--overwrite"])
    assert sorted(p.name for p in run_folder.iterdir()) == before


def test_overwrite_of_a_data_folder_is_refused(trained, prepared, nothing_written):
    for out in (prepared, prepared / "char"):
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(UserError, match="is a folder of prepared data"):
            export(trained, out, "--overwrite")
        assert sorted(p.name for p in out.iterdir()) == before


def test_leftovers_of_an_interrupted_export_or_sample_are_named_not_deleted(trained, tmp_path,
                                                                            capsys):
    from bigram.sample import main as sample_main
    out = tmp_path / "hf"
    # a kill between export's two renames leaves the previous export under ".tmp.old"
    left = tmp_path / ".hf.k2j4h1x9.tmp.old"
    left.mkdir()
    (left / hf.EXPORT_MARK).write_text("an earlier export")
    assert export(trained, out) == 0
    note = capsys.readouterr().err
    assert f"note: {left} was left by an interrupted write of {out}" in note
    assert left.is_dir() and (out / "model.safetensors").is_file()

    text = tmp_path / "samples.txt"
    partial = tmp_path / ".samples.txt.0a1b2c3d.tmp"
    partial.write_text("half a sample")
    assert sample_main(["--out-dir", str(trained), "--out", str(text), "--max-new-tokens", "5",
                        "--num-samples", "1"]) == 0
    assert f"note: {partial} was left by an interrupted write of {text}" in capsys.readouterr().err
    assert partial.read_text() == "half a sample" and text.is_file()


def test_prepare_removes_what_a_killed_preparation_or_download_left(small_text_file, tmp_path):
    from prepare_data import main as prepare_main
    out = tmp_path / "data"
    out.mkdir()
    killed_download = out / ".input.txt.x8y7z6w5.tmp"
    killed_download.write_bytes(b"First Citizen:\nBefore we proc")
    assert prepare_main(["--input", str(small_text_file), "--out-dir", str(out)]) == 0
    assert not killed_download.exists()
    assert not [p for p in out.rglob("*.tmp")] and (out / "char" / "meta.json").is_file()
