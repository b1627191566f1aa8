"""Atomic file writes: everything kedit writes (deltas, statistics, caches, reports, records) goes
through here, so a reader, or a process killed mid-write, never sees a partial file.

A file is written to a temporary name in its own directory, flushed to disk, then renamed over the
target (``os.replace`` is atomic on POSIX and Windows). A write that fails (a full disk included: it is
raised as ``OSError(ENOSPC)`` whatever the writer called it) removes the temporary file and leaves the
target as it was."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic", "write_json_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; write the file there. On a clean exit it is synced and
    renamed to ``path``; on an error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
    try:
        yield tmp
        with open(tmp, "rb") as written:  # on disk before the rename, so a crash cannot leave a torn file
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        # Writers report a full disk in their own ways (safetensors: SafetensorError "os error 28", torch.save:
        # RuntimeError "file write failed"); say it as the OSError it is, checked before the space is freed.
        full = isinstance(exc, Exception) and not isinstance(exc, OSError) and _disk_full(path.parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise


def _disk_full(directory: Path) -> bool:
    try:
        stats = os.statvfs(directory)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False
    return stats.f_bavail * stats.f_frsize < (1 << 16)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """``data`` as JSON (UTF-8, non-JSON values through ``str``), newline-terminated."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=str) + "\n"
    return write_text_atomic(path, text)
