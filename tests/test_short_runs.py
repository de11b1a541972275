"""Short runs: a --max-iters below the recipe's warmup or evaluation interval fits the recipe's
schedule to it (and says so); warmup the user gave, and a resumed run's, are never changed."""
import pytest
import torch

from bigram.family import FAMILY as BIGRAM
from bigram.train import main as bigram_main
from conftest import one_error_line, read_metrics, run_script, stop_requested_during, tiny_flags
from gpt.family import FAMILY as GPT_FAMILY
from lmkit.config import parse_flags
from lmkit.errors import UserError

ADJUSTED = "short run: --warmup-iters 100 -> 1, --eval-interval 500 -> 30 to fit --max-iters 30"


def seed_schedule_flags(data_dir, out_dir, **overrides) -> list:
    """tiny_flags with the seed recipe's warmup and evaluation interval (tiny model, seed schedule)."""
    return tiny_flags(data_dir, out_dir, warmup_iters=False, eval_interval=False, **overrides)


def saved_train_config(out_dir, run="bigram") -> dict:
    return torch.load(out_dir / "checkpoints" / run / "last.pt", weights_only=False)["train_config"]


def test_seed_recipe_with_30_steps_trains_and_says_what_it_adjusted(prepared, tmp_path, capsys):
    assert bigram_main(seed_schedule_flags(prepared / "char", tmp_path, max_iters=30)) == 0
    out = capsys.readouterr().out
    assert out.count("short run:") == 1 and ADJUSTED in out.splitlines()
    config = saved_train_config(tmp_path)
    assert (config["warmup_iters"], config["eval_interval"]) == (1, 30)
    assert [int(row["step"]) for row in read_metrics(tmp_path, "bigram")] == [30]


def test_fitting_follows_the_preset_and_leaves_given_and_fitting_values_alone():
    """A preset's values count as the recipe's; flags the user gave stay; -1 already fits."""
    def fitted(family, *argv):
        flags = parse_flags(family, "", list(argv))
        return flags.get("warmup_iters"), flags.get("eval_interval")

    assert fitted(BIGRAM, "--preset", "cpu", "--max-iters", "20") == (1, 20)  # 30 of 1100 steps
    assert fitted(BIGRAM, "--max-iters", "30", "--eval-interval", "40") == (1, 40)
    assert fitted(BIGRAM, "--max-iters", "600") == (None, None)  # the seed's 100 and 500 fit
    assert fitted(BIGRAM, "--max-iters", "10", "--warmup-iters", "0") == (0, 10)
    assert fitted(BIGRAM, "--preset", "cpu") == (30, 275)
    assert fitted(GPT_FAMILY, "--max-iters", "30") == (None, 30)  # warmup -1: a quarter
    assert fitted(BIGRAM, "--max-iters", "30", "--resume") == (None, None)


def test_explicit_warmup_longer_than_the_run_is_refused_in_one_sentence(prepared, tmp_path):
    result = run_script("bigram/train.py", *tiny_flags(prepared / "char", tmp_path),
                        "--warmup-iters", "50", "--max-iters", "30")
    assert result.returncode == 2
    assert "--warmup-iters 50 is more than --max-iters 30" in one_error_line(result.stderr)
    assert "short run" not in result.stdout
    assert not (tmp_path / "checkpoints").exists()


def test_resume_keeps_the_checkpoints_schedule(prepared, tmp_path, monkeypatch, capsys):
    """A resumed run's warmup comes from its checkpoint: a shorter --max-iters than the saved
    warmup is refused, not fitted, and a fitted short run resumes with its fitted values."""
    data = prepared / "char"
    with monkeypatch.context() as patch:
        stop_requested_during(3, patch)
        assert bigram_main(tiny_flags(data, tmp_path, max_iters=40, warmup_iters=20,
                                      run="long")) == 130
        assert bigram_main(seed_schedule_flags(data, tmp_path, max_iters=30, run="short")) == 130
    capsys.readouterr()
    resume = ["--resume", "--out-dir", str(tmp_path), "--data-dir", str(data)]

    with pytest.raises(UserError, match="--warmup-iters 20 is more than --max-iters 10"):
        bigram_main(resume + ["--run", "long", "--max-iters", "10"])
    assert bigram_main(resume + ["--run", "short", "--max-iters", "6"]) == 0
    assert "short run" not in capsys.readouterr().out
    config = saved_train_config(tmp_path, "short")
    assert (config["max_iters"], config["warmup_iters"], config["eval_interval"]) == (6, 1, 30)
