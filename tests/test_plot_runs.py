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


NANOGPT_LOG = """found vocab_size = 65 (inside data/shakespeare_char/meta.pkl)
tokens per iteration will be: 768
step 0: train loss 4.1676, val loss 4.1649
iter 0: loss 4.1722, time 900.00ms, mfu -100.00%
iter 10: loss 3.3000, time 50.00ms, mfu 0.02%
step 20: train loss 2.8000, val loss 2.8500
iter 20: loss 2.9000, time 650.00ms, mfu 0.02%
iter 30: loss 2.7000, time 50.00ms, mfu 0.02%
step 40: train loss 2.6000, val loss 2.6500
iter 40: loss 2.6000, time 650.00ms, mfu 0.02%
"""


def test_a_nanogpt_log_is_a_curve_with_seconds_and_bpc(trained, tmp_path):
    from plot_runs import read_nanogpt_log
    log = tmp_path / "nanogpt.log"
    log.write_text(NANOGPT_LOG)
    label, rows = read_nanogpt_log(log)
    assert label == "nanoGPT (nanogpt.log, val estimated on few batches)" and [r["step"] for r in rows] == [20, 40]
    # 50 ms a step, plus the 850 ms of the step-0 evaluation and 600 ms for each later one
    assert [round(r["elapsed_s"], 3) for r in rows] == [2.45, 4.05]
    assert [r["tokens_seen"] for r in rows] == [20 * 768, 40 * 768]
    assert rows[1]["val_bpc"] == pytest.approx(2.65 / 0.6931471805599453)
    out = tmp_path / "vs.png"
    result = run_script("plot_runs.py", "bigram", log, "--x", "seconds", "--y", "bpc",
                        "--out", out, "--out-dir", trained)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bpe_nanogpt_log_has_no_bpc_and_other_files_are_refused(trained, tmp_path):
    log = tmp_path / "gpt2.log"
    log.write_text(NANOGPT_LOG.replace("found vocab_size = 65 (inside data/shakespeare_char/"
                                       "meta.pkl)\n", ""))
    result = run_script("plot_runs.py", log, "--y", "bpc", "--out", tmp_path / "c.png")
    assert result.returncode == 1 and "--y loss" in one_error_line(result.stderr)
    notes = tmp_path / "notes.txt"
    notes.write_text("just some text\n")
    result = run_script("plot_runs.py", notes, "--out", tmp_path / "c.png")
    assert result.returncode == 1 and "nanoGPT training log" in one_error_line(result.stderr)
    assert not (tmp_path / "c.png").exists()
