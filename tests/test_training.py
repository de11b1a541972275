"""Training: both models learn, resume is exact, accumulation is exact, outputs are written."""
import math

import numpy as np
import pytest
import torch

from bigram.model import BigramConfig, BigramLanguageModel
from bigram.family import FAMILY as BIGRAM
from bigram.train import main as bigram_main
from conftest import read_metrics, run_script, saved_weights, stop_requested_during, tiny_flags
from gpt.model import GPT, GPTConfig
from gpt.family import FAMILY as GPT_FAMILY
from gpt.train import main as gpt_main
from lmkit.config import recipe_values, split_values
from lmkit.errors import UserError
from lmkit.schedule import lr_at
from lmkit.tokenizers import tokenizer_from_meta

MAINS = {"bigram": (bigram_main, "char"), "gpt": (gpt_main, "gpt2")}


def seed_train_config(family, **changes):
    """The TrainConfig of a family's seed recipe, with some values changed."""
    return split_values(family, {**recipe_values(family), **changes})[0]


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_loss_falls_and_outputs_are_written(kind, prepared, tmp_path):
    """A few steps on a small text lower the loss; metrics, plot, checkpoints and sample exist."""
    main, tokenizer = MAINS[kind]
    assert main(tiny_flags(prepared / tokenizer, tmp_path, max_iters=30, eval_interval=10,
                                 learning_rate=1e-2)) == 0
    rows = read_metrics(tmp_path, kind)
    assert [int(r["step"]) for r in rows] == [10, 20, 30]
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 0.3
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    for row in rows:
        assert int(row["tokens_seen"]) == int(row["step"]) * 4 * 16
        assert float(row["val_bpc"]) > 0 and float(row["tokens_per_s"]) > 0
    assert (tmp_path / "checkpoints" / kind / "best.pt").is_file()
    plot = tmp_path / "plots" / kind / "loss_plot.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sample = (tmp_path / "samples" / kind / "train_sample.txt").read_text()
    assert sample.startswith(f"# {kind} at step 30")
    state = torch.load(tmp_path / "checkpoints" / kind / "last.pt", weights_only=True)
    assert state["step"] == 30 and state["meta"]["tokenizer"] == tokenizer
    assert [m["step"] for m in state["metrics"]] == [10, 20, 30]
    curve_steps = [p[0] for p in state["loss_curve"]]  # logged every 3 steps and at each eval
    assert curve_steps == sorted(set(range(3, 31, 3)) | {10, 20, 30})


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_val_bpc_is_val_loss_in_bits_per_character(kind, prepared, tmp_path):
    """bits/char = val loss x targets / the characters those targets cover / ln 2. The first
    val token is never a target, so for the char model bits/char is exactly val loss / ln 2."""
    main, tokenizer = MAINS[kind]
    assert main(tiny_flags(prepared / tokenizer, tmp_path, max_iters=6)) == 0
    meta = torch.load(tmp_path / f"checkpoints/{kind}/last.pt", weights_only=True)["meta"]
    row = read_metrics(tmp_path, kind)[-1]
    first = int(np.fromfile(prepared / tokenizer / "val.bin", dtype="<u2")[0])
    covered = meta["n_val_chars"] - len(tokenizer_from_meta(meta).decode([first]))
    expected = float(row["val_loss"]) * (meta["n_val_tokens"] - 1) / covered / math.log(2)
    assert float(row["val_bpc"]) == pytest.approx(expected, rel=1e-6)
    if kind == "bigram":
        assert float(row["val_bpc"]) == pytest.approx(float(row["val_loss"]) / math.log(2), rel=1e-6)


@pytest.mark.parametrize("kind,stop_step", [("bigram", 7), ("gpt", 6)])
def test_resume_after_stop_equals_uninterrupted_run(kind, stop_step, prepared, tmp_path, monkeypatch):
    """Stop at a step (mid-window or at an eval), resume: same losses and same final weights."""
    main, tokenizer = MAINS[kind]
    flags = tiny_flags(prepared / tokenizer, tmp_path, dropout=0.1, grad_accum_steps=2)
    assert main(flags + ["--run", "straight"]) == 0

    with monkeypatch.context() as patch:
        stop_requested_during(stop_step, patch)
        assert main(flags + ["--run", "split"]) == 130
    assert torch.load(tmp_path / "checkpoints/split/last.pt", weights_only=True)["step"] == stop_step
    assert main(["--resume", "--run", "split", "--out-dir", str(tmp_path),
                 "--data-dir", str(prepared / tokenizer)]) == 0

    straight, split = read_metrics(tmp_path, "straight"), read_metrics(tmp_path, "split")
    for a, b in zip(straight, split, strict=True):
        for field in ("step", "lr", "train_loss", "val_loss", "val_bpc", "tokens_seen"):
            assert a[field] == b[field]
    for name, tensor in saved_weights(tmp_path, "straight").items():
        assert torch.equal(tensor, saved_weights(tmp_path, "split")[name]), name


def test_resume_can_extend_max_iters(prepared, tmp_path):
    """--max-iters may change on resume; the run continues from its step."""
    flags = tiny_flags(prepared / "char", tmp_path, max_iters=6)
    assert bigram_main(flags) == 0
    assert bigram_main(["--resume", "--max-iters", "12", "--out-dir", str(tmp_path),
                        "--data-dir", str(prepared / "char")]) == 0
    assert [int(r["step"]) for r in read_metrics(tmp_path, "bigram")] == [6, 12]


def test_resume_with_other_architecture_lists_differences(prepared, tmp_path):
    assert bigram_main(tiny_flags(prepared / "char", tmp_path, max_iters=6)) == 0
    with pytest.raises(UserError, match=r"n_embd 16 -> 32, n_layer 1 -> 2"):
        bigram_main(["--resume", "--n-layer", "2", "--n-embd", "32", "--out-dir", str(tmp_path),
                     "--data-dir", str(prepared / "char")])


def test_resume_with_other_tokenizer_data_is_refused(prepared, tmp_path):
    assert bigram_main(tiny_flags(prepared / "char", tmp_path, max_iters=6)) == 0
    with pytest.raises(UserError, match="holds gpt2 tokens"):
        bigram_main(["--resume", "--out-dir", str(tmp_path), "--data-dir", str(prepared / "gpt2")])


def test_resume_without_checkpoint_says_what_to_do(prepared, tmp_path):
    with pytest.raises(UserError, match=r"nothing to resume.*train without --resume"):
        gpt_main(tiny_flags(prepared / "gpt2", tmp_path, resume=True))


def test_gradient_accumulation_matches_one_big_batch(prepared, tmp_path):
    """2 micro-batches of B give the same update as one batch of 2B."""
    data = prepared / "gpt2"
    assert gpt_main(tiny_flags(data, tmp_path, max_iters=1, eval_interval=1, warmup_iters=1, run="accum",
                               batch_size=4, grad_accum_steps=2)) == 0
    assert gpt_main(tiny_flags(data, tmp_path, max_iters=1, eval_interval=1, warmup_iters=1, run="big",
                               batch_size=8, grad_accum_steps=1)) == 0
    accum, big = saved_weights(tmp_path, "accum"), saved_weights(tmp_path, "big")
    for name, tensor in accum.items():
        torch.testing.assert_close(tensor, big[name], rtol=1e-5, atol=1e-6)


def test_cosine_schedule_values():
    cfg = seed_train_config(GPT_FAMILY)  # 4000 iters, warmup -1 = a quarter
    assert lr_at(0, cfg) == pytest.approx(6e-4 / 1000)
    assert lr_at(999, cfg) == pytest.approx(6e-4)
    assert lr_at(1000, cfg) == pytest.approx(6e-4)
    assert lr_at(2500, cfg) == pytest.approx((6e-4 + 6e-5) / 2)
    assert lr_at(4000, cfg) == pytest.approx(6e-5)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(1000, 4000))


def test_bigram_schedule_warms_up_and_constant_reproduces_the_lectures():
    cfg = seed_train_config(BIGRAM)
    assert lr_at(0, cfg) == pytest.approx(3e-6) and lr_at(99, cfg) == pytest.approx(3e-4)
    assert lr_at(4999, cfg) == pytest.approx(3e-5, rel=1e-3)
    constant = seed_train_config(BIGRAM, lr_schedule="constant")
    assert {lr_at(s, constant) for s in range(0, 5000, 7)} == {3e-4}


def test_seed_config_parameter_counts():
    assert BigramLanguageModel(BigramConfig()).num_params() == 10_788_929
    gpt = GPT(GPTConfig())
    assert gpt.config.vocab_size == 50304
    assert gpt.num_params() == 7_240_448
    assert gpt.lm_head.weight is gpt.wte.weight


def test_gpt_vocabulary_is_padded_and_residual_init_scaled():
    config = GPT_FAMILY.model_config(split_values(GPT_FAMILY, recipe_values(GPT_FAMILY))[1], 50257)
    assert config == GPTConfig()  # the seed architecture, vocabulary padded to 50304
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_embd=256, n_head=4, vocab_size=512))
    assert model.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert model.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_help_lists_every_flag_with_defaults():
    out = run_script("gpt/train.py", "--help", check=True).stdout
    for flag in ("--preset", "--device", "--resume", "--run", "--seed", "--max-iters",
                 "--eval-interval", "--eval-iters", "--batch-size", "--block-size",
                 "--grad-accum-steps", "--n-layer", "--n-head", "--n-embd", "--dropout",
                 "--learning-rate", "--min-lr", "--warmup-iters", "--lr-schedule",
                 "--weight-decay", "--data-dir"):
        assert flag in out
    assert "seed: 0.0006" in out and "seed: 4000" in out


@pytest.mark.slow
@pytest.mark.parametrize("flags,message", [
    (["--n-embd", "30", "--n-head", "4"], "not divisible by --n-head"),
    (["--max-iters", "0"], "--max-iters must be at least 1"),
    (["--dropout", "1.5"], "--dropout must be in"),
    (["--warmup-iters", "13"], "--warmup-iters 13 is more than --max-iters 12"),
    (["--peer-timeout", "0"], "--peer-timeout must be more than 0"),
    (["--peer-timeout", "100000"], "at most 86400 seconds"),
])
def test_bad_flags_exit_2_with_one_sentence(flags, message, prepared, tmp_path):
    result = run_script("bigram/train.py", *tiny_flags(prepared / "char", tmp_path), *flags)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_data_says_run_prepare(tmp_path):
    result = run_script("gpt/train.py", "--data-dir", tmp_path / "nowhere", "--out-dir", tmp_path)
    assert result.returncode == 1
    assert "python prepare_data.py" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints" / "gpt" / "last.pt").exists()


def test_block_size_longer_than_val_split_is_refused(prepared, tmp_path):
    with pytest.raises(UserError, match="longer than the validation split"):
        bigram_main(tiny_flags(prepared / "char", tmp_path, block_size=100_000))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_bad_flag(prepared, tmp_path):
    result = run_script("bigram/train.py", *tiny_flags(prepared / "char", tmp_path, device="cuda"))
    assert result.returncode == 2 and "sees no CUDA GPU" in result.stderr


def test_split_that_disagrees_with_meta_says_prepare_again(prepared, tmp_path):
    data = tmp_path / "char"
    data.mkdir()
    for name in ("meta.json", "train.bin"):
        (data / name).write_bytes((prepared / "char" / name).read_bytes())
    (data / "val.bin").write_bytes((prepared / "char" / "val.bin").read_bytes()[:-20])
    with pytest.raises(UserError, match=r"val.bin holds .* run `python prepare_data.py` again"):
        bigram_main(tiny_flags(data, tmp_path))


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_head_loss_equals_plain_cross_entropy(autocast):
    """The GPT head's chunked loss gives F.cross_entropy's loss and gradients."""
    from gpt.model import head_loss
    torch.manual_seed(0)
    x = torch.randn(300, 32, requires_grad=True)
    weight = (0.5 * torch.randn(1000, 32)).requires_grad_()
    targets = torch.randint(0, 1000, (300,))
    results = []
    for loss_fn in (lambda: head_loss(x, weight, targets, chunk_rows=64),
                    lambda: torch.nn.functional.cross_entropy((x @ weight.t()).float(), targets)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        (3 * loss).backward()
        results.append((loss.detach(), x.grad.clone(), weight.grad.clone()))
        x.grad = weight.grad = None
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    for ours, plain in zip(*results):
        torch.testing.assert_close(ours, plain, **tol)
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(x @ weight.t(), targets)
        torch.testing.assert_close(head_loss(x, weight, targets, 64), plain, rtol=1e-5, atol=1e-5)


def test_a_new_run_never_silently_replaces_an_old_one(prepared, tmp_path):
    flags = tiny_flags(prepared / "char", tmp_path, max_iters=6)
    assert bigram_main(flags) == 0
    with pytest.raises(UserError, match="already holds a run; continue it with --resume"):
        bigram_main(flags)
    assert bigram_main(flags + ["--overwrite", "--seed", "7"]) == 0


def test_resume_keeps_data_dir_and_applies_new_optimizer_flags(prepared, tmp_path):
    """Left-out flags (here --data-dir) come from the checkpoint; given ones (weight decay,
    dropout) take effect."""
    assert bigram_main(tiny_flags(prepared / "char", tmp_path, max_iters=6, weight_decay=0.1)) == 0
    assert bigram_main(["--resume", "--max-iters", "12", "--weight-decay", "0.05", "--dropout", "0.1",
                        "--out-dir", str(tmp_path)]) == 0
    state = torch.load(tmp_path / "checkpoints/bigram/last.pt", weights_only=True)
    assert state["train_config"]["data_dir"] == str(prepared / "char")
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.05, 0.0]
    assert state["model_config"]["dropout"] == 0.1 and state["tokens_seen"] == 12 * 4 * 16


@pytest.mark.parametrize("change", [
    {"n_val_chars": 0}, {"vocab_size": "65"}, {"chars": ["a"]}, {"tokenizer": "bytes"}, "list"])
def test_foreign_meta_json_is_refused(change, prepared, tmp_path):
    """A meta.json that prepare_data.py did not write is refused before any training."""
    import json
    data = tmp_path / "char"
    data.mkdir()
    for name in ("train.bin", "val.bin"):
        (data / name).write_bytes((prepared / "char" / name).read_bytes())
    meta = json.loads((prepared / "char" / "meta.json").read_text())
    meta = [meta] if change == "list" else {**meta, **change}
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="not a meta.json written by prepare_data.py"):
        bigram_main(tiny_flags(data, tmp_path))


def test_explicit_bfloat16_on_a_cpu_without_it_says_it_is_slow(prepared, tmp_path, capsys):
    """--dtype bfloat16 still trains, and on a CPU that emulates it, one line says so."""
    from lmkit.device import cpu_has_fast_bf16
    assert bigram_main(tiny_flags(prepared / "char", tmp_path, dtype="bfloat16", max_iters=2,
                                  eval_interval=2, sample_tokens=0)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "no native bfloat16" in line]
    assert len(notes) == (0 if cpu_has_fast_bf16() else 1)


def test_checkpoint_from_before_the_model_config_had_its_own_flags_resumes(prepared, tmp_path):
    """Older checkpoints kept the architecture inside train_config too; they still resume."""
    data = prepared / "char"
    assert bigram_main(tiny_flags(data, tmp_path, max_iters=6)) == 0
    path = tmp_path / "checkpoints/bigram/last.pt"
    state = torch.load(path, weights_only=True)
    arch = {k: v for k, v in state["model_config"].items() if k != "vocab_size"}
    state["train_config"] = {**state["train_config"], **arch}
    torch.save(state, path)
    assert bigram_main(["--resume", "--max-iters", "9", "--out-dir", str(tmp_path)]) == 0
    assert torch.load(path, weights_only=True)["model_config"] == state["model_config"]
