"""Shared fixtures and helpers: a small generated corpus, prepared data, tiny trained checkpoints,
and the checks several test files make of a run's outputs."""
import csv
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import prepare_data  # noqa: E402
from lmkit.decoder import KVCacheDecoder  # noqa: E402
from lmkit.history import TrainingHistory  # noqa: E402
from lmkit.trainer import Trainer  # noqa: E402

SHARED_CORPUS = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CACHED_CORPUS = REPO_ROOT / "data" / "input.txt"


def make_text(n_lines: int = 1500, seed: int = 0) -> str:
    """A small play-like text: repetitive enough that a tiny model's loss falls in a few steps."""
    rng = random.Random(seed)
    names = ["ROMEO", "JULIET", "NURSE", "FRIAR"]
    words = ("thou art the sun and moon my love what light through yonder window breaks "
             "good night sweet prince parting is such sorrow").split()
    lines = []
    for i in range(n_lines):
        if i % 5 == 0:
            lines.append(f"\n{rng.choice(names)}:")
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))).capitalize() + ".")
    return "\n".join(lines) + "\n"


def tiny_flags(data_dir: Path, out_dir: Path, **overrides) -> list:
    """Flags for a model small enough to train in a second or two on a CPU."""
    values = dict(device="cpu", dtype="float32", n_layer=1, n_head=2, n_embd=16, block_size=16,
                  batch_size=4, grad_accum_steps=1, max_iters=12, eval_interval=6, eval_iters=2,
                  log_interval=3, dropout=0.0, learning_rate=3e-3, min_lr=3e-4, warmup_iters=2,
                  sample_tokens=10, data_dir=data_dir, out_dir=out_dir)
    values.update(overrides)
    flags = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    return flags


def run_script(script: str, *args, check=False, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts the way a user does, from the repo root."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def one_error_line(stderr: str) -> str:
    """The single "error: ..." line a failing script printed, with no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def wait_until(condition, proc, timeout=120):
    """Poll condition() until it holds; fail if the process proc ends first or time runs out."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def read_metrics(out_dir, run) -> list:
    """The rows of checkpoints/<run>/metrics.csv."""
    path = out_dir / "checkpoints" / run / "metrics.csv"
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def saved_weights(out_dir, run, name="last.pt") -> dict:
    """The model weights saved in checkpoints/<run>/<name>."""
    return torch.load(out_dir / "checkpoints" / run / name, weights_only=True)["model"]


def assert_decoder_matches_forward(model, device="cpu", tol=1e-5) -> KVCacheDecoder:
    """Feed the KV-cache decoder a 5-token prompt, then one token at a time, and check its logits
    against the model's own forward at every position; returns the decoder."""
    tokens = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(8)).to(device)
    decoder = KVCacheDecoder(model.decoder_weights(), batch_size=3, device=torch.device(device))
    with torch.inference_mode():
        logits = decoder.feed(tokens[:, :5])
        for end in range(5, 17):
            expected, _ = model(tokens[:, :end])
            torch.testing.assert_close(logits, expected[:, -1], rtol=tol, atol=tol)
            if end < 16:
                logits = decoder.feed(tokens[:, end:end + 1])
    return decoder


def stop_requested_during(step_to_stop: int, monkeypatch):
    """Make the trainer see a Ctrl-C during the given step, without a real signal."""
    original = TrainingHistory.record_step

    def record_step(self, loss, grad_norm, seconds):
        if self.step + 1 == step_to_stop:  # the step being finished now
            active_trainer[0].stop.requested = True
        return original(self, loss, grad_norm, seconds)

    active_trainer = []
    original_init = Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        active_trainer[:] = [self]

    monkeypatch.setattr(TrainingHistory, "record_step", record_step)
    monkeypatch.setattr(Trainer, "__init__", init)


@pytest.fixture(scope="session")
def small_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, small_text_file) -> Path:
    """A data folder with char/ and gpt2/ splits of the small text."""
    out = tmp_path_factory.mktemp("data")
    assert prepare_data.main(["--input", str(small_text_file), "--out-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, prepared) -> Path:
    """An out_dir holding tiny trained 'bigram' and 'gpt' runs (checkpoints, plots, samples)."""
    from bigram.train import main as bigram_main
    from gpt.train import main as gpt_main

    out = tmp_path_factory.mktemp("runs")
    assert bigram_main(tiny_flags(prepared / "char", out)) == 0
    assert gpt_main(tiny_flags(prepared / "gpt2", out, block_size=32)) == 0
    return out


@pytest.fixture(scope="session")
def real_corpus() -> Path:
    """Tiny Shakespeare from ../shared (CI) or the local cache; skipped when neither exists."""
    for path in (SHARED_CORPUS, CACHED_CORPUS):
        if path.is_file():
            return path
    pytest.skip("Tiny Shakespeare is not available offline here")
