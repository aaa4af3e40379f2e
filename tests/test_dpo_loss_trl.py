"""jaxlora's preference losses against TRL's own loss code (torch, CPU).

TRL 1.x computes the DPO loss inside `DPOTrainer._compute_loss(model, inputs, ...)`, a method that
runs the model. We call that very method on a bare `object.__new__(DPOTrainer)` carrying only the
attributes it reads, with `precompute_ref_logps=True` (reference log-probs come from the batch)
and a stand-in model whose `log_probs` put each sequence's summed log-prob in one column, so the
sums TRL takes are exactly our inputs. TRL returns the batch-mean loss, so per-pair losses are
compared by calling it one pair at a time. ORPO and SimPO use `ORPOTrainer.odds_ratio_loss` and
`CPOTrainer.cpo_loss` (trl.experimental) the same way.
"""

from __future__ import annotations

import collections
import types

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import losses as L

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

pytestmark = pytest.mark.torch

N = 12


def _random_pairs(seed: int = 0):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (-rng.uniform(5.0, 60.0, N).astype(np.float32) for _ in range(4))
    lc, lr = (rng.integers(1, 30, N) for _ in range(2))
    return pc, pr, rc, rr, lc, lr


class _StandInModel:
    """Returns precomputed per-token log-probs the way TRL's fused-LM-head forward does."""

    training = True

    def __init__(self, log_probs):
        self.log_probs = log_probs

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return types.SimpleNamespace(
            log_probs=self.log_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros_like(self.log_probs, dtype=torch.bool),
        )


def _trl_dpo(loss_type, beta, eps, pc, pr, rc, rr, lc, lr):
    """TRL's DPOTrainer._compute_loss on one batch -> (mean loss, TRL's logged metrics)."""
    from trl import DPOTrainer

    n = len(pc)
    t = int(max(max(lc), max(lr))) + 2
    # completion_mask: completions start at position 1, so TRL's unshifted count (IPO) = length.
    completion_mask = torch.zeros(2 * n, t, dtype=torch.long)
    for i, length in enumerate(list(lc) + list(lr)):
        completion_mask[i, 1 : 1 + int(length)] = 1
    log_probs = torch.zeros(2 * n, t - 1)
    log_probs[:, 0] = torch.tensor(np.concatenate([pc, pr]))  # row sum = summed log-prob

    trainer = object.__new__(DPOTrainer)
    model = _StandInModel(log_probs)
    attrs = dict(
        model=model,
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"),
            gather=lambda x: x,
            gather_for_metrics=lambda x: x,
            unwrap_model=lambda m: m,
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    for k, v in attrs.items():
        object.__setattr__(trainer, k, v)
    inputs = {
        "input_ids": torch.zeros(2 * n, t, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, t, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(rc),
        "ref_rejected_logps": torch.tensor(rr),
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), metrics


def _ours(loss_type, beta, eps, pc, pr, rc, rr, lc, lr):
    return L.dpo_loss(
        *(jnp.asarray(x) for x in (pc, pr, rc, rr)),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        chosen_lengths=jnp.asarray(lc),
        rejected_lengths=jnp.asarray(lr),
    )


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.5, 0.0),
        ("hinge", 0.1, 0.0),
        ("hinge", 0.05, 0.0),
        ("ipo", 0.1, 0.0),
        ("ipo", 0.5, 0.0),
        ("robust", 0.1, 0.0),
        ("robust", 0.2, 0.1),
        ("robust", 0.1, 0.3),
    ],
)
def test_dpo_loss_matches_trl_per_pair_and_batch(loss_type, beta, eps):
    pc, pr, rc, rr, lc, lr = _random_pairs(1)
    losses, cr, rrw = _ours(loss_type, beta, eps, pc, pr, rc, rr, lc, lr)
    for i in range(N):
        sl = slice(i, i + 1)
        trl_loss, _ = _trl_dpo(loss_type, beta, eps, pc[sl], pr[sl], rc[sl], rr[sl], lc[sl], lr[sl])
        np.testing.assert_allclose(float(losses[i]), trl_loss, rtol=1e-6, atol=1e-6)
    trl_mean, trl_metrics = _trl_dpo(loss_type, beta, eps, pc, pr, rc, rr, lc, lr)
    np.testing.assert_allclose(float(losses.mean()), trl_mean, rtol=1e-6, atol=1e-6)
    ours = L.preference_metrics(cr, rrw, jnp.asarray(pc), jnp.asarray(pr))
    for key, value in ours.items():
        np.testing.assert_allclose(float(value), trl_metrics[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_label_smoothing_matches_trl(eps):
    # TRL 1.x's `sigmoid` ignores label_smoothing; its cDPO expression survives in `aot`, which
    # sorts the batch's log-ratios before applying it. For a single pair the sort is the identity,
    # so `aot` on one pair is exactly cDPO: -(1-ε)·logσ(βΔ) - ε·logσ(-βΔ).
    pc, pr, rc, rr, lc, lr = _random_pairs(2)
    losses, _, _ = _ours("sigmoid", 0.1, eps, pc, pr, rc, rr, lc, lr)
    for i in range(N):
        sl = slice(i, i + 1)
        trl_loss, _ = _trl_dpo("aot", 0.1, eps, pc[sl], pr[sl], rc[sl], rr[sl], lc[sl], lr[sl])
        np.testing.assert_allclose(float(losses[i]), trl_loss, rtol=1e-6, atol=1e-6)


def test_trl_sigmoid_at_zero_margin_is_log2_like_ours():
    x = np.full(3, -17.0, np.float32)
    ones = np.ones(3, np.int64)
    trl_loss, metrics = _trl_dpo("sigmoid", 0.1, 0.0, x, x, x, x, ones, ones)
    losses, cr, rrw = _ours("sigmoid", 0.1, 0.0, x, x, x, x, ones, ones)
    np.testing.assert_allclose(trl_loss, np.log(2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(losses), np.log(2), rtol=1e-6)
    assert metrics["rewards/margins"] == 0.0 and float(jnp.abs(cr - rrw).max()) == 0.0


def _bare(cls, **attrs):
    obj = object.__new__(cls)
    obj.accelerator = types.SimpleNamespace(device=torch.device("cpu"))
    for k, v in attrs.items():
        object.__setattr__(obj, k, v)
    return obj


def test_orpo_matches_trl_odds_ratio_loss():
    orpo_mod = pytest.importorskip("trl.experimental.orpo")
    pc, pr, _, _, lc, lr = _random_pairs(3)
    # Push some per-token means close to 0 to exercise log1mexp's other branch.
    pc[:3] = -(lc[:3] * np.array([1e-3, 0.3, 0.69])).astype(np.float32)
    beta = 0.1
    trainer = _bare(orpo_mod.ORPOTrainer, beta=beta)
    # ORPOTrainer feeds odds_ratio_loss per-token AVERAGED log-probs (average_log_prob=True).
    avg_c = torch.tensor(pc) / torch.tensor(lc, dtype=torch.float32)
    avg_r = torch.tensor(pr) / torch.tensor(lr, dtype=torch.float32)
    trl_losses, trl_cr, trl_rr, _, _ = trainer.odds_ratio_loss(avg_c, avg_r)
    losses, cr, rrw = L.orpo_loss(*(jnp.asarray(x) for x in (pc, pr, lc, lr)), beta=beta)
    # TRL returns β·logσ(log_odds) and its loss is `nll - losses.mean()`; ours is the negation.
    np.testing.assert_allclose(np.asarray(losses), -trl_losses.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cr), trl_cr.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(rrw), trl_rr.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.1)])
def test_simpo_matches_trl_cpo_simpo(beta, gamma, eps):
    cpo_mod = pytest.importorskip("trl.experimental.cpo")
    pc, pr, _, _, lc, lr = _random_pairs(4)
    trainer = _bare(
        cpo_mod.CPOTrainer,
        alpha=0.0,
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=eps,
        loss_type="simpo",
    )
    # CPOTrainer averages log-probs per token for loss_type="simpo".
    avg_c = torch.tensor(pc) / torch.tensor(lc, dtype=torch.float32)
    avg_r = torch.tensor(pr) / torch.tensor(lr, dtype=torch.float32)
    trl_losses, trl_cr, trl_rr = trainer.cpo_loss(avg_c, avg_r)
    losses, cr, rrw = L.simpo_loss(
        *(jnp.asarray(x) for x in (pc, pr, lc, lr)), beta=beta, gamma=gamma, label_smoothing=eps
    )
    np.testing.assert_allclose(np.asarray(losses), trl_losses.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cr), trl_cr.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rrw), trl_rr.numpy(), rtol=1e-6, atol=1e-6)
