"""The sample.py command both models share: load a checkpoint, generate N samples in one batch
(or, with --interactive, continue prompt after prompt: lmkit/interactive.py).

The generation maths (filtering, drawing, the KV-cache loop) is lmkit/generation.py."""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

from lmkit import device as dev
from lmkit.checkpoint import load_checkpoint
from lmkit.errors import UserError
from lmkit.files import (REPO_ROOT, RunPaths, atomic_write_text, check_run_name, ensure_writable_dirs,
                         read_user_file)
from lmkit.generation import generate
from lmkit.tokenizers import start_ids, tokenizer_from_meta

# The sampling settings a user can set by flag (and change by /command in --interactive):
# name -> (is the value in range, what the range is).
SAMPLING_RANGES = {
    "max_new_tokens": (lambda v: v >= 0, "0 or more"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "a finite number, 0 or more"),
    "top_k": (lambda v: v is None or v >= 1, "at least 1"),
    "top_p": (lambda v: v is None or 0 < v <= 1, "in (0, 1]"),
    "seed": (lambda v: 0 <= v < 2 ** 63, "between 0 and 2**63 - 1"),
}


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
    need(args.out is None or not args.out.is_dir(), f"--out {args.out} is a folder; give a file name")
    if args.interactive:
        need(args.num_samples == 1, "--interactive makes one sample per prompt; leave out "
                                    "--num-samples")
        need(args.prompt is None and args.prompt_file is None, "--interactive reads its prompts "
             "from standard input; leave out --prompt and --prompt-file")
        need(args.out is None or args.out.is_file() or not args.out.exists(),
             f"--interactive rewrites its transcript after every turn, so --out must name a "
             f"regular file, not {args.out}")


def find_checkpoint(args, kind: str) -> Path:
    """--checkpoint, or checkpoints/<run>/best.pt (else last.pt): for sample.py and export.py."""
    check_run_name(args.run)
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            raise UserError(f"checkpoint {args.checkpoint} does not exist")
        return args.checkpoint
    paths = RunPaths.for_run(args.out_dir, args.run)
    for path in (paths.best, paths.last):
        if path.is_file():
            return path
    run_flag = f" --run {args.run}" if args.run != kind else ""
    if args.out_dir.resolve() != REPO_ROOT:
        run_flag += f" --out-dir {args.out_dir}"
    raise UserError(f"no checkpoint in {paths.checkpoints}; train one first with "
                    f"`python {kind}/train.py{run_flag}`")


def load_checkpoint_of(family, args, command: str) -> tuple:
    """(path, state) of the checkpoint args name, refused unless it is this family's and its
    weights are finite; command ("sample" or "export") names the script in the messages."""
    path = find_checkpoint(args, family.kind)
    state = load_checkpoint(path)
    if state["kind"] != family.kind:
        raise UserError(f"{path} is a {state['kind']} checkpoint; {command} it with "
                        f"`python {state['kind']}/{command}.py`")
    if not all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point()):
        raise UserError(f"{path} holds NaN or infinite weights; {command} another checkpoint or "
                        "train again")
    return path, state


def read_prompt(args) -> str:
    if args.prompt_file is None:
        return args.prompt or ""
    try:
        return read_user_file(args.prompt_file, "prompt file").decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file {args.prompt_file} is not UTF-8 text") from None


def load_model(state: dict, family, device):
    config = family.config_cls(**state["model_config"])
    model = family.model_cls(config)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def prompt_ids(text: str, tokenizer, block_size: int) -> list:
    if not text:
        return start_ids(tokenizer)
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give some text")
    if len(ids) > block_size:
        print(f"note: the prompt is {len(ids)} tokens; keeping its last {block_size} "
              "(the model's block size)", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


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
    return path


def unused_path(path: Path) -> Path:
    """path, or path with -2, -3, ... before its suffix if a file is already there."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


class Streamer:
    """Prints the first row's text as tokens arrive. Each token is decoded once, held back only
    while it ends in half a UTF-8 character (at most 4 tokens, then shown replaced)."""

    def __init__(self, tokenizer, prompt_text: str):
        self.tokenizer = tokenizer
        self.pending = []
        print(prompt_text, end="", flush=True)

    def __call__(self, token: torch.Tensor) -> None:
        self.pending.append(int(token[0, 0]))
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return
        print(text, end="", flush=True)
        self.pending = []

    def finish(self) -> None:
        print(self.tokenizer.decode(self.pending) if self.pending else "", flush=True)


def write_like_the_shell(path: Path, text: str) -> None:
    """Write text to --out as `>` would: into a FIFO or a device as it is, through a symlink to
    its target; a regular file (or a new one) is replaced atomically."""
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_file():
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror}); choose another --out") from None
        return
    atomic_write_text(path, text)


def main(family, description: str, argv=None) -> int:
    args = build_parser(family.kind, family.default_top_k, description).parse_args(argv)
    check_args(args)
    path, state = load_checkpoint_of(family, args, "sample")
    device = dev.pick_device(args.device)
    model = load_model(state, family, device)
    meta = state["meta"]
    tokenizer = tokenizer_from_meta(meta)
    if args.interactive:
        from lmkit.interactive import Session  # a lazy import: that module builds on this one
        return Session(model, tokenizer, meta, args, device, samples_path(args, "interactive"),
                       checkpoint_line(path, state)).run()
    prompt_text = read_prompt(args)
    ids = prompt_ids(prompt_text, tokenizer, model.config.block_size)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    streamer = Streamer(tokenizer, tokenizer.decode(ids) if prompt_text else "") if args.stream else None

    out_path = samples_path(args, "samples")

    new_tokens = []  # (B, 1) each: what a stopped run has made so far is still saved

    def on_token(token):
        new_tokens.append(token)
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
    out = torch.cat([idx.cpu(), *(t.cpu() for t in new_tokens)], dim=1)
    skip = 0 if prompt_text else len(ids)  # the start token of an empty prompt is not text
    texts = [tokenizer.decode(row[skip:].tolist()) for row in out]

    header = (checkpoint_line(path, state) +
              f"# num_samples={args.num_samples} max_new_tokens={args.max_new_tokens} "
              f"temperature={args.temperature} top_k={args.top_k} top_p={args.top_p} "
              f"seed={args.seed} kv_cache={not args.no_kv_cache} prompt={prompt_text!r}\n")
    if stopped:
        header += f"# stopped after {len(new_tokens)} of {args.max_new_tokens} tokens\n"
    blocks = [f"---------- sample {i + 1}/{len(texts)} ----------\n{t}\n" for i, t in enumerate(texts)]
    write_like_the_shell(out_path, header + "\n" + "\n".join(blocks))  # saved before shown
    if not args.stream:
        print("\n".join(blocks), flush=True)
    elif len(blocks) > 1:
        print("\n".join(blocks[1:]), flush=True)
    n_tokens = args.num_samples * len(new_tokens)
    print(f"{n_tokens} tokens in {seconds:.2f}s ({n_tokens / max(seconds, 1e-9):,.0f} tokens/s); "
          f"saved to {out_path}" + ("; stopped early" if stopped else ""), file=sys.stderr)
    if stopped:
        return 130
    return 0
