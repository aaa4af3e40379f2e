"""`jaxlora bench` (jaxlora/bench.py): builds the training step for a config and prints one
parseable JSON line last. Tiny random shapes, 2 steps, so the test stays fast."""

from __future__ import annotations

import json

import pytest

from jaxlora.bench import measure as bench
from jaxlora.config import config_from_dict
from jaxlora.errors import UserError

SMALL = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def _config(tmp_path, **overrides):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL))
    raw = {
        "model_name_or_path": f"random:{path}",
        "finetuning_type": "lora",
        "lora_rank": 4,
        "lora_target": "all",
        "cutoff_len": 16,
        "per_device_train_batch_size": 2,
        "max_grad_norm": 0,
        **overrides,
    }
    return config_from_dict(raw)


def _run(cfg, capsys) -> dict:
    rc = bench.run_bench_cli(cfg, steps=2, warmup=1, matmul_sizes=(64,))
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])  # the LAST line is the JSON
    assert "tokens/s" in "\n".join(lines[:-1])  # human table before it
    return result


@pytest.mark.slow
def test_bench_prints_json_with_all_keys(tmp_path, capsys):
    r = _run(_config(tmp_path), capsys)
    for key in bench.JSON_KEYS:
        assert key in r, key
    assert r["tokens_per_step"] == 2 * 16  # rows x cutoff_len on one device
    assert r["step_s"] > 0 and r["compile_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(32 / r["step_s"])
    assert r["peak_mem_bytes"] > 0
    assert r["mem_source"] in ("device_peak", "compiled", "max_rss")
    assert r["flop_formula"] == "4N + 3A_f + 6P_r"
    # N = 2 x (q 32x32 + k,v 2 x 32x16 + o 32x32 + mlp 3 x 32x64) + head 32 x 128
    n = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64) + 32 * 128
    assert r["n_matmul_params"] == n
    assert r["lora_params"] == 2 * 4 * ((32 + 32) * 2 + (32 + 16) * 2 + 2 * (32 + 64) + (64 + 32))
    assert r["flops_per_token"] == pytest.approx(
        4 * n + 3 * (2 * 16 * 32 * 2) + 6 * r["lora_params"]
    )
    assert r["device"].endswith("cpu") and r["peak_source"] == "measured"
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / r["peak_flops"])
    assert r["final_loss"] == pytest.approx(4.85, abs=0.5)  # ~ln(128) on random weights


def test_full_finetuning_uses_full_formula(tmp_path):
    cfg = _config(tmp_path, finetuning_type="full")
    model = bench.random_model(SMALL, bench.jnp.float32)
    count = bench.flop_count(cfg, model, ())
    assert count.formula == "6N + 3A_f" and count.lora == 0


@pytest.mark.slow
def test_bench_full_finetuning_runs(tmp_path, capsys):
    r = _run(_config(tmp_path, finetuning_type="full"), capsys)
    assert r["flop_formula"] == "6N + 3A_f" and r["mode"] == "full"


def test_random_shape_specs(tmp_path):
    assert bench.random_shape_config("random:llama3-8b")["hidden_size"] == 4096
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    assert bench.random_shape_config(f"random:{tmp_path}")["vocab_size"] == 128
    with pytest.raises(UserError, match="random:<shape>"):
        bench.random_shape_config("random:no-such-shape")


def test_bench_rejects_dpo_and_bad_steps(tmp_path):
    with pytest.raises(UserError, match="DPO"):
        bench.run_bench(_config(tmp_path, stage="dpo"), steps=1)
    with pytest.raises(UserError, match="steps"):
        bench.run_bench(_config(tmp_path), steps=0)


@pytest.mark.parametrize("packing", [True, False])
def test_bench_tells_the_step_whether_rows_are_unpacked(tmp_path, monkeypatch, packing):
    """`packing: false` builds the step as the trainer does for unpacked rows (right_padded):
    on a GPU `attention: auto` then gives cuDNN the padding as sequence lengths."""
    from jaxlora.train import step_setup

    seen = []
    real = step_setup.build_steps

    def spy(*args, **kw):
        seen.append(args[5] if len(args) > 5 else kw.get("right_padded", False))
        return real(*args, **kw)

    monkeypatch.setattr(step_setup, "build_steps", spy)
    bench.build_bench_run(_config(tmp_path, packing=packing))
    assert seen == [not packing]
