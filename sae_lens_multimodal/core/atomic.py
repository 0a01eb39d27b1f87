"""Atomic writes of files and directories: readers see the old content or the new, never a half-written mix.

Every writer in the package goes through these helpers. A file is written to a hidden temporary file in the
same directory (so the final rename never crosses a filesystem) and moved into place with ``os.replace``.
A directory is assembled in a hidden temporary sibling and swapped into place; the previous directory is
moved aside first and put back if the swap fails, so a failure leaves the old directory, not a partial one.

- :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`: content we hold.
- :func:`atomic_save`: a library writes the file (``torch.save``, ``safetensors.save_file``, ``savefig``):
  it is called with the temporary path.
- :func:`atomic_directory`: a context manager yielding the temporary directory to fill.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save", "atomic_directory"]

PathLike = Union[str, "os.PathLike[str]"]
T = TypeVar("T")


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (``mkstemp`` makes it private, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_path(path: Union[str, Path]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(
    path: PathLike,
    writer: Callable[[Path], T],
    *,
    suffix: Optional[str] = None,
    fsync: bool = False,
) -> T:
    """Call ``writer(tmp_path)`` to write a temporary file next to ``path``, then move it onto ``path``.

    Use this when a library writes the file (``lambda tmp: torch.save(obj, tmp)``). ``suffix`` is the
    temporary file's suffix (default ``.tmp``); pass ``path.suffix`` when the writer picks the format from
    the name (matplotlib's ``savefig``). ``fsync=True`` flushes the file to disk before the rename (for
    caches that must survive a power loss). If ``writer`` raises, the temporary file is removed and
    ``path`` is left as it was. Returns what ``writer`` returns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" if suffix is None else suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        result = writer(tmp)
        os.chmod(tmp, _file_mode())
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return result


def atomic_write_bytes(path: PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_save(path, write, fsync=fsync)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def atomic_write_json(path: PathLike, obj: Any, *, fsync: bool = False, **dumps_kwargs: Any) -> Path:
    """Write ``json.dumps(obj, **dumps_kwargs)`` plus a final newline to ``path`` atomically; returns the path."""
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n", fsync=fsync)


def _unused_sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name next to ``path`` (reserved with mkdtemp, then freed for a rename onto it)."""
    reserved = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{tag}-"))
    os.rmdir(reserved)
    return reserved


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, mode: int = 0o755) -> Iterator[Path]:
    """Fill a directory atomically: ``with atomic_directory(out) as tmp: <write into tmp>``.

    The block writes into ``tmp``, a hidden sibling of ``path``. When the block ends normally, ``tmp`` is
    given ``mode`` (``mkdtemp`` makes it private; written folders are meant to be shared) and swapped into
    place: an existing ``path`` (folder or file) is first renamed aside, then ``tmp`` is renamed to ``path``,
    then the old one is deleted. If the block raises, ``tmp`` is deleted and ``path`` is untouched; if the
    swap fails, the old ``path`` is put back. ``path`` is therefore never a half-written folder.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new-"))
    try:
        yield tmp
        os.chmod(tmp, mode)
        old: Optional[Path] = None
        if path.exists() or path.is_symlink():
            old = _unused_sibling(path, "old")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
