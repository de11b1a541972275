"""Hugging Face interop, offline: export to GPT-2 folders (lmkit/hf.py) and load GPT-2's weights
(gpt/pretrained.py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import REPO_ROOT, one_error_line, run_script  # noqa: E402
from gpt import pretrained  # noqa: E402
from gpt.model import GPT, GPTConfig  # noqa: E402
from lmkit import hf  # noqa: E402
from lmkit.checkpoint import load_checkpoint  # noqa: E402
from lmkit.errors import UserError  # noqa: E402
from lmkit.generation import generate  # noqa: E402
from lmkit.tokenizers import tokenizer_from_meta  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No test here may reach the network: neither Hugging Face's libraries in this process
    (which read HF_HUB_OFFLINE once, when first imported) nor the scripts the tests start."""
    from huggingface_hub import constants
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield


def full_logits(model, idx):
    """Our model's logits at every position (its forward returns only the last one)."""
    hidden = []
    hook = model.ln_f.register_forward_hook(lambda m, inputs, out: hidden.append(out))
    with torch.no_grad():
        model(idx)
        hook.remove()
        return model.lm_head(hidden[0])


def checkpoint_path(out_dir, run) -> Path:
    folder = out_dir / "checkpoints" / run
    return folder / "best.pt" if (folder / "best.pt").is_file() else folder / "last.pt"


def load_ours(path):
    state = load_checkpoint(path)
    family = __import__(f"{state['kind']}.family", fromlist=["FAMILY"]).FAMILY
    model = family.model_cls(family.config_cls(**state["model_config"]))
    model.load_state_dict(state["model"])
    return state, model.eval()


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A small random GPT-2 saved by transformers itself, its weights moved off their init
    so that every tensor (LayerNorm biases included) matters."""
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50257,
                                     n_positions=64, activation_function="gelu_new")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """Both trained runs exported: the char one by its script, the gpt one in this process."""
    out = tmp_path_factory.mktemp("hf")
    run_script("bigram/export.py", "--out-dir", trained, "--out", out / "bigram", check=True)
    from gpt.export import main
    assert main(["--out-dir", str(trained), "--out", str(out / "gpt")]) == 0
    return out


def test_load_gpt2_gives_the_logits_transformers_gives(tiny_gpt2):
    folder, theirs = tiny_gpt2
    values, state = pretrained.load_gpt2(str(folder), None)
    # GPT-2's own 50257 tokens, unpadded: a zero padding row would score 0, far above the real
    # tokens' logits of a trained GPT-2 (around -60), and swamp the loss of a fine-tune.
    assert values == dict(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32,
                          bias=True)
    model = GPT(GPTConfig(**values, dropout=0.0)).eval()
    model.load_state_dict(state)
    idx = torch.randint(50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(idx).logits
    assert expected.abs().max() > 1  # logits big enough for the comparison to mean something
    assert (full_logits(model, idx)[..., :50257] - expected).abs().max() <= TOLERANCE

    values, cropped = pretrained.load_gpt2(str(folder), 16)  # nanoGPT's crop_block_size
    assert values["block_size"] == 16 and cropped["wpe.weight"].shape == (16, 32)
    model = GPT(GPTConfig(**values, dropout=0.0)).eval()
    model.load_state_dict(cropped)
    cropped_logits = full_logits(model, idx[:, :16])[..., :50257]
    assert (cropped_logits - expected[:, :16]).abs().max() <= TOLERANCE


def test_load_gpt2_reads_pytorch_model_bin_too(tiny_gpt2, tmp_path):
    folder, theirs = tiny_gpt2
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    _, from_bin = pretrained.load_gpt2(str(tmp_path), None)
    _, from_safetensors = pretrained.load_gpt2(str(folder), None)
    assert from_bin.keys() == from_safetensors.keys()
    assert all(torch.equal(from_bin[k], from_safetensors[k]) for k in from_bin)


def check_same_tokens(hf_tokenizer, ours, text):
    ids = ours.encode(text)
    assert hf_tokenizer(text)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == ours.decode(ids) == text


@pytest.mark.parametrize("kind", ["gpt", "bigram"])
def test_export_reproduces_our_logits_greedy_tokens_and_tokenizer(kind, trained, exported,
                                                                   small_text_file):
    state, model = load_ours(checkpoint_path(trained, kind))
    folder = exported / kind
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    n_vocab, block = state["meta"]["vocab_size"], model.config.block_size
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == n_vocab

    tokenizer = tokenizer_from_meta(state["meta"])
    text = small_text_file.read_text(encoding="utf-8")[:400]  # spaces, newlines, capitals
    check_same_tokens(hf_tokenizer, tokenizer, text)
    if kind == "gpt":
        assert type(hf_tokenizer).__name__ in ("GPT2TokenizerFast", "GPT2Tokenizer")
        assert hf_tokenizer.bos_token == hf_tokenizer.eos_token == "<|endoftext|>"
        check_same_tokens(hf_tokenizer, tokenizer, "  Hello,\n\nworld!  It's 2024 .")

    idx = torch.tensor([tokenizer.encode(text)[:block]])
    with torch.no_grad():
        expected = theirs(idx).logits
    assert (full_logits(model, idx)[..., :n_vocab] - expected).abs().max() <= TOLERANCE

    prompt = idx[:, :block // 2]
    ours = generate(model, prompt, block - prompt.size(1), temperature=0, vocab_size=n_vocab)
    with torch.no_grad():
        greedy = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=block - prompt.size(1), pad_token_id=0)
    assert greedy.tolist() == ours.tolist()


def test_a_model_without_biases_exports_exactly(trained, tmp_path):
    """bias=False maps onto GPT-2 as zero biases: the exported model's logits are ours."""
    state = load_checkpoint(checkpoint_path(trained, "gpt"))
    state["model_config"]["bias"] = False
    torch.manual_seed(0)
    model = GPT(GPTConfig(**state["model_config"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state["model"] = model.state_dict()
    torch.save(state, tmp_path / "options.pt")
    from gpt.export import main
    assert main(["--checkpoint", str(tmp_path / "options.pt"), "--out", str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    generator = torch.Generator().manual_seed(2)
    idx = torch.randint(50257, (2, model.config.block_size), generator=generator)
    with torch.no_grad():
        expected = theirs(idx).logits
    assert (full_logits(model, idx)[..., :50257] - expected).abs().max() <= TOLERANCE


def test_export_then_load_gpt2_gives_back_the_same_weights(trained, exported):
    state = load_checkpoint(checkpoint_path(trained, "gpt"))
    values, loaded = pretrained.load_gpt2(str(exported / "gpt"), None)
    n_vocab = state["meta"]["vocab_size"]  # the padded rows are not exported
    expected = {**state["model_config"], "vocab_size": n_vocab}
    assert GPTConfig(**values, dropout=expected["dropout"]) == GPTConfig(**expected)
    assert loaded.keys() == state["model"].keys()
    for name, tensor in state["model"].items():
        if name in ("wte.weight", "lm_head.weight"):
            assert torch.equal(loaded[name], tensor[:n_vocab])
        else:
            assert torch.equal(loaded[name], tensor), name


def spoil(folder: Path, how: str) -> None:
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    config = json.loads(config_path.read_text())
    if how == "no config":
        config_path.unlink()
    elif how == "no weights":
        weights_path.unlink()
    elif how == "config not json":
        config_path.write_text("{not json")
    elif how == "llama":
        config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    elif how == "relu":
        config.update(activation_function="relu")
    elif how == "shapes":
        config.update(n_embd=64)
    elif how == "truncated":
        weights_path.write_bytes(weights_path.read_bytes()[:weights_path.stat().st_size // 2])
    if config_path.exists() and how != "config not json":
        config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("how, says", [
    ("no config", "has no config.json"),
    ("no weights", "has no model.safetensors or pytorch_model.bin"),
    ("config not json", "is not a readable JSON file"),
    ("llama", "holds a llama model"),
    ("relu", "activation is relu"),
    ("shapes", "has shape"),
    ("truncated", "truncated or damaged"),
])
def test_a_bad_folder_gets_one_sentence(tiny_gpt2, tmp_path, how, says):
    folder = tmp_path / "model"
    shutil.copytree(tiny_gpt2[0], folder)
    spoil(folder, how)
    with pytest.raises(UserError) as caught:
        pretrained.load_gpt2(str(folder), None)
    message = str(caught.value)
    assert says in message and "\n" not in message


def test_a_block_size_beyond_the_model_positions_or_a_missing_folder_is_refused(tiny_gpt2,
                                                                                tmp_path):
    with pytest.raises(UserError, match="block size 128 does not fit"):
        pretrained.load_gpt2(str(tiny_gpt2[0]), 128)
    with pytest.raises(UserError, match="does not exist; check the path"):
        pretrained.load_gpt2(str(tmp_path / "nothing"), None)


def test_model_names_resolve_through_the_local_cache_offline(tiny_gpt2, tmp_path, monkeypatch):
    from huggingface_hub import constants
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--gpt2"
    shutil.copytree(tiny_gpt2[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    values, _ = pretrained.load_gpt2("gpt2", 16)
    assert values["block_size"] == 16 and values["n_embd"] == 32
    with pytest.raises(UserError, match="neither a folder nor a model in the local"):
        pretrained.load_gpt2("gpt2-medium", 16)


@pytest.mark.slow
def test_a_model_that_cannot_be_found_is_one_error_line_from_a_command(tmp_path):
    code = ("from lmkit.errors import run_main; from gpt.pretrained import load_gpt2\n"
            "run_main(lambda: load_gpt2('gpt2', None))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "neither a folder nor a model in the local Hugging Face cache" in line
    assert "HF_HUB_OFFLINE forbids downloading it" in line


def test_export_refusals_are_one_sentence(trained, exported, tmp_path):
    bigram = checkpoint_path(trained, "bigram")
    wrong_kind = run_script("gpt/export.py", "--checkpoint", bigram, "--out", tmp_path / "x")
    assert wrong_kind.returncode == 1
    assert "python bigram/export.py" in one_error_line(wrong_kind.stderr)

    assert not (tmp_path / "x").exists()

    before = sorted(p.name for p in (exported / "gpt").iterdir())
    from gpt.export import main
    with pytest.raises(UserError, match="already exists and is not empty; pass --overwrite"):
        main(["--out-dir", str(trained), "--out", str(exported / "gpt")])
    assert sorted(p.name for p in (exported / "gpt").iterdir()) == before


def export_crafted(state: dict, tmp_path: Path, family_module: str):
    path = tmp_path / "crafted.pt"
    torch.save(state, path)
    main = __import__(family_module, fromlist=["main"]).main
    with pytest.raises(UserError) as caught:
        main(["--checkpoint", str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    return str(caught.value)


def test_an_option_gpt2_lacks_is_refused_by_name(trained, tmp_path):
    state = load_checkpoint(checkpoint_path(trained, "gpt"))
    state["model_config"]["rotary"] = True
    del state["model"]["wpe.weight"]  # a rotary model has no position table
    message = export_crafted(state, tmp_path, "gpt.export")
    assert "rotary=True has no GPT-2 counterpart" in message and "\n" not in message


def test_a_head_bias_that_cannot_be_folded_is_refused(trained, tmp_path):
    state = load_checkpoint(checkpoint_path(trained, "bigram"))
    state["model"]["ln_f.weight"][0] = 0.0
    message = export_crafted(state, tmp_path, "bigram.export")
    assert "gains of zero" in message and "\n" not in message


def test_a_failed_export_leaves_no_folder_and_overwrite_replaces(trained, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    real_write = hf.write_file
    written = []

    def write_then_fail(path, data):
        if len(written) == 2:
            raise OSError(28, "No space left on device")  # ENOSPC on the third file
        written.append(path)
        real_write(path, data)

    monkeypatch.setattr(hf, "write_file", write_then_fail)
    from gpt.export import main
    with pytest.raises(UserError, match="no space left"):
        main(["--out-dir", str(trained), "--out", str(out)])
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temp twin

    monkeypatch.setattr(hf, "write_file", real_write)
    assert main(["--out-dir", str(trained), "--out", str(out)]) == 0  # an earlier export
    (out / "stale.txt").write_text("old")
    assert main(["--out-dir", str(trained), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.slow
def test_training_from_a_gpt2_folder_starts_from_its_weights(tiny_gpt2, prepared, tmp_path):
    """--init-from FOLDER: step 0 gives transformers' logits; the run then trains, resumes,
    samples and exports like any other."""
    from conftest import tiny_flags
    from gpt.family import FAMILY
    from gpt.train import main as gpt_main
    from lmkit.config import parse_flags
    from lmkit.trainer import Trainer

    folder, theirs = tiny_gpt2
    flags = [str(f) for f in tiny_flags(prepared / "gpt2", tmp_path, init_from=folder,
                                        block_size=32, max_iters=6, eval_interval=3)]
    trainer = Trainer(FAMILY, parse_flags(FAMILY, "", flags))
    try:
        assert trainer.model_config.n_embd == 32 and trainer.model_config.vocab_size == 50257
        idx = torch.randint(50257, (2, 32), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = theirs(idx).logits
        assert (full_logits(trainer.model.eval(), idx) - expected).abs().max() <= TOLERANCE
    finally:
        trainer.close()
    assert gpt_main(flags) == 0
    assert gpt_main(["--resume", "--max-iters", "9", "--out-dir", str(tmp_path)]) == 0
    state = load_checkpoint(tmp_path / "checkpoints/gpt/last.pt")
    assert state["step"] == 9 and state["train_config"]["init_from"] == str(folder)
    assert run_script("gpt/sample.py", "--out-dir", tmp_path, "--max-new-tokens", 5).returncode == 0
    exported = run_script("gpt/export.py", "--out-dir", tmp_path, "--out", tmp_path / "hf")
    assert exported.returncode == 0, exported.stderr


def test_init_from_is_refused_for_the_char_model(prepared, tmp_path):
    from conftest import tiny_flags
    result = run_script("bigram/train.py", *tiny_flags(prepared / "char", tmp_path),
                        "--init-from", "gpt2")
    assert result.returncode == 2 and "gpt model only" in one_error_line(result.stderr)
