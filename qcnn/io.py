"""Atomic file writes: a reader never sees a half-written file, even if the writer is killed.

Every write goes to a uniquely named temporary file in the destination directory (``mkstemp``, with the
writer's pid in the name: two processes never share one), is flushed and ``fsync``\\ ed, then
``os.replace``\\ d over the destination; the directory is ``fsync``\\ ed so that the rename itself is
durable where the platform allows it. On any error (or interrupt) the temporary file is removed and the
destination is left as it was; a writer killed outright (SIGKILL) leaves its temporary file, which the
next write of the same destination removes once that process is gone.

This module imports nothing from qcnn, so every layer may use it.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _fsync_dir(directory: Path) -> None:
    try:  # not possible on every platform / file system
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (owned by someone else) or cannot tell: leave its file alone
    return True


def remove_orphans(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of ``path`` left by writers that were killed mid-write (their process is
    gone); a live writer's temporary file is never touched. Returns the files removed."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        if len(parts) >= 3 and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def write_with(path: str | os.PathLike, writer: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``writer(f)`` on a binary file object and atomically put what it wrote at ``path``.

    The temporary file is ``.<name>.<pid>.<random>.tmp``; temporary files of ``path`` whose writer process
    no longer exists (killed mid-write) are removed first (:func:`remove_orphans`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch  # the only torch use here; keeps this module importable without it

    return write_with(path, lambda f: torch.save(obj, f))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    return write_with(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, **dumps_kwargs) -> Path:
    """Atomically write ``obj`` as JSON (with a final newline) to ``path``."""
    return write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


def check_zip_integrity(path: str | os.PathLike) -> None:
    """Raise ValueError naming ``path`` and the damaged member if a zip archive's CRC-32 checks fail.

    ``torch.save`` files are zip archives with a CRC-32 per member, but ``torch.load`` never checks them: a
    flipped bit in a weight loads silently as a different model. Files that are not zip archives (legacy
    ``torch.save`` format) are left to their loader."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is corrupted: its zip structure cannot be read ({e})") from None
    if bad is not None:
        raise ValueError(f"{str(path)!r} is corrupted: the CRC-32 of its member {bad!r} does not match its "
                         "contents (the file changed after it was written)")


def load_torch(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``torch.load(weights_only=True)``; refuses anything but tensors and containers,
    and a file whose CRC-32 checks fail (:func:`qcnn.io.check_zip_integrity`)."""
    import torch  # the one torch dependency of this module: everything else is plain files

    path = Path(path)
    if path.is_dir():
        hint = f"; it holds {str(path / 'model.pt')!r}" if (path / "model.pt").is_file() else ""
        raise ValueError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    check_zip_integrity(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint {str(path)!r} was refused: it is corrupted or holds objects other than tensors and "
            f"plain containers (only weights_only loading is allowed) [{type(e).__name__}: {msg}]"
        ) from None


__all__ = ["check_zip_integrity", "load_torch", "remove_orphans", "save_torch", "write_bytes", "write_json",
           "write_text", "write_with"]
