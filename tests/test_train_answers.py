"""The answers printed after `jaxlora train` reuse the base model training held.

Reading the base again costs seconds for SmolLM2 and a minute for an 8B checkpoint; the model in
memory is the same weights whenever it is what inference would load. These tests pin that the
reuse happens (no second load), gives the answers a fresh load gives, and is refused where the
params in memory are not the checkpoint's (PiSSA residual, quantised base).
"""

from __future__ import annotations

import pytest

import jaxlora.io.model as io_model
from jaxlora.cli.app import main
from jaxlora.cli.inference import sample_answers
from jaxlora.config import config_from_dict, load_config
from jaxlora.models.attention import AttentionSpec
from jaxlora.train.model_parts import build_model_parts, inference_base

HEAD = "\nanswers of the trained adapter to "


@pytest.mark.slow  # a CLI training run + two generations: ~8 s on 2 cores
def test_answers_after_train_reuse_the_base_and_match_a_fresh_load(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    yaml = tmp_path / "run.yaml"
    yaml.write_text(
        "model_name_or_path: tiny\nstage: sft\nfinetuning_type: lora\nlora_rank: 8\n"
        "dataset: demo:identity_sft\ncutoff_len: 64\nmax_samples: 16\n"
        f"output_dir: {out}\nper_device_train_batch_size: 8\nlearning_rate: 1.0e-2\n"
        "max_steps: 3\nbf16: false\nattention: xla\n"
    )
    loads = []
    real_load = io_model.load_model

    def counting_load(*args, **kw):
        loads.append(args)
        return real_load(*args, **kw)

    # Training binds load_model at import (train.methods); inference imports it when called,
    # so this counts the loads of the answering phase only.
    monkeypatch.setattr(io_model, "load_model", counting_load)
    assert main(["train", str(yaml), "--no-progress"]) == 0
    said = capsys.readouterr().out.split(HEAD)
    assert len(said) == 2, said
    head, *answers = said[1].split("\n\n> ")
    assert loads == [], loads  # the base in memory answered
    assert head.startswith("3 training prompts (greedy, <= 48 new tokens; "), head
    assert "with loading the model" not in head, head
    assert len(answers) == 3

    # A fresh load of the base + the saved adapter answers the same (greedy).
    cfg = load_config(yaml)
    fresh = sample_answers(cfg, out, n=3)
    assert len(loads) == 1
    header = said[1].split("\n", 1)[0]
    assert said[1] == header + "\n" + "".join(f"\n> {q}\n{a}\n" for q, a in fresh)


@pytest.mark.parametrize(
    "extra, reusable",
    [
        ({}, True),
        ({"pissa_init": True}, False),  # the params in memory are the residual W - A B
        ({"quantization_bit": 4}, False),  # NF4 codes, inference loads bf16
        ({"finetuning_type": "full"}, False),  # no adapter: the trained weights are the model
    ],
)
def test_inference_base_only_when_memory_holds_the_checkpoint(tmp_path, extra, reusable):
    cfg = config_from_dict(
        dict(model_name_or_path="tiny", lora_rank=4, attention="xla", bf16=False)
        | extra
        | dict(output_dir=str(tmp_path))
    )
    model_path = io_model.resolve_model_path("tiny")
    parts = build_model_parts(cfg, model_path, io_model.load_tokenizer(model_path), log=print)
    base = inference_base(parts)
    assert (base is not None) == reusable
    if reusable:
        assert base.params is parts.model.params  # no copy
        assert base.attention == AttentionSpec()  # inference's own kernel choice
