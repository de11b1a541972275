"""Hostile outside input and requests beyond the machine (issue #24, classes 6 and 7): a
Hugging Face config.json or a checkpoint with wrong types, absurd sizes or odd nesting, flags
that ask for more memory than there is, and names longer than the file system allows. Each is
refused in one sentence before anything large is allocated.

Every case runs the real command's main() under run_main, as the script would, in one child
process per group of cases (a fresh process per case would cost a second or two of imports
each). The child's peak resident memory after each case shows that nothing large was allocated:
a refusal that came after the allocation would have raised it, or killed the child."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, tiny_flags
from lmkit.generation import TokenChunks

PEAK_MB = 1500  # the child's peak resident memory: torch and a tiny model take about 400 MB

DRIVER = """
import io, json, os, resource, sys
sys.path.insert(0, sys.argv[1])
from lmkit.errors import run_main
results = []
for module, argv in json.loads(sys.stdin.read()):
    main = __import__(module, fromlist=["main"]).main
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    code = None
    try:
        run_main(lambda: main(argv))
    except SystemExit as e:
        code = e.code
    err = sys.stderr.getvalue()
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results.append({"code": code, "stderr": err, "peak_mb": peak})
print("RESULTS " + json.dumps(results))
"""


def run_cases(cases: dict, timeout=300) -> dict:
    """{name: (module, argv)} run in one child process; {name: its code, stderr and peak MB}."""
    names = list(cases)
    payload = json.dumps([[cases[n][0], [str(a) for a in cases[n][1]]] for n in names])
    done = subprocess.run([sys.executable, "-c", DRIVER, str(REPO_ROOT)], input=payload,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, done.stdout + done.stderr
    return dict(zip(names, json.loads(lines[-1][len("RESULTS "):])))


def check_refused(result: dict, code: int, *says: str) -> str:
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"]
    assert result["code"] == code, result
    for words in says:
        assert words in lines[0], lines[0]
    assert result["peak_mb"] < PEAK_MB, result
    return lines[0]


# ---- class 6: a Hugging Face config.json (--init-from FOLDER) ------------------------------

GPT2_CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257,
               "n_positions": 64, "n_layer": 2, "n_head": 2, "n_embd": 32,
               "activation_function": "gelu_new"}
DEEP = 100_000  # nesting levels of a config.json that would overflow the parser's stack

HF_CASES = {  # name: (what replaces config.json's fields, or the whole file; words the line holds)
    "size as a string": ({"n_embd": "32"}, "n_embd '32' is not a whole number"),
    "size as a float": ({"n_embd": 32.0}, "n_embd 32.0 is not a whole number"),
    "fractional size": ({"n_layer": 1.5}, "n_layer 1.5 is not a whole number"),
    "zero layers": ({"n_layer": 0}, "n_layer 0 is below 1"),
    "negative heads": ({"n_head": -2}, "n_head -2 is below 1"),
    "size as a bool": ({"n_embd": True}, "n_embd True is not a whole number"),
    "size as null": ({"n_embd": None}, "n_embd None is not a whole number"),
    "size as a list": ({"n_embd": [32]}, "n_embd [32] is not a whole number"),
    "size as a nested dict": ({"n_embd": {"value": 32}}, "n_embd {'value': 32}"),
    "absurd vocabulary": ({"vocab_size": 2 ** 40}, "vocab_size 1,099,511,627,776 is beyond"),
    "absurd width": ({"n_embd": 10 ** 9}, "n_embd 1,000,000,000 is beyond"),
    "absurd positions": ({"n_positions": 10 ** 12}, "n_positions 1,000,000,000,000 is beyond"),
    "width not divisible by heads": ({"n_embd": 33}, "not divisible by its n_head 2"),
    "architectures as a string": ({"architectures": "GPT2LMHeadModel"}, "a list of strings"),
    "model_type as a dict": ({"model_type": {"gpt2": 1}}, "model_type must be a string"),
    "epsilon as a string": ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon '1e-5'"),
    "switch as a string": ({"tie_word_embeddings": "false"}, "is not true or false"),
    "sizes in range, beyond the memory": ({"n_embd": 2 ** 16, "n_head": 2 ** 6, "n_layer": 2 ** 12},
                                          "GiB of memory"),
    "config as a list": ([GPT2_CONFIG], "is not a Hugging Face model config"),
    "config nested too deep": ("[" * DEEP + "]" * DEEP, "is not a readable JSON file"),
    # fields gpt/model.py does not use are ignored: this one gets as far as the weights
    "unknown extras": ({"flux_capacitor": {"deep": [1, 2]}, "n_ctx": "x"},
                       "weights do not match its config.json"),
}


@pytest.fixture(scope="module")
def hf_results(prepared, tmp_path_factory):
    from lmkit.hf import safetensors_torch
    cases = {}
    for name, (change, _) in HF_CASES.items():
        folder = tmp_path_factory.mktemp("hf")
        if isinstance(change, dict):
            text = json.dumps({**GPT2_CONFIG, **change})
        else:
            text = change if isinstance(change, str) else json.dumps(change)
        (folder / "config.json").write_text(text)
        safetensors_torch().save_file({"wte.weight": torch.zeros(2, 2)},
                                      str(folder / "model.safetensors"))
        out = tmp_path_factory.mktemp("runs")
        cases[name] = ("gpt.train", tiny_flags(prepared / "gpt2", out, init_from=folder))
    return run_cases(cases)


@pytest.mark.parametrize("name", HF_CASES)
def test_a_hostile_hugging_face_config_is_refused_before_its_weights(hf_results, name):
    line = check_refused(hf_results[name], 1, HF_CASES[name][1])
    assert "config.json" in line or "init-from" in line or "GiB" in line


# ---- class 6: checkpoints (sample.py, export.py, train.py --resume) -----------------------

def set_config(name, value):
    return lambda state: state["model_config"].__setitem__(name, value)


def reshape_weight(state):
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 5)


def retype_weight(state):
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name].long()


def wrong_moment(state):
    moments = state["optimizer"]["state"]
    moments[next(iter(moments))]["exp_avg"] = torch.zeros(7)


CHECKPOINT_CASES = {  # name: (command, how the checkpoint is spoiled, words the line holds)
    "width as a string": ("sample", set_config("n_embd", "16"), "n_embd '16' is not a whole"),
    "absurd layers": ("sample", set_config("n_layer", 10 ** 6), "n_layer 1,000,000 is beyond"),
    "absurd vocabulary": ("sample", set_config("vocab_size", 2 ** 40), "vocab_size"),
    "width in range, other tensors": ("sample", set_config("n_embd", 2 ** 16), "has shape"),
    "zero block size": ("export", set_config("block_size", 0), "block_size 0 is below 1"),
    "dropout as a string": ("sample", set_config("dropout", "0.1"), "dropout '0.1'"),
    "option as a string": ("sample", set_config("rotary", "yes"), "rotary 'yes' is not true"),
    "unknown option": ("sample", set_config("flux", 1), "does not know: flux"),
    "config as a list": ("sample", lambda s: s.__setitem__("model_config", [16]),
                         "not a checkpoint of this project"),
    "tensor of another shape": ("export", reshape_weight, "has shape (3, 5)"),
    "tensor missing": ("sample", lambda s: s["model"].popitem(), "lacks the weight"),
    "tensor extra": ("sample", lambda s: s["model"].__setitem__("x.weight", torch.zeros(1)),
                     "unexpected weight x.weight"),
    "integer tensor": ("sample", retype_weight, "torch.int64 values"),
    "weights as a list": ("sample", lambda s: s.__setitem__("model", [1]), "not a dictionary"),
    "negative step": ("sample", lambda s: s.__setitem__("step", -1), "step -1 is not a count"),
    "step as a bool": ("sample", lambda s: s.__setitem__("step", True), "step True"),
    "fractional step": ("export", lambda s: s.__setitem__("step", 1.5), "step 1.5"),
    "huge step": ("sample", lambda s: s.__setitem__("step", 2 ** 70), "is not a count"),
    "metrics as a string": ("sample", lambda s: s.__setitem__("metrics", "abc"), "metrics"),
    "tokens seen negative": ("resume", lambda s: s.__setitem__("tokens_seen", -5), "tokens_seen"),
    "setting as a string": ("resume", lambda s: s["train_config"].__setitem__("max_iters", "many"),
                            "max_iters 'many' cannot be a value of --max-iters"),
    "huge iteration count": ("resume",
                             lambda s: s["train_config"].__setitem__("eval_iters", 2 ** 64),
                             "eval_iters"),
    "optimizer moment of another shape": ("resume", wrong_moment, "optimizer's exp_avg"),
    "random state of another size": ("resume", lambda s: s["rank_states"][0].__setitem__(
        "sampler", torch.zeros(3, dtype=torch.uint8)), "random states"),
}


@pytest.fixture(scope="module")
def checkpoint_results(trained, tmp_path_factory):
    cases = {}
    for name, (command, spoil, _) in CHECKPOINT_CASES.items():
        state = torch.load(trained / "checkpoints/bigram/last.pt", weights_only=True)
        spoil(state)
        out = tmp_path_factory.mktemp("crafted")
        (out / "checkpoints" / "bigram").mkdir(parents=True)
        torch.save(state, out / "checkpoints/bigram/last.pt")
        argv = {"sample": ["--out-dir", out, "--device", "cpu", "--max-new-tokens", 5],
                "export": ["--out-dir", out, "--out", out / "hf"],
                "resume": ["--resume", "--out-dir", out, "--device", "cpu", "--max-iters", 13]}
        module = "bigram.train" if command == "resume" else f"bigram.{command}"
        cases[name] = (module, argv[command])
    return run_cases(cases)


@pytest.mark.parametrize("name", CHECKPOINT_CASES)
def test_a_hostile_checkpoint_is_refused_naming_the_file(checkpoint_results, name):
    line = check_refused(checkpoint_results[name], 1, CHECKPOINT_CASES[name][2])
    assert "last.pt" in line


# ---- class 7: flags that ask for more than the machine has ---------------------------------

def sampling_cases(trained):
    sample = ["--out-dir", trained, "--device", "cpu"]
    return {
        "a trillion samples": (["--num-samples", 10 ** 12], "--num-samples"),
        "a trillion tokens": (["--max-new-tokens", 10 ** 12], "--max-new-tokens"),
        "both large": (["--num-samples", 10 ** 6, "--max-new-tokens", 10 ** 6], "--num-samples"),
        "a trillion tokens without the cache": (["--max-new-tokens", 10 ** 12, "--no-kv-cache"],
                                                "--max-new-tokens"),
        "interactive with a trillion tokens": (["--interactive", "--max-new-tokens", 10 ** 12],
                                               "--max-new-tokens"),
    }, sample


def test_sampling_beyond_the_memory_is_refused_naming_the_need_and_the_flag(trained):
    cases, common = sampling_cases(trained)
    results = run_cases({name: ("gpt.sample", [*common, *argv])
                         for name, (argv, _) in cases.items()})
    for name, (_, flag) in cases.items():
        check_refused(results[name], 1, "GiB of memory", flag)


TRAINING_CASES = {  # flags: (exit code, words the line holds)
    "max iterations beyond int64": ({"max_iters": 2 ** 63}, 2, "--max-iters must be below 2**63"),
    "eval iterations beyond int64": ({"eval_iters": 2 ** 64}, 2, "--eval-iters must be below"),
    "absurd layers": ({"n_layer": 10 ** 7}, 2, "--n-layer must be at most 4,096"),
    "absurd width": ({"n_embd": 10 ** 10, "n_head": 1}, 2, "--n-embd must be at most 65,536"),
    "absurd block": ({"block_size": 10 ** 9}, 2, "--block-size must be at most"),
    "width in range, beyond the memory": ({"n_embd": 2 ** 16, "n_head": 1, "n_layer": 4096}, 1,
                                          "GiB of memory"),
    "absurd batch": ({"batch_size": 10 ** 9}, 1, "--batch-size"),
    "absurd accumulation": ({"grad_accum_steps": 10 ** 11}, 1, "fewer --grad-accum-steps"),
}


def test_training_flags_beyond_the_machine_are_refused_before_they_allocate(prepared, tmp_path):
    cases = {name: ("bigram.train", tiny_flags(prepared / "char", tmp_path / str(i), **flags))
             for i, (name, (flags, _, _)) in enumerate(TRAINING_CASES.items())}
    results = run_cases(cases)
    for name, (_, code, says) in TRAINING_CASES.items():
        check_refused(results[name], code, says)
    assert not list(tmp_path.rglob("last.pt"))


def test_long_generation_holds_its_tokens_in_chunks_and_reads_its_tail_only():
    """generate keeps its tokens in TokenChunks: one tensor per 1,024 tokens, not one each."""
    chunks = TokenChunks(torch.zeros(2, 3, dtype=torch.long))
    for i in range(2500):
        chunks.append(torch.full((2, 1), i))
    assert len(chunks.pieces) == 3 and len(chunks.fresh) == 2500 - 2 * TokenChunks.CHUNK
    assert chunks.length == 2503
    assert chunks.last(5)[0].tolist() == [2495, 2496, 2497, 2498, 2499]
    assert chunks.last(10 ** 6).shape == (2, 2503)
    assert torch.equal(chunks.all()[:, 3:], torch.arange(2500).expand(2, -1))


# ---- class 7: names longer than the file system allows -------------------------------------

def long_name(n: int, char: str = "x") -> str:
    return char * n


def name_cases(prepared, trained, tmp_path):
    deep = tmp_path.joinpath(*[long_name(200)] * 21)  # 21 names of 200 bytes: past PATH_MAX
    data = ["--data-dir", prepared / "char"]
    train = ["bigram.train", ["--device", "cpu", *data]]
    return {
        "train --run of 300 characters": (train[0], [*train[1], "--out-dir", tmp_path,
                                                     "--run", long_name(300)], "--run"),
        "train --run of 128 two-byte characters": (train[0], [*train[1], "--out-dir", tmp_path,
                                                              "--run", long_name(128, "é")],
                                                   "256 bytes long"),
        "train --out-dir with a 300-character name": (
            train[0], [*train[1], "--out-dir", tmp_path / long_name(300) / "runs"], "--out-dir"),
        "train --out-dir past PATH_MAX": (train[0], [*train[1], "--out-dir", deep], "--out-dir"),
        "sample --out of 300 characters": (
            "bigram.sample", ["--out-dir", trained, "--out", tmp_path / long_name(300)], "--out"),
        "sample --out whose temp name is too long": (
            "bigram.sample", ["--out-dir", trained, "--out", tmp_path / long_name(250)],
            "with the 14 its temporary name adds"),
        "sample --run of 300 characters": (
            "bigram.sample", ["--out-dir", trained, "--run", long_name(300)], "--run"),
        "sample --out past PATH_MAX": (
            "bigram.sample", ["--out-dir", trained, "--out", deep / "s.txt"], "--out"),
        "export --out of 300 characters": (
            "bigram.export", ["--out-dir", trained, "--out", tmp_path / long_name(300)], "--out"),
        "export --out whose temp name is too long": (
            "bigram.export", ["--out-dir", trained, "--out", tmp_path / long_name(240)], "--out"),
        "prepare --input of 300 characters": (
            "prepare_data", ["--input", tmp_path / long_name(300)], "--input"),
        "prepare --out-dir with a 300-character name": (
            "prepare_data", ["--input", trained / "../x.txt", "--out-dir",
                             tmp_path / long_name(300)], "--out-dir"),
        "prepare --out-dir past PATH_MAX": (
            "prepare_data", ["--input", trained / "../x.txt", "--out-dir", deep], "--out-dir"),
    }


def test_names_longer_than_the_file_system_allows_are_bad_flags(prepared, trained, tmp_path):
    cases = name_cases(prepared, trained, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    results = run_cases({name: (module, argv) for name, (module, argv, _) in cases.items()})
    for name, (_, _, flag) in cases.items():
        line = check_refused(results[name], 2, flag)
        assert "this file system allows" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing was written


def test_the_longest_names_that_fit_still_work(trained, tmp_path):
    """The limits are the file system's own: a 241-byte --out (255 less its temp name's 14)
    is written."""
    out = tmp_path / long_name(241)
    results = run_cases({"sample": ("bigram.sample", ["--out-dir", trained, "--device", "cpu",
                                                      "--max-new-tokens", 5, "--out", out])})
    assert results["sample"]["code"] == 0, results
    assert out.read_text(encoding="utf-8").startswith("# checkpoint:")
    assert math.isfinite(results["sample"]["peak_mb"])
