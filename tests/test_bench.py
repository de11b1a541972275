"""bench.py runs end to end and writes its JSON (it measures; no speed is asserted here)."""
import json

import pytest

from conftest import run_script
from lmkit.device import cpu_has_fast_bf16


def test_bench_writes_every_measurement(prepared, tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("bench.py", "--model", "bigram", "--preset", "cpu", "--steps", 2,
                        "--warmup", 1, "--samples", 2, "--sample-tokens", 8, "--json", out, "--",
                        "--data-dir", prepared / "char", "--n-layer", 1, "--n-embd", 16,
                        "--n-head", 2, "--block-size", 16, "--batch-size", 4, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    for key in ("tokens_per_s", "ms_per_step", "first_step_s", "matmul_peak_fp32", "matmul_peak_bf16",
                "mfu_vs_fp32", "mfu_vs_bf16", "peak_memory_mb", "prepare_data_s"):
        assert key in numbers
    assert numbers["tokens_per_s"] > 0 and numbers["params"] > 0
    assert numbers["matmul_peak_fp32"] > 0
    # bf16 is measured only where the CPU has it natively (emulated, one product takes a minute)
    assert (numbers["matmul_peak_bf16"] is None) == (not cpu_has_fast_bf16())
    assert set(numbers["sampling_tokens_per_s"]) == {
        "one_at_a_time_no_cache", "one_at_a_time_cache", "batched_no_cache", "batched_cache",
        "speedup_batched_cache_vs_one_no_cache"}
    assert "tokens_per_s" in result.stdout


@pytest.mark.slow
def test_bench_times_the_head_loss_chunkings(prepared, tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("bench.py", "--model", "gpt", "--steps", 1, "--warmup", 1,
                        "--skip-sampling", "--head-loss", "--json", out, "--",
                        "--data-dir", prepared / "gpt2", "--n-layer", 1, "--n-embd", 16,
                        "--n-head", 2, "--block-size", 16, "--batch-size", 4,
                        "--grad-accum-steps", 1, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    timings = json.loads(out.read_text())["head_loss_ms"]
    assert set(timings) == {"chunk_128", "chunk_512", "chunk_2048", "chunk_8192", "plain"}
    assert all(ms > 0 for ms in timings.values())


def test_bench_runs_nanogpt_then_our_preset_back_to_back(prepared, small_text_file, tmp_path):
    """--vs-nanogpt: a stand-in nanoGPT checkout gets our 90/10 split and nanoGPT's CPU flags,
    then our command runs; both rows are read back."""
    checkout = tmp_path / "nanoGPT"
    (checkout / "config").mkdir(parents=True)
    (checkout / "config" / "train_shakespeare_char.py").write_text("")
    (checkout / "train.py").write_text(
        "import os, sys\n"
        "assert os.path.getsize('data/shakespeare_char/train.bin') > 0\n"
        "assert '--device=cpu' in sys.argv and '--max_iters=2000' in sys.argv\n"
        "print('step 2000: train loss 1.4000, val loss 1.6000')\n")
    out = tmp_path / "vs.json"
    result = run_script("bench.py", "--vs-nanogpt", checkout, "--corpus", small_text_file,
                        "--model", "bigram", "--json", out, "--",
                        "--data-dir", prepared / "char", "--n-layer", 1, "--n-embd", 16,
                        "--n-head", 2, "--block-size", 16, "--batch-size", 4, "--max-iters", 4,
                        "--eval-interval", 2, "--eval-iters", 1, "--warmup-iters", 1,
                        "--sample-tokens", 0)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    assert numbers["nanogpt"]["val_loss"] == 1.6
    assert numbers["ours"]["step"] in (2, 4) and numbers["ours"]["val_bpc"] > 0
    assert numbers["time_ratio"] > 0 and "bits/char" in result.stdout
