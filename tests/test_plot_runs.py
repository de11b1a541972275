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


HEADER = "step,lr,train_loss,val_loss,val_bpc,tokens_seen,elapsed_s,tokens_per_s\n"
GOOD_ROWS = "6,0.003,3.1,3.2,4.6,384,0.5,700\n12,0.001,2.9,3.0,4.3,768,1.0,760\n"
DAMAGED_METRICS = {  # what is in the file -> (lines named in the warnings, is anything left)
    "text in a number column": (HEADER + GOOD_ROWS + "18,0.001,2.8,oops,4.1,1152,1.5,760\n",
                                ["line 4: val_loss is 'oops', not a number"], True),
    "a truncated last row": (HEADER + GOOD_ROWS + "18,0.001,2.8", ["line 4: the row ends before"],
                             True),
    "an infinite value": (HEADER + GOOD_ROWS + "18,0.001,2.8,inf,4.1,1152,1.5,760\n",
                          ["line 4: val_loss is 'inf', not a finite number"], True),
    "an empty file": ("", ["(no header)"], False),
    "a header only": (HEADER, ["(a header and no evaluations)"], False),
    "an all-NaN column": (HEADER + GOOD_ROWS.replace("3.2", "nan").replace("3.0", "nan"),
                          ["(line 2: val_loss is 'nan', not a finite number)"], False),
    "a missing column": (HEADER.replace("val_loss,", "") + "6,0.003,3.1,4.6,384,0.5,700\n",
                         ["(no val_loss column)"], False),
    "bytes that are not UTF-8": (b"step,val_loss\n\xff\xfe,1\n", ["(it is not a readable CSV"],
                                 False),
}


@pytest.mark.parametrize("damage", DAMAGED_METRICS)
def test_a_damaged_metrics_file_is_named_and_the_rest_is_drawn(damage, tmp_path, capsys):
    from plot_runs import main
    content, warnings, anything_left = DAMAGED_METRICS[damage]
    good, damaged = tmp_path / "good.csv", tmp_path / "damaged.csv"
    good.write_text(HEADER + GOOD_ROWS, encoding="utf-8")
    damaged.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    out = tmp_path / "compare.png"
    assert main([str(good), str(damaged), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{2 if anything_left else 1} runs against steps" in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == len(warnings) and all(line.startswith("warning: ") for line in lines)
    for line, expected in zip(lines, warnings):
        assert str(damaged) in line and expected in line, line
    if not anything_left:
        assert "left out of the plot" in lines[0]


def test_no_run_left_to_draw_is_one_error_sentence_after_the_warnings(tmp_path):
    empty, header_only = tmp_path / "empty.csv", tmp_path / "header.csv"
    empty.write_text("")
    header_only.write_text(HEADER)
    out = tmp_path / "compare.png"
    result = run_script("plot_runs.py", empty, header_only, "--out", out)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert [line.split(":")[0] for line in lines] == ["warning", "warning", "error"]
    assert "none of the runs has an evaluation to plot" in lines[-1]
    assert not out.exists()
