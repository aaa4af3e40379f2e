"""DPO stage (`jaxlora.train.dpo`): reference model, pair log-probs, losses, cache, accumulation,
e2e.

Independent references: the separately loaded model (`jaxlora.load_model`, `Model.logits`) and
numpy formulas; the DPO step itself is `build_run`'s (the code `jaxlora train` runs).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.config import config_from_dict, load_config
from jaxlora.data.batching import Batcher, collate, concat_preference_batch
from jaxlora.data.packing import pack_lengths, pack_preferences, preference_units
from jaxlora.losses import logprobs_from_logits, sequence_logps
from jaxlora.models.llama import head_weight
from jaxlora.peft.lora import Adapter, LoraConfig, init_lora
from jaxlora.train.dpo import PairLogps
from jaxlora.train.setup import Run, build_run

REPO = Path(__file__).resolve().parents[1]
LF_DPO = REPO.parent / "shared" / "data" / "llamafactory" / "dpo_en_demo.json"


def _cfg(model_dir, out, **kw):
    base = dict(
        model_name_or_path=str(model_dir),
        stage="dpo",
        dataset="demo:dpo_demo",
        cutoff_len=128,
        max_samples=24,
        val_size=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        warmup_steps=0,
        bf16=False,
        output_dir=str(out),
    )
    base.update(kw)
    return config_from_dict(base)


def _setup(model_dir, out, **kw) -> Run:
    return build_run(_cfg(model_dir, out, **kw), log=lambda s: None)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """Cached reference log-probs go to a per-test directory, never ~/.cache."""
    monkeypatch.setenv("JAXLORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    return _setup(tiny_model_dir, tmp_path_factory.mktemp("dpo") / "run")


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return jaxlora.load_model(tiny_model_dir, dtype="float32")


def _np(x):
    return np.asarray(jax.device_get(x))


def _model_pair_logps(model, host_batch, adapter=None):
    """Summed completion log-probs and lengths per side from `Model.logits` (numpy [B] each)."""
    rows = concat_preference_batch({k: _np(v) for k, v in host_batch.items() if k != "loss_scale"})
    logits = model.logits(
        rows["input_ids"], adapter, positions=rows["positions"], segment_ids=rows["segment_ids"]
    )
    tok = _np(logprobs_from_logits(logits, jnp.asarray(rows["input_ids"])))  # [2B, T-1]
    w = rows["loss_mask"][:, 1:] * (rows["segment_ids"][:, 1:] > 0)
    sums, lens = (tok * w).sum(-1), w.sum(-1).astype(np.float64)
    b = len(sums) // 2
    return sums[:b], sums[b:], lens[:b], lens[b:]


def _ref_fn(run):
    return jax.jit(run.stage.reference_fn(run.parts.model.module(run.parts.adapter_spec), None))


def _perturbed(trainable, seed=0, scale=0.05):
    leaves, tree = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, new)


# ----------------------------------------------------------------------------- reference model


def test_reference_adapters_off_equals_separate_base_exactly(lora_run, base_model):
    run = lora_run
    assert set(run.parts.frozen) == {"base"}  # LoRA from zero: no second copy of anything
    batch = run.batches.batch(0)
    rc, rr = _ref_fn(run)(run.parts.frozen, batch)
    # The same computation on a separately loaded base model (no adapter spec at all).
    module = base_model.module()
    rows = concat_preference_batch({k: _np(v) for k, v in batch.items() if k != "loss_scale"})

    @jax.jit
    def base_logps(params, ids, mask, seg, pos):
        h = module.apply({"params": params}, ids, pos, seg, return_hidden=True)
        head, vocab_major = head_weight(params, base_model.config)
        return sequence_logps(h, head, ids, mask, seg, vocab_major=vocab_major)[0]

    want = _np(
        base_logps(
            base_model.params,
            *(rows[k] for k in ("input_ids", "loss_mask", "segment_ids", "positions")),
        )
    )
    b = len(want) // 2
    np.testing.assert_array_equal(_np(rc)[:, 0], want[:b])
    np.testing.assert_array_equal(_np(rr)[:, 0], want[b:])
    # ... and, through full logits, the public `Model.logits` path.
    pc, pr, _, _ = _model_pair_logps(base_model, batch)
    np.testing.assert_allclose(_np(rc)[:, 0], pc, rtol=1e-5)
    np.testing.assert_allclose(_np(rr)[:, 0], pr, rtol=1e-5)


def test_step0_loss_is_log2_and_rewards_zero(lora_run):
    run = lora_run
    batch = {k: v for k, v in run.batches.batch(0).items() if k != "loss_scale"}
    out = jax.device_get(run.steps.eval_step(run.steps.state["trainable"], run.parts.frozen, batch))
    n = out["pref/count"]
    assert n == run.cfg.train.per_device_train_batch_size
    np.testing.assert_allclose(out["loss_sum"] / out["tokens"], math.log(2), rtol=1e-6)
    for key in ("chosen", "rejected", "margins"):
        assert abs(out[f"pref/rewards/{key}"]) / n < 1e-5, key
    assert out["pref/logps/chosen"] < 0 and out["pref/logps/rejected"] < 0


def test_target_counts_are_pairs(lora_run):
    run = lora_run
    np.testing.assert_array_equal(run.batches.targets, np.ones(len(run.data.train)))
    packed = pack_preferences(run.data.train[:6], 256, run.data.pad_id)
    counts = run.stage.target_counts(packed)
    assert counts.sum() == 6 and counts.max() > 1


# ----------------------------------------------------------------------------- losses


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _expected(loss_type, beta, eps, ftx, gamma, pc, pr, rc, rr, lc, lr):
    """numpy formulas (TRL 1.x DPOTrainer / LLaMA-Factory ORPO / SimPO) per pair."""
    dc, dr = pc - rc, pr - rr
    d = dc - dr
    mc, mr = pc / lc, pr / lr
    nll = -mc
    if loss_type == "sigmoid":
        losses = -(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d)
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1 - beta * d)
    elif loss_type == "ipo":
        losses = (dc / lc - dr / lr - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        losses = (-(1 - eps) * _logsig(beta * d) + eps * _logsig(-beta * d)) / (1 - 2 * eps)
    elif loss_type == "orpo":
        log_odds = (mc - mr) - (np.log1p(-np.exp(mc)) - np.log1p(-np.exp(mr)))
        losses = nll - beta * _logsig(log_odds)
    else:  # simpo
        z = beta * (mc - mr) - gamma
        losses = -(1 - eps) * _logsig(z) - eps * _logsig(-z)
    if loss_type in ("orpo", "simpo"):
        cr, rwr = beta * mc, beta * mr
    else:
        cr, rwr = beta * dc, beta * dr
    return losses + ftx * nll, cr, rwr


def _pair_inputs(run, base_model, batch, trainable):
    adapter = Adapter(trainable, run.parts.lora_config)
    pc, pr, lc, lr = _model_pair_logps(base_model, batch, adapter)
    rc, rr, _, _ = _model_pair_logps(base_model, batch)
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("loss_type,eps,ftx", [("sigmoid", 0.2, 0.5), ("orpo", 0.0, 0.0)])
def test_step_loss_and_metrics_match_formulas(lora_run, base_model, loss_type, eps, ftx):
    """The jitted DPO loss (one [2B, T] forward + reference pass) against numpy formulas on
    log-probs from `Model.logits`: sums over pairs, loss_scale, every metric."""
    run = lora_run
    dpo = copy.copy(run.stage)
    dpo.loss_type, dpo.label_smoothing, dpo.ftx = loss_type, eps, ftx
    dpo.use_reference = loss_type != "orpo"
    trainable = _perturbed(run.steps.state["trainable"])
    batch = run.batches.batch(1)
    loss = jax.jit(dpo.loss_fn(run.parts.model.module(run.parts.adapter_spec), None))
    scaled, (loss_sum, n, metrics) = loss(trainable, run.parts.frozen, batch, jax.random.key(0))

    pc, pr, rc, rr, lc, lr = _pair_inputs(run, base_model, batch, trainable)
    beta = dpo.beta
    losses, cr, rwr = _expected(loss_type, beta, eps, ftx, dpo.simpo_gamma, pc, pr, rc, rr, lc, lr)
    assert float(n) == len(pc)
    np.testing.assert_allclose(float(loss_sum), losses.sum(), rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(float(scaled), losses.sum() * float(batch["loss_scale"]), rtol=2e-4)
    got = {k: float(v) for k, v in metrics.items()}
    np.testing.assert_allclose(got["pref/rewards/chosen"], cr.sum(), rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(got["pref/rewards/rejected"], rwr.sum(), rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(got["pref/rewards/margins"], (cr - rwr).sum(), rtol=2e-4, atol=1e-4)
    assert got["pref/rewards/accuracies"] == float((cr > rwr).sum())
    np.testing.assert_allclose(got["pref/logps/chosen"], pc.sum(), rtol=1e-5)
    np.testing.assert_allclose(got["pref/logps/rejected"], pr.sum(), rtol=1e-5)
    assert ("pref/nll_loss" in got) == (loss_type == "orpo" or ftx > 0)


@pytest.mark.parametrize(
    "loss_type,beta,eps,ftx",
    [
        ("sigmoid", 0.1, 0.0, 0.0),
        ("sigmoid", 0.1, 0.0, 0.3),
        ("hinge", 0.1, 0.0, 0.0),
        ("ipo", 0.1, 0.0, 0.0),
        ("robust", 0.2, 0.1, 0.0),
        ("orpo", 0.1, 0.0, 0.0),
        ("orpo", 0.2, 0.0, 0.5),
        ("simpo", 2.0, 0.0, 0.0),
        ("simpo", 2.0, 0.1, 0.0),
    ],
)
def test_pair_losses_every_type(lora_run, base_model, loss_type, beta, eps, ftx):
    """Loss selection, lengths (ipo/orpo/simpo), ORPO's NLL and pref_ftx on real log-probs."""
    run = lora_run
    dpo = copy.copy(run.stage)
    dpo.loss_type, dpo.beta, dpo.label_smoothing, dpo.ftx = loss_type, beta, eps, ftx
    pc, pr, rc, rr, lc, lr = _pair_inputs(
        run, base_model, run.batches.batch(1), _perturbed(run.steps.state["trainable"])
    )
    pol = PairLogps(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, lc, lr)), jnp.ones(len(pc)) > 0)
    losses, cr, rwr, _ = dpo._pair_losses(pol, jnp.asarray(rc), jnp.asarray(rr))
    want = _expected(loss_type, beta, eps, ftx, dpo.simpo_gamma, pc, pr, rc, rr, lc, lr)
    for got, exp in zip((losses, cr, rwr), want, strict=True):
        np.testing.assert_allclose(_np(got), exp, rtol=1e-4, atol=1e-6)


def test_dummy_rows_are_excluded(lora_run):
    run = lora_run
    s = run.data.train
    loss = jax.jit(run.stage.loss_fn(run.parts.model.module(run.parts.adapter_spec), None))
    trainable = _perturbed(run.steps.state["trainable"], seed=1)

    def run_on(rows):
        host = collate(rows, pad_id=run.data.pad_id, length=128)
        _, (loss_sum, n, metrics) = loss(
            trainable, run.parts.frozen, run.parts.put_batch(host), jax.random.key(0)
        )
        return float(loss_sum), float(n), {k: float(v) for k, v in metrics.items()}

    with_dummies = run_on([s[0], None, s[1], None])
    plain = run_on([s[0], s[1]])
    assert with_dummies[1] == plain[1] == 2.0
    np.testing.assert_allclose(with_dummies[0], plain[0], rtol=1e-5)
    for k, v in plain[2].items():
        np.testing.assert_allclose(with_dummies[2][k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_packed_rows_give_the_same_pair_logps(lora_run):
    """Packing-aware: segments 2k-1/2k of a packed row are pair k; per-pair log-probs equal the
    unpacked [2B, T] forward's."""
    run = lora_run
    pairs = run.data.train[:6]
    packed = pack_preferences(pairs, 256, run.data.pad_id)
    dpo = copy.copy(run.stage)
    dpo.packed, dpo.pairs_per_row = True, int(max(dpo.target_counts(packed)))
    trainable = _perturbed(run.steps.state["trainable"], seed=2)
    module = run.parts.model.module(run.parts.adapter_spec)
    variables = {"params": run.parts.frozen["base"], "lora": trainable}
    got = jax.jit(lambda v, b: dpo._forward(module, v, b, None))(
        variables, run.parts.put_batch(collate(packed, pad_id=0, length=256))
    )
    want = jax.jit(lambda v, b: run.stage._forward(module, v, b, None))(
        variables, run.parts.put_batch(collate(pairs, pad_id=0, length=128))
    )
    # Slot k of packed row r holds pair rows[r][k] (the packer's deterministic assignment).
    rows = pack_lengths([len(preference_units(e)) for e in pairs], 256)
    present = _np(got.present)
    assert present.sum() == 6
    for r, members in enumerate(rows):
        assert present[r, : len(members)].all() and not present[r, len(members) :].any()
        for k, i in enumerate(members):
            for field in ("chosen", "rejected", "chosen_len", "rejected_len"):
                np.testing.assert_allclose(
                    _np(getattr(got, field))[r, k], _np(getattr(want, field))[i, 0], rtol=1e-5
                )


def test_add_to_batch_slices_per_host(lora_run):
    run = lora_run
    dpo = copy.copy(run.stage)
    n = len(run.data.train)
    table = np.arange(n * 2, dtype=np.float32).reshape(n, 1, 2)
    dpo._tables = {"train": table}
    for proc in (0, 1):
        b = Batcher(
            run.data.train, batch_size=6, pad_id=0, seed=3, process_index=proc, process_count=2
        )
        step = len(b) - 1  # last batch: has dummy rows (16 train samples / 6)
        out = dpo.add_to_batch(b.get(0, step), b, (0, step))
        idx = b.global_indices(0, step)[proc * 3 : proc * 3 + 3]
        want = np.where(idx >= 0, table[np.maximum(idx, 0), 0, 0], 0.0)
        np.testing.assert_array_equal(out["ref_chosen_logps"][:, 0], want)
        assert out["ref_rejected_logps"].shape == (3, 1)
    assert run.stage.add_to_batch({"x": 1}, b, (0, 0)) == {"x": 1}  # not cached: unchanged


# ----------------------------------------------------------------------------- start points


@pytest.mark.slow
def test_nonzero_initial_adapter_reference_is_initial_model(tiny_model_dir, base_model, tmp_path):
    from jaxlora.io.peft import save_peft_adapter

    lcfg = LoraConfig(rank=8, alpha=16.0)
    start = Adapter(_perturbed(init_lora(jax.random.key(4), base_model.params, lcfg), 4, 0.2), lcfg)
    save_peft_adapter(start, tmp_path / "start")
    run = _setup(tiny_model_dir, tmp_path / "run", adapter_name_or_path=str(tmp_path / "start"))
    assert set(run.parts.frozen) == {"base", "ref_trainable"}
    batch = run.batches.batch(0)
    ref = _ref_fn(run)
    rc, rr = ref(run.parts.frozen, batch)
    pc, pr, _, _ = _model_pair_logps(base_model, batch, jaxlora.load_adapter(tmp_path / "start"))
    np.testing.assert_allclose(_np(rc)[:, 0], pc, rtol=1e-5)
    np.testing.assert_allclose(_np(rr)[:, 0], pr, rtol=1e-5)
    bc, _, _, _ = _model_pair_logps(base_model, batch)
    assert np.abs(_np(rc)[:, 0] - bc).max() > 1e-2  # not the base's
    # Step 0: policy == reference; training the policy leaves the reference where it was.
    state, out = run.steps.train_step(run.steps.state, run.parts.frozen, batch)
    out = jax.device_get(out)
    np.testing.assert_allclose(out["loss_sum"] / out["tokens"], math.log(2), rtol=1e-6)
    state, out = run.steps.train_step(state, run.parts.frozen, batch)
    np.testing.assert_array_equal(_np(ref(run.parts.frozen, batch)[0]), _np(rc))
    assert abs(float(jax.device_get(out)["pref/rewards/margins"])) > 1e-6
    # Cached: the precomputed reference is the initial model too (same data order, same rows).
    cached = _setup(
        tiny_model_dir,
        tmp_path / "cached",
        adapter_name_or_path=str(tmp_path / "start"),
        precompute_ref_logps=True,
    )
    assert set(cached.parts.frozen) == {"base"}
    np.testing.assert_allclose(
        _np(cached.batches.batch(0)["ref_chosen_logps"])[:, 0], pc, rtol=1e-5
    )


@pytest.mark.slow
def test_full_finetuning_reference_is_a_frozen_copy(tiny_model_dir, tmp_path):
    run = _setup(tiny_model_dir, tmp_path / "run", finetuning_type="full", learning_rate=1e-4)
    assert set(run.parts.frozen) == {"base", "ref_trainable"}
    batch = run.batches.batch(0)
    ref = _ref_fn(run)
    rc0, _ = ref(run.parts.frozen, batch)
    state, out = run.steps.train_step(run.steps.state, run.parts.frozen, batch)
    out = jax.device_get(out)
    np.testing.assert_allclose(out["loss_sum"] / out["tokens"], math.log(2), rtol=1e-6)
    assert abs(out["pref/rewards/margins"]) < 1e-5
    state, out = run.steps.train_step(state, run.parts.frozen, batch)
    np.testing.assert_array_equal(_np(ref(run.parts.frozen, batch)[0]), _np(rc0))  # not donated
    assert abs(float(jax.device_get(out)["pref/rewards/margins"])) > 1e-6
    # Cached: computed from the initial params before any step, and no copy is kept.
    cached = _setup(
        tiny_model_dir, tmp_path / "cached", finetuning_type="full", precompute_ref_logps=True
    )
    assert cached.parts.frozen == {"base": {}}
    np.testing.assert_allclose(
        _np(cached.batches.batch(0)["ref_chosen_logps"]), _np(rc0), rtol=1e-5
    )


# ----------------------------------------------------------------------------- cache


def _steps(run, n=2):
    state, outs = run.steps.state, []
    for m in range(n):
        state, out = run.steps.train_step(state, run.parts.frozen, run.batches.batch(m))
        outs.append({k: float(v) for k, v in jax.device_get(out).items()})
    return outs, run.evaluate(state)


@pytest.mark.slow
def test_cached_reference_logps(tiny_model_dir, tmp_path):
    live = _setup(tiny_model_dir, tmp_path / "live")
    live_out = _steps(live)

    first = _setup(tiny_model_dir, tmp_path / "a", precompute_ref_logps=True)
    assert not first.stage.cache_hit and first.stage.cache_path.is_file()
    assert first.stage.reference_traces == 1  # the precompute pass only
    assert set(first.parts.frozen) == {"base"}
    first_out = _steps(first)
    assert first.stage.reference_traces == 1  # the train/eval steps traced no reference forward

    second = _setup(tiny_model_dir, tmp_path / "b", precompute_ref_logps=True)
    assert second.stage.cache_hit and second.stage.cache_path == first.stage.cache_path
    assert second.stage.reference_traces == 0
    assert _steps(second) == first_out  # identical, bit for bit
    assert second.stage.reference_traces == 0
    # Cached vs live reference: the same numbers up to batch-shape rounding.
    for a, b in zip(first_out[0], live_out[0], strict=True):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)

    # Changing the data or the template invalidates the cache.
    other_data = _setup(tiny_model_dir, tmp_path / "c", precompute_ref_logps=True, max_samples=20)
    assert not other_data.stage.cache_hit and other_data.stage.cache_path != first.stage.cache_path
    other_tmpl = _setup(
        tiny_model_dir, tmp_path / "d", precompute_ref_logps=True, system="Answer briefly."
    )
    assert not other_tmpl.stage.cache_hit
    assert other_tmpl.stage.cache_path not in (first.stage.cache_path, other_data.stage.cache_path)


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.slow
def test_gradient_accumulation_equals_big_batch(tiny_model_dir, tmp_path):
    big = _setup(tiny_model_dir, tmp_path / "big", per_device_train_batch_size=8, max_steps=2)
    acc = _setup(
        tiny_model_dir,
        tmp_path / "acc",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
    )
    s_big, s_acc = big.steps.state, acc.steps.state
    for step in range(2):
        s_big, out = big.steps.train_step(s_big, big.parts.frozen, big.batches.batch(step))
        want = jax.device_get(out)
        got = []
        for m in (2 * step, 2 * step + 1):
            s_acc, o = acc.steps.train_step(s_acc, acc.parts.frozen, acc.batches.batch(m))
            got.append(jax.device_get(o))
        for k in want:
            if k.startswith("pref/") or k in ("loss_sum", "tokens"):
                total = sum(float(g[k]) for g in got)
                np.testing.assert_allclose(total, float(want[k]), rtol=1e-5, atol=1e-5, err_msg=k)
    for a, b in zip(
        jax.tree_util.tree_leaves(s_big["trainable"]),
        jax.tree_util.tree_leaves(s_acc["trainable"]),
        strict=True,
    ):
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- end to end


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_llamafactory_dpo_demo_trains_unchanged(tiny_model_dir, tmp_path):
    if not LF_DPO.is_file():
        pytest.skip(f"{LF_DPO} not present")
    from jaxlora.train.loop import train

    cfg = _cfg(
        tiny_model_dir,
        tmp_path / "run",
        dataset=str(LF_DPO),
        max_samples=12,
        val_size=0,
        cutoff_len=256,
        max_steps=2,
        logging_steps=1,
    )
    res = train(cfg, progress=False, log=lambda s: None)
    assert res.final_step == 2
    trains = [r for r in _records(tmp_path / "run") if "train/loss" in r]
    assert len(trains) == 2 and all(np.isfinite(r["train/loss"]) for r in trains)
    np.testing.assert_allclose(trains[0]["train/loss"], math.log(2), rtol=1e-5)
    assert {"train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen"} <= set(
        trains[0]
    )


@pytest.mark.slow
def test_quickstart_dpo_rewards_rise(tmp_path):
    from jaxlora.train.loop import train

    cfg = load_config(
        REPO / "configs" / "quickstart-dpo.yaml",
        # 12 steps (cosine over 12), evals at 4/8/12: measured margins 0.38 -> 0.96, eval
        # accuracy 0.73 -> 1.0, train loss 0.38; a bf16 step at the suite's -O0 costs ~1.1 s here.
        [f"output_dir={tmp_path / 'run'}", "max_steps=12", "eval_steps=4", "save_steps=1000"],
    )
    train(cfg, progress=False, log=lambda s: None)
    recs = _records(tmp_path / "run")
    evals = [r for r in recs if "eval/rewards/accuracies" in r]
    trains = [r for r in recs if "train/rewards/margins" in r]
    assert len(evals) == 3
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"] + 0.05, evals
    assert evals[-1]["eval/rewards/accuracies"] >= 0.8, evals
    assert trains[-1]["train/rewards/accuracies"] > trains[0]["train/rewards/accuracies"], trains
    assert trains[-1]["train/loss"] < math.log(2) - 0.05


@pytest.mark.slow
def test_packed_run_equals_unpacked_run(tiny_model_dir, tmp_path):
    """All 8 pairs in one optimiser step, packed (with cached reference) or not: same losses,
    rewards and update (the mean over pairs does not depend on how rows are laid out)."""
    kw = dict(max_samples=8, val_size=0, per_device_train_batch_size=8)
    plain = _setup(tiny_model_dir, tmp_path / "plain", **kw)
    packed = _setup(
        tiny_model_dir, tmp_path / "packed", packing=True, precompute_ref_logps=True, **kw
    )
    assert packed.stage.packed and packed.stage.pairs_per_row > 1
    assert packed.batches.targets.sum() == 8 and len(packed.data.train) < 8
    outs = []
    for run in (plain, packed):
        state, got = run.steps.state, []
        for _ in range(2):
            state, out = run.steps.train_step(state, run.parts.frozen, run.batches.batch(0))
            got.append({k: float(v) for k, v in jax.device_get(out).items()})
        outs.append(got)
    for a, b in zip(*outs, strict=True):
        assert a["pref/count"] == b["pref/count"] == 8
        for k in a:
            if k == "pref/rewards/accuracies":
                # A count of `chosen > rejected`: after one small step some margins are ~1e-7,
                # so packed vs unpacked fp32 rounding may flip a few; the sums below are exact.
                continue
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
