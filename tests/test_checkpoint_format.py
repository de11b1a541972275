"""The checkpoint's format version: lmkit.checkpoint.upgrade reads it, brings the formats it knows
up to today's, and refuses a newer or unknown one in one sentence."""
import pytest
import torch

from bigram.model import BigramConfig
from bigram.sample import main as sample_main
from bigram.train import main as train_main
from lmkit.checkpoint import FORMAT_VERSION, upgrade
from lmkit.errors import UserError


def old_state(**changes) -> dict:
    """A checkpoint's state as an older version of the project wrote it."""
    state = {"kind": "bigram", "model": {}, "step": 6, "metrics": [], "meta": {},
             "model_config": {"vocab_size": 65, "block_size": 16, "n_embd": 16, "n_head": 2,
                              "n_layer": 1, "dropout": 0.0}}
    state.update(changes)
    return state


def test_a_checkpoint_without_a_version_is_upgraded_to_todays_format():
    """No version reads as the first format; the retired options that were off are dropped and,
    given the model config, the options added since take their defaults (off)."""
    saved = old_state()["model_config"]
    state = upgrade(old_state(model_config={**saved, "rmsnorm": False, "zero_init": True}),
                    "old.pt", BigramConfig)
    assert state["version"] == FORMAT_VERSION
    assert state["model_config"] == {**saved, "rotary": False, "qk_norm": False}
    assert BigramConfig(**state["model_config"]).block_size == 16


@pytest.mark.parametrize("version, says", [
    (FORMAT_VERSION + 1, f"was written by a newer version of this project (checkpoint format "
                         f"{FORMAT_VERSION + 1}, this one reads up to {FORMAT_VERSION}); update "
                         "the project to load it"),
    ("2.0", "has an unknown checkpoint format ('2.0'); it was not written by this project"),
    (0, "has an unknown checkpoint format (0); it was not written by this project"),
])
def test_a_newer_or_unknown_format_is_refused_in_one_sentence(version, says):
    with pytest.raises(UserError) as refused:
        upgrade(old_state(version=version), "x.pt")
    assert str(refused.value) == f"x.pt {says}"


def test_sampling_or_resuming_a_newer_checkpoint_is_refused_in_one_sentence(trained, tmp_path):
    state = torch.load(trained / "checkpoints/bigram/last.pt", weights_only=True)
    state["version"] = FORMAT_VERSION + 1
    run = tmp_path / "checkpoints" / "bigram"
    run.mkdir(parents=True)
    torch.save(state, run / "last.pt")
    with pytest.raises(UserError) as sampling:
        sample_main(["--out-dir", str(tmp_path), "--device", "cpu"])
    with pytest.raises(UserError) as resuming:
        train_main(["--resume", "--out-dir", str(tmp_path), "--device", "cpu"])
    for refused in (sampling, resuming):
        message = str(refused.value)
        assert "was written by a newer version of this project" in message
        assert "\n" not in message
