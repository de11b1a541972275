"""sample.py --interactive: prompts read from stdin, commands between them, Ctrl-C, the transcript.

Most tests run the session in-process with a fake stdin (fast); the subprocess tests drive the
real scripts through a pipe, one of them with a real SIGINT."""
import io
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from bigram.family import FAMILY as BIGRAM_FAMILY
from conftest import REPO_ROOT, one_error_line, run_script
from gpt.family import FAMILY as GPT_FAMILY
from lmkit import interactive, sample_cli
from lmkit.checkpoint import load_checkpoint
from lmkit.errors import UserError
from lmkit.generation import generate
from lmkit.tokenizers import tokenizer_from_meta

FAMILIES = {"bigram": BIGRAM_FAMILY, "gpt": GPT_FAMILY}
TURN = re.compile(r"^-+ turn \d+: (.*) -+\n", re.M)


class Terminal(io.StringIO):
    """A stdin that says it is a terminal."""

    def isatty(self):
        return True


def session(trained, tmp_path, monkeypatch, capsys, text, *flags, kind="bigram", stdin_cls=io.StringIO):
    """Run `<kind>/sample.py --interactive` in-process on stdin `text`; (exit code, stdout,
    stderr, transcript path)."""
    monkeypatch.setattr(sys, "stdin", stdin_cls(text))
    transcript = tmp_path / "transcript.txt"
    code = sample_cli.main(FAMILIES[kind], "", ["--interactive", "--out-dir", str(trained), "--device",
                                                "cpu", "--out", str(transcript), *map(str, flags)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, transcript


def turns(transcript):
    """[(the settings line, the text)] of each turn in a transcript file."""
    parts = TURN.split(transcript.read_text(encoding="utf-8"))
    settings, bodies = parts[1::2], parts[2::2]
    # each turn's text ends in a newline, and a blank line separates it from the next turn
    texts = [body[:-2] for body in bodies[:-1]] + [body[:-1] for body in bodies[-1:]]
    return list(zip(settings, texts))


def streamed(kind, trained, capsys, *flags) -> str:
    """What non-interactive `sample.py --stream` prints on stdout for these flags (in-process)."""
    assert sample_cli.main(FAMILIES[kind], "", ["--stream", "--out-dir", str(trained), "--device", "cpu",
                                                *map(str, flags)]) == 0
    return capsys.readouterr().out


def greedy_text(trained, kind, prompt, n) -> str:
    state = load_checkpoint(trained / "checkpoints" / kind / "best.pt")
    model = sample_cli.load_model(state, FAMILIES[kind], torch.device("cpu"))
    tok = tokenizer_from_meta(state["meta"])
    ids = generate(model, torch.tensor([tok.encode(prompt)]), n, temperature=0,
                   vocab_size=state["meta"]["vocab_size"])
    return tok.decode(ids[0].tolist())


# ---- turns -------------------------------------------------------------------------------------
def test_two_prompts_give_two_streamed_continuations_and_a_transcript(trained, tmp_path, monkeypatch,
                                                                     capsys):
    """Two prompt lines give two continuations on stdout, each the prompt plus 20 new characters
    and a blank line, exit 0 at the end of input, and the transcript holds both with settings."""
    code, out, err, transcript = session(trained, tmp_path, monkeypatch, capsys,
                                         "ROMEO:\nJULIET:\n", "--max-new-tokens", 20, "--seed", 3)
    assert code == 0
    saved = turns(transcript)
    assert saved[0][1].startswith("ROMEO:") and saved[1][1].startswith("JULIET:")
    assert [len(text) for _, text in saved] == [6 + 20, 7 + 20]
    assert out == "".join(text + "\n\n" for _, text in saved)
    assert all("temperature=1.0" in s and "max_new_tokens=20" in s and "seed=3" in s
               for s, _ in saved)
    assert "goodbye" in err.splitlines()[-1] and str(transcript) in err


def test_first_turn_matches_non_interactive_sample_with_the_same_seed(trained, tmp_path, monkeypatch,
                                                                      capsys):
    """The first turn, and the first turn after /seed N, print exactly what
    `sample.py --stream --seed N --prompt X` prints (plus the blank line); the turn in between,
    drawn from the generator running on, differs."""
    expected = streamed("bigram", trained, capsys, "--prompt", "ROMEO:", "--max-new-tokens", 30,
                        "--seed", 7)
    code, out, _, _ = session(trained, tmp_path, monkeypatch, capsys,
                              "ROMEO:\nROMEO:\n/seed 7\nROMEO:\n", "--max-new-tokens", 30,
                              "--seed", 7)
    assert code == 0
    assert out.startswith(expected + "\n") and out.endswith(expected + "\n")
    assert out != (expected + "\n") * 3


def test_empty_line_continues_from_the_start_token(trained, tmp_path, monkeypatch, capsys):
    """An empty line continues from nothing, like sample.py without --prompt: the same text,
    with the start token left out."""
    expected = streamed("bigram", trained, capsys, "--max-new-tokens", 25, "--temperature", 0)
    code, out, _, transcript = session(trained, tmp_path, monkeypatch, capsys, "\n",
                                       "--max-new-tokens", 25, "--temperature", 0)
    assert code == 0 and out == expected + "\n"
    assert turns(transcript)[0][1] + "\n" == expected


def test_long_prompt_keeps_its_last_block(trained, tmp_path, monkeypatch, capsys):
    """A prompt longer than the block size (16) is cut to its last 16 characters, with a note."""
    prompt = "ROMEO: Thou art the sun and moon my love."
    code, out, err, _ = session(trained, tmp_path, monkeypatch, capsys, prompt + "\n",
                                "--max-new-tokens", 5)
    assert code == 0
    assert out.startswith(prompt[-16:]) and len(out) == 16 + 5 + 2
    assert re.search(rf"{len(prompt)}\b.*\b16\b", err), err


def test_last_line_without_a_newline_is_a_prompt(trained, tmp_path, monkeypatch, capsys):
    code, out, _, _ = session(trained, tmp_path, monkeypatch, capsys, "ROMEO:", "--max-new-tokens", 4)
    assert code == 0 and out.startswith("ROMEO:") and len(out) == 6 + 4 + 2


def test_double_slash_starts_a_prompt_with_a_slash(trained, tmp_path, monkeypatch, capsys):
    """ "//x" is the prompt "/x" (here refused: the char model never saw "/"), not a command."""
    code, _, err, _ = session(trained, tmp_path, monkeypatch, capsys, "//x\n")
    assert code == 0
    assert "outside the model's vocabulary: '/', 'x'" in err and "unknown command" not in err


# ---- commands ----------------------------------------------------------------------------------
def test_commands_change_the_settings_of_later_turns(trained, tmp_path, monkeypatch, capsys):
    """/temperature, /top-k, /top-p and /tokens apply to the turns after them ("none" turns a
    filter off), and /help lists the commands with the settings now."""
    code, out, err, transcript = session(
        trained, tmp_path, monkeypatch, capsys,
        "ROMEO:\n/temperature 0.5\n/top-k 3\n/top-p 0.9\n/tokens 7\nROMEO:\n/top-k none\n/help\n",
        "--max-new-tokens", 12)
    assert code == 0
    [(first, text1), (second, text2)] = turns(transcript)
    assert "temperature=1.0 top_k=None top_p=None max_new_tokens=12" in first
    assert "temperature=0.5 top_k=3 top_p=0.9 max_new_tokens=7" in second
    assert (len(text1), len(text2)) == (6 + 12, 6 + 7)
    for command in ("/temperature", "/top-k", "/top-p", "/tokens", "/seed", "/help", "/quit"):
        assert command in err
    assert "now: temperature=0.5 top_k=None top_p=0.9 max_new_tokens=7" in err


def test_greedy_turns_match_non_interactive_gpt_sample(trained, tmp_path, capsys):
    """Through a pipe, `gpt/sample.py --interactive` after /temperature 0 prints, for each of two
    prompts, exactly what `gpt/sample.py --stream --temperature 0 --prompt X` prints (plus the
    blank line), whatever the seed; /quit ends the session with what follows unread."""
    expected = [streamed("gpt", trained, capsys, "--temperature", 0, "--prompt", prompt,
                         "--max-new-tokens", 15, "--out", tmp_path / "once.txt")
                for prompt in ("ROMEO:", " thou art")]
    r = run_script("gpt/sample.py", "--interactive", "--out-dir", trained, "--device", "cpu",
                   "--max-new-tokens", 15, "--seed", 5, "--out", tmp_path / "t.txt",
                   input="/temperature 0\nROMEO:\n thou art\n/quit\nJULIET:\n", check=True)
    assert r.stdout == "".join(text + "\n" for text in expected)
    assert "goodbye" in r.stderr


@pytest.mark.parametrize("line, error", [
    ("/temperature -1", "/temperature takes one value, a finite number, 0 or more; got '-1'"),
    ("/temperature nan", "/temperature takes one value"),
    ("/temperature", "got ''"),
    ("/top-k 0", "/top-k takes one value, at least 1 (or none)"),
    ("/top-k 2.5", "/top-k takes one value"),
    ("/top-p 1.5", "/top-p takes one value, in (0, 1] (or none)"),
    ("/tokens -3", "/tokens takes one value, 0 or more"),
    ("/tokens 1 2", "got '1 2'"),
    ("/seed -1", "/seed takes one value, between 0 and 2**63 - 1"),
    ("/seed none", "/seed takes one value"),
    ("/bogus 3", "unknown command /bogus; /help lists the commands"),
    ("ROMEO: hello @ you#", "outside the model's vocabulary: '#', '@'"),
])
def test_a_bad_command_or_prompt_gets_one_sentence_and_the_loop_goes_on(trained, tmp_path, monkeypatch,
                                                                        capsys, line, error):
    """A bad command value, an unknown command or an unencodable prompt prints one error line,
    changes nothing, and the next prompt is continued with the settings as they were."""
    code, out, err, transcript = session(trained, tmp_path, monkeypatch, capsys, f"{line}\nROMEO:\n",
                                         "--max-new-tokens", 6)
    assert code == 0
    errors = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and error in errors[0], err
    [(settings, text)] = turns(transcript)
    assert "temperature=1.0 top_k=None top_p=None max_new_tokens=6 seed=1337" in settings
    assert out == text + "\n\n" and len(text) == 6 + 6


# ---- how a session ends ------------------------------------------------------------------------
def test_end_of_input_exits_0_with_a_goodbye_and_no_transcript(trained, tmp_path):
    """No input at all: exit 0, nothing on stdout, a goodbye on stderr, no transcript file."""
    out = tmp_path / "t.txt"
    r = run_script("bigram/sample.py", "--interactive", "--out-dir", trained, "--device", "cpu",
                   "--out", out, input="")
    assert r.returncode == 0 and r.stdout == ""
    assert r.stderr.splitlines()[-1] == "goodbye"
    assert not out.exists()


class CtrlCAtSecondPrompt(io.StringIO):
    def __init__(self, text):
        super().__init__(text)
        self.reads = 0

    def readline(self, *args):
        self.reads += 1
        if self.reads == 2:
            raise KeyboardInterrupt
        return super().readline(*args)


def test_ctrl_c_at_the_prompt_ends_the_session_cleanly(trained, tmp_path, monkeypatch, capsys):
    """Ctrl-C while waiting for a line ends the session with exit 0 and a goodbye; the turn
    before it is saved, and the line after it is never read."""
    code, out, err, transcript = session(trained, tmp_path, monkeypatch, capsys, "ROMEO:\nJULIET:\n",
                                         "--max-new-tokens", 5, stdin_cls=CtrlCAtSecondPrompt)
    assert code == 0
    assert out.startswith("ROMEO:") and "JULIET" not in out
    assert "goodbye; the transcript is in" in err.splitlines()[-1]
    assert len(turns(transcript)) == 1


def test_ctrl_c_during_a_continuation_stops_only_that_one(trained, tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt inside the token loop (as Ctrl-C raises it) ends that continuation
    after the tokens made so far, notes it, and the session goes on to the next prompt."""
    shown = []

    class CtrlCAtFourthToken(sample_cli.Streamer):
        def __call__(self, token):
            super().__call__(token)
            shown.append(token)
            if len(shown) == 4:  # of the whole session: only the first turn is stopped
                raise KeyboardInterrupt

    monkeypatch.setattr(interactive, "Streamer", CtrlCAtFourthToken)
    code, out, err, transcript = session(trained, tmp_path, monkeypatch, capsys, "ROMEO:\nJULIET:\n",
                                         "--max-new-tokens", 20)
    assert code == 0
    assert "stopped after 4 of 20 tokens" in err
    [(first, text1), (second, text2)] = turns(transcript)
    assert "(stopped after 4 of 20 tokens)" in first and len(text1) == 6 + 4
    assert "stopped" not in second and len(text2) == 7 + 20
    assert out == text1 + "\n\n" + text2 + "\n\n"


def test_sigint_during_a_long_continuation_ends_only_that_continuation(trained, tmp_path):
    """A real SIGINT sent while a 100-million-token continuation streams stops it; the session
    then continues the next prompt (greedy, 5 tokens) and exits 0 at the end of input."""
    transcript = tmp_path / "t.txt"
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "bigram" / "sample.py"), "--interactive", "--out-dir",
         str(trained), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "100000000",
         "--out", str(transcript)],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"ROMEO:\n")
        proc.stdin.flush()
        assert len(proc.stdout.read(40)) == 40  # blocks until the continuation is streaming
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"/tokens 5\nJULIET:\n", timeout=120)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 0, err
    assert re.search(r"stopped after \d+ of 100000000 tokens", err)
    assert "Traceback" not in err and "goodbye; the transcript is in" in err
    assert out.decode().endswith("\n\n" + greedy_text(trained, "bigram", "JULIET:", 5) + "\n\n")
    [(first, _), (second, _)] = turns(transcript)
    assert "stopped after" in first and "stopped" not in second


# ---- the prompt marker, the transcript, flags it refuses ---------------------------------------
def test_prompt_marker_only_at_a_terminal(trained, tmp_path, monkeypatch, capsys):
    """At a terminal "> " goes to stderr before each line; from a pipe no marker appears at all,
    and stdout holds only the text in both cases."""
    _, piped_out, piped_err, _ = session(trained, tmp_path, monkeypatch, capsys, "ROMEO:\n",
                                         "--max-new-tokens", 5)
    _, tty_out, tty_err, _ = session(trained, tmp_path, monkeypatch, capsys, "ROMEO:\n",
                                     "--max-new-tokens", 5, stdin_cls=Terminal)
    assert "> " not in piped_err and "> " not in piped_out
    assert tty_err.count("> ") == 2 and tty_out == piped_out


class WatchingStdin(io.StringIO):
    """A stdin that records, each time a line is read, how many turns the transcript holds."""

    def __init__(self, text, transcript):
        super().__init__(text)
        self.transcript, self.seen = transcript, []

    def readline(self, *args):
        self.seen.append(len(turns(self.transcript)) if self.transcript.exists() else None)
        return super().readline(*args)


def test_transcript_is_saved_after_every_turn(trained, tmp_path, monkeypatch, capsys):
    """The transcript file exists from the first turn on and holds every turn done so far each
    time the session waits for a line; it opens with the checkpoint line."""
    transcript = tmp_path / "transcript.txt"
    stdin = WatchingStdin("ROMEO:\n/tokens 3\nJULIET:\n", transcript)
    session(trained, tmp_path, monkeypatch, capsys, "", "--max-new-tokens", 4,
            stdin_cls=lambda _: stdin)
    assert stdin.seen == [None, 1, 1, 2]
    header = transcript.read_text(encoding="utf-8")
    assert header.startswith(f"# checkpoint: {trained / 'checkpoints' / 'bigram' / 'best.pt'} (step ")
    assert "interactive session: kv_cache=True" in header


def test_default_transcript_goes_to_samples_of_the_run(trained, tmp_path, monkeypatch, capsys):
    """Without --out the transcript is samples/<run>/interactive-<date>-<time>.txt."""
    shutil.copytree(trained / "checkpoints" / "bigram", tmp_path / "checkpoints" / "bigram")
    monkeypatch.setattr(sys, "stdin", io.StringIO("ROMEO:\n"))
    assert sample_cli.main(BIGRAM_FAMILY, "", ["--interactive", "--out-dir", str(tmp_path),
                                               "--device", "cpu", "--max-new-tokens", "3"]) == 0
    [path] = (tmp_path / "samples" / "bigram").glob("interactive-*.txt")
    assert str(path) in capsys.readouterr().err
    assert len(turns(path)) == 1


@pytest.mark.parametrize("flags, named", [
    (["--num-samples", "2"], "--num-samples"),
    (["--prompt", "ROMEO:"], "--prompt"),
    (["--out", "/dev/null"], "regular file"),
])
def test_interactive_refuses_flags_it_cannot_honour(trained, flags, named):
    """--num-samples > 1, --prompt and a non-file --out are refused before anything loads."""
    with pytest.raises(UserError) as caught:
        sample_cli.main(BIGRAM_FAMILY, "", ["--interactive", "--out-dir", str(trained), *flags])
    assert caught.value.exit_code == 2 and named in str(caught.value)


def test_refusal_is_one_error_line_from_the_script(trained):
    r = run_script("gpt/sample.py", "--interactive", "--num-samples", "3", "--out-dir", trained,
                   input="ROMEO:\n")
    assert r.returncode == 2 and r.stdout == ""
    assert "one sample per prompt" in one_error_line(r.stderr)
