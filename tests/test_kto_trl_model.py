"""KTO on real models: TRL's `KTOTrainer._compute_loss` (policy + reference torch models, its own
collator over the same token ids and KL rotation) against `jaxlora.train.kto.kto_batch_loss` on
the jaxlora batch of the same rows. Tiny Qwen2 (GQA), fp32; the policy is the reference with
perturbed weights (the full fine-tuning case)."""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora.data import load_feedback_dataset, make_batches
from jaxlora.train.kto import kto_batch_loss, sequence_logps
from jaxlora.train.tracking import preference_means

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from tiny_qwen2 import tiny_qwen2  # noqa: E402
from trl_kto import bare_kto_trainer  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def models(tmp_path_factory, chatml_tokenizer):
    root = tmp_path_factory.mktemp("kto-models")
    ref = tiny_qwen2(vocab_size=len(chatml_tokenizer))
    ref.save_pretrained(root / "ref")
    policy = tiny_qwen2(vocab_size=len(chatml_tokenizer))
    policy.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.save_pretrained(root / "policy")
    return root


def _trl_loss(root, batch_examples, beta, wd, wu, names):
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference
    from trl.trainer.utils import add_fused_lm_head

    policy = transformers.AutoModelForCausalLM.from_pretrained(root / names[0]).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(root / names[1]).eval()
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits"))
    add_fused_lm_head(ref)
    trainer = bare_kto_trainer(
        policy,
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
        ref_model=ref,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    policy.train()  # TRL reads `model.training` for the metric split; no dropout in this config
    inputs = DataCollatorForUnpairedPreference(pad_token_id=0)(batch_examples)
    with torch.no_grad():
        loss = trainer._compute_loss(policy, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


# The perturbed model scores the mismatched rows lower than the original: as the policy its KL
# estimate is negative (clamped to 0), as the reference positive (the unclamped path).
@pytest.mark.slow
@pytest.mark.parametrize(
    "beta,wd,wu,names",
    [(0.1, 1.0, 1.0, ("policy", "ref")), (0.5, 1.33, 0.8, ("ref", "policy"))],
)
def test_kto_batch_loss_matches_trl_on_real_models(
    models, tmp_path, chatml_tokenizer, beta, wd, wu, names
):
    rows = [
        {
            "prompt": f"Question {i}: " + "why " * (i + 1),
            "completion": "because " * (6 - i),
            "label": i % 3 != 1,
        }
        for i in range(6)
    ]
    (tmp_path / "fb.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    train, _, _ = load_feedback_dataset(chatml_tokenizer, dataset=str(tmp_path / "fb.jsonl"))
    # A global batch of 8 with 6 real rows: the 2 dummy rows must change nothing.
    batch = make_batches(train, batch_size=8, pad_id=0, shuffle=False, bucket_multiple=16).get(0, 0)
    examples = [
        {
            "prompt_ids": e.prompt_ids.tolist(),
            "completion_ids": e.completion_ids.tolist(),
            "label": bool(e.label),
        }
        for e in train
    ]
    comps = [e["completion_ids"] for e in examples]
    for e, kl in zip(examples, [comps[-1]] + comps[:-1], strict=True):  # TRL's rotation
        e["KL_completion_ids"] = kl
    trl_loss, trl_metrics = _trl_loss(models, examples, beta, wd, wu, names)

    policy = jaxlora.load_model(models / names[0], dtype="float32")
    ref = jaxlora.load_model(models / names[1], dtype="float32")
    module = policy.module()
    jb = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    ref_logps = sequence_logps(module, {"params": ref.params}, jb, ref.config)[:2]
    loss_sum, n, sums = kto_batch_loss(
        module,
        {"params": policy.params},
        ref_logps,
        jb,
        policy.config,
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
    )
    assert float(n) == 6
    np.testing.assert_allclose(float(loss_sum) / float(n), trl_loss, rtol=1e-4, atol=1e-6)
    ours = preference_means({k: float(v) for k, v in sums.items()})
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "kl",
    ):
        np.testing.assert_allclose(ours[key], trl_metrics[key], rtol=1e-4, atol=1e-5)
    assert (trl_metrics["kl"] > 0) == (names[0] == "ref")
