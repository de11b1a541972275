"""sample.py --interactive: load the checkpoint once, then continue prompt after prompt.

Each line read from standard input is a prompt. Its continuation streams to standard output
(the prompt as the model sees it, then the new text, then a blank line), the way
`sample.py --stream --prompt ...` prints it. A line starting with "/" is a command that changes
a setting (/help lists them); "//" starts a prompt that begins with "/". An empty line continues
from nothing (the model's start token), like sample.py without --prompt.

One random generator, seeded with --seed, runs on from turn to turn, so a prompt sent twice gets
two different continuations; /seed N reseeds it, and the next turn then matches
`sample.py --seed N`. Ctrl-C stops the continuation being written; Ctrl-C at the prompt, /quit
or the end of input ends the session. After every turn the whole session so far is saved
atomically to samples/<run>/interactive-<date>-<time>.txt (or --out).
"""
import sys

import torch

from lmkit import device as dev
from lmkit.errors import UserError
from lmkit.generation import generate
from lmkit.sample_io import SAMPLING_RANGES, Streamer, prompt_ids, write_like_the_shell

# command -> (the sampling setting it changes, how to read its value, whether "none" turns it off)
SETTING_COMMANDS = {
    "/temperature": ("temperature", float, False),
    "/top-k": ("top_k", int, True),
    "/top-p": ("top_p", float, True),
    "/tokens": ("max_new_tokens", int, False),
    "/seed": ("seed", int, False),
}
HELP = """\
Type a prompt and press Enter to continue it; an empty line continues from nothing.
  /temperature T  softmax temperature; 0 is greedy
  /top-k K        sample only from the K likeliest tokens; none turns this off
  /top-p P        sample only from the smallest set of tokens holding P of the probability;
                  none turns this off
  /tokens N       tokens to generate per prompt
  /seed N         reseed the random generator
  /help           this list, and the settings now
  /quit           end the session (so do Ctrl-D, and Ctrl-C at the prompt)
Ctrl-C during a continuation stops it. A prompt that starts with "/" is typed as "//"."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Session:
    def __init__(self, model, tokenizer, meta, args, device, out_path, checkpoint_line: str):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.vocab_size = meta["vocab_size"]
        self.args = args  # its sampling settings change as commands arrive
        self.generator = torch.Generator(device=device).manual_seed(args.seed)
        self.out_path = out_path
        self.header = (checkpoint_line +
                       f"# interactive session: kv_cache={not args.no_kv_cache}; one random "
                       "generator runs on across turns, reseeded only by --seed and /seed\n")
        self.turns = []  # the transcript's blocks, one per continuation

    def run(self) -> int:
        say("Type a prompt and press Enter; /help lists the commands; Ctrl-D ends the session.")
        while True:
            line = self.read_line()
            if line is None:
                break
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    break
            else:
                self.continue_prompt(line[1:] if line.startswith("//") else line)
        say(f"goodbye; the transcript is in {self.out_path}" if self.turns else "goodbye")
        return 0

    def read_line(self):
        """The next line from standard input without its line end; None at the end of the input
        or on Ctrl-C. The "> " marker appears (on stderr) only at a terminal, so piped output
        holds just the text."""
        at_terminal = sys.stdin.isatty()
        if at_terminal:
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            if at_terminal:
                print(file=sys.stderr)  # end the marker's line
            return None
        return line.removesuffix("\n")

    def settings(self) -> str:
        a = self.args
        return (f"temperature={a.temperature} top_k={a.top_k} top_p={a.top_p} "
                f"max_new_tokens={a.max_new_tokens} seed={a.seed}")

    def command(self, line: str) -> bool:
        """Carry out one /command; False when it ends the session. A bad one gets one sentence."""
        name, *values = line.split()
        if name == "/quit":
            return False
        if name == "/help":
            say(f"{HELP}\nnow: {self.settings()}")
            return True
        if name not in SETTING_COMMANDS:
            say(f"error: unknown command {name}; /help lists the commands")
            return True
        setting, parse, none_turns_off = SETTING_COMMANDS[name]
        in_range, must_be = SAMPLING_RANGES[setting]
        try:
            [text] = values
            value = None if none_turns_off and text.lower() == "none" else parse(text)
            valid = in_range(value)
        except ValueError:
            valid = False
        if not valid:
            must_be += " (or none)" if none_turns_off else ""
            say(f"error: {name} takes one value, {must_be}; got {' '.join(values)!r}")
            return True
        setattr(self.args, setting, value)
        if setting == "seed":
            self.generator.manual_seed(value)
        say(f"{setting}={value}")
        return True

    def continue_prompt(self, text: str) -> None:
        """Stream one continuation of text, then save the transcript; Ctrl-C stops it early."""
        try:
            ids = prompt_ids(text, self.tokenizer, self.model.config.block_size)
        except UserError as e:
            say(f"error: {e}")
            return
        streamer = Streamer(self.tokenizer, self.tokenizer.decode(ids) if text else "")
        new_ids = []

        def on_token(token):
            new_ids.append(int(token[0, 0]))
            streamer(token)

        a, stopped = self.args, False
        try:
            generate(self.model, torch.tensor([ids], device=self.device), a.max_new_tokens,
                     temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                     generator=self.generator, use_cache=not a.no_kv_cache,
                     vocab_size=self.vocab_size, on_token=on_token)
            dev.synchronize(self.device)
        except KeyboardInterrupt:
            stopped = True
        streamer.finish()
        print(flush=True)  # a blank line between turns
        note = ""
        if stopped:
            stopped_after = f"stopped after {len(new_ids)} of {a.max_new_tokens} tokens"
            say(stopped_after)
            note = f" ({stopped_after})"
        sample = self.tokenizer.decode((ids if text else []) + new_ids)  # no start token
        self.turns.append(f"---------- turn {len(self.turns) + 1}: {self.settings()} "
                          f"prompt={text!r}{note} ----------\n{sample}\n")
        write_like_the_shell(self.out_path, self.header + "\n" + "\n".join(self.turns))
