"""plot_runs.py overlays the val loss of several runs against steps, tokens or seconds."""
import pytest

from conftest import one_error_line, run_script


@pytest.mark.parametrize("x,y", [("steps", "loss"), ("tokens", "bpc"), ("seconds", "loss")])
def test_two_runs_in_one_plot(x, y, trained, tmp_path):
    out = tmp_path / "compare.png"
    result = run_script("plot_runs.py", "bigram", trained / "checkpoints/gpt/metrics.csv",
                        "--x", x, "--y", y, "--out", out, "--out-dir", trained)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"2 runs against {x}" in result.stdout


def test_a_run_without_metrics_is_one_sentence(trained, tmp_path):
    result = run_script("plot_runs.py", "bigram", "nosuchrun", "--out", tmp_path / "c.png",
                        "--out-dir", trained)
    assert result.returncode == 1 and "train it first" in one_error_line(result.stderr)
    assert not (tmp_path / "c.png").exists()
