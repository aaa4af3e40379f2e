"""Mixture of experts (Qwen3-MoE, Mixtral) against transformers on tiny random checkpoints:
logits (padded and packed rows), the router load-balancing loss, and config refusals."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.errors import UserError
from jaxlora.models.config import config_from_hf
from jaxlora.models.moe import EXPERT_NAMES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

BASE = dict(
    vocab_size=101,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)
CASES = {
    # Qwen3-MoE without top-k renormalisation (norm_topk_prob False), q/k norms, biases.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            num_experts=4,
            norm_topk_prob=False,
            attention_bias=True,
        ),
    ),
    # Mixtral: always renormalised, a sliding window shorter than the rows.
    "mixtral": (
        "MixtralConfig",
        dict(intermediate_size=16, num_local_experts=4, sliding_window=5),
    ),
}


def save_moe(tmp_path, case, **extra):
    """A tiny random MoE checkpoint (router weights large enough that top-k is decisive)."""
    config_cls, overrides = CASES[case]
    cfg = getattr(transformers, config_cls)(**BASE, **overrides, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("gate.weight"):  # the router
                p.copy_(torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, BASE["vocab_size"], size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    return ids, mask


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_logits_and_aux_loss_match_transformers(tmp_path, case):
    torch_model = save_moe(tmp_path, case)
    ids, mask = _batch()
    with torch.no_grad():
        out = torch_model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            output_router_logits=True,
        )
    ref, ref_aux = out.logits.numpy(), float(out.aux_loss)
    model = jaxlora.load_model(tmp_path, dtype="float32")
    assert model.config.num_experts == 4
    got = np.asarray(model.logits(ids, segment_ids=mask))
    err = np.abs(got - ref)[mask.astype(bool)].max()
    assert err <= 1e-4, f"{case}: max |Δlogits| = {err}"

    # Router load-balancing loss over the non-padding tokens, as transformers computes it.
    module = model.module()
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    # jit: run eagerly, each op of the scanned model would compile on its own.
    aux_loss = jax.jit(lambda p, i, s: module.apply({"params": p}, i, pos, s, return_aux_loss=True))
    _, aux = aux_loss(model.params, jnp.asarray(ids), jnp.asarray(mask))
    assert abs(float(aux) - ref_aux) <= 1e-5 * max(1.0, ref_aux), (float(aux), ref_aux)
    # The mask matters: all tokens counted gives transformers' unmasked value, not the masked.
    with torch.no_grad():
        unmasked = float(
            torch_model(input_ids=torch.tensor(ids), output_router_logits=True).aux_loss
        )
    _, aux_all = aux_loss(model.params, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)))
    assert abs(float(aux_all) - unmasked) <= 1e-5 * max(1.0, unmasked)
    assert abs(unmasked - ref_aux) > 1e-4

    # Packed: both samples in one row (positions restart, segments 1 and 2) route and attend
    # exactly as each sample alone in transformers.
    a, b = ids[0, :7], ids[1, :5]
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    positions = np.array([list(range(7)) + list(range(5)) + [0, 0]])
    got = np.asarray(model.logits(packed, positions=positions, segment_ids=seg))[0]
    with torch.no_grad():
        ref_a = torch_model(input_ids=torch.tensor(a[None])).logits.numpy()[0]
        ref_b = torch_model(input_ids=torch.tensor(b[None])).logits.numpy()[0]
    assert np.abs(got[:7] - ref_a).max() <= 1e-4
    assert np.abs(got[7:12] - ref_b).max() <= 1e-4

    # KV-cache decoding routes each new token like the full forward: greedy tokens equal
    # transformers' generate (past Mixtral's 5-token window too).
    from jaxlora.evaluate.generate import generate

    new = generate(model, [a.tolist()], max_new_tokens=8, stop_token_ids=())[0]
    with torch.no_grad():
        hf = torch_model.generate(
            torch.tensor(a[None]), do_sample=False, max_new_tokens=8, min_new_tokens=8
        )
    assert new == hf[0, 7:].tolist()


def _raw(case, **over):
    config_cls, overrides = CASES[case]
    cfg = getattr(transformers, config_cls)(**BASE, **overrides)
    raw = json.loads(cfg.to_json_string())
    raw.update(over)
    return raw


def test_moe_config_fields_and_refusals():
    q = config_from_hf(_raw("qwen3_moe", norm_topk_prob=True, router_aux_loss_coef=0.02))
    assert (q.num_experts, q.num_experts_per_tok, q.moe_intermediate_size) == (4, 2, 16)
    assert q.norm_topk_prob and q.qk_norm and q.router_aux_loss_coef == 0.02
    m = config_from_hf(_raw("mixtral", norm_topk_prob=False))
    assert m.norm_topk_prob and m.moe_intermediate_size == 16 and m.sliding_window == 5
    # Dense MLP layers inside a Qwen3-MoE stack cannot share one scanned layer: refused.
    with pytest.raises(UserError, match=r"qwen3_moe with a dense MLP in layers \[1\]"):
        config_from_hf(_raw("qwen3_moe", mlp_only_layers=[1]))
    with pytest.raises(UserError, match=r"layers \[0\]"):
        config_from_hf(_raw("qwen3_moe", decoder_sparse_step=2))
    with pytest.raises(UserError, match="num_experts_per_tok 5"):
        config_from_hf(_raw("mixtral", num_experts_per_tok=5))


def test_route_matches_transformers_routers():
    """Softmax before top-k; renormalised per family; Qwen3-MoE casts the weights to the
    logits dtype (bf16 here), Mixtral keeps them fp32."""
    from jaxlora.models.moe import route

    logits = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    mods = transformers.models
    for case, norm in (("qwen3_moe", False), ("qwen3_moe", True), ("mixtral", True)):
        config_cls, overrides = CASES[case]
        hf_cfg = getattr(transformers, config_cls)(
            **{**BASE, **overrides, "hidden_size": 4, "norm_topk_prob": norm}
        )
        if case == "mixtral":
            router = mods.mixtral.modeling_mixtral.MixtralTopKRouter(hf_cfg)
        else:
            router = mods.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(hf_cfg)
        router = router.to(torch.bfloat16)
        with torch.no_grad():  # identity router: its logits are its input
            router.weight.copy_(torch.eye(4))
            _, ref_w, ref_e = router(torch.tensor(logits).to(torch.bfloat16))
        lg = jnp.asarray(logits, jnp.bfloat16)
        w, e, _ = route(lg, 2, norm, keep_fp32=case == "mixtral")
        assert w.dtype == (jnp.float32 if case == "mixtral" else jnp.bfloat16)
        assert ref_w.dtype == (torch.float32 if case == "mixtral" else torch.bfloat16)
        np.testing.assert_array_equal(np.asarray(e), ref_e.numpy())
        np.testing.assert_allclose(np.asarray(w, np.float32), ref_w.float().numpy(), atol=1e-6)


def _peft_grads_per_expert(pm, n_layers, e, r):
    """PEFT's LoRA gradients in our layout. PEFT (transformers 5) converts our per-expert
    adapter into `target_parameters` LoRAs of the fused `experts.gate_up_proj` (rank 2r, rows
    e*2r + j of A, columns j*E + e of the block-diagonal B) and `experts.down_proj` (rank r)."""
    out = {}
    named = dict(pm.named_parameters())

    def g(name):
        return named[name].grad.numpy()

    for i in range(n_layers):
        stem = f"base_model.model.model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[("self_attn", proj, "lora_a", i)] = g(
                f"{stem}.self_attn.{proj}.lora_A.default.weight"
            ).T
            out[("self_attn", proj, "lora_b", i)] = g(
                f"{stem}.self_attn.{proj}.lora_B.default.weight"
            ).T
        a = g(f"{stem}.mlp.experts.base_layer.lora_A.default.weight").reshape(e, 2 * r, -1)
        b = g(f"{stem}.mlp.experts.base_layer.lora_B.default.weight")  # [2I, 2r*E]
        f = b.shape[0] // 2
        b = b.reshape(2 * f, 2 * r, e)
        out[("experts", "gate", "lora_a", i)] = a[:, :r].transpose(0, 2, 1)  # [E, D, r]
        out[("experts", "up", "lora_a", i)] = a[:, r:].transpose(0, 2, 1)
        out[("experts", "gate", "lora_b", i)] = b[:f, :r].transpose(2, 1, 0)  # [E, r, I]
        out[("experts", "up", "lora_b", i)] = b[f:, r:].transpose(2, 1, 0)
        a = g(f"{stem}.mlp.experts.lora_A.default.weight").reshape(e, r, -1)
        b = g(f"{stem}.mlp.experts.lora_B.default.weight").reshape(-1, r, e)
        out[("experts", "down", "lora_a", i)] = a.transpose(0, 2, 1)
        out[("experts", "down", "lora_b", i)] = b.transpose(2, 1, 0)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_lora_matches_peft(tmp_path, case):
    """LoRA on attention and on every expert: PEFT (transformers 5) loads our adapter with the
    same logits, one step's loss (CE + coef * aux) and gradients match PEFT's, and the merged
    export loads in transformers with the same logits."""
    from peft import PeftModel

    from jaxlora.io.export import export_merged
    from jaxlora.io.peft import load_peft_adapter, save_peft_adapter
    from jaxlora.peft.lora import Adapter, LoraConfig, init_lora
    from jaxlora.train.steps import lm_loss_fn

    torch_model = save_moe(
        tmp_path / "base", case, output_router_logits=True, router_aux_loss_coef=0.1
    )
    model = jaxlora.load_model(tmp_path / "base", dtype="float32")
    r, e, n_layers = 2, 4, BASE["num_hidden_layers"]
    lcfg = LoraConfig(
        rank=r,
        alpha=4.0,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )
    tree = init_lora(jax.random.key(0), model.params, lcfg)
    # Non-zero B so the adapter changes the model and A gets a gradient.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    tree = jax.tree_util.tree_unflatten(
        treedef,
        [
            0.3 * jax.random.normal(k, x.shape) if p[-1].key == "lora_b" else x
            for k, (p, x) in zip(keys, leaves, strict=True)
        ],
    )
    adapter = Adapter(tree, lcfg)
    save_peft_adapter(adapter, tmp_path / "adapter")
    back = load_peft_adapter(tmp_path / "adapter")  # our own reader round-trips it
    for (p1, x1), (p2, x2) in zip(
        jax.tree_util.tree_flatten_with_path(back.params)[0],
        jax.tree_util.tree_flatten_with_path(tree)[0],
        strict=True,
    ):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(x1), np.asarray(x2))

    ids, mask = _batch()
    ours = np.asarray(model.logits(ids, adapter, segment_ids=mask))
    pm = PeftModel.from_pretrained(torch_model, tmp_path / "adapter", is_trainable=True).eval()
    labels = np.where(mask == 1, ids, -100)
    out = pm(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        labels=torch.tensor(labels),
        output_router_logits=True,
    )
    valid = mask.astype(bool)
    assert np.abs(out.logits.detach().numpy() - ours)[valid].max() <= 1e-4
    assert np.abs(ours - np.asarray(model.logits(ids, segment_ids=mask)))[valid].max() > 1e-2
    out.loss.backward()

    module = model.module(adapter.spec)
    loss = lm_loss_fn(module, model.config, "lora", None)
    n_targets = float(mask[:, 1:].sum())
    batch = {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape),
        "segment_ids": jnp.asarray(mask, jnp.int32),
        "loss_mask": jnp.asarray(mask, jnp.int32),
        "loss_scale": jnp.float32(1.0 / n_targets),
    }
    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        tree, model.params, batch, jax.random.key(0)
    )
    assert abs(float(value) - out.loss.item()) <= 1e-5
    assert abs(float(aux[2]["moe/aux_loss"]) - out.aux_loss.item()) <= 1e-6
    ref = _peft_grads_per_expert(pm, n_layers, e, r)
    block = "block_sparse_moe" if case == "mixtral" else "mlp"
    names = dict(zip(("gate", "up", "down"), EXPERT_NAMES[case], strict=True))
    worst = 0.0
    for (where, proj, kind, i), want in ref.items():
        if where == "self_attn":
            got = grads["layers"]["self_attn"][proj][kind][i]
        else:
            got = grads["layers"][block]["experts"][names[proj]][kind][i]
        worst = max(worst, float(np.abs(np.asarray(got) - want).max()))
    assert worst <= 1e-4, worst
    assert max(float(np.abs(v).max()) for v in ref.values()) > 1e-3  # gradients are not all 0

    # Merged export: transformers loads it and gives the adapted logits.
    export_merged(tmp_path / "base", tmp_path / "merged", adapter=adapter)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert np.abs(got.numpy() - ours)[valid].max() <= 1e-4


def test_qlora_quantises_experts_not_the_router():
    from jaxlora.models.quant import default_predicate

    assert default_predicate(("layers", "mlp", "experts", "gate_proj", "kernel"))
    assert default_predicate(("layers", "block_sparse_moe", "experts", "w1", "kernel"))
    assert default_predicate(("layers", "mlp", "gate_proj", "kernel"))  # dense MLP
    assert not default_predicate(("layers", "mlp", "gate", "kernel"))  # router
    assert not default_predicate(("layers", "block_sparse_moe", "gate", "kernel"))


def test_flops_count_active_experts():
    """MFU counts the weights a token uses: router + its k experts, not all E."""
    from jaxlora.bench.flops import matmul_params

    cfg = config_from_hf(_raw("qwen3_moe"))  # d 32, E 4, k 2, expert width 16, 2 layers
    attn = 32 * 32 + 2 * 32 * 16 + 32 * 32  # q, k, v (2 kv heads x 8), o
    per_layer = attn + 32 * 4 + 2 * 3 * 32 * 16
    assert matmul_params(cfg) == 2 * per_layer + 32 * 101


@pytest.mark.slow
def test_moe_bad_inputs_are_one_line_errors():
    """LoRA variants PEFT cannot load on experts, and a negative aux coefficient, are refused."""
    import flax.linen as nn

    from jaxlora.config import config_from_dict
    from jaxlora.models.llama import Decoder
    from jaxlora.peft.lora import LoraConfig, init_lora, init_pissa, parse_targets

    cfg = config_from_hf(_raw("mixtral"))
    ids = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(Decoder(cfg, dtype=jnp.float32).init(jax.random.key(0), ids)["params"])
    key = jax.random.key(0)
    with pytest.raises(UserError, match="LoRA on MoE experts takes neither use_dora"):
        init_lora(key, params, LoraConfig(dropout=0.05))
    with pytest.raises(UserError, match="LoRA on MoE experts takes neither use_dora"):
        init_lora(key, params, LoraConfig(use_dora=True, targets=("w1",)))
    with pytest.raises(UserError, match="PiSSA on MoE experts"):
        init_pissa(key, params, LoraConfig(init="pissa", rank=2, targets=("down_proj",)))
    # Attention-only LoRA with dropout is fine; Mixtral's names are aliases of ours.
    tree = init_lora(key, params, LoraConfig(dropout=0.05, targets=("q_proj", "v_proj")))
    assert set(tree["layers"]) == {"self_attn"}
    assert parse_targets("w1,w2,q_proj") == ("q_proj", "gate_proj", "down_proj")
    tree = init_lora(key, params, LoraConfig(targets=parse_targets("w3")))
    assert tree["layers"]["block_sparse_moe"]["experts"]["w3"]["lora_a"].shape == (2, 4, 32, 8)
    with pytest.raises(UserError, match="moe_aux_loss_coef"):
        config_from_dict({"moe_aux_loss_coef": -0.1})


def test_mixtral_router_jitter_only_while_training():
    """`router_jitter_noise`: the MoE input is scaled by U(1-j, 1+j) noise in training forwards
    (dropout rng), never in eval ones, as MixtralSparseMoeBlock does."""
    import flax.linen as nn

    from jaxlora.models.llama import Decoder

    cfg = config_from_hf(_raw("mixtral", router_jitter_noise=0.5))
    ids = jnp.arange(1, 9)[None]
    init = jax.jit(Decoder(cfg, dtype=jnp.float32).init)(jax.random.key(0), ids)
    variables = {"params": nn.unbox(init["params"])}
    # jit'd forwards (eagerly, each op of the scanned model would compile on its own).
    plain = jax.jit(Decoder(config_from_hf(_raw("mixtral")), dtype=jnp.float32).apply)(
        variables, ids
    )
    evald = jax.jit(Decoder(cfg, dtype=jnp.float32).apply)(variables, ids)
    train = jax.jit(Decoder(cfg, dtype=jnp.float32, deterministic=False).apply)
    a = train(variables, ids, rngs={"dropout": jax.random.key(1)})
    b = train(variables, ids, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(np.asarray(evald), np.asarray(plain))
    assert float(jnp.abs(a - plain).max()) > 1e-3 and float(jnp.abs(a - b).max()) > 1e-3
