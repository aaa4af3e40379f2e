"""Cached reference log-probs for the DPO stage (`precompute_ref_logps: true`).

Why this module exists: `jaxlora.train.dpo` is about the preference step itself (reference model,
pairs, loss); storing the reference's answers on disk is a separate concern with its own rules,
so it lives here. Before training, the reference log-probs of every train/eval pair are computed
once and stored at `$JAXLORA_CACHE/ref_logps/<key>.npz` (default `~/.cache/jaxlora`), keyed by a
fingerprint of model (config.json + sampled content of every weight file + dtype/quantisation +
the initial adapter's values), data (the encoded token ids of train and eval), template and
lengths. `DPOSetup` then feeds the tables into the batches as `ref_chosen_logps` /
`ref_rejected_logps` and the step traces no reference forward.

Tables are `{"train": [N, pairs_per_row, 2], "eval": ...}` fp32, (chosen, rejected) in the last
axis. This module does not import `jaxlora.train.dpo`; the reference pass comes in as a callable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.data.pipeline import fingerprint as data_fingerprint
from jaxlora.losses.fused_ce import fused_ce_positions
from jaxlora.parallel import distributed
from jaxlora.parallel.distributed import to_host

CACHE_FORMAT = "jaxlora-ref-logps-1"

# reference_fn(module, chunk_size) -> ref(frozen, batch) -> (chosen, rejected) [B, P]
ReferenceFactory = Callable[[Any, int | None], Callable]


def cache_root() -> Path:
    """`$JAXLORA_CACHE` (default `~/.cache/jaxlora`), shared with the tiny demo model."""
    return Path(os.environ.get("JAXLORA_CACHE", Path.home() / ".cache" / "jaxlora"))


def _mesh_context(run: Any):
    mesh = getattr(run, "mesh", None)
    if mesh is None:
        return contextlib.nullcontext()
    from jaxlora.parallel import sharding

    return sharding.mesh_context(mesh)


def _file_digest(path: Path, chunk: int = 1 << 16, samples: int = 16) -> str:
    """Name, size and sha256 of 16 evenly spaced 64 KiB chunks (incl. the first and last).

    Content, not mtime: every host of a multi-host run must derive the same key, and a
    re-generated checkpoint with equal shapes (same safetensors header) must not match.
    """
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    offsets = {min(size * i // samples, max(size - chunk, 0)) for i in range(samples)}
    offsets.add(max(size - chunk, 0))
    with open(path, "rb") as fh:
        for off in sorted(offsets):
            fh.seek(off)
            h.update(fh.read(chunk))
    return h.hexdigest()


def _tree_digest(tree: Any) -> str:
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = to_host(x)  # a collective for arrays sharded across hosts: all hosts hash
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _gather_rows(x: jax.Array) -> np.ndarray:
    """All rows of a batch output on every host (global arrays or per-host local slices)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    # tiled: a global array comes back whole; per-host local slices are concatenated in
    # process order (the batch rows are split across hosts in that order).
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def fingerprint(run: Any, data: Any, initial: Any, packed: bool) -> str:
    """sha256 over everything the reference log-probs depend on (see the module docstring).

    `initial` is the initial trainable tree the reference uses, or None for the adapters-off base.
    """
    cfg, report = run.cfg, data.report
    model_dir = Path(run.model.path) if run.model.path else None
    files = {}
    if model_dir is not None:
        for p in sorted(model_dir.glob("*.safetensors")):
            files[p.name] = _file_digest(p)
    parts = {
        "format": CACHE_FORMAT,
        "model_config": run.model.raw_config or repr(run.model.config),
        "weights": files,
        "mode": run.mode,
        "dtype": str(jnp.dtype(run.model.dtype)),
        "quantization": [
            cfg.model.quantization_bit,
            cfg.model.quantization_type,
            cfg.model.double_quantization,
        ],
        "attention": cfg.model.attention,
        # LoRA reference = base + initial adapter; full/freeze copies come from the files.
        "ref_adapter": _tree_digest(initial) if run.mode == "lora" and initial else None,
        "adapter_spec": repr(run.adapter_spec) if initial is not None else None,
        # The loaders' content hash (no pass over the samples); lists built elsewhere: hashed.
        "data": getattr(data.report, "fingerprint", "") or data_fingerprint(data.train, data.eval),
        "n": [len(data.train), len(data.eval)],
        "template": [report.template_name, report.chat_template],
        "lengths": [cfg.data.cutoff_len, cfg.data.max_prompt_length, packed],
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def cache_file(key: str) -> Path:
    """Where the tables for fingerprint `key` are stored."""
    return cache_root() / "ref_logps" / f"{key[:32]}.npz"


def expected_shapes(data: Any, pairs_per_row: int) -> dict[str, tuple[int, ...]]:
    """Table shape per split the run has: [N, pairs_per_row, 2]."""
    p = pairs_per_row
    out = {"train": (len(data.train), p, 2)}
    if data.eval:
        out["eval"] = (len(data.eval), p, 2)
    return out


def load_tables(
    path: Path, key: str, shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray] | None:
    """The tables stored at `path` for `key`, or None when absent, stale, partial or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            tables = {k: np.asarray(z[k]) for k in shapes}
    except (OSError, KeyError, ValueError):
        return None  # unreadable or partial: recompute
    if any(tables[k].shape != s for k, s in shapes.items()):
        return None
    return tables


def save_tables(path: Path, key: str, tables: dict[str, np.ndarray]) -> None:
    """Atomic write (temp file + rename); every host writes its own copy if it lacks one,
    so caches on host-local disks also hit next time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{jax.process_index()}.tmp.npz")
    try:
        np.savez(tmp, key=np.asarray(key), **tables)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def precompute_tables(
    run: Any,
    data: Any,
    frozen: dict,
    reference_fn: ReferenceFactory,
    packed: bool,
    pairs_per_row: int,
) -> dict[str, np.ndarray]:
    """Reference log-probs of every train/eval sample: [N, pairs_per_row, 2] (chosen,
    rejected), batched and jitted like the eval step."""
    per_device = run.cfg.train.resolved_eval_batch_size
    mesh = getattr(run, "mesh", None)
    if mesh is not None:
        from jaxlora.parallel import sharding

        batch_size = per_device * sharding.batch_shards(mesh)
    else:
        batch_size = per_device * jax.device_count()
    module = run.model.module(run.adapter_spec)
    rows = per_device * (1 if packed else 2)
    chunk = fused_ce_positions(
        rows, run.model.config.vocab_size, None
    )  # as the step builder, per device
    fn = jax.jit(reference_fn(module, chunk))
    tables = {}
    for split, samples in (("train", data.train), ("eval", data.eval)):
        if not samples:
            continue
        batcher = data.in_order_batcher(samples, batch_size)
        table = np.zeros((len(samples), pairs_per_row, 2), np.float32)
        for step in range(len(batcher)):
            idx = batcher.global_indices(0, step)
            batch = run.put_batch(batcher.get(0, step))
            with _mesh_context(run):  # activation sharding constraints, as in the steps
                rc, rr = fn(frozen, batch)
            keep = idx >= 0
            table[idx[keep], :, 0] = _gather_rows(rc)[keep]
            table[idx[keep], :, 1] = _gather_rows(rr)[keep]
        tables[split] = table
    return tables


def cached_tables(
    run: Any,
    data: Any,
    base: Any,
    initial: Any,
    reference_fn: ReferenceFactory,
    *,
    packed: bool,
    pairs_per_row: int,
    log: Callable[[str], None],
) -> tuple[dict[str, np.ndarray], Path, bool]:
    """(tables, cache file, hit): read from the on-disk cache, computed and saved on a miss.

    `base` is the frozen base params, `initial` the initial trainable tree the reference needs
    (None: the adapters-off base).
    """
    key = fingerprint(run, data, initial, packed)
    path = cache_file(key)
    tables = load_tables(path, key, expected_shapes(data, pairs_per_row))
    # A hit must be unanimous, or the hosts would run different programs.
    hit = not distributed.agree_on_flag(tables is None)
    if hit:
        log(f"reference log-probs: read from cache {path}")
        return tables, path, True
    t0 = time.perf_counter()
    frozen = {"base": base}
    if initial is not None:
        frozen["ref_trainable"] = initial
    tables = precompute_tables(run, data, frozen, reference_fn, packed, pairs_per_row)
    save_tables(path, key, tables)
    log(
        f"reference log-probs: computed for {len(data.train)} train / "
        f"{len(data.eval)} eval samples in {time.perf_counter() - t0:.1f}s, "
        f"cached at {path}"
    )
    return tables, path, False
