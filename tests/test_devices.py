"""The checks that touch numerics or device state, on every device this machine has: always
the CPU, plus cuda and mps where present (skipped with the reason elsewhere). Training, exact
resume, decoder logits and cached sampling run here on the GPUs only: their CPU versions are
in test_training.py and test_sampling.py. Also float16 with a gradient scaler, checkpoints
moving between devices, --compile, and out of memory."""
import platform
import subprocess
import sys

import pytest
import torch

from bigram.model import BigramConfig, BigramLanguageModel
from bigram.train import main as bigram_main
from conftest import (REPO_ROOT, assert_decoder_matches_forward, one_error_line, read_metrics,
                      run_script, saved_weights, stop_requested_during, tiny_flags)
from gpt.model import GPT, GPTConfig, head_loss
from gpt.train import main as gpt_main
from lmkit.errors import UserError
from lmkit.generation import generate

MAINS = {"bigram": (bigram_main, "char"), "gpt": (gpt_main, "gpt2")}
HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA GPU on this machine")),
    pytest.param("mps", marks=pytest.mark.skipif(not HAS_MPS, reason="no Apple GPU on this machine")),
]
GPUS = DEVICES[1:]


def assert_same(a: dict, b: dict, device: str):
    """Bit for bit on the CPU; GPUs' atomics-based kernels may differ in the last bits."""
    assert a.keys() == b.keys()
    for name in a:
        if device == "cpu":
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def tiny_model(kind: str, device: str):
    torch.manual_seed(0)
    if kind == "bigram":
        model = BigramLanguageModel(BigramConfig(vocab_size=50, block_size=16, n_embd=16,
                                                 n_head=2, n_layer=2, dropout=0.0))
    else:
        model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16,
                              dropout=0.0))
    return model.to(device).eval()


@pytest.mark.parametrize("device", GPUS)
@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_tiny_model_trains(kind, device, prepared, tmp_path):
    main, tokenizer = MAINS[kind]
    assert main(tiny_flags(prepared / tokenizer, tmp_path, device=device, dtype="auto",
                           max_iters=20, eval_interval=10, learning_rate=1e-2)) == 0
    rows = read_metrics(tmp_path, kind)
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    assert (tmp_path / "checkpoints" / kind / "best.pt").is_file()


@pytest.mark.parametrize("device", GPUS)
def test_resume_after_a_stop_equals_a_straight_run(device, prepared, tmp_path, monkeypatch):
    flags = tiny_flags(prepared / "char", tmp_path, device=device, dtype="auto", dropout=0.1,
                       grad_accum_steps=2)
    assert bigram_main(flags + ["--run", "straight"]) == 0
    with monkeypatch.context() as patch:
        stop_requested_during(7, patch)
        assert bigram_main(flags + ["--run", "split"]) == 130
    assert bigram_main(["--resume", "--run", "split", "--out-dir", str(tmp_path)]) == 0
    assert_same(saved_weights(tmp_path, "straight"), saved_weights(tmp_path, "split"), device)


@pytest.mark.parametrize("device", GPUS)
@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_decoder_logits_equal_the_forward(kind, device):
    model = tiny_model(kind, device)
    weights = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=weights) * 0.5)
    assert_decoder_matches_forward(model, device, tol=1e-4)


@pytest.mark.parametrize("device", GPUS)
@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_cached_sampling_equals_uncached(kind, device):
    model = tiny_model(kind, device)
    prompt = torch.zeros((2, 1), dtype=torch.long, device=device)
    runs = [generate(model, prompt, 15, temperature=0, use_cache=cached) for cached in (True, False)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_head_loss_under_autocast(dtype, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=gen).to(device).requires_grad_()
    weight = torch.randn(70, 16, generator=gen).to(device).requires_grad_()
    targets = torch.randint(0, 70, (300,), generator=gen).to(device)
    with torch.autocast(device, dtype=dtype):
        loss = head_loss(x, weight, targets, chunk_rows=128)
    loss.backward()
    plain = torch.nn.functional.cross_entropy((x @ weight.t()).float(), targets)
    torch.testing.assert_close(loss, plain, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_loss_is_caught(device, prepared, tmp_path):
    flags = tiny_flags(prepared / "char", tmp_path, device=device, learning_rate=1e30, min_lr=0,
                       grad_clip=0, warmup_iters=0, max_iters=20, eval_interval=20)
    with pytest.raises(UserError, match="non-finite at step"):
        bigram_main(flags)
    assert not (tmp_path / "checkpoints/bigram/last.pt").exists()


# ---- float16 with a gradient scaler ------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_float16_with_a_grad_scaler_trains_and_resumes_exactly(device, prepared, tmp_path,
                                                               monkeypatch):
    """The scaler's state is in the checkpoint, so a stopped float16 run resumes exactly."""
    flags = tiny_flags(prepared / "char", tmp_path, device=device, dtype="float16",
                       learning_rate=1e-2)
    assert bigram_main(flags + ["--run", "straight"]) == 0
    state = torch.load(tmp_path / "checkpoints/straight/last.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] > 0  # the scaler ran and was saved
    rows = read_metrics(tmp_path, "straight")
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    with monkeypatch.context() as patch:
        stop_requested_during(5, patch)
        assert bigram_main(flags + ["--run", "split"]) == 130
    assert bigram_main(["--resume", "--run", "split", "--out-dir", str(tmp_path)]) == 0
    assert_same(saved_weights(tmp_path, "straight"), saved_weights(tmp_path, "split"), device)


# ---- checkpoints move between devices ------------------------------------------------------------

@pytest.mark.parametrize("gpu", GPUS)
def test_checkpoint_moves_between_a_gpu_and_the_cpu(gpu, prepared, tmp_path):
    data = prepared / "char"
    for trained_on, resumed_on in ((gpu, "cpu"), ("cpu", gpu)):
        run = f"from-{trained_on}"
        assert bigram_main(tiny_flags(data, tmp_path, device=trained_on, run=run, max_iters=6)) == 0
        assert bigram_main(["--resume", "--run", run, "--out-dir", str(tmp_path), "--device",
                            resumed_on, "--max-iters", "12"]) == 0
        result = run_script("bigram/sample.py", "--out-dir", tmp_path, "--run", run,
                            "--device", resumed_on, "--max-new-tokens", 20)
        assert result.returncode == 0, result.stderr


# ---- --compile, and out of memory ----------------------------------------------------------------

@pytest.mark.slow
def test_compile_trains_a_few_steps(prepared, tmp_path):
    assert bigram_main(tiny_flags(prepared / "char", tmp_path, compile=True, max_iters=3,
                                  eval_interval=3, eval_iters=1, sample_tokens=0)) == 0
    assert read_metrics(tmp_path, "bigram")[-1]["step"] == "3"


@pytest.mark.slow
def test_the_feed_forward_relu_compiles_without_a_boolean_mask():
    """nn.ReLU under torch.compile saves a boolean mask whose stores are slow on AVX2 CPUs; the
    model's ReLU must compile to float-only kernels and give the same gradients as eager."""
    from torch._inductor.utils import run_and_get_code
    from bigram.model import FeedForward
    torch.manual_seed(0)
    ffwd = FeedForward(BigramConfig(n_embd=32, dropout=0.0))
    x = torch.randn(4, 8, 32, requires_grad=True)

    def grads(fn):
        for p in (x, *ffwd.parameters()):
            p.grad = None
        fn(x).square().sum().backward()
        return [p.grad.clone() for p in (x, *ffwd.parameters())]

    eager = grads(ffwd)
    compiled, code = run_and_get_code(grads, torch.compile(ffwd))
    assert code and not any("bool*" in kernel for kernel in code)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_the_feed_forward_relu_is_nn_relu_bit_for_bit_in_eager():
    from bigram.model import ReLU
    x = torch.randn(64, 64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    out, reference = ReLU()(x), torch.nn.ReLU()(y)
    grad = torch.randn(64, 64)
    out.backward(grad)
    reference.backward(grad)
    assert torch.equal(out, reference) and torch.equal(x.grad, y.grad)


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_training_steps_keep_freed_memory_instead_of_page_faulting_it_back():
    """Each step frees its activations and allocates them again. glibc's defaults hand big blocks
    back to the kernel, so a step page-faults them in afresh; keep_freed_memory, which train.py
    sets on CPUs, stops that."""
    script = ("import resource, sys, torch\n"
              "sys.path.insert(0, sys.argv[1])\n"
              "from bigram.model import BigramConfig, BigramLanguageModel\n"
              "from lmkit.process import keep_freed_memory\n"
              "assert keep_freed_memory()\n"
              "model = BigramLanguageModel(BigramConfig(block_size=64, n_layer=4, n_head=4,\n"
              "                                         n_embd=128, dropout=0.0))\n"
              "opt = torch.optim.AdamW(model.parameters())\n"
              "x = torch.randint(65, (12, 64))\n"
              "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "faulting_steps = 0\n"
              "for step in range(40):\n"
              "    before = faults()\n"
              "    model(x, x)[1].backward(); opt.step(); opt.zero_grad()\n"
              "    faulting_steps += step >= 10 and faults() - before > 100\n"
              "print(faulting_steps)\n")
    result = subprocess.run([sys.executable, "-c", script, str(REPO_ROOT)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # The step's activations span over 5,000 pages. With glibc's defaults, 9-20 of every 20 steps
    # faulted hundreds to thousands of them back in here; with the setting, a step faults 0 or
    # 1 times, and now and then one grows the heap.
    assert int(result.stdout) <= 3


@pytest.mark.slow
def test_a_cpu_run_too_big_for_the_memory_is_refused_before_it_starts(prepared, tmp_path):
    result = run_script("bigram/train.py", *tiny_flags(prepared / "char", tmp_path),
                        "--batch-size", 1_000_000, "--n-embd", 384, "--n-head", 6)
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "GiB" in line and "--batch-size" in line and "--grad-accum-steps" in line
    assert not (tmp_path / "checkpoints/bigram/last.pt").exists()


def test_an_apple_gpu_out_of_memory_error_is_one_sentence(tmp_path):
    """MPS reports running out of memory as a plain RuntimeError."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import torch\n"
              "from lmkit.errors import run_main\n"
              "def main():\n"
              "    raise RuntimeError('MPS backend out of memory (MPS allocated: 9 GB)')\n"
              "run_main(main)\n")
    result = subprocess.run([sys.executable, "-c", script, str(REPO_ROOT)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert "--grad-accum-steps" in one_error_line(result.stderr)
