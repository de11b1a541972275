"""The sample.py command both models share: load a checkpoint, generate N samples in one batch
(or, with --interactive, continue prompt after prompt: lmkit/interactive.py).

What the two modes share (prompts, streaming, --out) is lmkit/sample_io.py; the generation maths
(filtering, drawing, the KV-cache loop) is lmkit/generation.py."""
import argparse
import sys
import time
from pathlib import Path

import torch

from lmkit import device as dev
from lmkit.checkpoint import find_checkpoint, load_checkpoint_of
from lmkit.errors import UserError
from lmkit.files import (REPO_ROOT, TEMP_NAME_EXTRA, RunPaths, check_path_fits,
                         ensure_writable_dirs, name_leftovers, read_user_file)
from lmkit.generation import TokenChunks, generate, sampling_memory
from lmkit.interactive import Session
from lmkit.process import allow_tf32, protect_console
from lmkit.sample_io import SAMPLING_RANGES, Streamer, prompt_ids, write_like_the_shell
from lmkit.tokenizers import tokenizer_from_meta


def build_parser(kind: str, default_top_k, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=kind, help="run whose checkpoints/<run>/best.pt (or last.pt) "
                                               "to load (default: %(default)s)")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint file to load instead")
    p.add_argument("--num-samples", type=int, default=1, help="samples, generated in one batch "
                                                              "(default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate per "
                                                                   "sample (default: %(default)s)")
    p.add_argument("--prompt", default=None, help="text to continue (default: start from nothing)")
    p.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature; 0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=default_top_k,
                   help="sample only from the k likeliest tokens (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only from the smallest set of tokens holding this much probability")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--stream", action="store_true", help="print the first sample as it is produced")
    p.add_argument("--interactive", action="store_true",
                   help="load the checkpoint once, then continue each line read from standard "
                        "input as a prompt, streaming the text; /help lists the commands")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole context every token (slow; for checks and benchmarks)")
    p.add_argument("--out", type=Path, help="file for the samples (default: samples/<run>/...)")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT,
                   help="folder holding checkpoints/ and samples/ (default: the repository root)")
    return p


def check_args(args) -> None:
    def need(ok, message):
        if not ok:
            raise UserError(message, exit_code=2)

    need(args.num_samples >= 1, f"--num-samples must be at least 1, got {args.num_samples}")
    for name, (in_range, must_be) in SAMPLING_RANGES.items():
        value = getattr(args, name)
        need(in_range(value), f"--{name.replace('_', '-')} must be {must_be}, got {value}")
    need(args.prompt is None or args.prompt_file is None, "give --prompt or --prompt-file, not both")
    if args.out is not None:
        check_path_fits(args.out, "choose a shorter --out", extra=TEMP_NAME_EXTRA)
    need(args.out is None or not args.out.is_dir(), f"--out {args.out} is a folder; give a file name")
    if args.interactive:
        need(args.num_samples == 1, "--interactive makes one sample per prompt; leave out "
                                    "--num-samples")
        need(args.prompt is None and args.prompt_file is None, "--interactive reads its prompts "
             "from standard input; leave out --prompt and --prompt-file")
        need(args.out is None or args.out.is_file() or not args.out.exists(),
             f"--interactive rewrites its transcript after every turn, so --out must name a "
             f"regular file, not {args.out}")


def read_prompt(args) -> str:
    if args.prompt_file is None:
        return args.prompt or ""
    try:
        return read_user_file(args.prompt_file, "prompt file").decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file {args.prompt_file} is not UTF-8 text") from None


def check_memory(state: dict, family, args, device) -> None:
    """Refuse, before the model is built, sampling that needs more memory than there is: the
    model's weights (4 bytes a parameter) and what lmkit.generation.sampling_memory counts, on
    the GPU and the host apart when the model runs on a CUDA GPU."""
    config = family.config_cls(**state["model_config"])
    _, n_params = dev.model_shapes(family.model_cls, config)
    meta = state["meta"]
    chars, tokens = meta.get("n_val_chars"), meta.get("n_val_tokens")
    chars_per_token = chars / tokens if type(chars) is type(tokens) is int and tokens > 0 else 1
    dtype_bytes = torch.finfo(dev.inference_dtype(device)).bits // 8

    def needs(max_new_tokens):
        return sampling_memory(config, args.num_samples, max_new_tokens, not args.no_kv_cache,
                               dtype_bytes, chars_per_token)

    on_device, on_host = needs(args.max_new_tokens)
    what = (f"sampling {args.num_samples:,} sample{'s' if args.num_samples > 1 else ''} of "
            f"{args.max_new_tokens:,} tokens")
    fix = "use fewer --num-samples (each sample holds its own KV cache and logits)"
    if 2 * sum(needs(0)) < on_device + on_host:  # most of it grows with the tokens
        fix = ("lower --max-new-tokens or --num-samples (the samples stay in memory until they "
               "are written)")
    weights = 4 * n_params
    if device.type == "cuda":
        dev.check_fits(weights + on_device, what, fix, device)
        dev.check_fits(weights + on_host, what, fix)
    else:
        dev.check_fits(weights + on_device + on_host, what, fix)


def load_model(state: dict, family, device):
    config = family.config_cls(**state["model_config"])
    model = family.model_cls(config)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def checkpoint_line(path: Path, state: dict) -> str:
    """The header line a samples file opens with: which checkpoint, how trained."""
    val = state["metrics"][-1]["val_loss"] if state["metrics"] else float("nan")
    return f"# checkpoint: {path} (step {state['step']}, val loss {val:.4f})\n"


def samples_path(args, name: str) -> Path:
    """--out, or a new samples/<run>/<name>-<date>-<time>.txt; its folder is checked writable."""
    path = args.out or unused_path(RunPaths.for_run(args.out_dir, args.run).samples /
                                   f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.txt")
    if path.is_file() or not path.exists():  # a device or FIFO needs no folder check
        ensure_writable_dirs(path.parent)
        name_leftovers(path)
    return path


def unused_path(path: Path) -> Path:
    """path, or path with -2, -3, ... before its suffix if a file is already there."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def main(family, description: str, argv=None) -> int:
    protect_console()  # a closed pipe or a console that cannot encode the text must not stop it
    allow_tf32()  # float32 products on NVIDIA GPUs in TF32: faster, and plenty for sampling
    args = build_parser(family.kind, family.default_top_k, description).parse_args(argv)
    check_args(args)
    path = find_checkpoint(args.checkpoint, args.run, args.out_dir, family.kind)
    state = load_checkpoint_of(family, path, "sample")
    device = dev.pick_device(args.device)
    check_memory(state, family, args, device)
    model = load_model(state, family, device)
    meta = state["meta"]
    tokenizer = tokenizer_from_meta(meta)
    if args.interactive:
        return Session(model, tokenizer, meta, args, device, samples_path(args, "interactive"),
                       checkpoint_line(path, state)).run()
    prompt_text = read_prompt(args)
    ids = prompt_ids(prompt_text, tokenizer, model.config.block_size)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    streamer = Streamer(tokenizer, tokenizer.decode(ids) if prompt_text else "") if args.stream else None

    out_path = samples_path(args, "samples")

    made = TokenChunks(idx)  # what a stopped run has made so far is still saved

    def on_token(token):
        made.append(token)
        if streamer:
            streamer(token)

    t0, stopped = time.time(), False
    try:
        generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, generator=generator, use_cache=not args.no_kv_cache,
                 vocab_size=meta["vocab_size"], on_token=on_token)
        dev.synchronize(device)
    except KeyboardInterrupt:
        stopped = True
    seconds = time.time() - t0
    if streamer:
        streamer.finish()
    out = made.all().cpu()
    n_new = made.length - idx.size(1)
    skip = 0 if prompt_text else len(ids)  # the start token of an empty prompt is not text
    texts = [tokenizer.decode(row[skip:].tolist()) for row in out]

    header = (checkpoint_line(path, state) +
              f"# num_samples={args.num_samples} max_new_tokens={args.max_new_tokens} "
              f"temperature={args.temperature} top_k={args.top_k} top_p={args.top_p} "
              f"seed={args.seed} kv_cache={not args.no_kv_cache} prompt={prompt_text!r}\n")
    if stopped:
        header += f"# stopped after {n_new} of {args.max_new_tokens} tokens\n"
    blocks = [f"---------- sample {i + 1}/{len(texts)} ----------\n{t}\n" for i, t in enumerate(texts)]
    write_like_the_shell(out_path, header + "\n" + "\n".join(blocks))  # saved before shown
    if not args.stream:
        print("\n".join(blocks), flush=True)
    elif len(blocks) > 1:
        print("\n".join(blocks[1:]), flush=True)
    n_tokens = args.num_samples * n_new
    print(f"{n_tokens} tokens in {seconds:.2f}s ({n_tokens / max(seconds, 1e-9):,.0f} tokens/s); "
          f"saved to {out_path}" + ("; stopped early" if stopped else ""), file=sys.stderr)
    if stopped:
        return 130
    return 0
