"""Multi-host tokenisation: each host encodes 1/P of a dataset into a shared cache directory.

Why this file exists: with P hosts every host used to tokenise every row (the same work P
times, each racing to rename the same cache entry). When the cache directory is shared by the
hosts, host i now encodes only chunks i, i + P, i + 2P, ... of each dataset into a part
directory, host 0 puts the parts back in chunk order into the usual cache entry (a copy of
already-encoded arrays, no tokenising), and every host reads that entry, which equals the
one-host build byte for byte (same samples, columns and content digest).

Whether the directory is shared is checked, not assumed: every host writes a probe file, and
only if every host sees every probe is the work split; otherwise each host builds the whole
dataset itself, as before. A bad row on any host is reported by every host as the same one-line
error (the failing host writes it next to the parts before the hosts meet again), so no host
waits forever for a part that will not come.

The hosts meet through ``hosts``: ``process_index``, ``process_count``, ``barrier(tag)`` and
``all(flag) -> bool`` (every host passed True). The trainer gives one made of JAX's multi-host
utilities; tests give one made of threads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.data.cache import SampleStore, StoreWriter, open_or_build, publish
from jaxlora.errors import UserError


def open_or_build_sharded(
    key: str, root: Path, build_part: Callable[[Path, tuple[int, int]], None], hosts: Any
) -> tuple[SampleStore, bool]:
    """``cache.open_or_build`` for P hosts: ``build_part(dir, (i, P))`` encodes host i's chunks.
    Returns (store, hit)."""
    pi, pc = hosts.process_index, hosts.process_count
    final = root / key
    if hosts.all((final / "meta.json").exists()):
        return SampleStore(final), True
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".{key}.hosts"
    work.mkdir(exist_ok=True)
    shutil.rmtree(work / f"part-{pi}", ignore_errors=True)  # left by a crashed run
    (work / f"error-{pi}").unlink(missing_ok=True)
    (work / f"probe-{pi}").write_text(str(os.getpid()))
    hosts.barrier(f"jaxlora-data-{key}-probe")
    shared = hosts.all(all((work / f"probe-{j}").exists() for j in range(pc)))
    if not shared:  # each host has its own directory: each builds everything
        return open_or_build(key, root, lambda d: build_part(d, (0, 1)))
    own: BaseException | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".part-{pi}-", dir=work))
        build_part(tmp, (pi, pc))
        os.rename(tmp, work / f"part-{pi}")
    except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other hosts
        own = e
        (work / f"error-{pi}").write_text(str(e))
    hosts.barrier(f"jaxlora-data-{key}-parts")
    if own is not None:
        raise own
    errors = sorted(work.glob("error-*"))
    if errors:
        raise UserError(errors[0].read_text())
    if pi == 0:
        _merge([SampleStore(work / f"part-{j}") for j in range(pc)], final, root)
    hosts.barrier(f"jaxlora-data-{key}-merged")
    if pi == 0:  # the parts are no longer read by anyone
        shutil.rmtree(work, ignore_errors=True)
    return SampleStore(final), False


def _merge(parts: list[SampleStore], final: Path, root: Path) -> None:
    """Interleave the parts' chunks (chunk c is part c % P's chunk c // P) into ``final``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        writer = StoreWriter(tmp, parts[0].type)
        chunks = [p.column("chunks") for p in parts]
        row_at = [0] * len(parts)  # next row / sample of each part
        sample_at = [0] * len(parts)
        cols: dict[str, list[np.ndarray]] = {"row_sample": [], "prompt_len": [], "answer_len": []}
        cols["chunks"], targets = [], []
        for c in range(sum(len(x) for x in chunks)):
            p, j = c % len(parts), c // len(parts)
            n_rows, n_samples = (int(v) for v in chunks[p][j])
            r0, s0 = row_at[p], sample_at[p]
            local = np.asarray(parts[p].column("row_sample")[r0 : r0 + n_rows])
            cols["row_sample"].append(np.where(local >= 0, local - s0 + writer.n, -1))
            for name in ("prompt_len", "answer_len"):
                cols[name].append(np.asarray(parts[p].column(name)[r0 : r0 + n_rows]))
            cols["chunks"].append(np.asarray([[n_rows, n_samples]], np.int64))
            if "targets" in parts[p]._extra:
                targets.append(np.asarray(parts[p].column("targets")[s0 : s0 + n_samples]))
            writer.append([parts[p][k] for k in range(s0, s0 + n_samples)])
            row_at[p], sample_at[p] = r0 + n_rows, s0 + n_samples
        for name, arrs in cols.items():
            np.save(tmp / f"{name}.npy", np.concatenate(arrs))
        if targets:
            np.save(tmp / "targets.npy", np.concatenate(targets))
        sums = {
            k: sum(int(p.meta[k]) for p in parts)
            for k in ("n_rows", "n_truncated", "n_answer_truncated", "n_dropped")
        }
        writer.close(label=parts[0].meta["label"], format=parts[0].meta["format"], **sums)
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
