"""rsLoRA, DoRA and PiSSA against PEFT itself: same forward, our exports load in PEFT, PEFT's
adapters load here, PiSSA's conversion to a plain LoRA matches PEFT's."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.config import config_from_dict
from jaxlora.errors import UserError
from jaxlora.io.peft import save_peft_adapter
from jaxlora.models.linear import adapter_output
from jaxlora.peft.lora import Adapter, LoraConfig, init_lora, merge
from jaxlora.train.methods import adapter_for_export, split_trainable

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tiny_qwen2 import CFG, save_tiny_qwen2  # noqa: E402

pytestmark = pytest.mark.torch

IDS = np.random.default_rng(1).integers(0, 97, size=(2, 10))
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A Qwen2-shaped checkpoint: q/k/v carry biases, which DoRA must leave out of its base."""
    return save_tiny_qwen2(tmp_path_factory.mktemp("base"), bias_std=0.1)


@pytest.fixture(scope="module")
def model(base):
    return jaxlora.load_model(base, dtype="float32")


def _torch_model(base):
    return transformers.AutoModelForCausalLM.from_pretrained(base).eval()


def _logits(m) -> np.ndarray:
    with torch.no_grad():
        return m(torch.tensor(IDS)).logits.numpy()


def _noisy(tree, seed, std=0.05):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, noisy)


# ----------------------------------------------------------------------------- DoRA layer


class _OneLinear(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out, bias=True)

    def forward(self, x):
        return self.proj(x)


class _FixedMask(torch.nn.Module):
    """Dropout with a known mask, so both frameworks see the same dropped-out input."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


@pytest.mark.parametrize("dropout", [False, True])
def test_dora_layer_forward_and_grads_match_peft(dropout):
    """Output and gradients (A, B, magnitude, input) equal PEFT's DoRA layer, bias included;
    with dropout the base term is recomputed on the dropped-out input (PEFT's training path)."""
    torch.manual_seed(0)
    d_in, d_out, r, alpha = 12, 10, 4, 8
    net = _OneLinear(d_in, d_out)
    pcfg = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=["proj"],
        use_dora=True,
        lora_dropout=0.3 if dropout else 0.0,
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(net, pcfg)
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    x = torch.randn(3, d_in, requires_grad=True)
    mask = (torch.rand(3, d_in) > 0.3).float() / 0.7
    if dropout:
        layer.lora_dropout["default"] = _FixedMask(mask)
        pm.train()
    else:
        pm.eval()
    out = pm(x)
    out.pow(2).sum().backward()

    w = layer.base_layer.weight.detach().numpy().T  # [in, out]
    bias = layer.base_layer.bias.detach().numpy()
    a = layer.lora_A["default"].weight.detach().numpy().T  # [in, r]
    b = layer.lora_B["default"].weight.detach().numpy().T  # [r, out]
    m = layer.lora_magnitude_vector["default"].weight.detach().numpy()
    scale = layer.scaling["default"]
    xm = mask.numpy() if dropout else None

    def ours(x, a, b, m):
        xd = x * xm if dropout else x
        xw = x @ w
        return xw + bias + adapter_output(x, xd, xw, jnp.asarray(w), a, b, scale, m)

    x0 = jnp.asarray(x.detach().numpy())
    y = ours(x0, jnp.asarray(a), jnp.asarray(b), jnp.asarray(m))
    np.testing.assert_allclose(np.asarray(y), out.detach().numpy(), atol=1e-5)
    grads = jax.grad(lambda *t: jnp.sum(ours(*t) ** 2), argnums=(0, 1, 2, 3))(
        x0, jnp.asarray(a), jnp.asarray(b), jnp.asarray(m)
    )
    ref = (
        x.grad.numpy(),
        layer.lora_A["default"].weight.grad.numpy().T,
        layer.lora_B["default"].weight.grad.numpy().T,
        layer.lora_magnitude_vector["default"].weight.grad.numpy(),
    )
    for g, rg in zip(grads, ref, strict=True):
        np.testing.assert_allclose(np.asarray(g), rg, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- DoRA / rsLoRA


@pytest.mark.parametrize("variant", ["dora", "rslora"])
def test_our_export_loads_in_peft(base, model, tmp_path, variant):
    lcfg = LoraConfig(
        rank=4,
        alpha=8,
        targets=tuple(TARGETS),
        use_dora=variant == "dora",
        use_rslora=variant == "rslora",
    )
    ad = Adapter(_noisy(init_lora(jax.random.key(0), model.params, lcfg), 1), lcfg)
    ours = np.asarray(model.logits(IDS, ad))
    assert np.abs(ours - np.asarray(model.logits(IDS))).max() > 1e-3
    save_peft_adapter(ad, tmp_path / "a", base_model=str(base))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is (variant == "dora") and cfg["use_rslora"] is (variant == "rslora")
    pm = peft.PeftModel.from_pretrained(_torch_model(base), tmp_path / "a").eval()
    assert np.abs(ours - _logits(pm)).max() <= 1e-4
    # Merging (DoRA: m · (W + sAB) / ||W + sAB||) gives the same model.
    merged = jaxlora.Model(model.config, merge(model.params, ad), dtype=model.dtype)
    np.testing.assert_allclose(np.asarray(merged.logits(IDS)), ours, atol=1e-4)


@pytest.mark.parametrize("variant", ["dora", "rslora"])
def test_peft_made_adapter_loads(base, model, tmp_path, variant):
    torch.manual_seed(3)
    pcfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=TARGETS,
        use_dora=variant == "dora",
        use_rslora=variant == "rslora",
        init_lora_weights=False,  # random B: a non-trivial adapter
    )
    pm = peft.get_peft_model(_torch_model(base), pcfg).eval()
    if variant == "dora":
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.2 * torch.rand_like(p))
    pm.save_pretrained(tmp_path / "p")
    ad = jaxlora.load_adapter(tmp_path / "p")
    assert ad.config.use_dora is (variant == "dora")
    assert ad.config.use_rslora is (variant == "rslora")
    ref = _logits(pm)
    assert np.abs(np.asarray(model.logits(IDS, ad)) - ref).max() <= 1e-4
    # Continuing training from it (`adapter_name_or_path`): step 0 is PEFT's model.
    cfg = config_from_dict(
        dict(model_name_or_path=str(base), adapter_name_or_path=str(tmp_path / "p"))
    )
    split = split_trainable(cfg, model.params)
    start = model.logits(IDS, Adapter(split.trainable, split.lora_config))
    assert np.abs(np.asarray(start) - ref).max() <= 1e-4


# ----------------------------------------------------------------------------- PiSSA


def _pissa_cfg(base, **kw):
    return config_from_dict(
        dict(
            model_name_or_path=str(base),
            lora_rank=4,
            lora_alpha=8,
            lora_target=",".join(TARGETS),
            pissa_init=True,
            pissa_iter=0,
            **kw,
        )
    )


def _module(tm, i, name):
    block = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    return getattr(getattr(tm.base_model.model.model.layers[i], block), name)


def test_pissa_init_matches_peft_and_export_matches_peft_conversion(base, model, tmp_path):
    split = split_trainable(_pissa_cfg(base), model.params)
    s = split.lora_config.scale
    torch.manual_seed(0)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
    pm = peft.get_peft_model(_torch_model(base), pcfg).eval()
    for name in TARGETS:
        block = "self_attn" if name != "down_proj" else "mlp"
        res = np.asarray(split.frozen["layers"][block][name]["kernel"])
        node = split.trainable["layers"][block][name]
        delta = s * np.einsum("lir,lro->lio", node["lora_a"], node["lora_b"])
        for i in range(CFG["num_hidden_layers"]):
            layer = _module(pm, i, name)
            ref_res = layer.base_layer.weight.detach().numpy().T
            ref_delta = (s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).T
            np.testing.assert_allclose(res[i], ref_res, atol=2e-5)
            np.testing.assert_allclose(delta[i], ref_delta.detach().numpy(), atol=2e-5)
    # Step 0: residual + adapter is the original model (and PEFT's).
    resid = jaxlora.Model(model.config, split.frozen, dtype=model.dtype)
    start = np.asarray(resid.logits(IDS, Adapter(split.trainable, split.lora_config)))
    np.testing.assert_allclose(start, np.asarray(model.logits(IDS)), atol=1e-4)
    assert np.abs(start - _logits(pm)).max() <= 1e-4

    # "Train", then export: a rank-2r plain LoRA for the ORIGINAL base, loadable by PEFT.
    trained = _noisy(split.trainable, 7)
    ours = np.asarray(resid.logits(IDS, Adapter(trained, split.lora_config)))
    exported = adapter_for_export(split, trained)
    assert exported.config.rank == 8 and exported.config.alpha == 16
    save_peft_adapter(exported, tmp_path / "ours", base_model=str(base))
    loaded = peft.PeftModel.from_pretrained(_torch_model(base), tmp_path / "ours").eval()
    assert np.abs(_logits(loaded) - ours).max() <= 1e-4

    # PEFT's own conversion of the same trained weights gives the same adapter.
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        for name in TARGETS:
            block = "self_attn" if name != "down_proj" else "mlp"
            node = trained["layers"][block][name]
            for i in range(CFG["num_hidden_layers"]):
                layer = _module(pm, i, name)
                layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(node["lora_a"][i]).T))
                layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(node["lora_b"][i]).T))
    pm.save_pretrained(
        tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    pcfg_out = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (pcfg_out["r"], pcfg_out["lora_alpha"]) == (8, 16)
    theirs = jaxlora.load_adapter(tmp_path / "peft")
    for (path, a), (_, b) in zip(_deltas(exported).items(), _deltas(theirs).items(), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=str(path))
    np.testing.assert_allclose(np.asarray(model.logits(IDS, theirs)), ours, atol=1e-4)


def _deltas(ad: Adapter) -> dict:
    from jaxlora.peft.lora import iter_modules

    s = ad.config.scale
    return {
        p: s * np.einsum("lir,lro->lio", n["lora_a"], n["lora_b"])
        for p, n in iter_modules(ad.params)
    }


def test_unconverted_peft_pissa_adapter_is_refused(base, tmp_path):
    pcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="pissa")
    pm = peft.get_peft_model(_torch_model(base), pcfg)
    pm.save_pretrained(tmp_path / "p")
    with pytest.raises(UserError, match="path_initial_model_for_weight_conversion"):
        jaxlora.load_adapter(tmp_path / "p")
