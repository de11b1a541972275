"""The speedrun options (rotary, QK-norm, Muon): each off by default, each trains and resumes
exactly, each samples the same with and without the KV cache. Checkpoints from before the options,
and from while the retired ones (RMSNorm, ReLU^2, zero init) existed, still load."""
import math
from types import SimpleNamespace

import pytest
import torch

from bigram.family import FAMILY as BIGRAM_FAMILY
from bigram.model import BigramConfig, BigramLanguageModel
from bigram.sample import main as bigram_sample_main
from bigram.train import main as bigram_main
from conftest import (assert_decoder_matches_forward, read_metrics, saved_weights,
                      stop_requested_during, tiny_flags)
from gpt.model import GPT, GPTConfig
from gpt.train import main as gpt_main
from lmkit import optim, sample_cli, trainer
from lmkit.checkpoint import load_checkpoint
from lmkit.errors import UserError
from lmkit.generation import generate, sample_next
from lmkit.optim import Float32Muon, MuonWithAdamW, make_optimizer, orthogonalize

OPTIONS = ["rotary", "qk_norm"]
MODELS = {"bigram": (BigramLanguageModel, BigramConfig), "gpt": (GPT, GPTConfig)}
MAINS = {"bigram": (bigram_main, "char"), "gpt": (gpt_main, "gpt2")}
CPU = torch.device("cpu")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@pytest.fixture(autouse=True, scope="module")
def one_thread_and_no_plots():
    """Tiny models run fastest on one thread (two fight over a busy CPU), and the loss plot
    (most of a tiny run's time) is tested elsewhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "plot_losses", lambda *args, **kwargs: None)
        yield
    torch.set_num_threads(threads)


def tiny_model(kind: str, options=(), block_size: int = 16, seed: int = 0, **changes):
    """A two-layer model of either kind with the given options on, in eval mode."""
    model_cls, config_cls = MODELS[kind]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=50, block_size=block_size, n_layer=2, n_head=2, n_embd=16,
                        dropout=0.0, **{name: True for name in options}, **changes)
    return model_cls(config).eval()


def large_weights(model, seed: int = 12):
    """Every weight drawn at std 0.5, norm gains included, so a misplaced one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5, generator=generator)
    return model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


EACH_OPTION = [(option,) for option in OPTIONS] + [tuple(OPTIONS)]
OPTION_IDS = OPTIONS + ["all"]


# ---- off by default: the seed models are unchanged ------------------------------------------
PER_BLOCK = {"bigram": ("ln1.weight", "ln1.bias", "sa.qkv.weight", "sa.proj.weight", "sa.proj.bias",
                        "ln2.weight", "ln2.bias", "ffwd.net.0.weight", "ffwd.net.0.bias",
                        "ffwd.net.2.weight", "ffwd.net.2.bias"),
             "gpt": ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                     "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                     "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")}
DEFAULT_NAMES = {  # the two-layer models' parameter names, as checkpoints before the options hold
    "bigram": {"token_embedding_table.weight", "position_embedding_table.weight", "ln_f.weight",
               "ln_f.bias", "lm_head.weight", "lm_head.bias",
               *(f"blocks.{i}.{name}" for i in range(2) for name in PER_BLOCK["bigram"])},
    "gpt": {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight",
            *(f"h.{i}.{name}" for i in range(2) for name in PER_BLOCK["gpt"])},
}


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_every_option_is_off_by_default(kind):
    config = MODELS[kind][1]()
    assert not any(getattr(config, option) for option in OPTIONS)


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_options_change_only_their_own_parameters(kind):
    """The default model has the parameter names checkpoints hold; rotary drops the position
    table; QK-norm (without gains) adds or removes nothing."""
    names = set(tiny_model(kind).state_dict())
    assert names == DEFAULT_NAMES[kind]
    position = {"bigram": "position_embedding_table.weight", "gpt": "wpe.weight"}[kind]
    assert set(tiny_model(kind, ["rotary"]).state_dict()) == names - {position}
    assert set(tiny_model(kind, ["qk_norm"]).state_dict()) == names


# ---- the KV-cache decoder runs every option ----------------------------------------------------
@pytest.mark.parametrize("options", EACH_OPTION, ids=OPTION_IDS)
@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_decoder_logits_equal_the_model_forward(kind, options):
    """With each option, the decoder fed a prompt and then one token at a time gives the logits
    of the model's own forward at every position (weights drawn large, gains included)."""
    model = large_weights(tiny_model(kind, options))
    assert_decoder_matches_forward(model)


@pytest.mark.parametrize("options", EACH_OPTION, ids=OPTION_IDS)
@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_cached_sampling_equals_uncached(kind, options):
    """Within the block, use_cache=True draws exactly the tokens of use_cache=False."""
    model = large_weights(tiny_model(kind, options))
    prompt = torch.randint(0, 50, (3, 4), generator=gen(5))
    cached = generate(model, prompt, 12, generator=gen(7), use_cache=True)
    uncached = generate(model, prompt, 12, generator=gen(7), use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_past_the_block_rotary_restarts_its_positions_like_the_forward(kind):
    """Past the block size the cache re-encodes the last half block from position 0; with every
    option on, each token equals a plain forward over that window."""
    block, keep = 8, 4
    model = large_weights(tiny_model(kind, OPTIONS, block_size=block))
    prompt = torch.randint(0, 50, (2, 3), generator=gen(2))
    cached = generate(model, prompt, 4 * block, generator=gen(6))
    seq, start, generator = prompt, 0, gen(6)
    with torch.inference_mode():
        for _ in range(4 * block):
            logits, _ = model(seq[:, start:])
            seq = torch.cat([seq, sample_next(logits[:, -1], generator=generator)], dim=1)
            if seq.size(1) - 1 - start == block:
                start = seq.size(1) - keep
    assert torch.equal(cached, seq)


# ---- Muon ------------------------------------------------------------------------------------
def muon_cfg(**changes):
    values = dict(optimizer="muon", muon_lr=0.02, muon_momentum=0.95, embedding_lr=0.0,
                  learning_rate=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    return SimpleNamespace(**{**values, **changes})


BLOCK_MATRICES = {"bigram": ("sa.qkv.weight", "sa.proj.weight", "ffwd.net.0.weight",
                             "ffwd.net.2.weight"),
                  "gpt": ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                          "mlp.c_proj.weight")}


@pytest.mark.parametrize("options", [(), tuple(OPTIONS)], ids=["default", "all"])
@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_muon_gets_the_block_matrices_and_adamw_the_rest(kind, options):
    """Muon: the four matrices of every block. AdamW: embeddings, head, norm gains, biases.
    Every parameter is in exactly one group; the groups come AdamW's first, then Muon's."""
    model = tiny_model(kind, options)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = make_optimizer(model, muon_cfg(), CPU)
    assert isinstance(opt, MuonWithAdamW)
    in_muon = [names[id(p)] for g in opt.muon.param_groups for p in g["params"]]
    in_adamw = [names[id(p)] for g in opt.adamw.param_groups for p in g["params"]]
    assert sorted(in_muon) == sorted(n for n in names.values() if n.endswith(BLOCK_MATRICES[kind]))
    assert len(in_muon) == 4 * 2
    assert sorted(in_muon + in_adamw) == sorted(names.values())  # each once (gpt's head is tied)
    assert opt.param_groups == opt.adamw.param_groups + opt.muon.param_groups
    optim.set_learning_rate(opt, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, pytest.approx(0.02)]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1]
    assert opt.muon.param_groups[0]["momentum"] == 0.95


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_embedding_lr_gives_the_embedding_tables_a_group_of_their_own(kind, optimizer):
    """--embedding-lr: the embedding tables (the GPT's tied head with its token embedding) in a
    third AdamW group whose rate follows the schedule at embedding_lr / learning_rate times
    the others'; without it, AdamW keeps its two groups, as older checkpoints hold."""
    model = tiny_model(kind)
    names = {id(p): n for n, p in model.named_parameters()}
    adamw_of = lambda opt: opt.adamw if optimizer == "muon" else opt
    plain = adamw_of(make_optimizer(model, muon_cfg(optimizer=optimizer), CPU))
    assert len(plain.param_groups) == 2
    opt = make_optimizer(model, muon_cfg(optimizer=optimizer, embedding_lr=0.01), CPU)
    groups = adamw_of(opt).param_groups
    assert len(groups) == 3
    tables = {"bigram": ["position_embedding_table.weight", "token_embedding_table.weight"],
              "gpt": ["wpe.weight", "wte.weight"]}[kind]
    assert sorted(names[id(p)] for p in groups[2]["params"]) == tables
    assert not any(names[id(p)] in tables for g in groups[:2] for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(len(g["params"]) for g in plain.param_groups)
    optim.set_learning_rate(opt, 5e-4)  # half the peak: the embeddings get half of theirs
    assert [g["lr"] for g in groups] == [5e-4, 5e-4, pytest.approx(0.005)]
    assert groups[2]["weight_decay"] == 0.1


def test_adamw_stays_the_plain_optimizer():
    """Without --optimizer muon, make_optimizer returns torch's AdamW as before."""
    opt = make_optimizer(tiny_model("gpt"), muon_cfg(optimizer="adamw"), CPU)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 2
    assert optim.describe(opt).startswith("AdamW")


@pytest.mark.parametrize("native", [True, False])
def test_library_muon_where_bfloat16_is_native_else_float32(native, monkeypatch):
    """torch.optim.Muon (bfloat16 Newton-Schulz) on devices with native bfloat16, Float32Muon
    elsewhere; describe() says which."""
    monkeypatch.setattr(optim.dev, "has_native_bf16", lambda device: native)
    opt = make_optimizer(tiny_model("bigram"), muon_cfg(), CPU)
    assert isinstance(opt.muon, torch.optim.Muon)
    assert isinstance(opt.muon, Float32Muon) is not native
    text = optim.describe(opt)
    assert ("float32" in text) is not native and "8 block matrices" in text and "AdamW" in text


def reference_orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration written out in float64, as the test's reference."""
    a, b, c = NS_COEFFICIENTS
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_float32_newton_schulz_equals_the_float64_reference(shape):
    g = torch.randn(shape, generator=gen(0))
    ours = orthogonalize(g)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference_orthogonalize(g), rtol=0, atol=1e-5)
    singular = torch.linalg.svdvals(ours)
    assert 0.6 < singular.min() and singular.max() < 1.25  # roughly orthogonal, as Muon wants


def matrices_and_grads(seed: int):
    generator = gen(seed)
    shapes = [(24, 8), (8, 24), (16, 16)]
    params = [torch.randn(s, generator=generator) * 0.1 for s in shapes]
    grads = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(4)]
    return params, grads


def run_muon(muon_cls, params, grads, **kwargs):
    params = [p.clone().requires_grad_() for p in params]
    opt = muon_cls(params, lr=0.02, weight_decay=0.1, momentum=0.95, **kwargs)
    trajectory = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory, opt


def test_float32_muon_equals_a_float64_reference_step():
    """Float32Muon's whole update (momentum, Nesterov, decoupled weight decay, the shape
    factor) equals the same update computed in float64, to float32 rounding."""
    params, grads = matrices_and_grads(1)
    trajectory, _ = run_muon(Float32Muon, params, grads)
    expected = [p.double() for p in params]
    buffers = [torch.zeros_like(p) for p in expected]
    for step, step_grads in enumerate(grads):
        for i, g in enumerate(step_grads):
            g = g.double()
            buffers[i] = 0.95 * buffers[i] + 0.05 * g
            update = reference_orthogonalize(0.05 * g + 0.95 * buffers[i])
            rows, cols = g.shape
            expected[i] = expected[i] * (1 - 0.02 * 0.1) - 0.02 * math.sqrt(max(1, rows / cols)) * update
            torch.testing.assert_close(trajectory[step][i].double(), expected[i], rtol=0, atol=1e-6)


def test_float32_muon_follows_the_library_muon():
    """torch.optim.Muon (bfloat16 Newton-Schulz, emulated here) and Float32Muon from the same
    weights and gradients: identical momentum, updates equal to bfloat16 rounding; each loads
    the other's state_dict."""
    params, grads = matrices_and_grads(2)
    ours, ours_opt = run_muon(Float32Muon, params, grads)
    library, library_opt = run_muon(torch.optim.Muon, params, grads)
    previous = params
    for step in range(len(grads)):
        for mine, theirs, before in zip(ours[step], library[step], previous):
            # the orthogonalised update, divided by the rate: entries up to about 0.5
            torch.testing.assert_close((mine - before) / 0.02, (theirs - before) / 0.02,
                                       rtol=0, atol=0.03)
        previous = library[step]
    for p_ours, p_library in zip(ours_opt.param_groups[0]["params"],
                                 library_opt.param_groups[0]["params"]):
        assert torch.equal(ours_opt.state[p_ours]["momentum_buffer"],
                           library_opt.state[p_library]["momentum_buffer"])
    assert ours_opt.state_dict()["param_groups"] == library_opt.state_dict()["param_groups"]
    swapped = torch.optim.Muon([p.clone() for p in params], lr=0.02)
    swapped.load_state_dict(ours_opt.state_dict())
    back = Float32Muon([p.clone() for p in params], lr=0.02)
    back.load_state_dict(library_opt.state_dict())
    assert back.param_groups[0]["weight_decay"] == 0.1 and len(back.state) == 3


# ---- training: loss falls, resume is exact ----------------------------------------------------
TRAINING_FLAGS = {"muon": ["--optimizer", "muon"], "embedding_lr": ["--embedding-lr", "0.01"]}
TRAINING_CASES = ([(option,) for option in OPTIONS] + [("muon",), ("embedding_lr",),
                                                       (*OPTIONS, *TRAINING_FLAGS)])


@pytest.mark.parametrize("options", TRAINING_CASES,
                         ids=OPTIONS + ["muon", "embedding_lr", "all+muon+embedding_lr"])
@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_option_trains_and_resumes_exactly(kind, options, prepared, tmp_path, monkeypatch):
    """train.py with the option: the loss falls over 12 steps, and a run stopped at step 7 and
    resumed ends with the same losses and the same weights, bit for bit (dropout on, 2
    accumulation steps, as in test_training)."""
    main, tokenizer = MAINS[kind]
    extra = [flag for o in options
             for flag in TRAINING_FLAGS.get(o, ["--" + o.replace("_", "-")])]
    flags = tiny_flags(prepared / tokenizer, tmp_path, dropout=0.1, grad_accum_steps=2,
                       sample_tokens=0) + extra
    assert main(flags + ["--run", "straight"]) == 0
    with monkeypatch.context() as patch:
        stop_requested_during(7, patch)
        assert main(flags + ["--run", "split"]) == 130
    assert main(["--resume", "--run", "split", "--out-dir", str(tmp_path)]) == 0

    straight, split = read_metrics(tmp_path, "straight"), read_metrics(tmp_path, "split")
    assert float(straight[-1]["val_loss"]) < float(straight[0]["val_loss"])
    assert float(straight[-1]["train_loss"]) < float(straight[0]["train_loss"])
    for a, b in zip(straight, split, strict=True):
        for field in ("step", "lr", "train_loss", "val_loss", "tokens_seen"):
            assert a[field] == b[field], field
    straight_weights = saved_weights(tmp_path, "straight")
    for name, tensor in saved_weights(tmp_path, "split").items():
        assert torch.equal(tensor, straight_weights[name]), name
    state = torch.load(tmp_path / "checkpoints/split/last.pt", weights_only=True)
    assert all(state["model_config"][o] for o in options if o not in TRAINING_FLAGS)
    assert ("muon" in state["optimizer"]) is ("muon" in options)


# ---- checkpoints from before the options, and from while the retired ones existed ----------
RETIRED_OFF = {"rmsnorm": False, "relu_squared": False, "zero_init": True}  # zero_init: init only


def tiny_bigram_run(prepared, out_dir):
    """Train a default bigram model for 6 steps; returns its checkpoint folder."""
    assert bigram_main(tiny_flags(prepared / "char", out_dir, max_iters=6, sample_tokens=0)) == 0
    return out_dir / "checkpoints" / "bigram"


def rewrite_model_config(run_dir, change):
    for name in ("last.pt", "best.pt"):
        state = torch.load(run_dir / name, weights_only=True)
        state["model_config"] = change(state["model_config"])
        torch.save(state, run_dir / name)


@pytest.fixture(params=["before-options", "retired-options-off"])
def old_checkpoint(request, prepared, tmp_path):
    """A default bigram run whose checkpoints' model_config lacks the option fields, as those
    saved before the options existed do, or holds the retired options, off (zero_init on, since
    it only changed the initialisation), as those saved while they existed do."""
    run_dir = tiny_bigram_run(prepared, tmp_path)
    if request.param == "before-options":
        change = lambda config: {k: v for k, v in config.items() if k not in OPTIONS}
    else:
        change = lambda config: {**config, **RETIRED_OFF}
    rewrite_model_config(run_dir, change)
    return tmp_path


def test_old_checkpoint_samples(old_checkpoint, capsys):
    state = load_checkpoint(old_checkpoint / "checkpoints/bigram/last.pt")
    model = sample_cli.load_model(state, BIGRAM_FAMILY, CPU)
    assert not any(getattr(model.config, option) for option in OPTIONS)
    assert bigram_sample_main(["--out-dir", str(old_checkpoint), "--device", "cpu",
                               "--max-new-tokens", "10", "--num-samples", "2"]) == 0
    assert "sample 2/2" in capsys.readouterr().out


def test_old_checkpoint_resumes(old_checkpoint):
    """A missing option field is the config's default and a retired one that is off is
    dropped, so resuming is not refused; the new checkpoint holds today's fields only."""
    assert bigram_main(["--resume", "--max-iters", "9", "--sample-tokens", "0",
                        "--out-dir", str(old_checkpoint)]) == 0
    state = torch.load(old_checkpoint / "checkpoints/bigram/last.pt", weights_only=True)
    assert state["step"] == 9 and not any(state["model_config"][o] for o in OPTIONS)
    assert not RETIRED_OFF.keys() & state["model_config"].keys()


@pytest.mark.parametrize("retired", ["rmsnorm", "relu_squared"])
def test_checkpoint_with_a_retired_option_on_is_refused_clearly(retired, prepared, tmp_path):
    """A model trained with a retired option on is another architecture: sampling and resuming
    refuse it in one sentence naming the flag, and write nothing."""
    rewrite_model_config(tiny_bigram_run(prepared, tmp_path),
                         lambda config: {**config, retired: True})
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as sampling:
        bigram_sample_main(["--out-dir", str(tmp_path), "--device", "cpu"])
    with pytest.raises(UserError) as resuming:
        bigram_main(["--resume", "--out-dir", str(tmp_path)])
    flag = "--" + retired.replace("_", "-")
    for error in (sampling, resuming):
        message = str(error.value)
        assert f"trained with {flag}, an option this version no longer has" in message
        assert "\n" not in message
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
