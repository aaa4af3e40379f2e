"""CLI polish: help on every option, `--debug` anywhere, `demo:` datasets in predict/eval, one chat
header, output modes from the umask, no empty checkpoints/best/, no transformers torch notice."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlora.cli.app import build_parser, main
from jaxlora.config import config_from_dict, dump_config
from jaxlora.errors import UserError
from jaxlora.io.atomic import atomic_dir, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def _parsers(parser: argparse.ArgumentParser, name="jaxlora"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_every_option_has_help():
    missing = [
        f"{name} {a.option_strings or a.dest}"
        for name, p in _parsers(build_parser())
        for a in p._actions
        if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction) and not a.help
    ]
    assert not missing, missing


def test_debug_anywhere(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert main(["train", missing]) == 2
    assert "config file not found" in capsys.readouterr().err
    for argv in (["--debug", "train", missing], ["train", missing, "--debug"]):
        with pytest.raises(UserError, match="config file not found"):
            main(argv)


def test_predict_and_eval_take_demo_names(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    common = ["--model", str(tiny_model_dir), "--max-samples", "2", "--max-new-tokens", "2"]
    assert main(["predict", *common, "--dataset", "demo:identity_sft", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2
    assert main(["eval", *common, "--dataset", "demo:identity_sft"]) == 0
    assert "rouge" in capsys.readouterr().out.lower()
    assert main(["eval", *common, "--dataset", "demo:nope"]) == 2
    assert "unknown demo dataset 'demo:nope'" in capsys.readouterr().err


def test_chat_header_once(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))
    assert main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("/exit") == 1, out


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "out") as d:
            (d / "f.txt").write_text("y")
        dump_config(config_from_dict({}), tmp_path / "config.yaml")
    finally:
        os.umask(old)
    for name, mode in (("a.txt", 0o666), ("out", 0o777), ("out/f.txt", 0o666)):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode & ~umask, name
    assert stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode) == 0o666 & ~umask


def test_no_empty_best_dir(tmp_path):
    from jaxlora.io.run_state import RunCheckpoints

    ckpt = RunCheckpoints(tmp_path / "checkpoints")
    assert ckpt.best_step() is None
    ckpt.close()
    assert not (tmp_path / "checkpoints" / "best").exists()


def test_data_stats_imports_neither_jax_nor_torch(tmp_path):
    """`jaxlora data stats` needs only the tokenizer: JAX, Flax and the model code are not
    imported (about a second of the command's start on a 2-core box). And the command does not
    import torch although it is installed here (transformers would, ~3 s), nor print
    transformers' "PyTorch was not found" notice about it."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"dataset: demo:identity_sft\nmax_samples: 4\ncutoff_len: 64\n"
        f"tokenized_path: {tmp_path / 'cache'}\n"
    )
    argv = ["jaxlora", "data", "stats", str(cfg), "--out", str(tmp_path)]
    code = (  # the console script's way in: main() reads sys.argv
        f"import sys; sys.argv = {argv!r}; from jaxlora.cli.app import main; rc = main(); "
        "print(rc, sorted(m for m in ('jax', 'flax', 'jaxlora.io.model', 'torch') "
        "if sys.modules.get(m) is not None)); "
        # Libraries that look for "torch" in sys.modules still work afterwards (scipy, under
        # the ROUGE scorer, broke on a lasting None entry there).
        "from jaxlora.evaluate.metrics import rouge_bleu; "
        "print(rouge_bleu(['a b c'], ['a b c'])['rouge-l'])"
    )
    # A fresh cache: the built-in tiny model is made first (its tokenizer is built with
    # transformers too), as on a user's first run.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXLORA_CACHE": str(tmp_path / "jc")}
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-2:] == ["0 []", "100.0"], proc.stdout[-500:]
    assert "PyTorch was not found" not in proc.stderr + proc.stdout
    assert "suggested cutoff_len" in proc.stdout
