"""Measure speed on this machine: training, sampling, matmul peak, MFU, memory, data prep.

    python bench.py --model bigram --preset cpu
    python bench.py --model gpt --steps 10 --json bench_gpt.json
    python bench.py --model bigram --preset cpu -- --dtype float32    # any train.py flag after --
    python bench.py --model gpt --head-loss -- --batch-size 64 --block-size 256   # head chunking
    python bench.py --bpe-training data/input.txt --bpe-vocab 2048   # rustbpe against tokenizers
    python bench.py --vs-nanogpt ~/nanoGPT --model gpt --preset cpu   # against nanoGPT's CPU recipe

Prints a table and writes the numbers as JSON. It measures; it asserts nothing.
"""
import argparse
import csv
import json
import math
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmkit import device as dev
from lmkit.config import parse_flags
from lmkit.errors import UserError, run_main
from lmkit.files import atomic_write_text
from lmkit.generation import generate
from lmkit.process import allow_tf32, keep_freed_memory, protect_console
from lmkit.trainer import Trainer

ROOT = Path(__file__).resolve().parent


def model_family(name: str):
    if name == "bigram":
        from bigram.family import FAMILY
        return FAMILY
    from gpt.family import FAMILY
    return FAMILY


def matmul_peak(device, dtype, size=2048, repeats=10) -> float:
    """Best FLOP/s of a square matmul in this dtype: the device's practical peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        dev.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        dev.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def flops_per_token(model, config) -> float:
    """Training FLOPs per token: 6 x matmul weights + attention (PaLM appendix B)."""
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * config.block_size


def bench_training(trainer: Trainer, steps: int, warmup: int) -> dict:
    """Time train_step alone (no evaluation, checkpoint or progress line), at the peak learning
    rate. The first step is timed apart: with --compile it holds the compilation."""
    lr = trainer.cfg.learning_rate
    t0 = time.perf_counter()
    trainer.train_step(lr)
    dev.synchronize(trainer.device)
    first_step_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        trainer.train_step(lr)
    dev.synchronize(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(lr)
    dev.synchronize(trainer.device)
    seconds = (time.perf_counter() - t0) / steps
    return {"first_step_s": first_step_s, "ms_per_step": 1000 * seconds,
            "tokens_per_s": trainer.tokens_per_step / seconds}


def bench_head_loss(trainer: Trainer, repeats: int = 5) -> dict:
    """ms per forward + backward of the GPT's output-head loss for one micro-batch, chunked at
    several sizes and plain (full logits, then F.cross_entropy): the numbers to choose the
    chunking of gpt.model.head_loss on this device."""
    from gpt.model import head_loss
    config, device = trainer.model_config, trainer.device
    rows = trainer.cfg.batch_size * config.block_size
    x = torch.randn(rows, config.n_embd, device=device, requires_grad=True)
    weight = torch.randn(config.vocab_size, config.n_embd, device=device, requires_grad=True)
    targets = torch.randint(config.vocab_size, (rows,), device=device)

    def plain(x, weight, targets):
        return torch.nn.functional.cross_entropy((x @ weight.t()).float(), targets)

    variants = {f"chunk_{n}": (lambda n: lambda *a: head_loss(*a, chunk_rows=n))(n)
                for n in (128, 512, 2048, 8192)}
    variants["plain"] = plain
    results = {}
    for name, loss_fn in variants.items():
        times = []
        for _ in range(repeats + 1):
            dev.synchronize(device)
            t0 = time.perf_counter()
            with dev.autocast(device, trainer.dtype):
                loss = loss_fn(x, weight, targets)
            loss.backward()
            dev.synchronize(device)
            times.append(time.perf_counter() - t0)
        results[name] = 1000 * min(times[1:])
    return results


def bench_sampling(model, device, n_samples: int, n_tokens: int) -> dict:
    model.eval()
    start = torch.zeros((1, 1), dtype=torch.long, device=device)
    results = {}
    for batched in (False, True):
        for cached in (False, True):
            generator = torch.Generator(device=device).manual_seed(0)
            generate(model, start.repeat(n_samples if batched else 1, 1), 20, generator=generator,
                     use_cache=cached)  # warm-up
            dev.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(1 if batched else n_samples):
                generate(model, start.repeat(n_samples if batched else 1, 1), n_tokens,
                         generator=generator, use_cache=cached)
            dev.synchronize(device)
            name = f"{'batched' if batched else 'one_at_a_time'}_{'cache' if cached else 'no_cache'}"
            results[name] = n_samples * n_tokens / (time.perf_counter() - t0)
    results["speedup_batched_cache_vs_one_no_cache"] = (
        results["batched_cache"] / results["one_at_a_time_no_cache"])
    model.train()
    return results


def bench_prepare() -> float:
    import prepare_data
    with tempfile.TemporaryDirectory() as out:
        cached = Path(prepare_data.__file__).parent / "data" / prepare_data.CORPUS_NAME
        if not cached.is_file():
            return float("nan")
        t0 = time.perf_counter()
        prepare_data.prepare(prepare_data.parse_args(["--input", str(cached), "--out-dir", out]))
        return time.perf_counter() - t0


def text_pieces(path: Path, size: int = 1 << 20):
    """A text file read in pieces of about a MiB, as a trainer can take it without holding it."""
    with open(path, encoding="utf-8") as f:
        while piece := f.read(size):
            yield piece


def train_bpe_with(library: str, path: Path, vocab_size: int) -> dict:
    """Learn a byte-level BPE with GPT-2's pattern; seconds, tokens reached and this process's
    peak memory (run it in a process of its own for a fair peak)."""
    import resource  # Unix only, like this measurement

    from lmkit.tokenizers import GPT2_PATTERN
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    if library == "rustbpe":
        import rustbpe
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_pieces(path), vocab_size, pattern=GPT2_PATTERN)
        reached = trainer.vocab_size
    else:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        bpe = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(text_pieces(path), bpe)
        reached = tokenizer.get_vocab_size()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": time.perf_counter() - t0, "vocab": reached, "peak_rss_mb": peak / 1024,
            "peak_growth_mb": (peak - before) / 1024}


def bench_bpe_training(path: Path, vocab_size: int) -> dict:
    """Each BPE trainer on the same text, each in a fresh process."""
    results = {}
    for library in ("rustbpe", "tokenizers"):
        code = (f"import json, sys; from pathlib import Path; sys.path.insert(0, {str(ROOT)!r}); "
                f"import bench; print(json.dumps(bench.train_bpe_with({library!r}, "
                f"Path({str(path)!r}), {vocab_size})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              encoding="utf-8", errors="replace")
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines()
                     if "Error" in line or "panicked" in line]
            results[library] = {"error": lines[-1] if lines else f"exit code {done.returncode}"}
            continue
        results[library] = json.loads(done.stdout)
    return results


# nanoGPT's README command for a laptop CPU: its char model, 4 layers, 128 wide, block 64,
# batch 12, 2,000 iterations, fp32, no compile; evaluated once, at the end (20 batches).
NANOGPT_CPU_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=10",
                     "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                     "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000",
                     "--dropout=0.0", "--eval_interval=2000"]


def run_nanogpt_cpu(checkout: Path, corpus: Path, work: Path) -> dict:
    """nanoGPT's CPU char recipe, from an unmodified copy of its checkout, on our 90/10 split of
    the corpus: wall seconds and its last val loss (nats per character)."""
    copy = work / "nanogpt"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "out*"))
    data = copy / "data" / "shakespeare_char"
    data.mkdir(parents=True, exist_ok=True)
    text = corpus.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n_train = int(0.9 * len(text))
    for name, part in (("train", text[:n_train]), ("val", text[n_train:])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(data / f"{name}.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py",
                           *NANOGPT_CPU_FLAGS, f"--out_dir={work / 'nanogpt_out'}"],
                          cwd=copy, capture_output=True, text=True,
                          encoding="utf-8", errors="replace")
    seconds = time.perf_counter() - t0
    losses = re.findall(r"val loss ([0-9.]+)", done.stdout)
    if done.returncode != 0 or not losses:
        raise UserError(f"nanoGPT failed: {(done.stderr or done.stdout)[-500:]}")
    return {"wall_s": seconds, "val_loss": float(losses[-1]),
            "val_bpc": float(losses[-1]) / math.log(2)}


def run_preset(model: str, preset: str, work: Path, extra: list) -> dict:
    """Our training command, timed whole: wall seconds and its best val bits per character."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / model / "train.py"), "--preset", preset,
                           "--out-dir", str(work), "--run", "vs-nanogpt", *extra],
                          capture_output=True, text=True,
                          encoding="utf-8", errors="replace")
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise UserError(f"{model}/train.py failed: {done.stderr[-500:]}")
    metrics = work / "checkpoints" / "vs-nanogpt" / "metrics.csv"
    with open(metrics, newline="", encoding="utf-8") as f:
        best = min(csv.DictReader(f), key=lambda row: float(row["val_bpc"]))
    return {"wall_s": seconds, "val_loss": float(best["val_loss"]),
            "val_bpc": float(best["val_bpc"]), "step": int(best["step"])}


def bench_vs_nanogpt(checkout: Path, corpus: Path, model: str, preset: str, extra: list) -> dict:
    """nanoGPT's CPU recipe, then our preset, back to back on this machine."""
    if not corpus.is_file():
        raise UserError(f"--vs-nanogpt reads the text from {corpus}; run `python "
                         "prepare_data.py` first, or give --corpus")
    if not (checkout / "train.py").is_file():
        raise UserError(f"--vs-nanogpt {checkout} is not a nanoGPT checkout (no train.py)")
    if any(flag.split("=")[0] in ("--run", "--run-name", "--out-dir") for flag in extra):
        raise UserError("--vs-nanogpt names the run and its folder itself; leave --run and "
                        "--out-dir out of the flags after --")
    with tempfile.TemporaryDirectory() as work:
        nanogpt = run_nanogpt_cpu(checkout, corpus, Path(work))
        ours = run_preset(model, preset, Path(work), extra)
    return {"nanogpt": nanogpt, "ours": ours, "model": model, "preset": preset,
            "extra_flags": extra, "threads": torch.get_num_threads(),
            "time_ratio": ours["wall_s"] / nanogpt["wall_s"]}


def main(argv=None) -> int:
    protect_console()  # a closed pipe must not stop the measuring; the JSON file holds the result
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bigram", "gpt"], default="bigram")
    p.add_argument("--preset", default="seed")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3,
                   help="steps before the timed ones (the first is reported as first_step_s)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--sample-tokens", type=int, default=500)
    p.add_argument("--skip-sampling", action="store_true")
    p.add_argument("--head-loss", action="store_true",
                   help="gpt: also time the head loss chunked at several sizes and plain")
    p.add_argument("--bpe-training", type=Path, metavar="TEXT",
                   help="instead: time rustbpe and tokenizers learning a BPE of TEXT, with peak memory")
    p.add_argument("--bpe-vocab", type=int, default=2048, help="the BPE size for --bpe-training")
    p.add_argument("--vs-nanogpt", type=Path, metavar="CHECKOUT",
                   help="instead: run nanoGPT's CPU char recipe from this checkout, then "
                        "--model's --preset, back to back, and compare wall time and val bpc")
    p.add_argument("--corpus", type=Path, default=ROOT / "data" / "input.txt",
                   help="the text nanoGPT trains on with --vs-nanogpt (default: %(default)s); "
                        "ours reads its prepared data")
    p.add_argument("--json", type=Path, default=Path("bench_results.json"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1")
    if args.bpe_training:
        if not args.bpe_training.is_file():
            p.error(f"--bpe-training {args.bpe_training} is not a file")
        if args.bpe_vocab < 256:
            p.error("--bpe-vocab must be at least 256: a byte-level BPE starts from the 256 bytes")
        results = bench_bpe_training(args.bpe_training, args.bpe_vocab)
        mb = args.bpe_training.stat().st_size / 1e6
        for library, r in results.items():
            print(f"{library:<11} {mb:,.1f} MB to {args.bpe_vocab} tokens: " + (
                r.get("error") or f"{r['seconds']:.2f} s, peak memory {r['peak_rss_mb']:,.0f} MiB "
                                  f"({r['peak_growth_mb']:,.0f} MiB above the process before "
                                  f"training), {r['vocab']} tokens"))
        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
        return 0
    if args.vs_nanogpt:
        result = bench_vs_nanogpt(args.vs_nanogpt, args.corpus, args.model, args.preset, extra)
        for name in ("nanogpt", "ours"):
            r = result[name]
            print(f"{name:<8} wall {r['wall_s']:7.1f} s   val loss {r['val_loss']:.4f}   "
                  f"val {r['val_bpc']:.4f} bits/char")
        print(f"ours took {result['time_ratio']:.2f}x nanoGPT's wall time")
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        return 0

    family = model_family(args.model)
    allow_tf32()  # as train.py sets it: the speed measured is the speed training gets
    with tempfile.TemporaryDirectory() as out:
        flags = parse_flags(family, "", ["--preset", args.preset, "--out-dir", out, *extra])
        trainer = Trainer(family, flags)
        device = trainer.device
        if device.type == "cpu":
            keep_freed_memory()  # as train.py sets it on a CPU
        result = {"model": args.model, "preset": args.preset, "extra_flags": extra,
                  "device": str(device), "device_name": dev.device_name(device),
                  "threads": torch.get_num_threads(),
                  "dtype": str(trainer.dtype).replace("torch.", ""),
                  "compile": trainer.cfg.compile, "params": trainer.model.num_params(),
                  "tokens_per_step": trainer.tokens_per_step}
        result.update(bench_training(trainer, args.steps, args.warmup))
        if args.head_loss and args.model == "gpt":
            result["head_loss_ms"] = bench_head_loss(trainer)
        peaks = {"fp32": matmul_peak(device, torch.float32)}
        # A CPU without native bfloat16 emulates it: one 2048^2 product takes about a minute.
        peaks["bf16"] = matmul_peak(device, torch.bfloat16) if dev.has_native_bf16(device) else None
        flops = flops_per_token(trainer.model, trainer.model_config) * result["tokens_per_s"]
        result["achieved_flops"] = flops
        result.update({f"matmul_peak_{k}": v for k, v in peaks.items()})
        result.update({f"mfu_vs_{k}": v and flops / v for k, v in peaks.items()})
        if not args.skip_sampling:
            result["sampling_tokens_per_s"] = bench_sampling(trainer.model, device, args.samples,
                                                             args.sample_tokens)
        result["peak_memory_mb"] = dev.peak_memory_bytes(device) / 2 ** 20
        trainer.close()
    result["prepare_data_s"] = bench_prepare()

    width = max(map(len, result)) + 2
    for key, value in result.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                print(f"{key + '.' + sub:<{width + 30}} {v:,.1f}")
        elif value is None:
            print(f"{key:<{width + 30}} not measured (no native support)")
        elif isinstance(value, float):
            print(f"{key:<{width + 30}} {value:,.3f}" if value < 10 else f"{key:<{width + 30}} {value:,.0f}")
        else:
            print(f"{key:<{width + 30}} {value}")
    atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    run_main(main)
