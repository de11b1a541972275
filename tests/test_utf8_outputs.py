"""Files the scripts write and read are UTF-8 whatever the locale says: here an ASCII-only
locale with Python's UTF-8 mode and locale coercion turned off, the strictest a machine has."""
import json
import os
import subprocess
import sys

import pytest

from conftest import make_text, run_script, tiny_flags

NON_ASCII = "\nÉLÉONORE:\nÔ Roméo, où es-tu — ß ñ ’ 愛 ✓\n"


def ascii_locale() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIOENCODING"))}
    return env | {"LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


@pytest.mark.slow
def test_prepare_train_sample_and_plot_keep_non_ascii_text_under_an_ascii_locale(tmp_path):
    env = ascii_locale()
    probe = subprocess.run([sys.executable, "-c", "import locale; print(locale.getpreferredencoding(False))"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "ANSI_X3.4-1968"  # open() without encoding= would be ASCII
    text = tmp_path / "play.txt"
    text.write_text(make_text() + NON_ASCII * 20, encoding="utf-8")
    data = tmp_path / "data"
    run_script("prepare_data.py", "--input", text, "--out-dir", data, env=env, check=True)
    meta = json.loads((data / "char" / "meta.json").read_bytes().decode("utf-8"))
    assert {"É", "ß", "愛", "✓", "—"} <= set(meta["chars"])

    run_script("bigram/train.py", *tiny_flags(data / "char", tmp_path), env=env, check=True)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Ô Roméo, où", encoding="utf-8")
    sample = tmp_path / "sample.txt"
    result = run_script("bigram/sample.py", "--out-dir", tmp_path, "--prompt-file", prompt,
                        "--max-new-tokens", "20", "--temperature", "0", "--out", sample,
                        env=env, check=True)
    assert "Traceback" not in result.stderr
    written = sample.read_bytes().decode("utf-8")  # strict: fails on anything not UTF-8
    assert "Ô Roméo, où" in written

    out = tmp_path / "compare.png"
    run_script("plot_runs.py", "bigram", "--out-dir", tmp_path, "--out", out, env=env, check=True)
    assert out.is_file()
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".csv", ".txt", ".md"):
            path.read_bytes().decode("utf-8")
