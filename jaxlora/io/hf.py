"""Hugging Face safetensors <-> jaxlora params pytree.

Loading streams tensor slices straight into (possibly sharded) device arrays: each leaf of the
stacked param tree is built with `jax.make_array_from_callback`, whose callback reads only the
slice a device needs from the safetensors files (memory-mapped), transposes HF's `[out, in]` to
our `[in, out]` and casts. No full host copy of the model is ever held; at most one device shard
of one leaf is in flight. Weights are read from safetensors only — pickled `.bin` files are never
opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxlora.errors import UserError
from jaxlora.io import placement
from jaxlora.models.attention import AttentionSpec
from jaxlora.models.config import ModelConfig
from jaxlora.models.llama import Decoder

SUFFIX = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def abstract_params(cfg: ModelConfig, dtype: Any = jnp.float32) -> tuple[dict, dict]:
    """(ShapeDtypeStruct tree, logical PartitionSpec tree) of the model's params.

    Tracing the model's init costs ~0.3 s even for a tiny model and a run asks 2-3 times (load,
    placement, export), so results are kept per (config, dtype); callers get fresh dicts over
    the shared immutable leaves. A config with an unhashable field is traced every time."""
    try:
        hash(cfg)
    except TypeError:
        return _trace_abstract_params(cfg, jnp.dtype(dtype))
    shapes, logical = _cached_abstract_params(cfg, jnp.dtype(dtype))
    return _copy_dicts(shapes), _copy_dicts(logical)


def _trace_abstract_params(cfg: ModelConfig, dtype: Any) -> tuple[dict, dict]:
    # Shapes only: dense attention, no kernel line for the 8-token dummy row.
    model = Decoder(
        cfg, dtype=dtype, param_dtype=dtype, attention=AttentionSpec(kernel="xla", quiet=True)
    )
    ids = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    logical = nn.get_partition_spec(boxed)
    return nn.unbox(boxed), logical


_cached_abstract_params = functools.lru_cache(maxsize=16)(_trace_abstract_params)


def _copy_dicts(tree: Any) -> Any:
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def is_expert_leaf(path: tuple[str, ...]) -> bool:
    """A leaf stacked over layers AND experts ([L, E, ...]): one HF tensor per (layer, expert)."""
    return len(path) > 3 and path[0] == "layers" and path[2] == "experts"


def hf_names(path: tuple[str, ...], num_layers: int, cfg: ModelConfig | None = None) -> list[str]:
    """HF tensor names for one leaf: one per layer for stacked leaves, one per (layer, expert)
    in row-major order for MoE expert leaves (`cfg` needed), else a single name. The decoder's
    prefix is `cfg.weight_prefix` (Gemma 3 multimodal checkpoints keep the text decoder under
    `model.language_model.`), else `model.`."""
    prefix = cfg.weight_prefix if cfg is not None else "model."
    suffix = SUFFIX[path[-1]]
    if path[0] == "lm_head":
        return [f"lm_head.{suffix}"]
    if path[0] == "layers":
        mid = ".".join(path[1:-1])
        if is_expert_leaf(path):  # layers/<block>/experts/<proj>/kernel
            assert cfg is not None, "expert leaves need the model config"
            block, proj = path[1], path[3]
            return [
                f"model.layers.{i}.{block}.experts.{e}.{proj}.{suffix}"
                for i in range(num_layers)
                for e in range(cfg.num_experts)
            ]
        return [f"{prefix}layers.{i}.{mid}.{suffix}" for i in range(num_layers)]
    return [prefix + ".".join(path[:-1]) + "." + suffix]


# Gemma 3 (multimodal) checkpoints saved before transformers 4.52 keep the text decoder here.
_OLD_GEMMA3_PREFIX = "language_model.model."


def checkpoint_config(cfg: ModelConfig, index: dict[str, Path]) -> ModelConfig:
    """`cfg` with the weight prefix this checkpoint uses (old Gemma 3 layout, see above)."""
    probe = f"{cfg.weight_prefix}embed_tokens.weight"
    if cfg.model_type == "gemma3" and probe not in index:
        if f"{_OLD_GEMMA3_PREFIX}embed_tokens.weight" in index:
            return dataclasses.replace(cfg, weight_prefix=_OLD_GEMMA3_PREFIX)
    return cfg


def extra_hf_tensors(model_dir: str | Path, cfg: ModelConfig) -> Iterator[tuple[str, Any]]:
    """(name, array) of the tensors a Gemma 3 multimodal checkpoint has besides its text decoder
    (vision tower, projector), read one at a time: a merged export passes them through
    unchanged so transformers loads the whole model. Nothing for the text-only families."""
    if cfg.model_type != "gemma3":
        return
    index = safetensors_index(model_dir)
    cfg = checkpoint_config(cfg, index)
    abstract, _ = abstract_params(cfg, jnp.float32)
    ours = {
        n
        for kp, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]
        for n in hf_names(_key_path(kp), cfg.num_hidden_layers, cfg)
    }
    for n in sorted(set(index) - ours - {"lm_head.weight", "language_model.lm_head.weight"}):
        with safe_open(str(index[n]), framework="numpy") as h:
            yield n, h.get_tensor(n)


def stack_index(path: tuple[str, ...], i: int, cfg: ModelConfig) -> int | tuple[int, int]:
    """Index into a stacked leaf of its i-th HF tensor: the layer, or (layer, expert)."""
    return divmod(i, cfg.num_experts) if is_expert_leaf(path) else i


def _key_path(kp) -> tuple[str, ...]:
    return tuple(k.key for k in kp)


def safetensors_index(model_dir: str | Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file, from the index.json or by scanning the files."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
        if missing:
            raise UserError(f"{index} lists shard files that are missing: {', '.join(missing)}")
        return {name: d / f for name, f in weight_map.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for pat in PICKLE_PATTERNS for p in d.glob(pat))
        if pickled:
            raise UserError(
                f"{d}: only pickle weights found ({', '.join(pickled[:3])}); jaxlora loads "
                "safetensors only and never unpickles. Convert to safetensors first, e.g. "
                "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
                "safe_serialization=True)` in an environment you trust."
            )
        raise UserError(f"{d}: no *.safetensors weight files found")
    out = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as h:
            for name in h.keys():
                out[name] = f
    return out


@contextlib.contextmanager
def _open_all(files) -> Iterator[dict[Path, Any]]:
    with contextlib.ExitStack() as stack:
        yield {f: stack.enter_context(safe_open(str(f), framework="numpy")) for f in set(files)}


def _read_slice(handle, name: str, idx: tuple[slice, ...], transpose: bool) -> np.ndarray:
    sl = handle.get_slice(name)
    if transpose:  # ours [in, out] <- HF [out, in]
        return np.asarray(sl[idx[1], idx[0]]).T
    return np.asarray(sl[idx] if idx else sl[:])


def load_params(
    model_dir: str | Path,
    cfg: ModelConfig,
    dtype: Any = jnp.bfloat16,
    shardings: dict | None = None,
    transform: Callable[[tuple[str, ...]], Callable | None] | None = None,
    transform_shardings: dict | None = None,
) -> dict:
    """Load an HF checkpoint into the stacked params pytree.

    `shardings`: optional tree of `jax.sharding.Sharding` for the loaded `dtype` weights (same
    structure as the params); each device reads only its own slice, so on a multi-host run
    every host reads only the safetensors slices of its own devices. Without it every leaf goes
    to this process's first local device.

    `transform(path)`: optional; a jittable per-layer function for that leaf (e.g. NF4 / int8
    quantisation, `[in, out] -> dict of arrays`) or None to load the leaf as is. A transformed
    leaf is loaded ONE LAYER at a time into the placement `shardings` gives it (each device reads
    its slice of that layer), transformed by a jitted SPMD program on the devices that hold the
    slices (reductions such as NF4's per-kernel mean become collectives), and written into its
    slot of the stacked result, placed by `transform_shardings[path]` (a tree shaped like the
    function's output with the leading layer axis). No host ever holds a whole leaf, and at most
    one layer of one kernel is on the devices in `dtype`.
    """
    abstract, _ = abstract_params(cfg, dtype)
    index = safetensors_index(model_dir)
    cfg = checkpoint_config(cfg, index)
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    names = {_key_path(kp): hf_names(_key_path(kp), cfg.num_hidden_layers, cfg) for kp, _ in flat}
    missing = [n for ns in names.values() for n in ns if n not in index]
    if missing:
        raise UserError(
            f"{model_dir}: checkpoint is missing {len(missing)} tensor(s) the {cfg.model_type} "
            f"config needs, e.g. {', '.join(missing[:4])}"
        )
    # This process's first device (on a multi-host run jax.devices()[0] belongs to process 0).
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    flat_shardings = placement.flat_by_path(shardings)
    flat_out = placement.flat_by_path(transform_shardings)
    out = {}
    with _open_all(index.values()) as handles:
        for kp, leaf in flat:
            path = _key_path(kp)
            leaf_names = names[path]
            stacked = path[0] == "layers"
            n_stack = (2 if is_expert_leaf(path) else 1) if stacked else 0  # [L(, E), ...]
            transpose = path[-1] == "kernel"
            per_shape = leaf.shape[n_stack:]
            hf_shape = tuple(reversed(per_shape)) if transpose else per_shape
            for n in leaf_names:
                got = tuple(handles[index[n]].get_slice(n).get_shape())
                if got != hf_shape:
                    raise UserError(
                        f"{model_dir}: tensor {n} has shape {list(got)}, config.json implies "
                        f"{list(hf_shape)}"
                    )

            def read(
                idx, leaf_names=leaf_names, n_stack=n_stack, transpose=transpose, shape=leaf.shape
            ):
                idx = tuple(idx)
                if not n_stack:
                    n = leaf_names[0]
                    return _read_slice(handles[index[n]], n, idx, transpose).astype(dtype)
                # the stacked index ranges ([L] or [L, E]) select HF tensors in row-major order
                grid = np.arange(len(leaf_names)).reshape(shape[:n_stack])[idx[:n_stack]]
                parts = [
                    _read_slice(
                        handles[index[leaf_names[i]]], leaf_names[i], idx[n_stack:], transpose
                    )
                    for i in grid.reshape(-1)
                ]
                per = parts[0].shape
                return np.stack(parts).reshape(grid.shape + per).astype(dtype)

            sharding = flat_shardings.get(path, default)
            fn = transform(path) if transform is not None else None
            if fn is None:
                cached = placement.once_per_slice(read)
                out[path] = jax.make_array_from_callback(leaf.shape, sharding, cached)
                continue
            target = flat_out.get(path)
            if not stacked:
                w = jax.make_array_from_callback(leaf.shape, sharding, read)
                out[path] = placement.jit_for(fn, target, default)(w)
                continue
            # One layer at a time: [*rest] or, for MoE experts, [E, *rest] (its E axis may be
            # split over the "expert" mesh axis; the per-layer function keeps leading axes).
            unit = leaf.shape[1:]
            layer_in = placement.drop_stack_axes(sharding, 1)
            if target is None:
                target = jax.tree_util.tree_map(
                    lambda _: default, jax.eval_shape(fn, jax.ShapeDtypeStruct(unit, dtype))
                )
            layer_out = jax.tree_util.tree_map(lambda t: placement.drop_stack_axes(t, 1), target)
            one = placement.jit_for(fn, layer_out, default)
            acc = None
            for i in range(leaf.shape[0]):

                def read_layer(idx, i=i, read=read):  # layer i's slice for one device
                    return read((slice(i, i + 1), *idx))[0]

                w = jax.make_array_from_callback(
                    unit, layer_in, placement.once_per_slice(read_layer)
                )  # each device holding its slice of layer i
                slot = np.asarray([i], np.int32)
                acc = placement.put_layer(acc, one(w), slot, (leaf.shape[0],), target)
            out[path] = acc
    return _unflatten(out)


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def params_to_hf_tensors(params: dict, cfg: ModelConfig, dtype: Any) -> Iterator[tuple]:
    """Yield (hf_name, numpy array in HF layout) one tensor at a time.

    Stacked leaves are read one layer at a time (`distributed.to_host`): on a multi-host run that
    is a collective, so every process must drain this generator in the same order, and no more
    than one layer of one leaf is ever gathered in one place.
    """
    from jaxlora.parallel.distributed import to_host

    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = _key_path(kp)
        names = hf_names(path, cfg.num_hidden_layers, cfg)
        for i, n in enumerate(names):
            t = to_host(leaf[stack_index(path, i, cfg)]) if path[0] == "layers" else to_host(leaf)
            if path[-1] == "kernel":
                t = t.T
            yield n, np.ascontiguousarray(t.astype(dtype))


def base_hf_tensors(model_dir: str | Path, cfg: ModelConfig) -> Iterator[tuple]:
    """Yield (param path, stacked index (layer, or (layer, expert)) or None, hf_name, array in HF
    layout and the checkpoint's dtype) for every tensor the config needs, read one at a time
    from disk (`export --merged`).

    Each tensor opens its file anew, so the memory map (whose touched pages count as resident)
    is dropped after every tensor instead of growing to the whole checkpoint.
    """
    abstract, _ = abstract_params(cfg, jnp.float32)
    index = safetensors_index(model_dir)
    cfg = checkpoint_config(cfg, index)
    for kp, _leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        path = _key_path(kp)
        for i, n in enumerate(hf_names(path, cfg.num_hidden_layers, cfg)):
            if n not in index:
                raise UserError(f"{model_dir}: checkpoint is missing tensor {n}")
            with safe_open(str(index[n]), framework="numpy") as h:
                t = h.get_tensor(n)
            yield path, (stack_index(path, i, cfg) if path[0] == "layers" else None), n, t


def write_hf_shards(
    tensors: Iterable[tuple[str, np.ndarray]], out_dir: str | Path, max_shard_bytes: int
) -> list[Path]:
    """Write (name, array) pairs as HF safetensors shards, each shard as soon as it is full, so
    at most one shard (plus the tensor in hand) is held in memory. The shard count is known only
    at the end: shards are written under temporary names and renamed to HF's
    `model-0000i-of-0000n.safetensors` (or `model.safetensors` when there is one) with an index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush() -> None:
        tmp = out / f".shard-{len(written):05d}.safetensors"
        write_safetensors(shard, tmp, metadata={"format": "pt"})
        written.append((tmp, list(shard)))

    for name, t in tensors:
        if size + t.nbytes > max_shard_bytes and shard:
            flush()
            shard, size = {}, 0
        shard[name] = t
        size += t.nbytes
        total += t.nbytes
    if shard or not written:
        flush()
    shard = {}
    files, weight_map = [], {}
    for i, (tmp, names) in enumerate(written):
        fname = (
            "model.safetensors"
            if len(written) == 1
            else f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        )
        tmp.rename(out / fname)
        files.append(out / fname)
        weight_map.update({n: fname for n in names})
    if len(written) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "int8": "I8"}


def write_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict) -> None:
    """A safetensors file written straight from the arrays' buffers: 8-byte header length,
    JSON header (dtype, shape, byte offsets), then the data. `safetensors.numpy.save_file` first
    copies every tensor to `bytes`, doubling the peak memory of a merged export's shard."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    arrays = {n: np.ascontiguousarray(t) for n, t in tensors.items()}
    for name, t in arrays.items():
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype.name],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in arrays.values():
            f.write(memoryview(t.reshape(-1).view(np.uint8)))


def save_params_hf(
    params: dict,
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    dtype: Any = jnp.bfloat16,
    max_shard_bytes: int = 4 * 1024**3,
) -> list[Path]:
    """Write params as HF safetensors (sharded with an index when larger than one shard)."""
    return write_hf_shards(params_to_hf_tensors(params, cfg, dtype), out_dir, max_shard_bytes)
