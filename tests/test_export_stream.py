"""`export_merged` streams: base tensors are read one at a time, merged on the host and written
shard by shard. The result equals the in-memory merge (`peft.lora.merge`) for LoRA and DoRA, and
is split into HF-named shards with an index when it exceeds `max_shard_bytes`."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora.io.export import export_merged
from jaxlora.peft.lora import Adapter, LoraConfig, init_lora, merge


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_streamed_merge_equals_in_memory_merge(tiny_model_dir, tmp_path, dora):
    model = jaxlora.load_model(tiny_model_dir, dtype="float32")
    cfg = LoraConfig(rank=4, alpha=8, targets=("q_proj", "down_proj"), use_dora=dora)
    params = init_lora(jax.random.key(0), model.params, cfg)
    # Non-zero B (and magnitudes off their init) so the merge changes every targeted kernel.
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: (
            x
            + (0.1 if "magnitude" in jax.tree_util.keystr(kp) else 0.05)
            * jax.random.normal(jax.random.key(2), x.shape)
        ),
        params,
    )
    ad = Adapter(params, cfg)
    out = export_merged(tiny_model_dir, tmp_path / "m", adapter=ad, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == files  # no temporary shards left
    got = jaxlora.load_model(out, dtype="float32").params
    want = merge(model.params, ad)
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-6),
        got,
        want,
    )
    moved = got["layers"]["self_attn"]["q_proj"]["kernel"] - np.asarray(
        model.params["layers"]["self_attn"]["q_proj"]["kernel"]
    )
    assert float(np.abs(moved).max()) > 1e-3


@pytest.mark.slow  # ~90 s on the loaded 2-core box (export + GGUF read-back)
def test_gguf_export_streams_from_disk_without_loading_the_model(
    tiny_model_dir, tmp_path, monkeypatch
):
    """`export_gguf` of base + adapter never builds the model (no `hf.load_params`, nothing on a
    device): the merged tensors are read, merged and spooled one at a time, and the file holds
    the in-memory merge (f16-rounded)."""
    from jaxlora.io import hf
    from jaxlora.io.export import export_gguf

    model = jaxlora.load_model(tiny_model_dir, dtype="float32")
    cfg = LoraConfig(rank=4, alpha=8, targets=("q_proj", "down_proj"), use_dora=True)
    params = init_lora(jax.random.key(0), model.params, cfg)
    params = jax.tree_util.tree_map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), params
    )
    ad = Adapter(params, cfg)

    def refuse(*a, **kw):
        raise AssertionError("export_gguf loaded the whole model")

    monkeypatch.setattr(hf, "load_params", refuse)
    out = export_gguf(tiny_model_dir, tmp_path / "g", adapter=ad, tokenizer=model.tokenizer)
    monkeypatch.undo()
    got = jaxlora.load_model(out / "model.gguf", dtype="float32").params
    want = merge(model.params, ad)
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-3, atol=1e-4),
        got,
        want,
    )


@pytest.mark.slow
def test_gguf_of_a_finished_full_run_streams_its_model_dir(tiny_model_dir, tmp_path, monkeypatch):
    """`jaxlora export RUN --gguf` of a finished full fine-tuning run reads RUN/model tensor by
    tensor: the base is never rebuilt nor the checkpoint restored onto a device."""
    import shutil

    from jaxlora.train import methods
    from jaxlora.train.outputs import export_from_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        f"model_name_or_path: {tiny_model_dir}\nfinetuning_type: full\ndataset: demo:identity\n"
    )
    shutil.copytree(tiny_model_dir, run / "model")

    def refuse(*a, **kw):
        raise AssertionError("rebuilt the base on a device")

    monkeypatch.setattr(methods, "rebuild_split", refuse)
    out = export_from_run(run, tmp_path / "g", gguf_type="f16")
    monkeypatch.undo()
    got = jaxlora.load_model(out / "model.gguf", dtype="float32").params
    want = jaxlora.load_model(tiny_model_dir, dtype="float32").params
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-3, atol=1e-4),
        got,
        want,
    )
