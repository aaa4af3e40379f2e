"""jaxlora's DPO step against TRL's `DPOTrainer` on the same tiny HF model, data and reference.

Both sides see the same pre-tokenised pairs (jaxlora's pipeline output is handed to TRL as
`prompt_ids`/`chosen_ids`/`rejected_ids`; TRL's own tokenisation step is bypassed, so chat
templates cannot differ), fp32, no dropout. The policy is the base plus a NON-ZERO LoRA adapter
(PEFT format, loaded by `peft` on the TRL side) and the reference is the base (jaxlora: adapters
off; TRL: the base passed as `ref_model`), so the first-step loss is not trivially log 2.
Compared: loss, rewards/*, logps/*, and the gradient norm, live and with precomputed reference
log-probs on both sides.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxlora.config import config_from_dict
from jaxlora.peft.lora import Adapter, LoraConfig, init_lora
from jaxlora.train.setup import build_run

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

pytestmark = pytest.mark.torch

PAIRS = [
    {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "Go away. It is 5."},
    {"prompt": "Who trained you?", "chosen": "I was fine-tuned with jaxlora.", "rejected": "No."},
    {"prompt": "你好！", "chosen": "你好！我是 JaxLoRA 助手。", "rejected": "别烦我。"},
    {"prompt": "Name a colour.", "chosen": "Blue is a colour.", "rejected": "Figure it out."},
]
BETA = 0.1
TRL_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected")  # fmt: skip


@pytest.fixture(scope="module")
def setting(tiny_model_dir, tmp_path_factory):
    """The data file and a non-zero adapter saved in PEFT format."""
    from jaxlora.io.model import load_model
    from jaxlora.io.peft import save_peft_adapter

    root = tmp_path_factory.mktemp("trl")
    data = root / "pairs.json"
    data.write_text(json.dumps(PAIRS, ensure_ascii=False))
    params = load_model(tiny_model_dir, dtype="float32").params
    lcfg = LoraConfig(rank=4, alpha=8.0)
    adapter = init_lora(jax.random.key(7), params, lcfg)
    leaves, tree = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.key(8), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    save_peft_adapter(Adapter(jax.tree_util.tree_unflatten(tree, noisy), lcfg), root / "adapter")
    return root, data


def _jaxlora(model_dir, root, data, precompute: bool) -> dict[str, float]:
    from jaxlora.io.peft import load_peft_adapter

    cfg = config_from_dict(
        dict(
            model_name_or_path=str(model_dir),
            stage="dpo",
            dataset=str(data),
            lora_rank=4,
            lora_alpha=8,
            pref_beta=BETA,
            per_device_train_batch_size=len(PAIRS),
            precompute_ref_logps=precompute,
            bf16=False,
            output_dir=str(root / f"run-{precompute}"),
            overwrite_output_dir=True,
        )
    )
    run = build_run(cfg, log=lambda s: None)
    assert set(run.parts.frozen) == {
        "base"
    }  # zero-init run: the reference is the base, adapters off
    policy = load_peft_adapter(root / "adapter").params  # the non-zero adapter as the policy
    loss = run.stage.loss_fn(run.parts.model.module(run.parts.adapter_spec), None)
    batch = run.batches.batch(0)  # all pairs; loss_scale = 1 / n_pairs

    def scaled(p):
        return loss(p, run.parts.frozen, batch, jax.random.key(0))

    (value, (loss_sum, n, metrics)), grads = jax.jit(jax.value_and_grad(scaled, has_aux=True))(
        policy
    )
    assert float(n) == len(PAIRS)
    out = {k[len("pref/") :]: float(v) / float(n) for k, v in metrics.items() if k != "pref/count"}
    out["loss"] = float(value)
    out["grad_norm"] = float(jax.numpy.sqrt(sum((g**2).sum() for g in jax.tree.leaves(grads))))
    return out, run


def _trl(model_dir, root, run, precompute: bool) -> dict[str, float]:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class PreTokenised(DPOTrainer):
        """DPOTrainer fed jaxlora's token ids: its own prompt extraction/tokenisation skipped."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    rows = [
        {
            "prompt_ids": [int(t) for t in ex.prompt_ids],
            "chosen_ids": [int(t) for t in ex.chosen_ids],
            "rejected_ids": [int(t) for t in ex.rejected_ids],
        }
        for ex in run.data.train
    ]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(root / "adapter"), is_trainable=True)
    args = DPOConfig(
        output_dir=str(root / f"trl-{precompute}"),
        per_device_train_batch_size=len(rows),
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=None,
        precompute_ref_log_probs=precompute,
        disable_dropout=True,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_steps=1,
        seed=0,
    )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    # An explicit reference model: the base, as jaxlora's zero-init run uses (left out, TRL would
    # copy the loaded adapter as reference, like jaxlora with adapter_name_or_path).
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    trainer = PreTokenised(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    trainer.model.train()
    inputs = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
    out = {k: trainer._metrics["train"][k][-1] for k in TRL_KEYS}
    out["loss"] = float(loss.detach())
    out["grad_norm"] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True])
def test_first_step_matches_trl_dpo_trainer(
    tiny_model_dir, setting, precompute, tmp_path, monkeypatch
):
    monkeypatch.setenv("JAXLORA_CACHE", str(tmp_path / "cache"))
    root, data = setting
    ours, run = _jaxlora(tiny_model_dir, root, data, precompute)
    theirs = _trl(tiny_model_dir, root, run, precompute)
    assert abs(theirs["rewards/margins"]) > 1e-2  # the policy differs from the reference
    assert abs(theirs["loss"] - np.log(2)) > 1e-3
    for key in ("loss", *TRL_KEYS):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(ours["grad_norm"], theirs["grad_norm"], rtol=1e-3)
