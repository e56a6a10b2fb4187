"""Files and folders that appear whole: written under a temporary name, then renamed into place.

A crash (kill -9 included) leaves either the old file or the new one, never half of one, and a reader
never sees a file being written. Temporary files are named ``.<name>.<random>.tmp``: hidden, and not
ending in the real file's suffix, so readers that list ``*.json`` or ``*.npy`` skip them, and
leftovers of a killed write can be found by that pattern.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True, tmp_dir: str | os.PathLike | None = None,
                backup: Callable[[Path], Path] | None = None) -> Iterator[Path]:
    """Yield a new empty temporary file to write ``path``'s content to; when the block succeeds, rename it
    over ``path``.

    The temporary file is created exclusively in ``path``'s folder (or in ``tmp_dir``, which must be on the
    same file system), with the permissions the umask gives any new file (not ``mkstemp``'s 0600). When
    the block raises, or the rename fails, the temporary file is removed and ``path`` is left as it was.
    The folders must exist.

    Args:
        path: the file to write.
        fsync: flush the new file to disk before the rename, and the folder's entry after it, so that a
            power loss also leaves the old or the new file; caches, which are rebuilt when damaged, skip it.
        tmp_dir: where to create the temporary file instead of ``path``'s folder.
        backup: where a file already at ``path`` is kept: called with ``path``, it returns the name the
            old file is renamed to just before the new one takes its place (renamed back if that fails).
    """
    path = Path(path)
    tmp = Path(tmp_dir if tmp_dir is not None else path.parent) / f".{path.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    kept = None
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        if backup is not None and path.exists():
            kept = backup(path)
            path.rename(kept)
        os.replace(tmp, path)
        if fsync:
            fsync_folder(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):  # on a read-only disk even the clean-up can fail
            tmp.unlink(missing_ok=True)
        if kept is not None and not path.exists():
            with contextlib.suppress(OSError):
                kept.rename(path)  # the file being replaced stays where it was
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = True,
                 tmp_dir: str | os.PathLike | None = None, backup: Callable[[Path], Path] | None = None) -> Path:
    """Write ``data`` (text is encoded as UTF-8, newlines as given) to ``path`` through :func:`atomic_path`,
    with its options; return the path."""
    with atomic_path(path, fsync=fsync, tmp_dir=tmp_dir, backup=backup) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8", newline="")
        else:
            tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty hidden folder beside ``path`` to fill; when the block succeeds, rename it to ``path``.

    For content that is the same whoever builds it: where ``path`` appeared meanwhile (another process
    finished first), the staged copy is dropped and ``path`` kept. When the block raises, the staged folder
    is removed. The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    staging.mkdir()
    try:
        yield staging
        try:
            staging.rename(path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def leftover_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files that writes of ``path`` through :func:`atomic_path` left behind (killed before
    they finished), sorted; a write in progress at the same moment is listed too."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def backup_path(path: str | os.PathLike) -> Path:
    """A free name to keep a replaced file under: ``<stem>.replaced-<UTC time>[-N]<suffix>.bak`` beside it
    (a record ``x.json`` is kept as ``x.replaced-20250101T120000.000000Z.json.bak``)."""
    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    backup = path.with_name(f"{path.stem}.replaced-{stamp}{path.suffix}.bak")
    suffix = 1
    while backup.exists():  # a rename would silently replace an older backup
        backup = path.with_name(f"{path.stem}.replaced-{stamp}-{suffix}{path.suffix}.bak")
        suffix += 1
    return backup


def fsync_folder(folder: str | os.PathLike) -> None:
    """Persist the entries of ``folder`` (renames into it); folders cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    # Windows flushes only through a descriptor open for writing; POSIX accepts either.
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
