"""On-disk tokenised samples: memory-mapped, keyed by a fingerprint of everything that made them.

Why this file exists: a 1M-row SFT set held as Python objects needs tens of GB, and every rerun,
resume, eval and ``data stats`` tokenised it again. Here each dataset is tokenised once into a
directory under ``$JAXLORA_CACHE/data/<key>`` (default ``~/.cache/jaxlora``), and the samples
are read back lazily, row by row, so host memory does not grow with the dataset.

Format: plain numpy arrays in raw files, one per sample field, all samples concatenated, plus
an int64 offsets array (``ids.bin`` + ``ids.off``), opened with ``np.memmap``. Chosen over Arrow
through ``datasets`` because the batcher needs random access to one sample as int32 arrays:
a memmap slice is that with no conversion, while ``Dataset.__getitem__`` builds Python lists
(or goes through its formatter) per row, and our samples are a handful of integer arrays with
no schema to speak of. The files are readable by any numpy (dtype and length in ``meta.json``).

A directory is written under a temporary name and renamed into place when complete, so a crash
or two concurrent builders (hosts sharing a filesystem) never leave a half-written cache; the
key covers the input files' bytes, the tokenizer, the template, every encoding option and the
source of the data package itself, so a code change never reads stale samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.data.encode import Example, PreferenceExample
from jaxlora.data.feedback import FeedbackExample

SAMPLE_TYPES = {c.__name__: c for c in (Example, PreferenceExample, FeedbackExample)}
_SMALL = {"loss_mask": np.int8}  # 0/1 fields stored narrow; read back as int32
_CODE_FILES = (
    "cache.py",
    "build.py",
    "views.py",
    "encode.py",
    "byte_offsets.py",
    "formats.py",
    "templates.py",
    "packing.py",
    "feedback.py",
    "loading.py",
)


def cache_root() -> Path:
    """`$JAXLORA_CACHE/data` (default `~/.cache/jaxlora/data`)."""
    return Path(os.environ.get("JAXLORA_CACHE", Path.home() / ".cache" / "jaxlora")) / "data"


def data_cache_dir(cfg: Any) -> Path:
    """Where a run's tokenised datasets are cached (``cfg``: a ``jaxlora.config.Config``):
    `tokenized_path`, else `$JAXLORA_CACHE/data`."""
    return Path(cfg.data.tokenized_path) if cfg.data.tokenized_path else cache_root()


def _code_digest() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in _CODE_FILES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (of every file, in name order, for a directory)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else "").encode() + b"\0")
        with f.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """Everything about a (fast) tokenizer that changes its ids: vocabulary, merges, normaliser,
    added and special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def data_key(**inputs: Any) -> str:
    """Hex key of a JSON-able dict of inputs plus the data package's source code."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob + _code_digest().encode()).hexdigest()[:24]


class StoreWriter:
    """Appends encoded samples of one type, field by field, to raw files in ``directory``."""

    def __init__(self, directory: Path, sample_type: type):
        self.dir = directory
        self.type = sample_type
        self.fields: dict[str, dict] = {}
        self.n = 0
        self._files: dict[str, Any] = {}
        self._hash = hashlib.sha256()

    def _put(self, name: str, arr: np.ndarray) -> None:
        if name not in self._files:
            self._files[name] = (self.dir / f"{name}.bin").open("wb")
        data = np.ascontiguousarray(arr).tobytes()
        self._files[name].write(data)
        self._hash.update(name.encode() + data)

    def append(self, samples: list) -> None:
        """Write a chunk of samples (all of ``sample_type``)."""
        if not samples:
            return
        for f in dataclasses.fields(self.type):
            vals = [getattr(s, f.name) for s in samples]
            if all(v is None for v in vals):
                continue
            arrs = [np.asarray(v) for v in vals]
            scalar = arrs[0].ndim == 0
            dtype = np.dtype(_SMALL.get(f.name, np.int32))
            meta = self.fields.setdefault(f.name, {"dtype": dtype.str, "scalar": scalar, "len": 0})
            if scalar:
                flat = np.asarray(arrs, dtype)
            else:
                flat = np.concatenate(arrs).astype(dtype) if arrs else np.zeros(0, dtype)
                lens = np.fromiter((len(a) for a in arrs), np.int64, len(arrs))
                self._put(f"{f.name}.len", lens)
            self._put(f.name, flat)
            meta["len"] += len(flat)
        self.n += len(samples)

    def close(self, **extra: Any) -> dict:
        """Flush; write ``meta.json`` (type, fields, count, content digest, ``extra``)."""
        for fh in self._files.values():
            fh.close()
        meta = {
            "type": self.type.__name__,
            "n": self.n,
            "fields": self.fields,
            "digest": self._hash.hexdigest(),
            **extra,
        }
        for name, m in self.fields.items():  # lengths -> offsets (int64 [n+1])
            if not m["scalar"]:
                lens = np.fromfile(self.dir / f"{name}.len.bin", np.int64)
                np.concatenate([[0], np.cumsum(lens)]).astype(np.int64).tofile(
                    self.dir / f"{name}.off.bin"
                )
                (self.dir / f"{name}.len.bin").unlink()
        (self.dir / "meta.json").write_text(json.dumps(meta))
        return meta


def _map(path: Path, dtype: Any, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


class SampleStore(Sequence):
    """Read side of one cache directory: ``store[i]`` is sample i as a fresh in-memory sample
    (Example / PreferenceExample / FeedbackExample); nothing else is loaded."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.type = SAMPLE_TYPES[self.meta["type"]]
        self.n = int(self.meta["n"])
        self._cols: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for name, m in self.meta["fields"].items():
            data = _map(self.dir / f"{name}.bin", np.dtype(m["dtype"]), int(m["len"]))
            off = None if m["scalar"] else _map(self.dir / f"{name}.off.bin", np.int64, self.n + 1)
            self._cols[name] = (data, off)
        # Per-row columns, mapped now so a temporary directory may be deleted after opening.
        self._extra = {p.stem: np.load(p, mmap_mode="r") for p in self.dir.glob("*.npy")}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):  # type: ignore[override]
        if not -self.n <= i < self.n:
            raise IndexError(f"sample {i} outside a store of {self.n}")
        i = int(i) % self.n
        kw = {}
        for name, (data, off) in self._cols.items():
            if off is None:
                kw[name] = np.asarray(data[i], np.int32)
            else:
                kw[name] = np.array(data[off[i] : off[i + 1]], np.int32)
        return self.type(**kw)

    def lengths(self, field: str) -> np.ndarray:
        """[n] int64 length of ``field`` in every sample (from the offsets; no data read)."""
        return np.diff(self._cols[field][1])

    def column(self, name: str) -> np.ndarray:
        """A per-row array saved next to the samples (``np.save`` file ``<name>.npy``)."""
        return self._extra[name]


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete store ``tmp`` to ``final``. When another process (another run, or
    another group of hosts, sharing the cache) published the same key first, its copy is
    identical (same fingerprint) and is kept; ``tmp`` is left for the caller to remove."""
    try:
        os.rename(tmp, final)
    except OSError:  # ENOTEMPTY / EEXIST: ``final`` exists
        if not (final / "meta.json").exists():
            raise


def open_or_build(key: str, root: Path, build: Callable[[Path], None]) -> tuple[SampleStore, bool]:
    """The store at ``root/key``, built by ``build(tmp_dir)`` first if absent. Returns
    (store, hit). A failing build leaves nothing behind."""
    final = root / key
    if (final / "meta.json").exists():
        return SampleStore(final), True
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        build(tmp)
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SampleStore(final), False
