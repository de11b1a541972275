"""notebooks/walkthrough.ipynb: in step with its jupytext source, committed without outputs, and
running from top to bottom (on tiny models) in a fresh kernel of this Python."""
import re

import pytest

from conftest import REPO_ROOT

NOTEBOOKS = REPO_ROOT / "notebooks"
NOTEBOOK = NOTEBOOKS / "walkthrough.ipynb"
SOURCE = NOTEBOOKS / "walkthrough.py"


def cells(nb) -> list:
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]


def parameters_cell(nb):
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return cell


def test_notebook_matches_its_py_source_and_has_no_outputs():
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert cells(notebook) == cells(jupytext.read(SOURCE)), (
        "walkthrough.ipynb and walkthrough.py differ; run "
        "`jupytext --sync notebooks/walkthrough.py`")
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), (
        "commit walkthrough.ipynb without outputs")
    assert "TINY = False" in parameters_cell(notebook).source


@pytest.mark.slow
def test_notebook_runs_on_tiny_models(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    kernelspec = pytest.importorskip("ipykernel.kernelspec")
    # A kernel spec that starts this very Python: one a user installed may start another.
    kernelspec.write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    out_dir = tmp_path / "runs"
    parameters_cell(notebook).source = (
        f"MAX_ITERS_CHAR = 12\nMAX_ITERS_GPT = 12\nBPE_VOCAB = 300\nDEVICE = 'cpu'\nTINY = True\n"
        f"OUT_DIR = {str(out_dir)!r}\n")
    before = sorted(p.name for p in NOTEBOOKS.iterdir())

    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the char model's losses, then both models' val bpc
    printed = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    # TINY trains on a text of the notebook's own, even where data/input.txt exists
    prompt = (out_dir / "own_text.txt").read_text(encoding="utf-8").split("\n")[0]
    for heading in ("char model sample:\n", "GPT sample:\n"):
        sample = printed.split(heading)[1]
        assert sample.startswith(prompt) and sample[len(prompt):].strip()
    assert len(re.findall(r"val \d+\.\d+ bits per character", printed)) == 2  # both models
    for run in ("char", "gpt"):
        assert (out_dir / "checkpoints" / run / "best.pt").is_file()
    assert (out_dir / "data" / "char" / "train.bin").is_file()
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before  # nothing written beside it
