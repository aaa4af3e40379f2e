"""A bare TRL `KTOTrainer` for calling its `_compute_loss` on our numbers.

`object.__new__` skips the trainer's __init__ (datasets, accelerate, a training loop); only the
attributes `_compute_loss` reads are set. The KTO loss tests use it with a stand-in model
(test_kto_loss_trl) and with real tiny models (test_kto_trl_model). Needs torch + trl.
"""

from __future__ import annotations

import collections
import types


def bare_kto_trainer(model, *, beta, desirable_weight, undesirable_weight, **attrs):
    """A `KTOTrainer` with `model` and the KTO weights; `attrs` add or override attributes
    (e.g. `ref_model`, `precompute_ref_logps`)."""
    import torch
    from trl import KTOTrainer

    trainer = object.__new__(KTOTrainer)
    fields = dict(
        model=model,
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, unwrap_model=lambda m: m
        ),
        aux_loss_enabled=False,
        calculate_KL=True,
        precompute_ref_logps=False,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    fields.update(attrs)
    for k, v in fields.items():
        object.__setattr__(trainer, k, v)
    return trainer
