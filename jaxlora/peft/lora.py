"""LoRA adapters as a separate pytree: init (kaiming / gaussian / PiSSA), scale, merge.

The adapter tree mirrors the targeted kernels of the param tree:

    params["layers"]["self_attn"]["q_proj"]["kernel"]      [L, in, out]   frozen base
    adapter["layers"]["self_attn"]["q_proj"]["lora_a"]     [L, in, r]     trainable, fp32
    adapter[...]["q_proj"]["lora_b"]     [L, r, out]    trainable, fp32 (zero init)
    adapter["layers"]["self_attn"]["q_proj"]["magnitude"]  [L, out]       DoRA only

A base kernel may be a quantised dict (`jaxlora.models.quant`); everything here reads its logical
[L, in, out] shape from the dict's leaves and dequantises one layer at a time where it needs the
dense weight, so a QLoRA base is never materialised whole in fp32.

Every function here is pure (pytree in, pytree out); the model reads the adapter from its "lora"
collection (see `jaxlora.models.linear`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora.errors import UserError, did_you_mean
from jaxlora.models import quant
from jaxlora.models.linear import AdapterSpec, dora_column_norm

# HF module name -> path of its kernel's parent in the param tree.
LINEAR_MODULES: dict[str, tuple[str, ...]] = {
    "q_proj": ("layers", "self_attn", "q_proj"),
    "k_proj": ("layers", "self_attn", "k_proj"),
    "v_proj": ("layers", "self_attn", "v_proj"),
    "o_proj": ("layers", "self_attn", "o_proj"),
    "gate_proj": ("layers", "mlp", "gate_proj"),
    "up_proj": ("layers", "mlp", "up_proj"),
    "down_proj": ("layers", "mlp", "down_proj"),
}
INITS = ("kaiming", "gaussian", "pissa")
# Mixture of experts: the MLP targets are the stacked experts (kernels [L, E, in, out]; adapters
# A [L, E, in, r], B [L, E, r, out], one LoRA per expert). Mixtral's w1/w3/w2 are its gate/up/
# down projections, so `gate_proj` etc. (or `w1` etc.) target them.
EXPERT_MODULES: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_proj": (
        ("layers", "mlp", "experts", "gate_proj"),
        ("layers", "block_sparse_moe", "experts", "w1"),
    ),
    "up_proj": (
        ("layers", "mlp", "experts", "up_proj"),
        ("layers", "block_sparse_moe", "experts", "w3"),
    ),
    "down_proj": (
        ("layers", "mlp", "experts", "down_proj"),
        ("layers", "block_sparse_moe", "experts", "w2"),
    ),
}
TARGET_ALIASES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral's names


def candidate_paths(name: str) -> tuple[tuple[str, ...], ...]:
    """Every param-tree path the target `name` may have (dense MLP first, then experts)."""
    name = TARGET_ALIASES.get(name, name)
    return (LINEAR_MODULES[name], *EXPERT_MODULES.get(name, ()))


def _has_path(tree: dict, path: tuple[str, ...]) -> bool:
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return False
        tree = tree[k]
    return True


def module_path(params: dict, name: str) -> tuple[str, ...]:
    """The path of target `name`'s module in this model's param tree."""
    for path in candidate_paths(name):
        if _has_path(params, path):
            return path
    raise UserError(f"lora_target: this model has no {name!r} module")


def is_expert_path(path: tuple[str, ...]) -> bool:
    return len(path) > 2 and path[2] == "experts"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(LINEAR_MODULES)
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"  # kaiming (PEFT default) | gaussian | pissa

    @property
    def scale(self) -> float:
        if self.use_rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(scale=self.scale, dropout=self.dropout, use_dora=self.use_dora)


@dataclasses.dataclass
class Adapter:
    """An adapter's weights and the settings needed to apply them."""

    params: dict
    config: LoraConfig
    collection = "lora"  # the model variable collection `params` goes into

    @property
    def spec(self) -> AdapterSpec:
        return self.config.spec


def parse_targets(target: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`all` or a comma list of HF module names -> validated tuple (in canonical order)."""
    names = target.split(",") if isinstance(target, str) else list(target)
    names = [TARGET_ALIASES.get(n.strip(), n.strip()) for n in names if n.strip()]
    if names == ["all"]:
        return tuple(LINEAR_MODULES)
    for n in names:
        if n not in LINEAR_MODULES:
            raise UserError(
                f"lora_target: unknown module {n!r}{did_you_mean(n, LINEAR_MODULES)}; valid: "
                + ", ".join(LINEAR_MODULES)
                + " (Mixtral: w1, w3, w2 = gate_proj, up_proj, down_proj) or all"
            )
    if not names:
        raise UserError("lora_target is empty; use `all` or a comma list such as q_proj,v_proj")
    return tuple(n for n in LINEAR_MODULES if n in names)


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """Functional update: a new dict tree with `value` at `path` (siblings shared)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = set_path(tree.get(path[0], {}), path[1:], value)
    return out


def kernel_shape(kernel: Any) -> tuple[int, ...]:
    """Logical [..., in, out] shape of a kernel: a plain array or a `quant` dict.

    NF4 packs two codes per byte along `in` ([..., in/2, out]); int8 keeps [..., in, out].
    Works on arrays and ShapeDtypeStructs alike.
    """
    kind = quant.quant_kind(kernel)
    if kind == "nf4":
        codes = tuple(kernel[quant.NF4_KEY].shape)
        return codes[:-2] + (2 * codes[-2], codes[-1])
    if kind == "int8":
        return tuple(kernel[quant.INT8_KEY].shape)
    return tuple(kernel.shape)


def kernel_dims(kernel: Any) -> tuple[int, int, int]:
    """(num_layers, in, out) of a stacked kernel, quantised or not (experts: [L, E, in, out])."""
    shape = kernel_shape(kernel)
    return shape[0], shape[-2], shape[-1]


def dense_kernel(kernel: Any, dtype: Any = jnp.float32) -> jax.Array:
    """The kernel as a dense array in `dtype` (dequantised when it is a quant dict)."""
    return quant.dequantize(kernel, dtype)


def init_lora(key: jax.Array, params: dict, cfg: LoraConfig) -> dict:
    """New adapter tree for `cfg.targets`: A random, B zero (so the model is unchanged).

    `cfg.init == "pissa"` needs the base weights replaced too: use `init_pissa`.
    """
    if cfg.init == "pissa":
        raise ValueError("PiSSA changes the base weights; call init_pissa(key, params, cfg)")
    adapter: dict = {}
    for i, name in enumerate(cfg.targets):
        path = module_path(params, name)
        if is_expert_path(path) and (cfg.use_dora or cfg.dropout > 0.0):
            raise UserError(
                f"lora_target {name}: LoRA on MoE experts takes neither use_dora nor lora_dropout "
                "(PEFT's expert-parameter LoRA refuses both); set lora_dropout: 0 / use_dora: "
                "false or target only q_proj,k_proj,v_proj,o_proj"
            )
        kernel = get_path(params, path)["kernel"]
        shape = kernel_shape(kernel)
        lead, d_in, d_out = shape[:-2], shape[-2], shape[-1]  # lead: [L] or [L, E]
        k = jax.random.fold_in(key, i)
        if cfg.init == "gaussian":
            # PEFT init_lora_weights="gaussian": normal(std = 1 / r) on lora_A.
            a = jax.random.normal(k, (*lead, d_in, cfg.rank), jnp.float32) / cfg.rank
        else:
            # PEFT: kaiming_uniform_(a=sqrt(5)) on lora_A [r, in] -> U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, (*lead, d_in, cfg.rank), jnp.float32, -bound, bound)
        node = {"lora_a": a, "lora_b": jnp.zeros((*lead, cfg.rank, d_out), jnp.float32)}
        if cfg.use_dora:
            node["magnitude"] = dora_magnitude(kernel, node["lora_a"], node["lora_b"], cfg.scale)
        adapter = set_path(adapter, path, node)
    return adapter


@jax.jit
def _dora_magnitude(kernel: Any, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    def one(args):  # one layer: kernel [in, out] (or its quant dict), a [in, r], b [r, out]
        k, a1, b1 = args
        return dora_column_norm(dense_kernel(k), a1, b1, scale)

    return jax.lax.map(one, (kernel, a, b))  # [L, out]


def dora_magnitude(kernel: Any, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """DoRA's initial magnitude ||W + scale·A·B|| per output feature: [L, out] fp32.

    As PEFT's `DoraLinearLayer.update_layer`. Computed layer by layer (`lax.map`), so a quantised
    base is dequantised one layer at a time.
    """
    return _dora_magnitude(kernel, a, b, jnp.float32(scale))


# ----------------------------------------------------------------------------- PiSSA


def _orthonormal_basis(m: jax.Array, q: int, niter: int, key: jax.Array) -> jax.Array:
    """torch.svd_lowrank's `get_approximate_basis`: Q [rows, q] spanning m's top-q range.

    Halko et al. randomized range finder with `niter` subspace (power) iterations, each
    re-orthonormalised by QR (m is [rows, cols]).
    """
    r = jax.random.normal(key, (m.shape[1], q), jnp.float32)
    qm, _ = jnp.linalg.qr(m @ r)

    def body(_, qm):
        qn, _ = jnp.linalg.qr(m.T @ qm)
        qm, _ = jnp.linalg.qr(m @ qn)
        return qm

    return jax.lax.fori_loop(0, niter, body, qm)


def pissa_factors(
    w: jax.Array, rank: int, scale: float, niter: int, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """PiSSA's (A [in, r], B [r, out]) for one kernel w [in, out], as PEFT's `pissa_init`.

    PEFT (weight = w.T, [out, in]): weight = V S Uh;  lora_A = diag(sqrt(S_r / scale)) Uh_r,
    lora_B = V_r diag(sqrt(S_r / scale)), so scale · lora_B @ lora_A is the top-r part of the
    weight. `niter == 0` is the exact SVD ("pissa"); otherwise torch.svd_lowrank with q = r and
    `niter` subspace iterations ("pissa_niter_{niter}").
    """
    m = w.astype(jnp.float32).T  # PEFT's weight [out, in]
    if niter == 0:
        v, s, uh = jnp.linalg.svd(m, full_matrices=False)
        v, s, uh = v[:, :rank], s[:rank], uh[:rank]
    else:
        basis = _orthonormal_basis(m, rank, niter, key)  # [out, r]
        ub, s, uh = jnp.linalg.svd(basis.T @ m, full_matrices=False)  # [r, in] -> r components
        v = basis @ ub
    root = jnp.sqrt(s / scale)  # [r]
    a = uh.T * root[None, :]  # [in, r] = lora_A.T
    b = root[:, None] * v.T  # [r, out] = lora_B.T
    return a, b


def _requantize_like(w: jax.Array, like: Any) -> Any:
    """Quantise w [in, out] with the settings of quant dict `like` (one layer)."""
    kind = quant.quant_kind(like)
    if kind == "int8":
        return quant.quantize(w, 8)
    n_in = w.shape[-2]
    nb = (like["absmax"] if "absmax" in like else like["absmax_q"]).shape[-2]
    # The power-of-two block with ceil(in / block) == nb; one block: any power of two >= in
    # (zero padding does not change a block's absmax).
    block = 1 << ((n_in if nb == 1 else math.ceil(n_in / nb)) - 1).bit_length()
    return quant.quantize(w, 4, block_size=block, double_quant="absmax" not in like)


def _pissa_module(kernel: Any, keys: jax.Array, rank: int, scale: float, niter: int):
    """(a [L, in, r], b [L, r, out], residual kernel like `kernel`), one layer at a time."""

    def one(args):
        k, key = args
        w = dense_kernel(k)  # [in, out] fp32
        a, b = pissa_factors(w, rank, scale, niter, key)
        residual = w - scale * (a @ b)
        if quant.is_quantized(k):
            residual = _requantize_like(residual, k)
        else:
            residual = residual.astype(k.dtype)
        return a, b, residual

    return jax.lax.map(one, (kernel, keys))


_pissa_module_jit = jax.jit(_pissa_module, static_argnums=(2, 3, 4))


def init_pissa(key: jax.Array, params: dict, cfg: LoraConfig, niter: int = 0) -> tuple[dict, dict]:
    """PiSSA: (adapter from the top-r singular components, params with residual kernels).

    The residual W - scale·A·B replaces each targeted kernel (same dtype; a quantised kernel is
    dequantised, decomposed and re-quantised with its own settings), so residual + adapter is
    the original model at step 0. DoRA's magnitude is then ||residual + scale·A·B|| = ||W||.
    """
    adapter, new_params = {}, params
    for i, name in enumerate(cfg.targets):
        path = module_path(params, name)
        if is_expert_path(path):
            raise UserError(
                f"pissa_init: PiSSA on MoE experts ({name}) is not supported; target only "
                "q_proj,k_proj,v_proj,o_proj or use the default init"
            )
        kernel = get_path(params, path)["kernel"]
        n_layers, d_in, d_out = kernel_dims(kernel)
        if cfg.rank > min(d_in, d_out):
            raise UserError(
                f"pissa_init: lora_rank {cfg.rank} exceeds min(in, out) = {min(d_in, d_out)} "
                f"of {name}"
            )
        keys = jax.random.split(jax.random.fold_in(key, i), n_layers)
        a, b, residual = _pissa_module_jit(kernel, keys, cfg.rank, float(cfg.scale), int(niter))
        node = {"lora_a": a, "lora_b": b}
        if cfg.use_dora:
            node["magnitude"] = dora_magnitude(residual, a, b, cfg.scale)
        adapter = set_path(adapter, path, node)
        new_params = set_path(new_params, path + ("kernel",), residual)
    return adapter, new_params


def pissa_to_lora(trained: Adapter, initial: Adapter) -> Adapter:
    """A PiSSA adapter as a plain LoRA on the ORIGINAL base, as PEFT's
    `save_pretrained(path_initial_model_for_weight_conversion=...)` converts it.

    W = W_res + s·A0·B0 and W_res + s·A·B = W + s·(A·B - A0·B0) = W + s·[A, A0]·[B; -B0]:
    rank doubles, alpha doubles (x sqrt(2) with rsLoRA) so the scale is unchanged. A DoRA
    magnitude carries over as is (the merged direction W_res + s·A·B is the same weight).
    """
    c = trained.config
    params: dict = {}
    for path, node in iter_modules(trained.params):
        init = get_path(initial.params, path)
        out = dict(node)
        out["lora_a"] = jnp.concatenate([node["lora_a"], init["lora_a"]], axis=-1)  # [L, in, 2r]
        out["lora_b"] = jnp.concatenate([node["lora_b"], -init["lora_b"]], axis=-2)  # [L, 2r, out]
        params = set_path(params, path, out)
    alpha = c.alpha * (math.sqrt(2.0) if c.use_rslora else 2.0)
    config = dataclasses.replace(c, rank=2 * c.rank, alpha=alpha, init="kaiming")
    return Adapter(params, config)


# ----------------------------------------------------------------------------- merge


def merge(params: dict, adapter: Adapter) -> dict:
    """Base params with the adapter folded in: W' = W + s·A·B (DoRA: m · (W + s·A·B) / ‖·‖).

    Returns a new tree (untouched leaves shared); merged kernels keep the base dtype, or fp32
    when the base kernel is quantised.
    """
    out = params
    s = adapter.config.scale
    for path, node in iter_modules(adapter.params):
        base = get_path(params, path)["kernel"]
        w = dense_kernel(base)
        a, b = node["lora_a"].astype(jnp.float32), node["lora_b"].astype(jnp.float32)
        merged = w + s * jnp.einsum("...ir,...ro->...io", a, b)
        if "magnitude" in node:
            # PEFT merge: the norm is taken of the merged weight W + s·A·B (per output column).
            norm = jnp.sqrt(jnp.sum(merged * merged, axis=-2, keepdims=True))
            merged = merged * (node["magnitude"][:, None, :] / norm)
        dtype = jnp.float32 if quant.is_quantized(base) else base.dtype
        out = set_path(out, path + ("kernel",), merged.astype(dtype))
    return out


def iter_modules(adapter_params: dict):
    """Yield (module path, {lora_a, lora_b[, magnitude]}) for every adapted module."""
    for name in LINEAR_MODULES:
        for path in candidate_paths(name):
            if _has_path(adapter_params, path):
                yield path, get_path(adapter_params, path)


def adapter_targets(adapter_params: dict) -> tuple[str, ...]:
    found = {q for q, _ in iter_modules(adapter_params)}
    return tuple(n for n in LINEAR_MODULES if any(p in found for p in candidate_paths(n)))


def num_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
