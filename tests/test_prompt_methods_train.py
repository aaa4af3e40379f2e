"""`finetuning_type: prompt_tuning | prefix_tuning` end to end: CLI training lowers the loss, the
run's adapter is PEFT's format (`PeftModel.from_pretrained` gives our logits), a PEFT-made
adapter continues training, merged export is refused, and config mistakes are named.

The model-level parity (virtual tokens in the decoder vs PEFT, both ways) is in
tests/test_prompt_prefix_peft.py; here the trainer's split, step, export and CLI are checked.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora.cli.app import main
from jaxlora.config import config_from_dict
from jaxlora.errors import UserError
from jaxlora.io.model import resolve_model_path
from jaxlora.models import prompt as vt
from jaxlora.train.setup import build_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = np.random.default_rng(3).integers(5, 300, size=(2, 12))


def _cfg(model_dir, out, **kw):
    base = dict(
        model_name_or_path=str(model_dir),
        dataset="demo:identity_sft",
        cutoff_len=64,
        max_samples=16,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        bf16=False,
        output_dir=str(out),
    )
    base.update(kw)
    return config_from_dict(base)


def _peft_logits(model_dir, adapter_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(IDS)).logits.numpy()
    return out[:, -IDS.shape[1] :]  # PEFT prompt tuning also returns the virtual positions


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, extra",
    [
        # Prompt tuning trains ~100x fewer numbers and wants a much larger learning rate.
        (
            "prompt_tuning",
            "prompt_tuning_init: text\nprompt_tuning_init_text: Please answer\n"
            "learning_rate: 0.3\n",
        ),
        (
            "prefix_tuning",
            "prefix_projection: true\nencoder_hidden_size: 32\nlearning_rate: 1.0e-2\n",
        ),
    ],
)
def test_cli_trains_and_peft_loads_the_adapter(tmp_path, capsys, method, extra):
    # The built-in demo model: trained-like weight scales, so a few virtual tokens can move its
    # (not near-uniform) predictions; a real HF checkpoint directory that transformers loads.
    tiny_model_dir = resolve_model_path("tiny")
    out = tmp_path / "run"
    yaml = tmp_path / "run.yaml"
    yaml.write_text(
        f"model_name_or_path: {tiny_model_dir}\nstage: sft\ndo_train: true\n"
        f"finetuning_type: {method}\nnum_virtual_tokens: 6\n{extra}"
        "dataset: demo:identity_sft\ncutoff_len: 64\nmax_samples: 16\n"
        f"output_dir: {out}\nlogging_steps: 1\nper_device_train_batch_size: 8\n"
        "max_steps: 6\nbf16: false\nreport_to: none\n"
    )
    assert main(["train", str(yaml), "--no-progress"]) == 0
    losses = [
        json.loads(x)["train/loss"]
        for x in (out / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in x
    ]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    raw = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert raw["peft_type"] == method.upper() and raw["num_virtual_tokens"] == 6

    # PEFT loads the saved adapter and gives our logits (fp32); the adapter changes the model.
    model = jaxlora.load_model(tiny_model_dir, dtype="float32")
    ad = jaxlora.load_adapter(out / "adapter")
    ours = np.asarray(model.logits(IDS, ad))
    np.testing.assert_allclose(ours, _peft_logits(tiny_model_dir, out / "adapter"), atol=1e-4)
    assert np.abs(ours - np.asarray(model.logits(IDS))).max() > 1e-2

    # A merged checkpoint cannot hold virtual tokens: refused in one line, nothing written.
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(tmp_path / "merged"), "--merged"]) == 2
    err = capsys.readouterr().err
    assert "cannot be merged" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()
    # The plain export is the same PEFT adapter.
    assert main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    again = jaxlora.load_adapter(tmp_path / "exp")
    np.testing.assert_allclose(np.asarray(model.logits(IDS, again)), ours, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_continues_a_peft_made_adapter(tiny_model_dir, tmp_path, method):
    """PEFT writes the adapter; our run starts from exactly its tensor and trains it."""
    if method == "prompt_tuning":
        pcfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    else:
        pcfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pm = peft.get_peft_model(hf, pcfg)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "peft")
    run = build_run(
        _cfg(
            tiny_model_dir,
            tmp_path / "run",
            finetuning_type=method,
            num_virtual_tokens=9,
            adapter_name_or_path=str(tmp_path / "peft"),
        ),  # fmt: skip
        log=lambda s: None,
    )
    leaf = vt.PROMPT_KEY if method == "prompt_tuning" else vt.PREFIX_KEY
    start = jaxlora.load_adapter(tmp_path / "peft").params[leaf]
    state = run.steps.state
    np.testing.assert_array_equal(np.asarray(state["trainable"][leaf]), start)  # its n wins: 4
    batch = run.batches.batch(0)
    state, out0 = run.steps.train_step(state, run.parts.frozen, batch)
    state, out1 = run.steps.train_step(state, run.parts.frozen, batch)
    assert float(out1["loss_sum"]) < float(out0["loss_sum"])
    assert np.abs(np.asarray(jax.device_get(state["trainable"][leaf])) - start).max() > 0


def test_config_mistakes_are_named(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="`prefix_projection` is only read by `finetuning_type: "):
        _cfg(tiny_model_dir, tmp_path, prefix_projection=True)
    with pytest.raises(UserError, match="prompt_tuning_init: text` and `prompt_tuning_init_text"):
        _cfg(tiny_model_dir, tmp_path, finetuning_type="prompt_tuning", prompt_tuning_init="text")
    with pytest.raises(UserError, match="`num_virtual_tokens` must be >= 1"):
        _cfg(tiny_model_dir, tmp_path, finetuning_type="prefix_tuning", num_virtual_tokens=0)
    # A LoRA adapter is not a prefix to continue.
    lora_dir = tmp_path / "lora"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft.get_peft_model(hf, peft.LoraConfig(target_modules=["q_proj"])).save_pretrained(lora_dir)
    cfg = _cfg(tiny_model_dir, tmp_path / "r", finetuning_type="prefix_tuning",
               adapter_name_or_path=str(lora_dir))  # fmt: skip
    with pytest.raises(UserError, match="is a LoRA adapter; finetuning_type prefix_tuning"):
        build_run(cfg, log=lambda s: None)
