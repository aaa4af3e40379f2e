"""Training losses as pure functions over arrays (hidden states, head kernel, masks; no modules).

- `lm`: masked causal-LM cross entropy, token / sequence log-probs (SFT, pt, DPO inputs);
- `fused_ce`: the LM head fused with the cross entropy, chunked so `[tokens, vocab]` logits are
  never stored;
- `preference`: DPO (sigmoid / hinge / IPO / robust, cDPO smoothing), ORPO, SimPO, KTO (loss +
  KL reference point) and metrics.

Used by both `jaxlora.train` and `jaxlora.evaluate`, so it sits below them. The public path
`jaxlora.losses.dpo_loss` (and the other names below) is stable.
"""

from jaxlora.losses import fused_ce
from jaxlora.losses.lm import (
    logprobs_from_logits,
    masked_lm_loss,
    reduce_logps,
    sequence_logps,
    target_weights,
    token_logprobs,
)
from jaxlora.losses.preference import (
    DPO_LOSS_TYPES,
    dpo_loss,
    kto_kl,
    kto_loss,
    kto_metrics,
    orpo_loss,
    preference_metrics,
    simpo_loss,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "dpo_loss",
    "fused_ce",
    "kto_kl",
    "kto_loss",
    "kto_metrics",
    "logprobs_from_logits",
    "masked_lm_loss",
    "orpo_loss",
    "preference_metrics",
    "reduce_logps",
    "sequence_logps",
    "simpo_loss",
    "target_weights",
    "token_logprobs",
]
