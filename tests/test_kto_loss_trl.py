"""jaxlora's KTO loss, KL reference point and metrics against TRL's `KTOTrainer._compute_loss`.

As in tests/test_dpo_loss_trl.py, TRL's own method runs on a bare `object.__new__(KTOTrainer)`
with `precompute_ref_logps=True` (reference log-probs, matched and mismatched, come from the
batch) and a stand-in model whose per-token log-probs put each row's summed log-prob in one
column. The stand-in tells the matched rows from the mismatched (KL) rows by their width, so TRL
computes its KL estimate from our numbers exactly as it does from a model's.
"""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import losses as L
from jaxlora.errors import UserError

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from trl_kto import bare_kto_trainer  # noqa: E402

pytestmark = pytest.mark.torch

T_MAIN, T_KL = 6, 5  # row widths: the stand-in model tells the two forwards apart by width


class _StandIn:
    training = True

    def __init__(self, main, kl):
        self.rows = {T_MAIN: main, T_KL: kl}

    def __call__(self, input_ids, **kwargs):
        sums = self.rows[input_ids.shape[1]]
        log_probs = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
        log_probs[:, 0] = torch.tensor(sums)
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)


def _trl_kto(beta, wd, wu, pol, ref, pol_kl, ref_kl, labels):
    n = len(pol)
    trainer = bare_kto_trainer(
        _StandIn(pol, pol_kl),
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
        precompute_ref_logps=True,
    )
    cmask = torch.zeros(n, T_MAIN, dtype=torch.long)
    cmask[:, 2:] = 1
    kl_cmask = torch.zeros(n, T_KL, dtype=torch.long)
    kl_cmask[:, 2:] = 1
    inputs = {
        "input_ids": torch.zeros(n, T_MAIN, dtype=torch.long),
        "attention_mask": torch.ones(n, T_MAIN, dtype=torch.long),
        "completion_mask": cmask,
        "KL_input_ids": torch.zeros(n, T_KL, dtype=torch.long),
        "KL_attention_mask": torch.ones(n, T_KL, dtype=torch.long),
        "KL_completion_mask": kl_cmask,
        "label": torch.tensor(labels),
        "ref_logps": torch.tensor(ref),
        "ref_KL_logps": torch.tensor(ref_kl),
    }
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _batch(seed, n=10, kl_shift=0.0):
    rng = np.random.default_rng(seed)
    pol, ref, pol_kl, ref_kl = (-rng.uniform(5.0, 60.0, n).astype(np.float32) for _ in range(4))
    pol_kl = (pol_kl + np.float32(kl_shift)).astype(np.float32)
    labels = rng.integers(0, 2, n).astype(bool)
    labels[:2] = [True, False]
    return pol, ref, pol_kl, ref_kl, labels


def _ours(beta, wd, wu, pol, ref, pol_kl, ref_kl, labels):
    kl = L.kto_kl(jnp.asarray(pol_kl), jnp.asarray(ref_kl))
    losses, rewards = L.kto_loss(
        jnp.asarray(pol),
        jnp.asarray(ref),
        jnp.asarray(labels),
        kl,
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
    )
    return kl, losses, rewards


@pytest.mark.parametrize(
    "beta,wd,wu,kl_shift",
    [(0.1, 1.0, 1.0, 30.0), (0.5, 1.0, 1.0, 30.0), (0.1, 1.33, 0.75, 30.0), (0.1, 1.0, 1.0, -60.0)],
)
def test_kto_loss_kl_and_metrics_match_trl(beta, wd, wu, kl_shift):
    pol, ref, pol_kl, ref_kl, labels = _batch(1, kl_shift=kl_shift)
    kl, losses, rewards = _ours(beta, wd, wu, pol, ref, pol_kl, ref_kl, labels)
    trl_loss, trl_metrics = _trl_kto(beta, wd, wu, pol, ref, pol_kl, ref_kl, labels)
    if kl_shift < 0:
        assert float(kl) == 0.0  # the clamp at 0 is exercised
    else:
        assert float(kl) > 0.0
    np.testing.assert_allclose(float(losses.mean()), trl_loss, rtol=1e-6, atol=1e-7)
    ours = L.kto_metrics(rewards, jnp.asarray(pol), jnp.asarray(labels), kl)
    for key, value in ours.items():
        np.testing.assert_allclose(float(value), trl_metrics[key], rtol=1e-6, atol=1e-5)

    # Per example: a one-row TRL batch whose single KL row has the same mean log-ratio.
    z = float(kl)
    for i in range(len(pol)):
        one = [np.asarray([x[i]], np.float32) for x in (pol, ref)]
        kl_pol, kl_ref = np.asarray([z - 7.0], np.float32), np.asarray([-7.0], np.float32)
        trl_i, _ = _trl_kto(beta, wd, wu, *one, kl_pol, kl_ref, [bool(labels[i])])
        np.testing.assert_allclose(float(losses[i]), trl_i, rtol=1e-5, atol=1e-6)


def test_kto_one_sided_batch_and_padding_mask():
    pol, ref, pol_kl, ref_kl, _ = _batch(2, kl_shift=20.0)
    labels = np.ones(len(pol), bool)
    kl, losses, rewards = _ours(0.1, 1.0, 1.0, pol, ref, pol_kl, ref_kl, labels)
    trl_loss, trl_metrics = _trl_kto(0.1, 1.0, 1.0, pol, ref, pol_kl, ref_kl, labels)
    np.testing.assert_allclose(float(losses.mean()), trl_loss, rtol=1e-6)
    ours = L.kto_metrics(rewards, jnp.asarray(pol), jnp.asarray(labels), kl)
    np.testing.assert_allclose(float(ours["rewards/chosen"]), trl_metrics["rewards/chosen"], 1e-6)
    assert "rewards/rejected" not in trl_metrics and float(ours["rewards/rejected"]) == 0.0
    # Padding rows (mask 0) change neither the KL estimate nor the metrics.
    pad = np.float32(-1e4)
    mask = jnp.asarray([1.0] * len(pol) + [0.0, 0.0])
    kl_pad = L.kto_kl(
        jnp.asarray(np.r_[pol_kl, pad, pad]), jnp.asarray(np.r_[ref_kl, 0.0, 0.0]), mask
    )
    np.testing.assert_allclose(float(kl_pad), float(kl), rtol=1e-6)


def test_kto_rejects_bad_settings():
    z = jnp.zeros(2)
    with pytest.raises(UserError, match="beta"):
        L.kto_loss(z, z, z > 0, 0.0, beta=0.0)
    with pytest.raises(UserError, match="kto_rejected_weight"):
        L.kto_loss(z, z, z > 0, 0.0, undesirable_weight=-1.0)
