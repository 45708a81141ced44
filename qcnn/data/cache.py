"""Decoded-dataset cache.

Decoding tens of thousands of JPEGs takes a while, so decoded image sets are stored once as a ``.pt`` file
of uint8 tensors in the cache directory (``$QCNN_CACHE``, else ``~/.cache/qcnn``). The file name carries a
key computed from the source's resolved path, size and modification time (for a directory: file count,
total size and newest mtime of its files) plus a format version, so an edited or replaced source is decoded
again. Files are written to a temporary name and renamed into place (atomic), and read back with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from qcnn.io import check_zip_integrity, save_torch

FORMAT_VERSION = 1


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``override``, else ``$QCNN_CACHE``, else ``~/.cache/qcnn``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("QCNN_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qcnn"


def source_fingerprint(path: str | os.PathLike) -> str:
    """Identity of a source file or directory: resolved path + size + mtime (aggregated for directories)."""
    p = Path(path).resolve()
    if p.is_dir():
        count = size = newest = 0
        for dirpath, _, files in os.walk(p):
            for f in files:
                st = os.stat(os.path.join(dirpath, f))
                count += 1
                size += st.st_size
                newest = max(newest, st.st_mtime_ns)
        return f"{p}|dir|{count}|{size}|{newest}"
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}"


def cache_path(name: str, source: str | os.PathLike, tag: str = "", root: str | os.PathLike | None = None) -> Path:
    key = hashlib.sha1(f"{source_fingerprint(source)}|{tag}|v{FORMAT_VERSION}".encode()).hexdigest()[:16]
    return cache_dir(root) / f"{name}-{Path(source).stem}-{key}.pt"


save_atomic = save_torch  #: ``torch.save`` atomically (:func:`qcnn.io.save_torch`)


def load_cached(path: Path) -> dict | None:
    """The cached dict, or None when absent or unreadable (a corrupt entry is decoded again)."""
    if not path.is_file():
        return None
    try:
        check_zip_integrity(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
