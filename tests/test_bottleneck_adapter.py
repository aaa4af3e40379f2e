"""`finetuning_type: adapter` (bottleneck adapters): a new adapter is exactly the base model,
the placement decides where they sit, files round-trip in the documented format, CLI training
lowers the loss, continues from a saved adapter, and merged export is refused."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxlora
from jaxlora.cli.app import main
from jaxlora.config import config_from_dict
from jaxlora.errors import UserError
from jaxlora.io.export import export_adapter
from jaxlora.io.model import resolve_model_path
from jaxlora.peft.bottleneck import BottleneckAdapter, BottleneckConfig, init_bottleneck
from jaxlora.train.setup import build_run

IDS = np.random.default_rng(5).integers(5, 300, size=(2, 10))


@pytest.fixture(scope="module")
def model():
    return jaxlora.load_model(resolve_model_path("tiny"), dtype="float32")


def _nonzero(tree, seed=0):
    leaves, td = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(td, new)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_new_adapter_is_the_base_and_placement_decides(model, placement):
    cfg = BottleneckConfig(size=8, non_linearity="relu", placement=placement)
    tree = init_bottleneck(jax.random.key(0), model.config, cfg)
    want = {"mlp"} if placement == "pfeiffer" else {"attn", "mlp"}
    assert {k.split("_")[0] for k in tree["layers"]} == want
    base = np.asarray(model.logits(IDS))
    np.testing.assert_array_equal(np.asarray(model.logits(IDS, BottleneckAdapter(tree, cfg))), base)
    moved = BottleneckAdapter(_nonzero(tree), cfg)
    assert np.abs(np.asarray(model.logits(IDS, moved)) - base).max() > 1e-3
    # Each placement is used: zeroing the attention adapters' up-projections changes Houlsby.
    if placement == "houlsby":
        only_mlp = dict(moved.params["layers"])
        only_mlp["attn_up"] = jnp.zeros_like(only_mlp["attn_up"])
        only_mlp["attn_up_b"] = jnp.zeros_like(only_mlp["attn_up_b"])
        out = model.logits(IDS, BottleneckAdapter({"layers": only_mlp}, cfg))
        assert np.abs(np.asarray(out) - np.asarray(model.logits(IDS, moved))).max() > 1e-4


def test_files_round_trip_in_the_documented_layout(model, tmp_path):
    cfg = BottleneckConfig(size=8, non_linearity="gelu", placement="houlsby")
    ad = BottleneckAdapter(_nonzero(init_bottleneck(jax.random.key(1), model.config, cfg)), cfg)
    export_adapter(ad, tmp_path / "a", base_model="tiny", model_config=model.config)
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["adapter_type"] == "jaxlora_bottleneck" and raw["placement"] == "houlsby"
    t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    n, d = model.config.num_hidden_layers, model.config.hidden_size
    assert len(t) == n * 2 * 4
    assert t["layers.0.attn_adapter.down.weight"].shape == (8, d)  # torch Linear: [out, in]
    assert t[f"layers.{n - 1}.mlp_adapter.up.weight"].shape == (d, 8)
    np.testing.assert_array_equal(
        t["layers.1.mlp_adapter.down.weight"], np.asarray(ad.params["layers"]["mlp_down"][1]).T
    )
    back = jaxlora.load_adapter(tmp_path / "a")
    np.testing.assert_array_equal(
        np.asarray(model.logits(IDS, back)), np.asarray(model.logits(IDS, ad))
    )


def test_config_keys_belong_to_the_method(tmp_path):
    with pytest.raises(UserError, match="`adapter_size` is only read by `finetuning_type: adapter"):
        config_from_dict(dict(adapter_size=8, output_dir=str(tmp_path)))
    with pytest.raises(UserError, match="`adapter_placement` must be one of houlsby, pfeiffer"):
        config_from_dict(dict(finetuning_type="adapter", adapter_placement="middle"))


@pytest.mark.slow
def test_cli_trains_continues_and_refuses_merge(tmp_path, capsys):
    out = tmp_path / "run"
    yaml = tmp_path / "run.yaml"
    yaml.write_text(
        "model_name_or_path: tiny\nstage: sft\nfinetuning_type: adapter\nadapter_size: 16\n"
        "adapter_non_linearity: gelu\nadapter_placement: pfeiffer\ndataset: demo:identity_sft\n"
        f"cutoff_len: 64\nmax_samples: 16\noutput_dir: {out}\nlogging_steps: 1\n"
        "per_device_train_batch_size: 8\nlearning_rate: 1.0e-2\nmax_steps: 6\nbf16: false\n"
    )
    assert main(["train", str(yaml), "--no-progress"]) == 0
    losses = [
        json.loads(x)["train/loss"]
        for x in (out / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in x
    ]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, losses
    saved = jaxlora.load_adapter(out / "adapter")
    assert saved.config == BottleneckConfig(16, "gelu", "pfeiffer")

    said = capsys.readouterr().out.split("\nanswers of the trained adapter to ")
    assert len(said) == 2 and "time: " in said[0], said  # after the run's own time line
    head, *answers = said[1].split("\n\n> ")
    assert head.startswith("3 training prompts (greedy, <= 48 new tokens; "), head
    assert len(answers) == 3, said[1]
    assert main(["export", str(out), "--out", str(tmp_path / "merged"), "--merged"]) == 2
    err = capsys.readouterr().err
    assert "bottleneck adapter cannot be merged" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()

    # Continue from the saved adapter: the run starts from exactly its values (its size wins).
    cfg = config_from_dict(
        dict(model_name_or_path="tiny", finetuning_type="adapter", adapter_size=4,
             adapter_name_or_path=str(out / "adapter"), dataset="demo:identity_sft",
             cutoff_len=64, max_samples=8, bf16=False, output_dir=str(tmp_path / "r2"))
    )  # fmt: skip
    run = build_run(cfg, log=lambda s: None)
    start = run.steps.state["trainable"]["layers"]
    for k, v in saved.params["layers"].items():
        np.testing.assert_array_equal(np.asarray(start[k]), v)
