"""Find datasets (paths, comma lists, LLaMA-Factory's dataset_info.json) and read their rows.

JSON, JSON Lines and CSV are parsed here with the standard library rather than through
``datasets.load_dataset``: Arrow schema inference turns a single mistyped row into an opaque
cast error and loses line numbers, and CSV cells should stay text ("5" is an answer, not an
int). Parquet, Arrow and saved ``datasets`` directories go through HF ``datasets``. Every row
comes back with a ``where`` label ("data/train.json row 3", "data/train.jsonl line 7") that
every later error message starts with.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxlora.data.formats import SourceSpec
from jaxlora.errors import UserError, did_you_mean

SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow")
# Registry keys that point at data we cannot read offline / do not support.
_REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_MEDIA_COLUMNS = ("images", "videos", "audios")


def _split_names(dataset: str | list[str] | tuple[str, ...]) -> list[str]:
    names = dataset.split(",") if isinstance(dataset, str) else list(dataset)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise UserError("config key `dataset` is empty; give a file path or a dataset name")
    return names


def _registry(dataset_dir: Path | None) -> dict[str, Any]:
    if dataset_dir is None:
        return {}
    path = dataset_dir / "dataset_info.json"
    if not path.exists():
        return {}
    try:
        reg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(reg, dict):
        raise UserError(f"{path}: expected a JSON object mapping dataset names to entries")
    return reg


def _from_registry(name: str, entry: Any, dataset_dir: Path, formatting: str) -> SourceSpec:
    where = f"{dataset_dir / 'dataset_info.json'} entry {name!r}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object, got {type(entry).__name__}")
    if "file_name" not in entry:
        remote = [k for k in _REMOTE_KEYS if k in entry]
        hint = (
            f" (it only has {remote[0]}; download the data and add `file_name`)" if remote else ""
        )
        raise UserError(f'{where}: no "file_name"; jaxlora reads local files only{hint}')
    columns = entry.get("columns") or {}
    media = [c for c in _MEDIA_COLUMNS if c in columns]
    if media:
        raise UserError(f"{where}: multimodal columns {media} are not supported (text only)")
    path = dataset_dir / str(entry["file_name"])
    # Registry files come with downloaded data: never follow them (.., absolute paths,
    # symlinks) outside the dataset dir.
    if not path.resolve().is_relative_to(dataset_dir.resolve()):
        raise UserError(
            f'{where}: "file_name" {entry["file_name"]!r} points outside the dataset dir '
            f"{dataset_dir}; registry entries may only name files inside it"
        )
    fmt = entry.get("formatting", "alpaca")
    if formatting not in ("auto", None, "") and formatting != fmt:
        fmt = formatting  # an explicit config value wins over the registry
    return SourceSpec(
        path=str(path),
        label=name,
        formatting=fmt,
        columns={k: v for k, v in columns.items() if isinstance(v, str)},
        tags=dict(entry.get("tags") or {}),
        ranking=bool(entry.get("ranking", False)),
    )


def resolve_demo_names(name: str | None) -> str | None:
    """`demo:<name>` items of a comma list -> the bundled demo file's path; others unchanged."""
    if name is None:
        return None
    demo = Path(__file__).resolve().parents[1] / "demo_data"
    parts = []
    for item in str(name).split(","):
        item = item.strip()
        if item.startswith("demo:"):
            path = demo / f"{item[5:]}.json"
            if not path.is_file():
                avail = sorted(p.stem for p in demo.glob("*.json"))
                raise UserError(
                    f"unknown demo dataset {item!r}; available: demo:" + ", demo:".join(avail)
                )
            item = str(path)
        parts.append(item)
    return ",".join(parts)


def resolve_datasets(
    dataset: str | list[str],
    dataset_dir: str | Path | None = None,
    formatting: str | None = "auto",
) -> list[SourceSpec]:
    """Turn ``dataset`` (path, comma list, registry names) into one SourceSpec per dataset.

    A name is looked up in ``dataset_dir/dataset_info.json`` first, then as a path (as given,
    then relative to ``dataset_dir``). The built-in demo sets are available as
    ``identity_sft`` and ``dpo_demo`` (files in ``jaxlora/demo_data``).
    """
    ddir = Path(dataset_dir) if dataset_dir else None
    if ddir is not None and not ddir.is_dir():
        raise UserError(f"config key `dataset_dir`: {ddir} is not a directory")
    reg = _registry(ddir)
    demo = Path(__file__).resolve().parents[1] / "demo_data"
    fmt = formatting or "auto"
    specs = []
    for name in _split_names(dataset):
        if name in reg:
            specs.append(_from_registry(name, reg[name], ddir, fmt))
            continue
        candidates = [Path(name).expanduser()]
        if ddir is not None and not Path(name).is_absolute():
            candidates.append(ddir / name)
        candidates.append(demo / f"{name}.json")
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            choices = list(reg) + [p.stem for p in demo.glob("*.json")]
            if ddir is not None:
                choices += [p.name for p in ddir.iterdir() if p.suffix in SUFFIXES]
            where = f" or in {ddir}/dataset_info.json" if reg else ""
            # A name close to one in the registry in use is meant, before any demo or file.
            hint = did_you_mean(name, list(reg)) or did_you_mean(name, choices)
            raise UserError(f"dataset {name!r} not found: no such file{where}{hint}")
        specs.append(SourceSpec(path=str(found), label=str(found), formatting=fmt))
    return specs


def _json_rows(path: Path, label: str) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".jsonl":  # line by line: memory does not grow with the file
        with path.open(encoding="utf-8-sig") as f:
            yield from _jsonl_lines(f, label)
        return
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # "Extra data" = several top-level values: JSON Lines
            raise UserError(
                f"{label} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})"
            ) from None
    else:
        if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise UserError(f"{label}: expected a JSON array of objects (or JSON Lines)")
            data = lists[0]
        if not isinstance(data, list):
            raise UserError(f"{label}: expected a JSON array of objects, got {type(data).__name__}")
        for i, row in enumerate(data):
            yield f"{label} row {i + 1}", row
        return
    yield from _jsonl_lines(text.splitlines(), label)


def _jsonl_lines(lines, label: str) -> Iterator[tuple[str, Any]]:
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{label} line {i + 1}: invalid JSON ({e.msg})") from None
        yield f"{label} line {i + 1}", row


def _hf_rows(path: Path, label: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise UserError(f"{label}: saved DatasetDict has no 'train' split ({list(ds)})")
                ds = ds["train"]
        else:
            builder = {".parquet": "parquet", ".arrow": "arrow"}[path.suffix]
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except UserError:
        raise
    except Exception as e:  # pyarrow/datasets raise many types for unreadable files
        raise UserError(f"{label}: cannot read as {path.suffix or 'datasets dir'}: {e}") from None
    for i, row in enumerate(ds):
        yield f"{label} row {i + 1}", row


def _csv_rows(path: Path, label: str) -> Iterator[tuple[str, Any]]:
    """CSV via the stdlib so every cell stays text ("5" is not turned into an int, empty cells
    are ""); list-valued fields may hold JSON (parsed by the format converters)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        try:
            for i, row in enumerate(csv.DictReader(f)):
                if None in row:
                    raise UserError(f"{label} row {i + 1}: more cells than header columns")
                yield f"{label} row {i + 1}", row
        except csv.Error as e:
            raise UserError(f"{label}: malformed CSV ({e})") from None


def _text_rows(path: Path, label: str) -> Iterator[tuple[str, Any]]:
    """Plain text: one document per non-empty line (as HF's `text` builder and LLaMA-Factory)."""
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            yield f"{label} line {i + 1}", {"text": line}


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def iter_rows(spec: SourceSpec, max_samples: int | None = None) -> Iterator[tuple[str, dict]]:
    """The rows (at most ``max_samples``) of one dataset as (where, row-dict) pairs, read lazily
    (JSON Lines, CSV and text line by line; a JSON array is parsed whole)."""
    path = Path(spec.path)
    if not path.exists():
        raise UserError(f"dataset {spec.label!r}: file {path} does not exist")
    if path.is_dir() and not _is_saved_dataset(path):
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise UserError(f"dataset {spec.label!r}: directory {path} has no data files")
    else:
        files = [path]
    n = 0
    for f in files:
        label = str(f)
        if f.is_dir():
            reader = _hf_rows
        elif f.suffix in (".json", ".jsonl"):
            reader = _json_rows
        elif f.suffix == ".txt":
            reader = _text_rows
        elif f.suffix == ".csv":
            reader = _csv_rows
        elif f.suffix in (".parquet", ".arrow"):
            reader = _hf_rows
        else:
            raise UserError(f"{label}: unsupported file type {f.suffix!r}; use one of {SUFFIXES}")
        for where, row in reader(f, label):
            if not isinstance(row, dict):
                raise UserError(
                    f"{where}: expected an object with named fields, got {type(row).__name__}"
                )
            yield where, row
            n += 1
            if max_samples is not None and n >= max_samples:
                return
    if not n:
        raise UserError(f"dataset {spec.label!r} ({path}) is empty")


def read_rows(spec: SourceSpec, max_samples: int | None = None) -> list[tuple[str, dict]]:
    """All rows (at most ``max_samples``) of one dataset as (where, row-dict) pairs."""
    return list(iter_rows(spec, max_samples))
