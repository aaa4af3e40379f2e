"""Atomic outputs: a directory or file appears complete or not at all.

Exports, reports and merged checkpoints are written into a hidden temporary sibling and renamed
into place, so a crash, a full disk or Ctrl-C never leaves a half-written output behind, and an
existing output is only replaced when the caller allows it.

`tempfile.mkstemp` / `mkdtemp` create 0600 / 0700 (private temp files); the outputs get the
modes an ordinary `open()` / `mkdir()` would give (0666 / 0777 minus the umask, so 0644 / 0755
under the usual umask 022) before they are renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from jaxlora.errors import UserError


def current_umask() -> int:
    """The process umask (read by setting it and putting it back: POSIX has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(path: str | Path | int, *, directory: bool = False) -> None:
    """chmod a (temp) file, fd or directory to what open()/mkdir() would have created."""
    mode = (0o777 if directory else 0o666) & ~current_umask()
    if isinstance(path, int):
        os.fchmod(path, mode)
    else:
        os.chmod(path, mode)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir; on success it replaces `out_dir`, on error it is removed."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"{out} already exists and is not empty; choose another path or pass "
            "overwrite_output_dir=true (--overwrite)"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        public_mode(tmp, directory=True)
    except OSError as e:
        raise UserError(f"cannot write to {out.parent}: {e.strerror}") from None
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:  # disk full, quota, permissions: nothing half-written, one message
        shutil.rmtree(tmp, ignore_errors=True)
        kept = " (the previous output is unchanged)" if out.exists() else ""
        raise UserError(
            f"writing {out} failed: {e.strerror or e}; nothing was written{kept}"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file via temp + rename (same directory, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        public_mode(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
